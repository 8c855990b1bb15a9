"""Launches the Triton-lowered Pallas scan kernels (``gpu_kernels``): ``GpuTuning(kernels=
"pallas_triton")``, and what ``gpu_scan`` runs where jax-triton is missing.

jax 0.11 deprecates Pallas' Triton backend (every lowering warns); these kernels stay selectable
while jax ships it. They run the same algorithm as the Triton kernels (``triton_kernels``) and
write their outputs in the same layout, which ``gpu_scan`` prepares and reduces. Pallas' own
interpreter runs them with ``interpret=True`` (no torch needed).
"""
from __future__ import annotations

import functools
import math

from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from toppax.pallas_kernels import register_cap
from toppax.pallas_kernels.gpu_kernels import bwd_kernel, fwd_kernel
from toppax.pallas_kernels.scan_call import out_types

_SQUEEZED = pl.squeezed if hasattr(pl, "squeezed") else None
_CompilerParams = getattr(pltriton, "CompilerParams", None) or getattr(pltriton,
                                                                      "TritonCompilerParams")


class _Grid:
  """The grid and BlockSpecs of both kernels. Index maps are written over (d, b, g): block of
  channels, batch element, state group. With state groups, g is the grid's first axis, so the
  groups of one block of channels run next to each other and share its rows in L2."""

  def __init__(self, cfg, st):
    length, block_d, n, groups = st.length, st.block_d, st.n, st.groups
    self.block_d, self.groups = block_d, groups
    n_d = pl.cdiv(st.dim, block_d)
    self.grid = (groups, n_d, st.batch) if groups > 1 else (n_d, st.batch)
    self.seq = self.spec((_SQUEEZED, length, block_d), lambda d, b, g: (b, 0, d))
    state_in = self.spec((_SQUEEZED, length, n), lambda d, b, g: (b, 0, g))
    vec = self.spec((block_d,), lambda d, b, g: (d,))
    self.in_specs = [self.seq, self.seq] + ([self.seq] if cfg.has_z else []) + [state_in] * 2
    if cfg.gap_delta is not None:
      self.in_specs.append(self.spec((_SQUEEZED, length), lambda d, b, g: (b, 0)))
    self.in_specs += [self.spec((n, block_d), lambda d, b, g: (g, d)), vec, vec]
    self.n = n

  def spec(self, shape, f):
    if self.groups > 1:
      return pl.BlockSpec(shape, lambda g, d, b: f(d, b, g))
    return pl.BlockSpec(shape, lambda d, b: f(d, b, 0))

  def checkpoints(self, n_ck):
    return self.spec((_SQUEEZED, n_ck, self.n, self.block_d), lambda d, b, g: (b, 0, g, d))

  def per_channel(self, shape):
    """The spec of a per-channel output of ``shape`` ((batch, ..., D), or with state groups
    (groups, batch, ..., D)): a program writes its block of D."""
    mid = shape[2:-1] if self.groups > 1 else shape[1:-1]
    block = (_SQUEEZED,) + mid + (self.block_d,)
    at = lambda d, b: (b,) + (0,) * len(mid) + (d,)
    if self.groups == 1:
      return self.spec(block, lambda d, b, g: at(d, b))
    return self.spec((_SQUEEZED,) + block, lambda d, b, g: (g,) + at(d, b))


def _nbytes(*xs):
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in xs))


def forward(cfg, st, xs, out_shapes, args):
  """The forward's outputs: y (or its per-group partials) and, with ``st.save``, checkpoints."""
  grid = _Grid(cfg, st)
  out_specs = [grid.per_channel(out_shapes[0].shape)]
  if st.save:
    out_specs.append(grid.checkpoints(out_shapes[1].shape[1]))
  elems = st.batch * st.length * st.dim * st.n_all
  kernel = functools.partial(fwd_kernel, cfg=cfg, length=st.length, block_d=st.block_d,
                             dim=st.dim, n=st.n, chunk=st.chunk, save=st.save,
                             rows_ahead=st.rows_ahead, groups=st.groups)
  return pl.pallas_call(
      kernel, grid=grid.grid, in_specs=grid.in_specs, out_specs=out_specs,
      out_shape=out_types(out_shapes, args), interpret=cfg.interpret,
      name=register_cap.kernel_name("selective_scan_fwd", st.maxnreg),
      # Triton does not software-pipeline these loops: more stages leave the code as it is.
      compiler_params=_CompilerParams(num_warps=cfg.tuning.num_warps, num_stages=1),
      cost_estimate=pl.CostEstimate(flops=7 * elems, transcendentals=elems + 2 * elems // st.n_all,
                                    bytes_accessed=_nbytes(*xs, *out_shapes)),
  )(*xs)


def backward(cfg, st, xs, out_shapes, args):
  """The backward's outputs, in ``gpu_scan.backward``'s order: du, dΔ (, dz) or their partials,
  the dB and dC partials, dA, dD, dbias (, dtilde) per batch element (or group)."""
  grid = _Grid(cfg, st)
  sq = _SQUEEZED
  in_specs = grid.in_specs + [grid.checkpoints(xs[-2].shape[1]), grid.seq]
  n_seq = 3 if cfg.has_z else 2
  out_specs = [grid.per_channel(s.shape) for s in out_shapes[:n_seq]]
  part_seq = grid.spec((st.warps if st.warps > 1 else sq, sq, st.length, st.n),
                       lambda d, b, g: (d, b, 0, g))
  out_specs += [part_seq, part_seq]
  out_specs.append(grid.spec((sq, st.n, st.block_d), lambda d, b, g: (b, g, d)))
  out_specs += [grid.per_channel(s.shape) for s in out_shapes[n_seq + 3:]]
  elems = st.batch * st.length * st.dim * st.n_all
  kernel = functools.partial(bwd_kernel, cfg=cfg, length=st.length, block_d=st.block_d,
                             dim=st.dim, n=st.n, chunk=st.chunk, sub=st.sub, warps=st.warps,
                             groups=st.groups)
  return pl.pallas_call(
      kernel, grid=grid.grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_types(out_shapes, args), interpret=cfg.interpret,
      name=register_cap.kernel_name("selective_scan_bwd", st.maxnreg),
      compiler_params=_CompilerParams(num_warps=st.warps, num_stages=1),
      cost_estimate=pl.CostEstimate(flops=25 * elems,
                                    transcendentals=2 * elems + 4 * elems // st.n_all,
                                    bytes_accessed=_nbytes(*xs, *out_shapes)),
  )(*xs)
