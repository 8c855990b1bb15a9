"""Selective scan for NVIDIA GPUs: Pallas kernels lowered through Triton (DESIGN §3).

Backend choice, by measurement (ViM-S shape, fp32; docs/benchmarks.md): the inference forward
runs on Mosaic GPU (``mgpu_scan``: 0.146 ms on an H200 and 0.146-0.149 ms on an H100) whenever
D is a multiple of 128 and that kernel compiles, because it measured faster than the Triton
forward (0.167 vs 0.189 ms in one H100 run); ``forward`` hands it over. The training forward
(which also writes the checkpoints), the backward and other shapes run the Triton-lowered
kernels in this module, which implement every option (forward+backward 0.959 ms on an H200).
Triton suits the sequential per-thread recurrence (registers of any power-of-two shape, the
kernel's own scalar loads and inline PTX, including warp shuffles) but leaves register
allocation to ptxas, which gives the backward 255 registers unless capped: ``_RegisterCap``
sets the Triton module's ``ttg.maxnreg`` (PTX ``.maxnreg``), and the backward runs under a
168-register cap (12 one-warp programs per SM instead of 8). jax 0.11 deprecates Pallas' Triton
backend; until it is removed the launchers below are the only place that names a backend, and
a failure to lower falls back to "xla" with a warning (common.py).

Forward: grid (D / BD, batch); each program owns BD channels of one sequence and walks the L
time steps in scan order. The state is N separate (BD,) vectors, so each thread holds all N
states of its channels: C.h is summed inside the thread, B_t and C_t enter as scalar loads
(one address across the warp), and no value ever crosses lanes. Loads run ahead of use
(software pipelining through the loop carry). exp2, log2 and reciprocals are single PTX
instructions (``_FastMath``). ``reverse`` only changes which row a scan step reads, so no
flipped copies are made. Rows are read by indexing Refs (``u_ref[t, :]``): L is only a loop
bound and need not be a power of two.

Backward: the forward saves the fp32 state every K steps. The backward keeps the forward's
layout, one channel per thread (32 per warp): per checkpoint interval of K steps, last to first,
it walks sub-chunks of ``bwd_chunk`` steps (last first), recomputing each sub-chunk's states
into registers (from the interval's checkpoint, or with tuning ``bwd_restart="kept"`` from the
first state of the sub-chunk kept by the interval's first pass), then runs the adjoint
recurrence over them. The rows an interval reads (its first pass's and every adjoint step's)
are loaded at its start (tuning ``bwd_prefetch``): the kernel waits mostly on global loads.
Everything but dB and dC stays inside the thread; those two are sums over channels, done per
step by a warp reduce-scatter (``_Warp``: each halving level keeps the lower half of the
partial sums and ships the upper half by ``shfl.sync.bfly``; 15 shuffle-and-add steps plus one
for 16 states, instead of 5 per state). The per-state registers are kept in each lane's state
order (lane L holds state k ^ order[L]) so no level needs selects; B_t and C_t reach each lane
by ``shfl.sync.idx`` with a per-lane source (or, tuning ``bc_load="tile"``, the order moves
whole groups of 4 states and each lane loads its row as 4-state vectors). Partials are
written one per warp; dA, dD and d(delta_bias) per batch element; XLA sums the partials
afterwards. More than ``bwd_states`` (16) states are split into groups, one program each; the
sums over states (du, dΔ, dz) become per-group partials that XLA adds. This replaced an (N, BD)
tile backward whose reductions went through shared memory and barriers (1.38 -> 1.10 ms
forward+backward on an H100; 1.030-1.068 ms with the cap, sub-chunks and series softplus;
0.985 ms with explicit FMAs, ``_FastMath.fma``; 0.922 vs 0.949-0.954 ms with the rows loaded
ahead, one run in 20 ms repeats; 0.898 ms in a full bench_scan run with 250 ms repeats).
No atomics: the gradients are bitwise deterministic.
"""
from __future__ import annotations

import functools
import logging
import math
import re

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from toppax.pallas_kernels.common import (LN2, LOG2E, ScanArgs, out_types, sigmoid,
                                          softplus_from_exp2, softplus_series)

# Forward: block_d channels per program over num_warps warps, rows loaded rows_ahead steps and
# B, C scalars bc_ahead steps before use, chunks of fwd_chunk (inference) or ckpt_every
# (training) steps unrolled per loop iteration. block_d / rows_ahead None = by problem size:
# with at least WIDE_CHANNELS channels (batch x D) two channels per thread (64 per one-warp
# program; each B/C scalar load serves both) and rows 2 steps ahead; below it one channel per
# thread, so there are twice the programs to fill the GPU, and rows 4 ahead. Measured on an
# H100 (docs/benchmarks.md), fp32/bf16 ms: ViM-S b128 (98,304 channels) 0.187/0.194 wide vs
# 0.271/0.223 narrow; ViM-T b128 (49,152) 0.140/0.123 narrow vs 0.152/0.167 wide. The training
# forward (with checkpoints) takes the same layout: ViM-S fp32 fwd+bwd on an H100 (eleventh
# session) 1.037 ms wide with rows 2 ahead (default), 1.133 narrow, 1.146 wide with rows 4 ahead.
# Backward: checkpoints every ckpt_every = K steps, each interval recomputed and walked in
# sub-chunks of bwd_chunk steps (None: 2 where it divides K, else K) under a bwd_maxnreg register
# cap (None: ptxas' choice, 255). H100, ViM-S fp32 fwd+bwd ms: K 4 uncapped 1.105-1.145; cap 168
# + sub-chunks of 2 1.030-1.068 (kept); cap 160 / 176 / 200 with sub-chunks 1.069 / 1.177 /
# 1.249; sub-chunks of 1 + cap 168 1.155; K 2 + cap 168 1.088. With explicit FMAs (twelfth
# session, another H100): default 0.947-0.960, "kept" 0.954, sub-chunks of 4 uncapped 1.019.
# maxnreg caps the forward (128: slower). softplus "series" (common.softplus_series, 2 MUFU ops,
# no division) or "goldberg".
# bwd_prefetch: "none" loads each row where it is used; "rows" loads the first pass's rows and
# every adjoint step's rows (dy, z, C) at a checkpoint interval's start. Nsight Compute on an
# H100 (thirteenth session, "none"): 39% of the backward's stall samples waited on global loads
# (long scoreboard), half of them on z just before sigmoid(z) in the adjoint, with 2.9 warps per
# scheduler and issue slots 50% busy. ViM-S fp32 fwd+bwd, one H100 run: "none" 0.949 / 0.954 ms,
# "rows" 0.922 (72 B spilled vs 16). Also tried in that run, and slower from spills: restarts
# reusing the loaded rows (1.034 ms, 160 B) and the loop carrying the next interval's
# checkpoint and rows, loaded once the current checkpoint was dead (1.077 ms, 368 B).
# bwd_put: how the backward's dB / dC reduce-scatters scale their inputs (dh * Δu, h * dy):
# "mul" multiplies all 16 values first; "fma" multiplies the 8 it ships at the first level and
# fuses the other 8 into that level's adds (tools.kernel_sass, sm_90: 531.8 -> 515.0
# instructions per step with "rows", 72 -> 88 B spilled). ViM-S fp32 fwd+bwd, one H100 run
# (fourteenth session): "mul" 0.896 / 0.896 ms, "fma" 0.921 / 0.920; default "mul".
# ckpt_stride: the training forward stores only every ckpt_stride-th interval's checkpoint (the
# checkpoints are half the bytes it moves at ViM-S: 308 of 621 MB at stride 1); the backward
# recomputes each missing one from the stored one before it (a loop over whole intervals, so
# (ckpt_stride - 1) / 2 more recomputed intervals per interval on average). ViM-S fp32 fwd+bwd,
# one H100 run (fifteenth session): stride 1 0.899 / 0.900 ms, stride 2 0.951 (forward 254.8 ->
# 209.1 µs, backward 598.0 -> 692.7: an interval recomputed costs twice what storing and reading
# it saves). Default 1; stride 2 halves the checkpoints' memory (308 -> 157 MB per scan there).
# ckpt_every 2 with stride 2 stores every 4 steps like the default and needs few registers
# (8 B spilled at cap 168), but lower caps for more warps per SM lost (sixteenth session, H100:
# cap 168 0.903 ms, 152 0.949, 128 1.122; default 0.899).
# bwd_num_warps warps of 32 channels per program. num_stages > 1 asks Triton to
# software-pipeline the loop's loads, but it does not pipeline these loops: 2 and 3 measured no
# faster (third session), and with 2 both kernels keep the default's static counts
# (tools.kernel_sass, triton 3.6.0, eighteenth session: no LDGSTS in the loop).
# bc_load ("shuffle" | "tile") and bwd_restart ("checkpoint" | "kept"): how the backward hands
# B_t, C_t to the lanes and where its earlier sub-chunks restart (_bwd_kernel); "tile" and
# "kept" execute fewer instructions (tools.kernel_sass) but measured no faster on an H100 (tenth
# session), so the defaults stay.
# fwd_states / bwd_states: states per forward / backward program (a power of two, at most 32);
# more states split into groups of that many, one program each, whose partial y (forward) or
# du/dΔ/dz (backward) XLA sums. The kernels' code grows with the states a program holds, and
# Triton's TTGIR passes with it: at N = 64 in one program each, the N = 33 GPU test (padded to
# 64) had not compiled after 7 minutes on an H100, and tools.kernel_sass spent over 8 CPU
# minutes in the forward's TTGIR passes; at N = 32 the forward took about 6 minutes on the
# 2-core CPU machine (247 registers). With groups of 16 both N = 33 and 64 compile and pass in
# 80 s each on the H100; N <= 16 compiles as before the split (same SASS counts, kernel_sass).
DEFAULT_TUNING = dict(block_d=None, num_warps=1, fwd_chunk=4, ckpt_every=4, rows_ahead=None,
                      bc_ahead=1, bwd_num_warps=1, num_stages=1, bwd_num_stages=1,
                      maxnreg=None, bwd_maxnreg=168, bwd_chunk=None, softplus="series",
                      partial_sum="sum", bc_load="shuffle",
                      bwd_restart="checkpoint", bwd_prefetch="rows", bwd_put="mul",
                      fwd_states=16, bwd_states=16, ckpt_stride=1)
TILE_GROUP = 4                          # bc_load "tile": states per vector load
BWD_SUB_CHUNK = 2                       # bwd_chunk None: this where it divides ckpt_every
WIDE_CHANNELS = 65536

log = logging.getLogger(__name__)

_SQUEEZED = pl.squeezed if hasattr(pl, "squeezed") else None
_CompilerParams = getattr(pltriton, "CompilerParams", None) or getattr(pltriton,
                                                                      "TritonCompilerParams")


def _choice(cfg, key, options):
  """Tuning ``key``, checked to be one of ``options``."""
  value = cfg.tune(key, DEFAULT_TUNING[key])
  if value not in options:
    raise ValueError(f"tuning {key} must be {' or '.join(map(repr, options))}, got {value!r}")
  return value


def _ckpt_stride(cfg):
  stride = cfg.tune("ckpt_stride", DEFAULT_TUNING["ckpt_stride"])
  if not (isinstance(stride, int) and not isinstance(stride, bool) and stride >= 1):
    raise ValueError(f"tuning ckpt_stride must be a positive int, got {stride!r}")
  return stride


def _pow2(n):
  return 1 << max(0, math.ceil(math.log2(max(n, 1))))


class _Rows:
  """Loads and stores of one (L, BD) channels-last block, masked where the block overhangs D."""

  def __init__(self, block_d, dim, axis=0):
    self.mask = None
    if dim % block_d:                   # grid axis ``axis`` walks the blocks of D
      self.mask = pl.program_id(axis) * block_d + jnp.arange(block_d) < dim

  @staticmethod
  def _view(ref, t):
    # Masked Pallas loads index with arrays only (a Python int breaks interpret mode); a tuple
    # indexes several leading axes at once.
    if t is None:
      return ref
    ts = t if isinstance(t, tuple) else (t,)
    return ref.at[tuple(jnp.asarray(i, jnp.int32) for i in ts)]

  def load(self, ref, t=None):
    view = self._view(ref, t)
    if self.mask is None:
      return view[...].astype(jnp.float32)
    mask = jnp.broadcast_to(self.mask, view.shape)
    return pltriton.load(view, mask=mask, other=0).astype(jnp.float32)

  def store(self, ref, value, t=None):
    view = self._view(ref, t)
    value = value.astype(view.dtype)
    if self.mask is None:
      view[...] = value
    else:
      pltriton.store(view, value, mask=jnp.broadcast_to(self.mask, view.shape))


def _scan_order(cfg, length):
  return (lambda s: length - 1 - s) if cfg.reverse else (lambda s: s)


def _kernel_setup(cfg, block_d, dim, groups, a_ref, d_ref, bias_ref, n):
  """What both kernels start with: the row loader (with state groups, grid axis 1 walks D), the
  fast math, and the per-channel constants: A log2(e) per state (ddec rescales by ln 2), the D
  skip (with state groups only group 0, grid axis 0, adds its terms: the others get 0),
  delta_bias, and the "bias" gap rule's Δ̃ = softplus(delta_bias)."""
  rows = _Rows(block_d, dim, axis=1 if groups > 1 else 0)
  fm = _FastMath(cfg.interpret, cfg.tune("softplus", DEFAULT_TUNING["softplus"]) == "series")
  a2 = [rows.load(a_ref, i) * LOG2E for i in range(n)]
  d_skip, bias = rows.load(d_ref), rows.load(bias_ref)
  if groups > 1:
    d_skip = jnp.where(pl.program_id(0) == 0, d_skip, 0.0)
  tilde = None
  if cfg.gap_delta == "bias":
    tilde = fm.softplus(bias) if cfg.delta_softplus else bias
  return rows, fm, a2, d_skip, bias, tilde


class _FastMath:
  """exp2, log2 and reciprocal as single MUFU instructions (PTX ``ex2/lg2/rcp.approx.ftz``), and
  multiply-add as one FFMA (``fma``, below).

  Measured on an H100 (Nsight Compute, ViM-S forward): with jnp.exp2 and 1/x (denormal-safe
  sequences) and jnp.log2 (a libdevice polynomial) the forward executed 138.5 M warp
  instructions, with these 94.9 M (0.201 -> 0.190 ms under the profiler). The approximations
  are within 2 ulp (ex2, rcp) and 2^-22 absolute (lg2); ftz flushes only results below 1e-38.
  Interpret mode (CPU tests) evaluates the same formulas with jnp.
  """

  def __init__(self, interpret, series=False):
    self.interpret = interpret
    self.series = series

  def _asm(self, op, x):
    return pltriton.elementwise_inline_asm(
        f"{op}.approx.ftz.f32 $0, $1;", args=[x], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])[0]

  def exp2(self, x):
    return jnp.exp2(x) if self.interpret else self._asm("ex2", x)

  def log2(self, x):
    return jnp.log2(x) if self.interpret else self._asm("lg2", x)

  def rcp(self, x):
    return 1.0 / x if self.interpret else self._asm("rcp", x)

  def softplus(self, x):
    if self.series:
      return softplus_series(x, self.exp2, self.log2, self.fma)
    return softplus_from_exp2(x, self.exp2, self.log2, lambda a, b: a * self.rcp(b))

  def sigmoid(self, x):
    return self.rcp(1.0 + self.exp2(x * -LOG2E))

  def fma(self, a, b, c):
    """a b + c with one rounding (PTX ``fma.rn.f32``; operands broadcast). XLA compiles these
    kernels (custom call ``__gpu$xla.gpu.triton``) with floating-point contraction off, so a
    jnp ``a * b + c`` stays an FMUL and an FADD: Nsight Compute found no FFMA at all in either
    kernel on an H100 before this helper (ViM-S backward 407.5 M warp instructions, 159.8 M of
    them FMUL and 103.1 M FADD), and ``tools.kernel_sass`` compiled that backward's SASS (3544
    instructions) only with Triton's ``enable_fp_fusion`` off. The hot multiply-adds are
    written with this instead."""
    if self.interpret:
      return a * b + c
    shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b), jnp.shape(c))
    args = [jnp.broadcast_to(jnp.asarray(v, jnp.float32), shape) for v in (a, b, c)]
    return pltriton.elementwise_inline_asm(
        "fma.rn.f32 $0, $1, $2, $3;", args=args, constraints="=r,r,r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])[0]


class _RegisterCap:
  """A per-thread register limit (PTX ``.maxnreg``) for one Triton-lowered Pallas kernel.

  Neither Pallas' ``CompilerParams`` nor XLA (which compiles Pallas' Triton kernels, custom call
  ``__gpu$xla.gpu.triton``, on jaxlib 0.10-0.11) takes a register option. Triton itself carries
  one as the module attribute ``ttg.maxnreg``, which its TritonGPU-to-LLVM conversion turns into
  ``nvvm.maxnreg`` and the NVPTX backend into ``.maxnreg``. So the kernel's name carries the cap
  (``<name>_maxnreg<cap>``: part of the traced kernel, so jit caches stay correct) and a wrapper
  around Pallas' Triton lowering puts the attribute on that kernel's module. If the lowering
  function is not where this jax keeps it, a warning is logged and kernels compile uncapped
  (same results, the compiler's register count).
  """
  TAG = "_maxnreg"
  installed = None                      # None: not tried yet; then True / False

  @classmethod
  def name(cls, base, cap):
    if cap is None:
      return base
    if isinstance(cap, bool) or not isinstance(cap, int) or not 24 <= cap <= 255:
      raise ValueError(f"register cap (tuning maxnreg / bwd_maxnreg) must be an int in [24, 255] "
                       f"(the PTX .maxnreg range), got {cap!r}; use None for no cap")
    cls.install()
    return f"{base}{cls.TAG}{cap}"

  @classmethod
  def install(cls):
    if cls.installed is not None:
      return
    try:
      from jax._src.lib.mlir import ir
      from jax._src.pallas.triton import lowering
      original = lowering.lower_jaxpr_to_triton_module
    except (ImportError, AttributeError) as e:
      log.warning("selective_scan: cannot cap registers on this jax (%s); kernels compile "
                  "without a register cap", e)
      cls.installed = False
      return
    pattern = re.compile(re.escape(cls.TAG) + r"(\d+)$")

    @functools.wraps(original)
    def lower_with_cap(jaxpr, *args, **kwargs):
      result = original(jaxpr, *args, **kwargs)
      match = pattern.search(getattr(jaxpr.debug_info, "func_name", "") or "")
      if match:
        with result.module.context:
          result.module.operation.attributes["ttg.maxnreg"] = ir.IntegerAttr.get(
              ir.IntegerType.get_signless(32), int(match.group(1)))
      return result

    lower_with_cap.toppax_register_cap = True
    if not getattr(original, "toppax_register_cap", False):
      lowering.lower_jaxpr_to_triton_module = lower_with_cap
    cls.installed = True


def _fwd_kernel(*refs, cfg, length, block_d, dim, n, chunk, save, rows_ahead, groups, stride):
  """The forward with whole channels per thread: the state is n separate (BD,) vectors, so each
  thread holds all n states of its channels, C.h is summed inside the thread, and B_t, C_t enter
  as scalars (uniform loads). No cross-lane work and no layout conversions. With ``groups`` > 1
  the program runs one group of n states (grid axis 0) and writes its part of y (the gate is
  linear in it; only group 0 adds the D skip)."""
  it = iter(refs)
  r = dict(u=next(it), delta=next(it))
  r["z"] = next(it) if cfg.has_z else None
  r["B"], r["C"] = next(it), next(it)
  r["gaps"] = next(it) if cfg.gap_delta is not None else None
  a_ref, d_ref, bias_ref = next(it), next(it), next(it)
  y_ref = next(it)
  ck_ref = next(it) if save else None

  rows, fm, a2, d_skip, bias, tilde = _kernel_setup(cfg, block_d, dim, groups, a_ref, d_ref,
                                                     bias_ref, n)
  t_of = _scan_order(cfg, length)

  # Software pipelining: the rows of step s + rows_ahead and the B, C scalars of step
  # s + bc_ahead are loaded while step s computes; the queues ride in the loop carry.
  bc_ahead = cfg.tune("bc_ahead", DEFAULT_TUNING["bc_ahead"])
  last = length - 1

  def load_rows(s):
    t = t_of(jnp.minimum(s, last))      # past the end: a harmless in-bounds reload
    x = dict(u=rows.load(r["u"], t), dr=rows.load(r["delta"], t) + bias)
    if cfg.gap_delta is not None:
      x["g"] = r["gaps"][t]
    if cfg.has_z:
      x["z"] = rows.load(r["z"], t)
    return x

  def load_bc(s):
    t = t_of(jnp.minimum(s, last))
    return ([r["B"][t, i].astype(jnp.float32) for i in range(n)],
            [r["C"][t, i].astype(jnp.float32) for i in range(n)])

  def step(s, x, bc, hs, prev):
    b, c = bc
    dt = fm.softplus(x["dr"]) if cfg.delta_softplus else x["dr"]
    dec = dt
    if cfg.gap_delta is not None:
      dec = fm.fma(x["g"], prev if cfg.gap_delta == "prev" else tilde, dt)
    dtu = dt * x["u"]
    y = d_skip * x["u"]
    new = []
    for i in range(n):
      # a h + b dtu: the multiply fused into the FMA is the one on the loop-carried path.
      h = fm.fma(fm.exp2(a2[i] * dec), hs[i], b[i] * dtu)
      y = fm.fma(c[i], h, y)
      new.append(h)
    if cfg.has_z:
      z = x["z"]
      y = y * z * fm.sigmoid(z)
    rows.store(y_ref, y, t_of(s))
    return new, dt

  def run(base, steps, carry):
    hs, prev, rq, bq = carry
    for i in range(steps):
      s = base + i
      rq = rq + [load_rows(s + rows_ahead)]
      bq = bq + [load_bc(s + bc_ahead)]
      hs, prev = step(s, rq[0], bq[0], hs, prev)
      rq, bq = rq[1:], bq[1:]
    return hs, prev, rq, bq

  head = length % chunk
  hs = [jnp.zeros((block_d,), jnp.float32) for _ in range(n)]
  prev = jnp.zeros((block_d,), jnp.float32)
  carry = (hs, prev, [load_rows(s) for s in range(rows_ahead)],
           [load_bc(s) for s in range(bc_ahead)])
  # The partial chunk goes first in scan order, so checkpoints sit at head + c * chunk.
  carry = run(0, head, carry)

  def store_checkpoint(c, hs):
    for i in range(n):
      rows.store(ck_ref, hs[i], (c, i))

  def body(c, carry):
    if save and stride == 1:
      store_checkpoint(c, carry[0])
    elif save:                          # every stride-th interval's (tuning ckpt_stride)
      pl.when(jax.lax.rem(c, stride) == 0)(lambda: store_checkpoint(jax.lax.div(c, stride),
                                                                    carry[0]))
    return run(head + c * chunk, chunk, carry)

  jax.lax.fori_loop(0, length // chunk, body, carry)


class _Warp:
  """Cross-lane work for the backward: a (BD,) vector with BD = 32 x warps holds one
  channel per thread (element i on lane i % 32 of warp i // 32), so ``shfl.sync.bfly`` (inline
  PTX) exchanges values between the channels of a warp. Interpret mode permutes the vector the
  same way."""

  def __init__(self, interpret, block_d):
    self.interpret = interpret
    self.lane = jnp.arange(block_d, dtype=jnp.int32) & 31

  def shfl_xor(self, x, offset):
    if self.interpret:
      return x[jnp.arange(x.shape[0], dtype=jnp.int32) ^ offset]
    return pltriton.elementwise_inline_asm(
        f"shfl.sync.bfly.b32 $0, $1, {offset}, 0x1f, 0xffffffff;", args=[x],
        constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])[0]

  def shfl_idx(self, x, src):
    """Every lane gets lane ``src`` (a per-lane int32 vector) of its warp's x (shfl.sync.idx)."""
    if self.interpret:
      return x[(jnp.arange(x.shape[0], dtype=jnp.int32) & ~31) + src]
    return pltriton.elementwise_inline_asm(
        "shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", args=[x, src],
        constraints="=r,r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])[0]

  def state_order(self, m, group=1):
    """The lane-dependent order of m per-state registers that makes ``reduce_scatter`` need no
    selects: lane L keeps state k ^ order[L] in its register k. order[L] has, for each halving
    level of the reduce-scatter (lane offset o, half h of the values still held), the bit h set
    when lane L has bit o set; so the registers a lane ships at a level (its upper half) hold
    the states its partner keeps (the partner's lower half), and vice versa. With ``group`` > 1
    only the levels with h >= group contribute: the order then moves whole aligned groups of
    ``group`` states and keeps each group's states in place (so a group loads as one vector),
    and the levels below ``group`` pick their half by selects."""
    order, length = jnp.zeros_like(self.lane), m
    for offset in (16, 8, 4, 2, 1):
      if length > 1:
        length //= 2
        if length >= group:
          order = order + jnp.where((self.lane & offset) != 0, length, 0)
    return order

  @staticmethod
  def permute(vals, order, group=1):
    """Register k of the result holds vals[k ^ order] (lane-dependent XOR of the index, by
    selects one bit at a time; a permutation that is its own inverse). Bits of order below
    ``group`` must be 0 (``state_order(m, group)``) and cost no selects."""
    bit = group
    while bit < len(vals):
      flip = (order & bit) != 0
      vals = [jnp.where(flip, vals[k ^ bit], vals[k]) for k in range(len(vals))]
      bit *= 2
    return vals

  def reduce_scatter(self, vals, group=1, scale=None, fma=None):
    """Sums m (BD,) vectors, held in ``state_order(m, group)``, over the 32 lanes of each warp
    and spreads the m sums over the lanes: returns a list whose entry k is, on lane L, the warp
    total of state k ^ state_order(m)[L]. Each halving level keeps the lower half of the list
    and ships the upper half to the partner lane: m - 1 shuffles and adds for m values (plus
    one per level left once a single value remains). Levels whose half is at least ``group``
    need no selects; below it (group order) a lane keeps the half its lane bit names, by two
    selects per shipped value. With ``scale`` (a (BD,) vector) it sums ``vals[k] * scale``,
    multiplying first; given also ``fma`` (a b + c), the first level multiplies only the shipped
    half and folds the kept half's product into its add as ``fma(kept, scale, shipped)`` (m / 2
    instructions fewer; where that level uses selects, it multiplies first)."""
    first = fma is not None and scale is not None and group == 1 and len(vals) > 1
    if scale is not None and not first:
      vals = [v * scale for v in vals]
    for offset in (16, 8, 4, 2, 1):
      if len(vals) > 1:
        half = len(vals) // 2
        if first:
          vals = [fma(vals[j], scale, self.shfl_xor(vals[j + half] * scale, offset))
                  for j in range(half)]
          first = False
        elif half >= group:
          vals = [vals[j] + self.shfl_xor(vals[j + half], offset) for j in range(half)]
        else:
          upper = (self.lane & offset) != 0
          keep = [jnp.where(upper, vals[j + half], vals[j]) for j in range(half)]
          ship = [jnp.where(upper, vals[j], vals[j + half]) for j in range(half)]
          vals = [k + self.shfl_xor(v, offset) for k, v in zip(keep, ship)]
      else:
        vals = [vals[0] + self.shfl_xor(vals[0], offset)]
    return vals


def _columns(tile):
  """The columns of a (BD, w) tile (w a power of two) as w (BD,) vectors, by halving splits
  (Triton splits only a last axis of 2; each thread holds its row, so no data moves)."""
  rows, width = tile.shape
  if width == 1:
    return [tile.reshape(rows)]
  if width == 2:
    return list(jnp.unstack(tile, axis=-1))
  even, odd = jnp.unstack(tile.reshape(rows, width // 2, 2), axis=-1)
  return [v for pair in zip(_columns(even), _columns(odd)) for v in pair]


def _sum_partials(dB_p, dC_p, how):
  """dB and dC from the backward's per-warp partials (P, B, L, N): ``"sum"`` is XLA's reduction
  of each; ``"dot"`` a matrix-vector product of each against ones (cuBLAS GEMV at full fp32
  precision, no TF32), timed against it by ``bench_scan --sweep``. Both are deterministic."""
  if how == "sum":
    return dB_p.sum(0), dC_p.sum(0)
  if how != "dot":
    raise ValueError(f"tuning partial_sum must be 'sum' or 'dot', got {how!r}")
  ones = jnp.ones((dB_p.shape[0],), dB_p.dtype)
  gemv = functools.partial(jnp.einsum, "p...,p->...", precision=jax.lax.Precision.HIGHEST)
  return gemv(dB_p, ones), gemv(dC_p, ones)


def _bwd_kernel(*refs, cfg, length, block_d, dim, n, chunk, sub, warps, groups, stride):
  """The backward with one channel per thread (the forward's layout): the state, its adjoint
  and dA are n separate (BD,) vectors, B_t and C_t broadcast per state; only dB and dC cross
  lanes, through one warp reduce-scatter each per step. a_t h_{t-1} is taken as
  h_t - B_t Δ_t u_t, so a chunk keeps K states, not K + 1.

  With ``groups`` > 1 the program handles one group of n states (grid axis 0) and du, Δ's
  gradient, dz, dD and the bias gradients are this group's partials (``backward`` sums them):
  every term of those is a sum over states, except the D skip's, which only group 0 adds."""
  it = iter(refs)
  r = dict(u=next(it), delta=next(it))
  r["z"] = next(it) if cfg.has_z else None
  r["B"], r["C"] = next(it), next(it)
  r["gaps"] = next(it) if cfg.gap_delta is not None else None
  a_ref, d_ref, bias_ref, ck_ref, dy_ref = (next(it) for _ in range(5))
  du_ref, ddelta_ref = next(it), next(it)
  dz_ref = next(it) if cfg.has_z else None
  dB_ref, dC_ref, dA_ref, dD_ref, dbias_ref = (next(it) for _ in range(5))
  dtilde_ref = next(it) if cfg.gap_delta == "bias" else None

  rows, fm, a2, d_skip, bias, tilde = _kernel_setup(cfg, block_d, dim, groups, a_ref, d_ref,
                                                     bias_ref, n)
  warp = _Warp(cfg.interpret, block_d)
  t_of = _scan_order(cfg, length)
  prev_rule = cfg.gap_delta == "prev"
  wid = jnp.arange(block_d, dtype=jnp.int32) // 32

  # Every per-state value of a lane (A, the checkpoints, the recomputed states, their adjoints,
  # dA) is kept in the warp's state order, so that the dB/dC reduce-scatter needs no selects
  # (SASS: 60 of about 600 instructions per step were selects); sums over states do not care.
  # B_t and C_t reach each lane in that order in one of two ways (tuning bc_load):
  # "shuffle": lane L loads entry L (one coalesced load per 32 states) and shfl.idx hands entry
  # j ^ order to each lane (69 instead of 294 load instructions in the kernel's SASS; 1.097 vs
  # 1.115 ms forward+backward, ViM-S, H100, separate runs: about even). "tile": the order moves
  # only whole aligned groups of G = 4 states (state_order's group), so each lane loads its
  # row as n / G vectors of G states (LDG.128 for fp32) with no shuffles; the reduce-scatter's
  # two levels below G take 2 selects per shipped value instead (6 per reduce-scatter for 16
  # states). Static SASS of the ViM-S backward (tools.kernel_sass, triton 3.6, sm_90, cap 168):
  # 513 instructions per step with shuffles, 485 with tiles but 128 B more spilled (the 16 values
  # of a row arrive at once); with bwd_restart "kept" 490 and 462. H100, fwd+bwd: shuffles
  # 1.12-1.14 ms, tiles 1.30, kept 1.14-1.15, kept + tiles 1.15 (docs/benchmarks.md).
  restart_kept = _choice(cfg, "bwd_restart", ("kept", "checkpoint")) == "kept"
  prefetch = _choice(cfg, "bwd_prefetch", ("none", "rows"))
  put_fma = _choice(cfg, "bwd_put", ("mul", "fma")) == "fma"
  bc_load = _choice(cfg, "bc_load", ("shuffle", "tile"))
  group = min(TILE_GROUP, n) if bc_load == "tile" else 1
  order = warp.state_order(n, group)    # register k of a lane holds state k ^ order
  final = warp.state_order(n)           # the reduce-scatter's k-th sum is state k ^ final
  a2 = warp.permute(a2, order, group)

  def put(ref, t, vals, scale):
    """Stores the warp sums of vals[j] * scale (state j ^ order) as row t of a dB / dC partial."""
    for k, v in enumerate(warp.reduce_scatter(vals, group, scale, fm.fma if put_fma else None)):
      idx = final ^ k
      if warps == 1:
        ref[t, idx] = v.astype(ref.dtype)
      else:
        ref[wid, t, idx] = v.astype(ref.dtype)

  def dt_of(dr):
    return fm.softplus(dr) if cfg.delta_softplus else dr

  cols = jnp.arange(group, dtype=jnp.int32)[None, :]

  def fetch(ref, t):
    """A B or C row as this lane loads it: entry L (for shuffles), or its groups as vectors."""
    if bc_load == "tile":
      vals = []
      for m in range(n // group):
        start = pl.multiple_of(order ^ (group * m), group)   # the hint makes one vector load
        vals += _columns(ref[t, start[:, None] + cols].astype(jnp.float32))
      return vals
    return ref[t, jnp.minimum(warp.lane, n - 1)].astype(jnp.float32)   # lane L: state L

  def spread(row):
    """A fetched row's entries in this lane's order: a function j -> state j ^ order."""
    if bc_load == "tile":
      return row.__getitem__
    return lambda j: warp.shfl_idx(row, order ^ j)

  def entries(ref, t):
    return spread(fetch(ref, t))

  def load_walk(s):
    """What the recompute of step s reads: u, raw Δ, the gap, B_t (fetched)."""
    t = t_of(s)
    x = dict(u=rows.load(r["u"], t), d=rows.load(r["delta"], t), b=fetch(r["B"], t))
    if cfg.gap_delta is not None:
      x["g"] = r["gaps"][t]
    return x

  def load_adjoint(s):
    """What the adjoint of step s reads: dy, z, C_t (fetched)."""
    t = t_of(s)
    x = dict(dout=rows.load(dy_ref, t), c=fetch(r["C"], t))
    if cfg.has_z:
      x["z"] = rows.load(r["z"], t)
    return x

  def prev_before(base):
    """The "prev" gap rule's Δ of the step before ``base`` (0 before the first step)."""
    if isinstance(base, int) and base == 0:
      return jnp.zeros((block_d,), jnp.float32)
    return dt_of(rows.load(r["delta"], t_of(jnp.maximum(base - 1, 0))) + bias)

  def advance(s, h, prev, pre=None):
    """Step s (scan order) from the state h before it: (its inputs x, the state after it).
    ``pre``: its rows from load_walk, loaded earlier (tuning bwd_prefetch)."""
    pre = load_walk(s) if pre is None else pre
    x = dict(u=pre["u"], dr=pre["d"] + bias)
    x["dt"] = dt = dt_of(x["dr"])
    dec = dt
    if cfg.gap_delta is not None:
      x["g"] = pre["g"]
      dec = fm.fma(x["g"], prev if prev_rule else tilde, dt)
    x["dec"] = dec
    dtu = dt * x["u"]
    b = spread(pre["b"])
    return x, [fm.fma(fm.exp2(a2[j] * dec), h[j], b(j) * dtu) for j in range(n)]

  def walk(base, start, stop, h, prev, pre=None):
    """Steps base + start ... base + stop - 1 from the state h before the first: their inputs
    and states. ``pre``: the interval's rows from load_walk, by step (or None: load here)."""
    xs, hs = [], []
    for i in range(start, stop):
      x, h = advance(base + i, h, prev, None if pre is None else pre[i])
      prev = x["dt"]
      xs.append(x)
      hs.append(h)
    return xs, hs

  def chunk_bwd(base, xs, hs, carry, adj=None):
    """The adjoint over steps base ... base + len(xs) - 1 (scan order), last first, from their
    inputs xs and states hs (the state after each step); ``adj``: their rows from load_adjoint,
    loaded earlier (or None: load here)."""
    steps = len(xs)
    dh, dA, gcarry, dD, dbias, dtilde = carry
    for i in reversed(range(steps)):
      t = t_of(base + i)
      x, h = xs[i], hs[i]
      u, dt, dec = x["u"], x["dt"], x["dec"]
      rows_in = load_adjoint(base + i) if adj is None else adj[i]
      c_row = spread(rows_in["c"])
      c = [c_row(j) for j in range(n)]
      dout = rows_in["dout"]
      if cfg.has_z:
        z = rows_in["z"]
        sz = fm.sigmoid(z)
        y_pre = d_skip * u
        for j in range(n):
          y_pre = fm.fma(c[j], h[j], y_pre)
        rows.store(dz_ref, dout * y_pre * sz * fm.fma(z, 1.0 - sz, 1.0), t)
        dy = dout * z * sz
      else:
        dy = dout
      dD = fm.fma(dy, u, dD)
      put(dC_ref, t, h, dy)
      dh = [fm.fma(c[j], dy, dh[j]) for j in range(n)]
      dtu = dt * u
      put(dB_ref, t, dh, dtu)
      neg_dtu = -dtu
      dbu = jnp.zeros_like(u)
      ddec = jnp.zeros_like(u)
      new_dh, new_dA = [], []
      b_row = entries(r["B"], t)
      for j in range(n):
        b = b_row(j)
        dbu = fm.fma(dh[j], b, dbu)
        a = fm.exp2(a2[j] * dec)
        da = dh[j] * fm.fma(b, neg_dtu, h[j])   # dh_t a_t h_{t-1}
        new_dA.append(fm.fma(da, dec, dA[j]))
        ddec = fm.fma(da, a2[j], ddec)
        new_dh.append(a * dh[j])
      dh, dA = new_dh, new_dA
      ddec = ddec * LN2
      ddt = fm.fma(dbu, u, ddec)
      if prev_rule:
        ddt = ddt + gcarry
        gcarry = x["g"] * ddec
      elif cfg.gap_delta == "bias":
        dtilde = fm.fma(x["g"], ddec, dtilde)
      ddr = ddt * fm.sigmoid(x["dr"]) if cfg.delta_softplus else ddt
      dbias = dbias + ddr
      rows.store(du_ref, fm.fma(dbu, dt, dy * d_skip), t)
      rows.store(ddelta_ref, ddr, t)
    return dh, dA, gcarry, dD, dbias, dtilde

  zeros = lambda: jnp.zeros((block_d,), jnp.float32)
  carry = ([zeros() for _ in range(n)], [zeros() for _ in range(n)], zeros(), zeros(), zeros(),
           zeros())
  head, full = length % chunk, length // chunk

  def interval(base, steps, h, carry):
    # sub steps at a time, last first: only sub states are live (registers). The first pass
    # recomputes the whole interval from its checkpoint h and runs the adjoint over the last
    # sub-chunk; each earlier sub-chunk then restarts from its first step's state and inputs,
    # kept from that first pass (bwd_restart "kept": K + (K / sub - 1)(sub - 1) recomputed steps
    # per K, 5 per 4 at K = 4, sub = 2), or from the checkpoint (bwd_restart "checkpoint":
    # (K / sub + 1) / 2 times the recompute, 6 per 4). With bwd_prefetch "rows" the rows of the
    # first pass and of every adjoint step are loaded at the interval's start; restarts load
    # theirs again (cache hits: reusing the loaded values let the compiler merge the restart
    # with the first pass and spill).
    if steps == 0:
      return carry
    walk_rows = adj_rows = None
    if prefetch == "rows":
      walk_rows = [load_walk(base + i) for i in range(steps)]
      adj_rows = [load_adjoint(base + i) for i in range(steps)]
    prev0 = prev_before(base) if prev_rule else None
    xs, hs = walk(base, 0, steps, h, prev0, walk_rows)
    starts = list(range(0, steps, sub))
    for a in reversed(starts):
      if a == starts[-1]:               # the first pass's last sub-chunk
        sub_x, sub_h = xs[a:], hs[a:]
      elif restart_kept:                # from step a's inputs and state, kept by the first pass
        more_x, more_h = walk(base, a + 1, a + sub, hs[a], xs[a]["dt"])
        sub_x, sub_h = [xs[a]] + more_x, [hs[a]] + more_h
      else:                             # from the checkpoint again, up to the sub-chunk's end
        sub_x, sub_h = (v[a:] for v in walk(base, 0, a + sub, h, prev0))
      carry = chunk_bwd(base + a, sub_x, sub_h, carry,
                        None if adj_rows is None else adj_rows[a:a + len(sub_x)])
    return carry

  def recompute(k, state):
    # One whole interval from the state before it, for an interval whose checkpoint was not
    # stored (tuning ckpt_stride): only its last state (and Δ, for the "prev" rule) is kept.
    base, h, prev = state
    pre = [load_walk(base + i) for i in range(chunk)]
    xs, hs = walk(base, 0, chunk, h, prev, pre)
    return base + chunk, hs[-1], xs[-1]["dt"]

  def body(i, carry):
    c = full - 1 - i
    kept = jax.lax.div(c, stride) if stride > 1 else c   # non-negative: lax.div floors
    ck = warp.permute([rows.load(ck_ref, (kept, j)) for j in range(n)], order, group)
    if stride > 1:
      base = head + kept * stride * chunk
      prev = prev_before(base) if prev_rule else zeros()
      _, ck, _ = jax.lax.fori_loop(0, c - kept * stride, recompute, (base, ck, prev))
    return interval(head + c * chunk, chunk, ck, carry)

  carry = jax.lax.fori_loop(0, full, body, carry)
  _, dA, _, dD, dbias, dtilde = interval(0, head, [zeros() for _ in range(n)], carry)
  dA = warp.permute(dA, order, group)   # back to state j in entry j
  for j in range(n):
    rows.store(dA_ref, dA[j], j)
  rows.store(dD_ref, dD)
  rows.store(dbias_ref, dbias)
  if dtilde_ref is not None:
    rows.store(dtilde_ref, dtilde)


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


def _states(cfg, key, n):
  """States per program for tuning ``key`` (fwd_states / bwd_states): all n (a power of two) up
  to the tuning, else groups of that many, one program each. Returns (states, groups)."""
  group = cfg.tune(key, DEFAULT_TUNING[key])
  if isinstance(group, bool) or group not in (1, 2, 4, 8, 16, 32):
    raise ValueError(f"tuning {key} must be a power of two from 1 to 32 (states per program; "
                     f"the backward shares them out over a warp's 32 lanes), got {group!r}")
  states = min(n, group)
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
  if not save:
    try:
      from toppax.pallas_kernels import mgpu_scan
    except ImportError:                 # a jax without Pallas' Mosaic GPU backend
      mgpu_scan = None
    if mgpu_scan is not None and mgpu_scan.usable(cfg, args):   # measured faster (docstring)
      return mgpu_scan.forward(cfg, args), None
  batch, length, dim = args.u.shape
  at, B, C, n_all = _padded_state(args)
  n, groups = _states(cfg, "fwd_states", n_all)
  chunk = cfg.tune("ckpt_every", DEFAULT_TUNING["ckpt_every"]) if save else cfg.tune(
      "fwd_chunk", DEFAULT_TUNING["fwd_chunk"])
  wide = batch * dim >= WIDE_CHANNELS
  block_d = min(cfg.tune("block_d", None) or (64 if wide else 32), _pow2(dim))
  rows_ahead = cfg.tune("rows_ahead", None) or (2 if wide else 4)
  grid = _Grid(cfg, length, block_d, n, pl.cdiv(dim, block_d), batch, groups)
  out_shape, out_specs = grid.outputs([args.u])
  stride = _ckpt_stride(cfg) if save else 1
  if save:
    n_ck = max(-(-(length // chunk) // stride), 1)
    out_shape.append(jax.ShapeDtypeStruct((batch, n_ck, n_all, dim), jnp.float32))
    out_specs.append(grid.checkpoints(n_ck))
  xs = _inputs(cfg, args, at, B, C)
  elems = batch * length * dim * n_all
  kernel = functools.partial(_fwd_kernel, cfg=cfg, length=length, block_d=block_d, dim=dim, n=n,
                             chunk=chunk, save=save, rows_ahead=rows_ahead, groups=groups,
                             stride=stride)
  outs = pl.pallas_call(
      kernel, grid=grid.grid, in_specs=grid.in_specs, out_specs=out_specs,
      out_shape=out_types(out_shape, args),
      interpret=cfg.interpret,
      name=_RegisterCap.name("selective_scan_fwd", cfg.tune("maxnreg", DEFAULT_TUNING["maxnreg"])),
      compiler_params=_CompilerParams(num_warps=cfg.tune("num_warps",
                                                         DEFAULT_TUNING["num_warps"]),
                                      num_stages=cfg.tune("num_stages",
                                                          DEFAULT_TUNING["num_stages"])),
      cost_estimate=pl.CostEstimate(flops=7 * elems, transcendentals=elems + 2 * elems // n_all,
                                    bytes_accessed=_nbytes(*xs, *out_shape)),
  )(*xs)
  return grid.total(outs[0], args.u), (outs[1] if save else None)


def backward(cfg, args, ckpt, dy):
  batch, length, dim = args.u.shape
  n_orig = args.A.shape[1]
  at, B, C, n_all = _padded_state(args)
  n, groups = _states(cfg, "bwd_states", n_all)
  chunk = cfg.tune("ckpt_every", DEFAULT_TUNING["ckpt_every"])
  # The checkpoints were written with the forward's block_d and state groups; any block_d and
  # groups read them (D is the checkpoints' last axis, N the one before), so the backward
  # picks its own.
  warps = cfg.tune("bwd_num_warps", DEFAULT_TUNING["bwd_num_warps"])
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
  sub = cfg.tune("bwd_chunk", DEFAULT_TUNING["bwd_chunk"])
  if sub is None:
    # The default sub-chunk applies where it divides the checkpoint interval; an
    # interval it does not divide (a user's ckpt_every=3) is processed whole.
    sub = BWD_SUB_CHUNK if chunk % BWD_SUB_CHUNK == 0 else chunk
  if not (isinstance(sub, int) and not isinstance(sub, bool) and 0 < sub <= chunk
          and chunk % sub == 0):
    raise ValueError(f"tuning bwd_chunk must divide ckpt_every = {chunk}, got {sub!r}")
  kernel = functools.partial(_bwd_kernel, cfg=cfg, length=length, block_d=block_d, dim=dim, n=n,
                             chunk=chunk, sub=sub, warps=warps, groups=groups,
                             stride=_ckpt_stride(cfg))
  outs = pl.pallas_call(
      kernel, grid=grid.grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_types(out_shape, args),
      interpret=cfg.interpret,
      name=_RegisterCap.name("selective_scan_bwd",
                             cfg.tune("bwd_maxnreg", DEFAULT_TUNING["bwd_maxnreg"])),
      compiler_params=_CompilerParams(num_warps=cfg.tune("bwd_num_warps",
                                                         DEFAULT_TUNING["bwd_num_warps"]),
                                      num_stages=cfg.tune("bwd_num_stages",
                                                          DEFAULT_TUNING["bwd_num_stages"])),
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
  dB, dC = _sum_partials(dB_p, dC_p, cfg.tune("partial_sum", DEFAULT_TUNING["partial_sum"]))
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
