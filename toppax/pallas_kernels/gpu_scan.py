"""``"pallas_gpu"``: the selective scan on NVIDIA GPUs. This module prepares a call (padding,
state groups, tuning), launches its kernels and reduces their partial outputs; docs/kernels.md
describes the kernels' design.

Kernels:
- the Triton kernels (``triton_kernels``, launched by ``triton_scan`` through jax-triton): the
  training forward (which also writes the checkpoints), the backward, and every inference
  forward that Mosaic GPU does not take. ``GpuTuning.kernels="triton"``, the default.
- the Mosaic GPU inference forward (``mgpu_scan``) where it can run (an sm_90+ GPU, D a
  multiple of 128, and it compiles; ``GpuTuning.fwd_backend="triton"`` turns it off), because it
  measured faster than the Triton forward.
- the same algorithm as Triton-lowered Pallas kernels (``gpu_kernels``, launched by
  ``pallas_triton_scan``): ``GpuTuning.kernels="pallas_triton"``. jax 0.11 deprecates Pallas'
  Triton backend, so they are not the default; they stay selectable while jax ships it, and run
  where jax-triton is missing (with a warning that says how to install it).

Why Triton through jax-triton for training: the recurrence runs one channel per thread with all
its states in registers, and the backward's dB/dC sums cross lanes by warp shuffles; Triton's
language expresses exactly that (inline PTX, per-thread scalar loads of B_t and C_t) and
compiles the tuned algorithm to the same instructions as the Pallas kernels did, under the
register cap the backward needs (``tools.kernel_sass`` compares them; docs/benchmarks.md has
the timings). Mosaic GPU lowers no warp shuffle and no register cap, and has no scan rule: its
backward would sum dB/dC through shared memory at every step.

Forward: grid (state groups, D / BD, batch); a program walks the L steps of one sequence for BD
channels. The training forward stores the fp32 state every ``ckpt_every`` steps, with the
partial chunk first in scan order so every stored interval is whole. Backward: one channel per
thread (BD = 32 x warps); dB and dC are written as one partial per warp, dA, dD and
d(delta_bias) per batch element, and XLA sums the partials, so no atomics are used and the
gradients are bitwise deterministic. More states than ``fwd_states`` / ``bwd_states`` (after N
is padded to a power of two; by default 16, or 8 where a launch would leave SMs idle:
``states_per_program``) are split into groups, one program each, whose partial outputs XLA
adds: the kernels are unrolled over their states, and Triton's compile time grows faster than
their code.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp

from toppax.pallas_kernels.common import sigmoid
from toppax.pallas_kernels.scan_call import Kernels, ScanArgs, without_batch
from toppax.pallas_kernels.triton_kernels import Static
from toppax.pallas_kernels.tuning import GpuTuning

log = logging.getLogger(__name__)

BWD_SUB_CHUNK = 2                       # bwd_chunk None: this, where it divides ckpt_every
WIDE_CHANNELS = 65536                   # batch x D from which a forward thread holds 2 channels


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


def states_per_program(value, batch, dim, block_d, sm_count):
  """The tuning's states per program, or for None: 16, but 8 where a launch of 16 would have
  fewer programs (batch x D / block_d) than the GPU has SMs (``sm_count``; None: unknown, 16).
  Such a launch leaves SMs idle while each program walks the whole sequence; two state groups
  double the programs. On an H100 (132 SMs) at the UperNet ViM-T scan (batch 8, D 384: 96
  programs) that takes the forward+backward from 1.42 to 1.14 ms; at ViM-S classification
  (batch 128: 3,072 programs) 16 states measure faster."""
  if value is not None:
    return value
  if sm_count and batch * -(-dim // block_d) < sm_count:
    return 8
  return 16


def _sm_count(cfg):
  """The GPU's SM count (None in interpret mode or where jax does not report it)."""
  if cfg.interpret:
    return None
  device = jax.devices()[0]
  return getattr(device, "core_count", None) if device.platform == "gpu" else None


def _inputs(cfg, args, at, B, C):
  xs = [args.u, args.delta] + ([args.z] if cfg.has_z else []) + [B, C]
  if cfg.gap_delta is not None:
    xs.append(args.gaps)
  return xs + [at, args.D.astype(jnp.float32), args.delta_bias.astype(jnp.float32)]


_warned = set()


def kernels_for(cfg) -> str:
  """The kernels that run a call: ``tuning.kernels``, except that the Triton kernels need
  jax-triton on a GPU and torch in interpret mode (Triton's interpreter); without them the
  Pallas-Triton kernels run, with a warning (once) that says what to install."""
  choice = cfg.tuning.kernels
  if choice != "triton":
    return choice
  from toppax.pallas_kernels import triton_scan
  why = triton_scan.interpreter_unavailable() if cfg.interpret else triton_scan.unavailable()
  if why is None:
    return choice
  if why not in _warned:
    _warned.add(why)
    fix = "pip install torch" if cfg.interpret else "pip install 'jax-triton>=0.3.1' (toppax[gpu])"
    log.warning("selective_scan: %s; running the Pallas-Triton kernels instead, which jax "
                "deprecates: %s", why, fix)
  return "pallas_triton"


def _launch(cfg, st, xs, out_shapes, args, num_warps):
  if kernels_for(cfg) == "triton":
    from toppax.pallas_kernels import triton_scan
    return triton_scan.call(st, xs, out_shapes, num_warps)
  from toppax.pallas_kernels import pallas_triton_scan
  launch = pallas_triton_scan.forward if st.kind == "fwd" else pallas_triton_scan.backward
  return list(launch(cfg, st, xs, out_shapes, args))


def _static(cfg, args, kind, n_all, n, block_d, chunk, **kw):
  batch, length, dim = args.u.shape
  return Static(kind=kind, reverse=cfg.reverse, delta_softplus=cfg.delta_softplus,
                gap_delta=cfg.gap_delta, has_z=cfg.has_z, interpret=cfg.interpret, batch=batch,
                length=length, dim=dim, n_all=n_all, n=n, block_d=block_d, chunk=chunk, **kw)


def _per_channel(st, x):
  """The output shape of a per-channel array shaped like x: x's, or with state groups one fp32
  partial per group in front (``_total`` adds them)."""
  if st.groups == 1:
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.ShapeDtypeStruct((st.groups,) + tuple(x.shape), jnp.float32)


def _total(st, out, like):
  return out if st.groups == 1 else out.sum(0).astype(like.dtype)


def forward_static(cfg, args, save) -> Static:
  """The forward kernel's static configuration for a call (only shapes of ``args`` are read)."""
  tuning = cfg.tuning
  batch, _, dim = args.u.shape
  n_all = _pow2(args.A.shape[1])
  wide = batch * dim >= WIDE_CHANNELS
  block_d = min(tuning.block_d or (64 if wide else 32), _pow2(dim))
  per_program = states_per_program(tuning.fwd_states, batch, dim, block_d, _sm_count(cfg))
  return _static(cfg, args, "fwd", n_all, _states(per_program, n_all)[0], block_d=block_d,
                 chunk=tuning.ckpt_every if save else tuning.fwd_chunk, save=save,
                 rows_ahead=tuning.rows_ahead or (2 if wide else 4), bc_ahead=tuning.bc_ahead,
                 maxnreg=tuning.maxnreg)


def backward_static(cfg, args) -> Static:
  """The backward kernel's static configuration for a call (only shapes of ``args`` are read).
  The checkpoints were written with the forward's block_d and state groups; any block_d and
  groups read them (D is the checkpoints' last axis, N the one before), so the backward picks
  its own: one channel per thread, since the shuffles need whole warps."""
  tuning = cfg.tuning
  n_all = _pow2(args.A.shape[1])
  chunk, sub, warps = tuning.ckpt_every, tuning.bwd_chunk, tuning.bwd_num_warps
  if sub is None:
    # The default sub-chunk applies where it divides the checkpoint interval; an interval it
    # does not divide (ckpt_every=3) is processed whole.
    sub = BWD_SUB_CHUNK if chunk % BWD_SUB_CHUNK == 0 else chunk
  batch, _, dim = args.u.shape
  per_program = states_per_program(tuning.bwd_states, batch, dim, 32 * warps, _sm_count(cfg))
  return _static(cfg, args, "bwd", n_all, _states(per_program, n_all)[0],
                 block_d=32 * warps, chunk=chunk, sub=sub, warps=warps,
                 maxnreg=tuning.bwd_maxnreg)


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
  st = forward_static(cfg, args, save)
  at, B, C, n_all = _padded_state(args)
  out_shapes = [_per_channel(st, args.u)]
  if save:
    out_shapes.append(jax.ShapeDtypeStruct(
        (st.batch, max(st.length // st.chunk, 1), n_all, st.dim), jnp.float32))
  outs = _launch(cfg, st, _inputs(cfg, args, at, B, C), out_shapes, args, cfg.tuning.num_warps)
  return _total(st, outs[0], args.u), (outs[1] if save else None)


def backward(cfg, args, ckpt, dy):
  """The cotangents of every input (``ScanArgs``) from the checkpoints and dy."""
  st = backward_static(cfg, args)
  batch, length, dim = args.u.shape
  n_orig = args.A.shape[1]
  at, B, C, n_all = _padded_state(args)
  warps = st.warps
  f32 = jnp.float32
  seq_outs = [args.u, args.delta] + ([args.z] if cfg.has_z else [])   # du, dΔ (, dz)
  n_part = -(-dim // st.block_d) * warps                              # dB, dC: one per warp
  out_shapes = [_per_channel(st, x) for x in seq_outs]
  out_shapes += [jax.ShapeDtypeStruct((n_part, batch, length, n_all), f32)] * 2
  out_shapes.append(jax.ShapeDtypeStruct((batch, n_all, dim), f32))
  n_vec = 3 if cfg.gap_delta == "bias" else 2                         # dD, dbias (, dtilde)
  out_shapes += [_per_channel(st, jax.ShapeDtypeStruct((batch, dim), f32))] * n_vec
  xs = _inputs(cfg, args, at, B, C) + [ckpt, dy]
  outs = _launch(cfg, st, xs, out_shapes, args, warps)
  grads = [_total(st, outs.pop(0), x) for x in seq_outs]
  du, ddelta = grads[0], grads[1]
  dz = grads[2] if cfg.has_z else None
  dB_p, dC_p, dA_p, dD_p, dbias_p = (outs.pop(0) for _ in range(5))
  dtilde_p = outs.pop(0) if cfg.gap_delta == "bias" else None
  # Every state group accumulates the same dD = Σ dy u (it needs no state): group 0's is taken.
  # The bias gradients are sums of the groups' terms.
  dD_p = dD_p[0] if st.groups > 1 else dD_p
  dbias_p = _total(st, dbias_p, dbias_p)
  dtilde_p = None if dtilde_p is None else _total(st, dtilde_p, dtilde_p)
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


def _pallas_triton_instead(cfg):
  """Where the Triton kernels do not build, the op tries the Pallas-Triton ones before "xla"."""
  if cfg.tuning.kernels != "triton":
    return None
  tuning = dataclasses.replace(cfg.tuning, kernels="pallas_triton")
  return dataclasses.replace(cfg, tuning=tuning), "the Pallas-Triton kernels"


def build_class(cfg, specs):
  """What the kernels of a call are built from, besides its batch size: the signature without
  the batch, and the three Triton kernels' configurations (``Static``) with batch 0. The batch
  sets the launch grid and constant offsets in the Triton kernels' code, not whether they
  build; where it changes their structure (the channels per thread, the states per program) the
  configurations differ, so such calls are checked apart. A model's calls at
  several batch sizes (training, evaluation, a last partial batch) thus share one check."""
  key = without_batch(specs)
  if key is specs:                      # over the grid limit: the exact signature
    return specs
  args = ScanArgs(*specs)
  statics = (forward_static(cfg, args, False), forward_static(cfg, args, True),
             backward_static(cfg, args))
  return key, tuple(dataclasses.replace(st, batch=0) for st in statics)


# jax-triton builds the Triton kernels while lowering, and the Mosaic forward checks itself by
# compiling: only the Pallas-Triton kernels are built by XLA's compile.
KERNELS = Kernels("pallas_gpu", forward, backward, GpuTuning, _pallas_triton_instead,
                  build_class, compile_forward=lambda cfg: kernels_for(cfg) != "triton")
