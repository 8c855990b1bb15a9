"""Inline PTX for the Triton-lowered scan kernels: single-instruction maths (``FastMath``) and
the warp shuffles of the backward (``Warp``). In interpret mode (the CPU tests) each helper
evaluates the same formula with jnp, or permutes the vector as the shuffle would.
"""
from __future__ import annotations

import jax
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from toppax.pallas_kernels.common import LOG2E, softplus_series


def _asm(code, args, constraints, dtype=None):
  x = args[0]
  shape = jnp.shape(x)
  return pltriton.elementwise_inline_asm(
      code, args=args, constraints=constraints, pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(shape, dtype or x.dtype)])[0]


class FastMath:
  """exp2, log2 and reciprocal as single MUFU instructions (PTX ``ex2/lg2/rcp.approx.ftz``), and
  multiply-add as one FFMA (``fma``).

  Triton otherwise emits jnp.exp2 and 1/x as denormal-safe sequences and jnp.log2 as a libdevice
  polynomial, several times the instructions of these. The approximations are within 2 ulp
  (ex2, rcp) and 2^-22 absolute (lg2); ftz flushes only results below 1e-38.
  """

  def __init__(self, interpret):
    self.interpret = interpret

  def _approx(self, op, x):
    return _asm(f"{op}.approx.ftz.f32 $0, $1;", [x], "=r,r")

  def exp2(self, x):
    return jnp.exp2(x) if self.interpret else self._approx("ex2", x)

  def log2(self, x):
    return jnp.log2(x) if self.interpret else self._approx("lg2", x)

  def rcp(self, x):
    return 1.0 / x if self.interpret else self._approx("rcp", x)

  def softplus(self, x):
    return softplus_series(x, self.exp2, self.log2, self.fma)

  def sigmoid(self, x):
    return self.rcp(1.0 + self.exp2(x * -LOG2E))

  def fma(self, a, b, c):
    """a b + c with one rounding (PTX ``fma.rn.f32``; operands broadcast). XLA compiles these
    kernels (custom call ``__gpu$xla.gpu.triton``) with floating-point contraction off, so a
    jnp ``a * b + c`` stays an FMUL and an FADD; the kernels' hot multiply-adds use this."""
    if self.interpret:
      return a * b + c
    shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b), jnp.shape(c))
    args = [jnp.broadcast_to(jnp.asarray(v, jnp.float32), shape) for v in (a, b, c)]
    return _asm("fma.rn.f32 $0, $1, $2, $3;", args, "=r,r,r,r", jnp.float32)


class Warp:
  """Cross-lane work for the backward: a (BD,) vector with BD = 32 x warps holds one channel per
  thread (element i on lane i % 32 of warp i // 32), so ``shfl.sync`` exchanges values between
  the channels of a warp."""

  def __init__(self, interpret, block_d):
    self.interpret = interpret
    self.lane = jnp.arange(block_d, dtype=jnp.int32) & 31

  def shfl_xor(self, x, offset):
    """Every lane gets lane ``lane ^ offset``'s x (``shfl.sync.bfly``)."""
    if self.interpret:
      return x[jnp.arange(x.shape[0], dtype=jnp.int32) ^ offset]
    return _asm(f"shfl.sync.bfly.b32 $0, $1, {offset}, 0x1f, 0xffffffff;", [x], "=r,r")

  def shfl_idx(self, x, src):
    """Every lane gets lane ``src`` (a per-lane int32 vector) of its warp's x (shfl.sync.idx)."""
    if self.interpret:
      return x[(jnp.arange(x.shape[0], dtype=jnp.int32) & ~31) + src]
    return _asm("shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", [x, src], "=r,r,r")

  def state_order(self, m):
    """The lane-dependent order of m per-state registers that makes ``reduce_scatter`` need no
    selects: lane L keeps state k ^ order[L] in its register k. order[L] has, for each halving
    level of the reduce-scatter (lane offset o, half h of the values still held), the bit h set
    when lane L has bit o set; so the registers a lane ships at a level (its upper half) hold
    the states its partner keeps (the partner's lower half), and vice versa."""
    order, length = jnp.zeros_like(self.lane), m
    for offset in (16, 8, 4, 2, 1):
      if length > 1:
        length //= 2
        order = order + jnp.where((self.lane & offset) != 0, length, 0)
    return order

  @staticmethod
  def permute(vals, order):
    """Register k of the result holds vals[k ^ order] (lane-dependent XOR of the index, by
    selects one bit at a time; a permutation that is its own inverse)."""
    bit = 1
    while bit < len(vals):
      flip = (order & bit) != 0
      vals = [jnp.where(flip, vals[k ^ bit], vals[k]) for k in range(len(vals))]
      bit *= 2
    return vals

  def reduce_scatter(self, vals, scale=None):
    """Sums m (BD,) vectors (times ``scale``, a (BD,) vector, if given), held in
    ``state_order(m)``, over the 32 lanes of each warp and spreads the m sums over the lanes:
    returns a list whose entry k is, on lane L, the warp total of state k ^ state_order(m)[L].
    Each halving level keeps the lower half of the list and ships the upper half to the partner
    lane: m - 1 shuffles and adds for m values, plus one per level left once a single value
    remains (5 per state if each were summed on its own)."""
    if scale is not None:
      vals = [v * scale for v in vals]
    for offset in (16, 8, 4, 2, 1):
      if len(vals) > 1:
        half = len(vals) // 2
        vals = [vals[j] + self.shfl_xor(vals[j + half], offset) for j in range(half)]
      else:
        vals = [vals[0] + self.shfl_xor(vals[0], offset)]
    return vals
