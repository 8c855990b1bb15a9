"""XLA implementations of the selective scan: the readable ``lax.scan`` ground truth and the
portable ``associative_scan`` fallback.

Both take already-prepared float inputs (see ``ops._prepare``): ``delta`` is the effective
step (bias added, softplus applied), ``delta_gap`` the extra decay ``g_t * Δ̃_t`` accumulated
over pruned positions (DESIGN §3), or ``None``. The state and every accumulation are in
``compute_dtype`` (float32, or float64 when the inputs are float64).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _flip(x, reverse):
  return None if x is None else (jnp.flip(x, axis=1) if reverse else x)


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

  h0 = jnp.zeros((batch, dim, n), u.dtype)
  _, ys = jax.lax.scan(step, h0, xs, reverse=reverse)
  return jnp.swapaxes(ys, 0, 1)


def scan_associative(u, delta, A, B, C, delta_gap=None, *, reverse=False):
  """Same recurrence as ``scan_reference`` as a parallel prefix over (decay, input) pairs."""
  decay = delta if delta_gap is None else delta + delta_gap
  a = jnp.exp(decay[..., None] * A)                              # (batch, L, D, N)
  b = (delta * u)[..., None] * B[:, :, None, :]                  # (batch, L, D, N)

  def combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r

  _, h = jax.lax.associative_scan(combine, (a, b), axis=1, reverse=reverse)
  return jnp.einsum("bldn,bln->bld", h, C, precision="highest")


def masked_full_scan(u, delta, A, B, C, keep, gap_delta, *, reverse=False):
  """The alignment oracle of DESIGN §3: a full-length scan in which pruned positions
  (``keep == False``) get ``u = 0`` and ``Δ = gap_delta`` (already effective, per position),
  read back by the caller at kept positions. Prepared inputs as above."""
  keep = keep[..., None].astype(u.dtype)
  u = u * keep
  delta = delta * keep + gap_delta * (1 - keep)
  return scan_reference(u, delta, A, B, C, reverse=reverse)
