"""XLA implementations of the selective scan: the readable ``lax.scan`` ground truth and the
portable ``associative_scan`` fallback.

Both take already-prepared float inputs (``ops._xla_impl`` prepares them with
``effective_delta`` and ``gap_decay``): ``delta`` is the effective step (bias added, softplus
applied), ``delta_gap`` the extra decay ``g_t * Δ̃_t`` accumulated over pruned positions
(docs/design.md#token-pruning), or ``None``. The state and every accumulation are in
``compute_dtype`` (float32, or float64 when the inputs are float64).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from toppax.pallas_kernels.common import vary, varying_axes


def scan_reference(u, delta, A, B, C, delta_gap=None, *, reverse=False):
  """``h_t = exp((Δ_t + G_t) A) h_{t-1} + Δ_t B_t u_t``, ``y_t = C_t · h_t`` by ``lax.scan``.

  Shapes: u, delta, delta_gap (batch, L, D); B, C (batch, L, N); A (D, N). Returns y (batch, L, D)
  without the D skip and gate (added by the caller).
  """
  batch, _, dim = u.shape
  n = A.shape[1]
  decay = delta if delta_gap is None else delta + delta_gap
  xs = tuple(jnp.swapaxes(x, 0, 1) for x in (u, delta, decay, B, C))

  def step(h, x):
    u_t, d_t, dec_t, b_t, c_t = x
    h = jnp.exp(dec_t[:, :, None] * A) * h + (d_t * u_t)[:, :, None] * b_t[:, None, :]
    return h, jnp.einsum("bdn,bn->bd", h, c_t, precision="highest")

  # Inside a shard_map with check_vma=True the carry must have the type of the step's output,
  # which varies over the axes of its inputs; plain zeros vary over none.
  h0 = vary(jnp.zeros((batch, dim, n), u.dtype), varying_axes(*xs, A))
  _, ys = jax.lax.scan(step, h0, xs, reverse=reverse)
  return jnp.swapaxes(ys, 0, 1)


def zero_free_length(n: int) -> int:
  """The smallest length >= n at which ``lax.associative_scan`` makes no zero-sized arrays.

  Its odd/even recursion halves the length level by level (n, n // 2, n // 4, ...), and a level
  of exactly 2 elements combines two empty slices: that happens when n's two leading bits are
  ``10`` (n = 8, 9, 157, ...). jaxlib 0.11's SPMD partitioner crashes (segfault) on such empty
  arrays when they are residuals saved across a ``shard_map`` (toppax.sharding.apply_model), so
  ``scan_associative`` pads those lengths up to the next length with leading bits ``11``
  (at most 1.5x, and none at ViM's L = 197).
  """
  if n < 2:
    return n
  k = n.bit_length()
  return n if (n >> (k - 2)) == 0b11 else 3 << (k - 2)


def scan_associative(u, delta, A, B, C, delta_gap=None, *, reverse=False):
  """Same recurrence as ``scan_reference`` as a parallel prefix over (decay, input) pairs."""
  decay = delta if delta_gap is None else delta + delta_gap
  a = jnp.exp(decay[..., None] * A)                              # (batch, L, D, N)
  b = (delta * u)[..., None] * B[:, :, None, :]                  # (batch, L, D, N)
  length = a.shape[1]
  pad = zero_free_length(length) - length
  if pad:   # identity pairs (1, 0) after the end: no effect on any h_t in either direction
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    a, b = jnp.pad(a, widths, constant_values=1), jnp.pad(b, widths)

  def combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r

  _, h = jax.lax.associative_scan(combine, (a, b), axis=1, reverse=reverse)
  return jnp.einsum("bldn,bln->bld", h[:, :length], C, precision="highest")
