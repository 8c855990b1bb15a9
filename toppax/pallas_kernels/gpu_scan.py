"""``"pallas_gpu"``: the selective scan on NVIDIA GPUs, launched here; the kernel bodies are in
``gpu_kernels`` (Triton-lowered Pallas) and ``mgpu_scan`` (Mosaic GPU). docs/kernels.md
describes their design.

The inference forward runs on Mosaic GPU where it can (an sm_90+ GPU, D a multiple of 128, and
it compiles; ``GpuTuning.fwd_backend="triton"`` turns it off), because it measured faster than
the Triton forward. The training forward (which also writes the checkpoints), the backward and
every other case run the Triton kernels, which implement every option. Triton suits the
per-thread sequential recurrence (registers of any power-of-two shape, the kernel's own scalar
loads, inline PTX including warp shuffles) but leaves register allocation to ptxas, so the
backward runs under a register cap (``register_cap``).

Forward: grid (D / BD, batch); a program walks the L steps of one sequence for BD channels.
The training forward stores the fp32 state every ``ckpt_every`` steps, with the partial chunk
first in scan order so every stored interval is whole. Backward: grid (D / 32 x warps, batch),
one channel per thread; dB and dC are written as one partial per warp, dA, dD and
d(delta_bias) per batch element, and XLA sums the partials, so no atomics are used and the
gradients are bitwise deterministic. More states than ``fwd_states`` / ``bwd_states`` (after
N is padded to a power of two) are split into groups, one program each (a leading grid axis),
whose partial outputs XLA adds: the kernels are unrolled over their states, and Triton's compile
time grows faster than their code.

jax 0.11 deprecates Pallas' Triton backend; where it no longer lowers, the op runs "xla"
instead, with a warning.
"""
from __future__ import annotations

import functools
import math

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from toppax.pallas_kernels import register_cap
from toppax.pallas_kernels.common import sigmoid
from toppax.pallas_kernels.gpu_kernels import bwd_kernel, fwd_kernel
from toppax.pallas_kernels.scan_call import Kernels, ScanArgs, out_types
from toppax.pallas_kernels.tuning import GpuTuning

BWD_SUB_CHUNK = 2                       # bwd_chunk None: this, where it divides ckpt_every
WIDE_CHANNELS = 65536                   # batch x D from which a forward thread holds 2 channels

_SQUEEZED = pl.squeezed if hasattr(pl, "squeezed") else None
_CompilerParams = getattr(pltriton, "CompilerParams", None) or getattr(pltriton,
                                                                      "TritonCompilerParams")


def _pow2(n):
  return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _padded_state(args):
  """A^T (N', D) and B, C with N padded to a power of two (Triton tiles); padded states stay 0."""
  n = args.A.shape[1]
  n2 = _pow2(n)
  at = args.A.astype(jnp.float32).T
  B, C = args.B, args.C
  if n2 != n:
    at = jnp.pad(at, ((0, n2 - n), (0, 0)))
    B = jnp.pad(B, ((0, 0), (0, 0), (0, n2 - n)))
    C = jnp.pad(C, ((0, 0), (0, 0), (0, n2 - n)))
  return at, B, C, n2


def _states(per_program, n):
  """(states per program, groups) for n states (a power of two) and the tuning's limit."""
  states = min(n, per_program)
  return states, n // states            # both powers of two


class _Grid:
  """The grid and BlockSpecs of both kernels. Index maps are written over (d, b, g): block of
  channels, batch element, state group. With state groups, g is the grid's first axis, so the
  groups of one block of channels run next to each other and share its rows in L2."""

  def __init__(self, cfg, length, block_d, n, n_d, batch, groups):
    self.length, self.block_d, self.n, self.groups = length, block_d, n, groups
    self.grid = (groups, n_d, batch) if groups > 1 else (n_d, batch)
    self.seq = self.spec((_SQUEEZED, length, block_d), lambda d, b, g: (b, 0, d))
    state_in = self.spec((_SQUEEZED, length, n), lambda d, b, g: (b, 0, g))
    vec = self.spec((block_d,), lambda d, b, g: (d,))
    self.in_specs = [self.seq, self.seq] + ([self.seq] if cfg.has_z else []) + [state_in] * 2
    if cfg.gap_delta is not None:
      self.in_specs.append(self.spec((_SQUEEZED, length), lambda d, b, g: (b, 0)))
    self.in_specs += [self.spec((n, block_d), lambda d, b, g: (g, d)), vec, vec]

  def spec(self, shape, f):
    if self.groups > 1:
      return pl.BlockSpec(shape, lambda g, d, b: f(d, b, g))
    return pl.BlockSpec(shape, lambda d, b: f(d, b, 0))

  def checkpoints(self, n_ck):
    return self.spec((_SQUEEZED, n_ck, self.n, self.block_d), lambda d, b, g: (b, 0, g, d))

  def outputs(self, xs):
    """Shapes and specs of per-channel outputs shaped like xs, (batch, ..., D) arrays or
    ShapeDtypeStructs (a program writes its block of D): those, or with state groups one fp32
    partial per group in front (``total`` adds them)."""
    xs = list(xs)
    if not xs:
      return [], []
    mid = xs[0].shape[1:-1]
    assert all(x.shape[1:-1] == mid for x in xs)
    block = (_SQUEEZED,) + mid + (self.block_d,)
    at = lambda d, b: (b,) + (0,) * len(mid) + (d,)
    if self.groups == 1:
      return ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs],
              [self.spec(block, lambda d, b, g: at(d, b))] * len(xs))
    return ([jax.ShapeDtypeStruct((self.groups,) + x.shape, jnp.float32) for x in xs],
            [self.spec((_SQUEEZED,) + block, lambda d, b, g: (g,) + at(d, b))] * len(xs))

  def total(self, out, like):
    return out if self.groups == 1 else out.sum(0).astype(like.dtype)


def _inputs(cfg, args, at, B, C):
  xs = [args.u, args.delta] + ([args.z] if cfg.has_z else []) + [B, C]
  if cfg.gap_delta is not None:
    xs.append(args.gaps)
  return xs + [at, args.D.astype(jnp.float32), args.delta_bias.astype(jnp.float32)]


def _nbytes(*xs):
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in xs))


def forward(cfg, args, save):
  """(y, checkpoints or None) of the scan; ``save``: the training forward, which also stores
  the state every ``ckpt_every`` steps for the backward."""
  if not save:
    try:
      from toppax.pallas_kernels import mgpu_scan
    except ImportError:                 # a jax without Pallas' Mosaic GPU backend
      mgpu_scan = None
    if mgpu_scan is not None and mgpu_scan.usable(cfg, args):
      return mgpu_scan.forward(cfg, args), None
  tuning = cfg.tuning
  batch, length, dim = args.u.shape
  at, B, C, n_all = _padded_state(args)
  n, groups = _states(tuning.fwd_states, n_all)
  chunk = tuning.ckpt_every if save else tuning.fwd_chunk
  wide = batch * dim >= WIDE_CHANNELS
  block_d = min(tuning.block_d or (64 if wide else 32), _pow2(dim))
  rows_ahead = tuning.rows_ahead or (2 if wide else 4)
  grid = _Grid(cfg, length, block_d, n, pl.cdiv(dim, block_d), batch, groups)
  out_shape, out_specs = grid.outputs([args.u])
  if save:
    n_ck = max(length // chunk, 1)
    out_shape.append(jax.ShapeDtypeStruct((batch, n_ck, n_all, dim), jnp.float32))
    out_specs.append(grid.checkpoints(n_ck))
  xs = _inputs(cfg, args, at, B, C)
  elems = batch * length * dim * n_all
  kernel = functools.partial(fwd_kernel, cfg=cfg, length=length, block_d=block_d, dim=dim, n=n,
                             chunk=chunk, save=save, rows_ahead=rows_ahead, groups=groups)
  outs = pl.pallas_call(
      kernel, grid=grid.grid, in_specs=grid.in_specs, out_specs=out_specs,
      out_shape=out_types(out_shape, args),
      interpret=cfg.interpret,
      name=register_cap.kernel_name("selective_scan_fwd", tuning.maxnreg),
      # Triton does not software-pipeline these loops: more stages leave the code as it is.
      compiler_params=_CompilerParams(num_warps=tuning.num_warps, num_stages=1),
      cost_estimate=pl.CostEstimate(flops=7 * elems, transcendentals=elems + 2 * elems // n_all,
                                    bytes_accessed=_nbytes(*xs, *out_shape)),
  )(*xs)
  return grid.total(outs[0], args.u), (outs[1] if save else None)


def backward(cfg, args, ckpt, dy):
  """The cotangents of every input (``ScanArgs``) from the checkpoints and dy."""
  tuning = cfg.tuning
  batch, length, dim = args.u.shape
  n_orig = args.A.shape[1]
  at, B, C, n_all = _padded_state(args)
  n, groups = _states(tuning.bwd_states, n_all)
  chunk = tuning.ckpt_every
  # The checkpoints were written with the forward's block_d and state groups; any block_d and
  # groups read them (D is the checkpoints' last axis, N the one before), so the backward
  # picks its own.
  warps = tuning.bwd_num_warps
  block_d = 32 * warps                  # one channel per thread: the shuffles need whole warps
  n_d = pl.cdiv(dim, block_d)
  grid = _Grid(cfg, length, block_d, n, n_d, batch, groups)
  in_specs = grid.in_specs + [grid.checkpoints(ckpt.shape[1]), grid.seq]
  xs = _inputs(cfg, args, at, B, C) + [ckpt, dy]

  f32, sq = jnp.float32, _SQUEEZED
  seq_outs = [args.u, args.delta] + ([args.z] if cfg.has_z else [])   # du, dΔ (, dz)
  out_shape, out_specs = grid.outputs(seq_outs)
  n_part = n_d * warps                  # dB, dC: one partial sum per warp
  part_seq = grid.spec((warps if warps > 1 else sq, sq, length, n), lambda d, b, g: (d, b, 0, g))
  out_shape += [jax.ShapeDtypeStruct((n_part, batch, length, n_all), f32)] * 2
  out_specs += [part_seq, part_seq]
  out_shape.append(jax.ShapeDtypeStruct((batch, n_all, dim), f32))
  out_specs.append(grid.spec((sq, n, block_d), lambda d, b, g: (b, g, d)))
  n_vec = 3 if cfg.gap_delta == "bias" else 2                     # dD, dbias (, dtilde)
  vec_shape, vec_specs = grid.outputs([jax.ShapeDtypeStruct((batch, dim), f32)] * n_vec)
  out_shape += vec_shape
  out_specs += vec_specs

  elems = batch * length * dim * n_all
  sub = tuning.bwd_chunk
  if sub is None:
    # The default sub-chunk applies where it divides the checkpoint interval; an interval it
    # does not divide (ckpt_every=3) is processed whole.
    sub = BWD_SUB_CHUNK if chunk % BWD_SUB_CHUNK == 0 else chunk
  kernel = functools.partial(bwd_kernel, cfg=cfg, length=length, block_d=block_d, dim=dim, n=n,
                             chunk=chunk, sub=sub, warps=warps, groups=groups)
  outs = pl.pallas_call(
      kernel, grid=grid.grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_types(out_shape, args),
      interpret=cfg.interpret,
      name=register_cap.kernel_name("selective_scan_bwd", tuning.bwd_maxnreg),
      compiler_params=_CompilerParams(num_warps=warps, num_stages=1),
      cost_estimate=pl.CostEstimate(flops=25 * elems,
                                    transcendentals=2 * elems + 4 * elems // n_all,
                                    bytes_accessed=_nbytes(*xs, *out_shape)),
  )(*xs)
  outs = list(outs)
  grads = [grid.total(outs.pop(0), x) for x in seq_outs]
  du, ddelta = grads[0], grads[1]
  dz = grads[2] if cfg.has_z else None
  dB_p, dC_p, dA_p, dD_p, dbias_p = (outs.pop(0) for _ in range(5))
  dtilde_p = outs.pop(0) if cfg.gap_delta == "bias" else None
  # Every state group accumulates the same dD = Σ dy u (it needs no state): group 0's is taken.
  # The bias gradients are sums of the groups' terms.
  dD_p = dD_p[0] if groups > 1 else dD_p
  dbias_p = grid.total(dbias_p, dbias_p)
  dtilde_p = None if dtilde_p is None else grid.total(dtilde_p, dtilde_p)
  dB, dC = dB_p.sum(0), dC_p.sum(0)
  dbias = dbias_p.sum(0)
  if dtilde_p is not None:
    dtilde = dtilde_p.sum(0)
    bias = args.delta_bias.astype(f32)
    dbias = dbias + (dtilde * sigmoid(bias) if cfg.delta_softplus else dtilde)
  return ScanArgs(
      u=du, delta=ddelta,
      A=dA_p.sum(0).T[:, :n_orig].astype(args.A.dtype),
      B=dB[..., :n_orig].astype(args.B.dtype),
      C=dC[..., :n_orig].astype(args.C.dtype),
      D=dD_p.sum(0).astype(args.D.dtype), z=dz,
      delta_bias=dbias.astype(args.delta_bias.dtype),
      gaps=None if args.gaps is None else jnp.zeros_like(args.gaps))


KERNELS = Kernels("pallas_gpu", forward, backward, GpuTuning)
