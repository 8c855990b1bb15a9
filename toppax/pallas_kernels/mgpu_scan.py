"""The inference forward of the selective scan on Pallas' Mosaic GPU backend.

``gpu_scan.forward`` hands it the inference forward (no checkpoints) on GPUs of compute
capability 9.0 or newer (TMA) when the shapes suit it (D a multiple of 128, a row of B/C a
multiple of 16 bytes) and it compiles, because it runs faster than the Triton-lowered forward;
training (the forward with checkpoints, and the backward) stays on the Triton kernels. If it
does not compile for a signature, the Triton forward runs instead, with a logged warning.

One warpgroup (128 threads) per (128 channels, batch element), thread = channel: the N states are
N ``(128,)`` arrays in the ``WG_STRIDED`` layout, so C.h is summed inside the thread. u, delta,
z, B, C (and gaps) stream through shared memory in chunks of ``GpuTuning.mosaic_chunk`` steps
(``plgpu.emit_pipeline``, TMA, ``mosaic_concurrent`` chunks in flight); B_t and C_t are read as
shared-memory scalars. The per-channel parameters (A log2 e, D, delta_bias: one (N + 2, D)
block) are copied into a scoped shared-memory buffer once per CTA before the pipeline starts
rather than streamed with the rows, which keeps the shared memory per CTA low enough for 6 CTAs
per SM instead of 4 (35 instead of 53 KB at N = 16, fp32): the ViM-S grid then fits in one
wave. ``reverse`` walks the chunks and the steps inside them backwards; the partial chunk is the
last block either way, and TMA clips its out-of-range rows. exp2, log2 and division use the
approximate PTX instructions (``approx_math``), as the Triton kernels do.

Not testable on CPU: Pallas' discharge interpreter (``interpret=True``) does not run
``emit_pipeline`` or ``copy_gmem_to_smem``, and jax 0.11's thread-simulating GPU interpreter
(``plgpu.InterpretGPUParams``) stops at the pipeline's predicated shared-to-global copy
("predicate not supported", jax 0.11.2). CPU tests check that it lowers for CUDA; the GPU tests
(``--run-gpu``) check its values.
"""
from __future__ import annotations

import inspect
import logging

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from toppax.pallas_kernels.common import LOG2E, softplus_series
from toppax.pallas_kernels.scan_call import ScanArgs, out_types, signature, without_batch

try:  # jax 0.11 registers Mosaic GPU's lowering only when this module is imported
  from jax._src.pallas.mosaic_gpu import pallas_call_registration  # noqa: F401
except ImportError:  # pragma: no cover - older/newer layouts
  pass

log = logging.getLogger(__name__)

# jax 0.10 takes the index as a required second argument of plgpu.load; jax 0.11 deprecates it
# (the index goes on the ref). _load passes it only where it is required; jax 0.11 treats an
# absent index as () (state.primitives.get_ref_and_transforms), so both lower the same.
_LOAD_PARAMS = inspect.signature(plgpu.load).parameters
_LOAD_TAKES_IDX = "idx" in _LOAD_PARAMS and _LOAD_PARAMS["idx"].default is inspect.Parameter.empty


def _load(ref, layout):
  if _LOAD_TAKES_IDX:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


LANES = 128


def _unpack(refs, has_z, has_gaps):
  """(u, delta, z, B, C, gaps) from the front of refs, None where absent, and the refs after
  them: the order in which ``forward`` passes the arrays and the pipeline its buffers."""
  it = iter(refs)
  u, delta = next(it), next(it)
  z = next(it) if has_z else None
  B, C = next(it), next(it)
  gaps = next(it) if has_gaps else None
  return (u, delta, z, B, C, gaps), list(it)


def supports(args) -> bool:
  """Shapes this kernel takes: D a multiple of 128, B/C rows a multiple of 16 bytes."""
  dim, n = args.u.shape[-1], args.A.shape[1]
  return dim % LANES == 0 and (n * jnp.dtype(args.B.dtype).itemsize) % 16 == 0


def forward(cfg, args):
  """y of the scan (no checkpoints) for the prepared ``scan_call.ScanArgs``."""
  batch, length, dim = args.u.shape
  n = args.A.shape[1]
  if not supports(args):
    raise ValueError(f"the Mosaic GPU forward needs D a multiple of {LANES} and N x itemsize a "
                     f"multiple of 16 bytes, got D = {dim}, N = {n}, "
                     f"{jnp.dtype(args.B.dtype).name}; gpu_scan uses its Triton forward there")
  chunk = cfg.tuning.mosaic_chunk or 32 // jnp.dtype(args.u.dtype).itemsize
  concurrent = cfg.tuning.mosaic_concurrent
  # A log2(e) transposed, D and delta_bias in one (N + 2, D) array: one XLA fusion, one TMA copy.
  params = jnp.concatenate([(args.A.astype(jnp.float32) * LOG2E).T,
                            args.D.astype(jnp.float32)[None],
                            args.delta_bias.astype(jnp.float32)[None]])
  lay = plgpu.Layout.WG_STRIDED((LANES,), vec_size=1)
  n_chunks = pl.cdiv(length, chunk)
  block = (lambda c: n_chunks - 1 - c) if cfg.reverse else (lambda c: c)
  gap_rule, has_z = cfg.gap_delta, cfg.has_z

  def kernel(*refs):
    (u_g, dl_g, z_g, b_g, c_g, g_g), (p_g, y_g) = _unpack(refs, has_z, gap_rule is not None)
    di, b = jax.lax.axis_index("d"), jax.lax.axis_index("b")

    cols = pl.ds(di * LANES, LANES)

    # The per-channel parameters go to registers once, through a shared-memory buffer that is
    # released before the pipeline allocates its own: a pipelined (N + 2, 128) block took
    # 18 KB of the 53 KB per CTA, and 53 KB allows 4 CTAs per SM, 1.45 waves of the ViM-S grid
    # (768 CTAs); 35 KB allows 6, one wave (Nsight Compute, H100).
    def load_params(p_s, bar):
      plgpu.copy_gmem_to_smem(p_g.at[:, cols], p_s, bar)
      plgpu.barrier_wait(bar)
      return tuple(_load(p_s.at[i], lay) for i in range(n + 2))

    *a2, d_skip, bias = pl.run_scoped(load_params, plgpu.SMEM((n + 2, LANES), jnp.float32),
                                      plgpu.Barrier(num_arrivals=1))
    tilde = None
    if gap_rule == "bias":
      tilde = softplus_series(bias) if cfg.delta_softplus else bias

    def body(idx, *smem):
      (u_s, dl_s, z_s, b_s, c_s, g_s), (y_s, carry) = _unpack(smem, has_z, gap_rule is not None)
      steps = jnp.minimum(chunk, length - block(idx[0]) * chunk)

      def step(s, carry):
        hs, prev = carry
        t = steps - 1 - s if cfg.reverse else s
        uu = _load(u_s.at[t], lay).astype(jnp.float32)
        x = _load(dl_s.at[t], lay).astype(jnp.float32) + bias
        dt = softplus_series(x) if cfg.delta_softplus else x
        dec = dt
        if gap_rule is not None:
          g = g_s[block(idx[0]) * chunk + t]
          dec = dt + g * (prev if gap_rule == "prev" else tilde)
        dtu = dt * uu
        y = d_skip * uu
        new = []
        for i in range(n):
          h = b_s[t, i].astype(jnp.float32) * dtu + jnp.exp2(a2[i] * dec) * hs[i]
          y = y + c_s[t, i].astype(jnp.float32) * h
          new.append(h)
        if has_z:
          zz = _load(z_s.at[t], lay).astype(jnp.float32)
          y = y * (zz / (1.0 + jnp.exp2(zz * -LOG2E)))
        y_s[t, :] = y.astype(y_s.dtype)
        return tuple(new), dt

      return jax.lax.fori_loop(0, steps, step, carry)

    row = pl.BlockSpec((chunk, LANES), lambda c: (block(c), 0))
    state = pl.BlockSpec((chunk, n), lambda c: (block(c), 0))
    specs = [row, row] + ([row] if has_z else []) + [state, state]
    operands = [u_g.at[b, :, cols], dl_g.at[b, :, cols]]
    operands += [z_g.at[b, :, cols]] if has_z else []
    operands += [b_g.at[b], c_g.at[b]]
    if gap_rule is not None:
      # Whole (padded) rows of gaps: TMA copies must be multiples of 128 bytes.
      specs.append(pl.BlockSpec((g_g.shape[1],), lambda c: (0,)))
      operands.append(g_g.at[b])
    zeros = lambda: plgpu.layout_cast(jnp.zeros((LANES,), jnp.float32), lay)
    init = (tuple(zeros() for _ in range(n)), zeros())
    plgpu.emit_pipeline(body, grid=(n_chunks,), in_specs=specs, out_specs=[row],
                        max_concurrent_steps=concurrent, init_carry=init)(
        *operands, y_g.at[b, :, cols])

  xs = [args.u, args.delta] + ([args.z] if has_z else []) + [args.B, args.C]
  if gap_rule is not None:
    pad = -length % 32
    xs.append(jnp.pad(args.gaps.astype(jnp.float32), ((0, 0), (0, pad))))
  return plgpu.kernel(
      kernel, out_type=out_types([jax.ShapeDtypeStruct(args.u.shape, args.u.dtype)], args)[0],
      grid=(dim // LANES, batch), grid_names=("d", "b"),
      compiler_params=plgpu.CompilerParams(approx_math=True))(*xs, params)


_compiled: dict = {}


def _compiles(cfg, specs):
  """Whether the kernel compiles for this signature, compiled once per signature without the
  batch (a launch grid axis only: ``scan_call.without_batch``), so a model's training and
  evaluation batches share one standalone compile."""
  key = (cfg, without_batch(specs))
  if key not in _compiled:
    try:
      jax.jit(lambda a: forward(cfg, a)).lower(ScanArgs(*specs)).compile()
      _compiled[key] = True
    except Exception as e:  # a kernel that cannot compile must fall back, never fail the op
      log.warning("selective_scan: Mosaic GPU forward failed to compile for %s (%s: %s); using "
                  "the Triton forward", specs[0], type(e).__name__, e)
      _compiled[key] = False
  return _compiled[key]


def usable(cfg, args) -> bool:
  """Whether gpu_scan should run this inference forward: on an sm_90+ GPU, not in interpret
  mode, not turned off (``GpuTuning.fwd_backend="triton"``), shapes supported, and it compiles."""
  if cfg.interpret or cfg.tuning.fwd_backend != "mosaic" or not supports(args):
    return False
  if not _sm90_or_newer():
    return False
  return _compiles(cfg, signature(args))


def _sm90_or_newer() -> bool:
  """The kernel's TMA pipeline needs an NVIDIA GPU of compute capability 9.0 or newer (ROCm
  devices have no ``compute_capability``; A100s are 8.0)."""
  if jax.default_backend() != "gpu":
    return False
  try:
    return float(str(jax.devices()[0].compute_capability)) >= 9.0   # "9.0" on an H100
  except (AttributeError, TypeError, ValueError):
    return False
