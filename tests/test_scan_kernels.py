"""The selective-scan kernels (GPU and TPU) in interpret mode on CPU, against the float64 oracle
(forward) and the "reference" implementation's jax.grad (gradients); plus dispatch/fallback and a
check that the kernels lower for CUDA and TPU from this CPU machine.

"pallas_gpu" in interpret mode runs its default kernels, the Triton kernels, in Triton's
interpreter where torch is installed, and the Pallas-Triton kernels (the same algorithm) in
Pallas' interpreter where it is not. The CUDA export tests below are of the Pallas-Triton
kernels (their Triton IR is part of the export); tests/test_triton_kernels.py checks the
Triton kernels' compile and jax-triton lowering, and with --run-gpu the GPU tests here run the
default kernels natively.

Interpret mode is slow, so each length carries one combination of options rather than all of
them; together the cases cover reverse, both gap rules, D/z/delta_bias, no softplus, channel
counts that are not a multiple of the block, multi-chunk and multi-tile lengths, and bf16.
"""
import contextlib
import functools
import logging

import jax
from jax import export
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

from toppax.pallas_kernels import ptx, register_cap, scan_call
from toppax.pallas_kernels.tuning import GpuTuning
from toppax.ssm import default_implementation, get_implementation, ops, selective_scan
from toppax.tools import kernel_sass
from tests import scan_utils

IMPLS = ["pallas_gpu", "pallas_tpu"]
KEYS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


_rel = scan_utils.rel


def _case(seed, batch, length, dim, n, options, dtype=np.float32):
  x = scan_utils.random_inputs(seed, batch, length, dim, n, dtype=dtype)
  kw = {k: x[k] for k in ("u", "delta", "A", "B", "C")}
  for opt, key in (("D", "D"), ("z", "z"), ("bias", "delta_bias")):
    if opt in options or "all" in options:
      kw[key] = x[key]
  gaps = None
  if "gaps" in options:
    gaps = np.random.default_rng(seed).integers(0, 4, (batch, length))
  return kw, gaps


# (length, dim, options, reverse, gap_delta): each length once, options rotated over them.
FORWARD_CASES = [
    (1, 6, ("all",), False, "prev"),
    (7, 6, ("D", "z"), True, "prev"),
    (101, 40, ("all", "gaps"), False, "prev"),
    (125, 12, ("bias", "gaps"), True, "bias"),
    (157, 6, ("all", "gaps"), True, "prev"),
    (197, 20, ("all", "gaps"), False, "bias"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("length,dim,options,reverse,gap_delta", FORWARD_CASES)
def test_forward_matches_oracle(impl, length, dim, options, reverse, gap_delta):
  kw, gaps = _case(length, 2, length, dim, 4, options)
  ref = scan_utils.numpy_scan(**kw, reverse=reverse, gaps=gaps, gap_delta=gap_delta)
  y = selective_scan(**{k: jnp.asarray(v) for k, v in kw.items()}, reverse=reverse,
                     gaps=None if gaps is None else jnp.asarray(gaps), gap_delta=gap_delta,
                     implementation=impl, interpret=True)
  assert y.shape == ref.shape and y.dtype == jnp.float32
  assert _rel(y, ref) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_no_softplus_and_unpadded_state(impl):
  # N = 3 is not a power of two: the GPU kernel pads the state; D = 5 fills no block.
  x = scan_utils.random_inputs(3, 2, 9, 5, 3)
  x["delta"] = np.abs(x["delta"]) * 0.3
  ref = scan_utils.numpy_scan(**x, delta_softplus=False)
  y = selective_scan(**{k: jnp.asarray(v) for k, v in x.items()}, delta_softplus=False,
                     implementation=impl, interpret=True)
  assert _rel(y, ref) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("gap_delta", ["prev", "bias"])
def test_gaps_equal_masked_full_length_oracle(impl, reverse, gap_delta):
  full = scan_utils.random_inputs(11, 2, 23, 5, 4)
  pos, gaps_f, gaps_b = scan_utils.random_keep(5, 2, 23, 9)
  compact = scan_utils.compact(full, pos)
  y = selective_scan(**{k: jnp.asarray(v) for k, v in compact.items()}, reverse=reverse,
                     gaps=jnp.asarray(gaps_b if reverse else gaps_f), gap_delta=gap_delta,
                     implementation=impl, interpret=True)
  oracle = scan_utils.masked_oracle(full, pos, reverse=reverse, gap_delta=gap_delta)
  assert _rel(y, oracle) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_inputs_keep_fp32_state(impl):
  x = scan_utils.random_inputs(4, 2, 40, 8, 4)
  lo = {k: (jnp.asarray(v, jnp.bfloat16) if k in ("u", "delta", "B", "C", "z") else jnp.asarray(v))
        for k, v in x.items()}
  y = selective_scan(**lo, reverse=True, implementation=impl, interpret=True)
  assert y.dtype == jnp.bfloat16
  ref = scan_utils.numpy_scan(**{k: np.asarray(v, np.float32) for k, v in lo.items()},
                              reverse=True)
  assert _rel(y, ref) < 5e-3


def _grads(impl, x, gaps, *, reverse, gap_delta, interpret, dtype=jnp.float32):
  ct = jnp.asarray(np.random.default_rng(1).standard_normal(x["u"].shape), dtype)

  def loss(*a):
    y = selective_scan(*a, reverse=reverse, gaps=gaps, gap_delta=gap_delta, implementation=impl,
                       interpret=interpret)
    return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=tuple(range(8))))(*[x[k] for k in KEYS])


# (length, dim, reverse, gap_delta, with gaps): several checkpoint chunks/tiles and a partial one.
GRAD_CASES = [
    (13, 6, False, "prev", True),
    (13, 6, True, "prev", True),
    (13, 6, True, "bias", True),
    (7, 12, False, "prev", False),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("length,dim,reverse,gap_delta,with_gaps", GRAD_CASES)
def test_gradients_match_reference(impl, length, dim, reverse, gap_delta, with_gaps):
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(9, 2, length, dim, 4).items()}
  gaps = jnp.asarray(np.random.default_rng(0).integers(0, 3, (2, length))) if with_gaps else None
  g_ref = _grads("reference", x, gaps, reverse=reverse, gap_delta=gap_delta, interpret=False)
  g = _grads(impl, x, gaps, reverse=reverse, gap_delta=gap_delta, interpret=True)
  for k, a, b in zip(KEYS, g_ref, g):
    assert b.shape == a.shape and b.dtype == a.dtype, k
    assert _rel(b, a) < 1e-5, k


# Tunings that force many checkpoint chunks (GPU) and sequence tiles (TPU) at a short length.
SMALL_TUNING = {"pallas_gpu": dict(block_d=8, fwd_chunk=4, ckpt_every=4),
                "pallas_tpu": dict(lane_tile=128, max_seq_tile=8)}


# The GPU forward's layouts: two channels per thread with rows 2 steps ahead (what it picks at
# ViM-S batch 128) and one per thread with B/C 2 steps ahead; D = 70 leaves a partial block.
# The backward: one warp per program (3 programs, the last partial) or two (per-warp dB/dC
# partial sums), checkpoints every 4 or 3 steps, and checkpoint intervals walked in
# sub-chunks of 2 (11 = 3 + 2 x 4: a partial head of 2 + 1), of 1 step, or whole, each
# recomputed from the interval's checkpoint (the default sub-chunk of 2 does not divide
# ckpt_every=3, so that interval goes whole). A GpuTuning instance or a dict of some fields.
@pytest.mark.parametrize("tuning", [dict(block_d=64, rows_ahead=2, bc_ahead=1),
                                    dict(block_d=32, rows_ahead=3, bc_ahead=2, fwd_chunk=2),
                                    GpuTuning(bwd_num_warps=2, ckpt_every=3),
                                    dict(ckpt_every=4, bwd_chunk=2, bwd_maxnreg=168),
                                    dict(ckpt_every=3, bwd_chunk=1),
                                    dict(ckpt_every=4, bwd_chunk=4, bwd_maxnreg=None)])
def test_gpu_forward_layouts_and_lookahead(tuning):
  length = 11
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(5, 2, length, 70, 4).items()}
  gaps = np.random.default_rng(4).integers(0, 3, (2, length))
  fn = get_implementation("pallas_gpu")
  run = lambda *a: fn(*a, delta_softplus=True, reverse=True, gaps=jnp.asarray(gaps),
                      gap_delta="prev", interpret=True, tuning=tuning)
  ref = scan_utils.numpy_scan(**{k: np.asarray(v) for k, v in x.items()}, reverse=True,
                              gaps=gaps, gap_delta="prev")
  args = [x[k] for k in KEYS]
  assert _rel(run(*args), ref) < 1e-5
  ct = jnp.asarray(np.random.default_rng(2).standard_normal(x["u"].shape), jnp.float32)
  g = jax.grad(lambda *a: jnp.sum(run(*a) * ct), argnums=tuple(range(8)))(*args)
  g_ref = jax.grad(lambda *a: jnp.sum(selective_scan(
      *a, reverse=True, gaps=jnp.asarray(gaps), implementation="reference") * ct),
      argnums=tuple(range(8)))(*args)
  for k, a, b in zip(KEYS, g_ref, g):
    assert _rel(b, a) < 1e-5, k


# The backward's hand-out of B_t, C_t to the lanes in their state order (one entry per lane,
# then shfl.idx) and its select-free reduce-scatter at several state counts: 16 (ViM), 3 (padded
# to 4), 1 and 64 (two programs of 32 states, the most one holds: the reduce-scatter leaves one
# state per lane); two warps per program give per-warp partials. N = 64 is slow in interpret
# mode.
SLOW_64 = pytest.mark.slow


@pytest.mark.parametrize("n,warps", [(16, 1), (16, 2), (3, 1), (1, 1),
                                     pytest.param(64, 1, marks=SLOW_64)])
def test_gpu_backward_state_orders(n, warps):
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(7, 2, 6, 40, n).items()}
  tuning = GpuTuning(bwd_num_warps=warps, bwd_states=32)
  fn = get_implementation("pallas_gpu")
  run = lambda *a: fn(*a, delta_softplus=True, reverse=False, gaps=None, gap_delta="prev",
                      interpret=True, tuning=tuning)
  args = [x[k] for k in KEYS]
  ct = jnp.asarray(np.random.default_rng(5).standard_normal(x["u"].shape), jnp.float32)
  g = jax.grad(lambda *a: jnp.sum(run(*a) * ct), argnums=tuple(range(8)))(*args)
  g_ref = jax.grad(lambda *a: jnp.sum(selective_scan(*a, implementation="reference") * ct),
                   argnums=tuple(range(8)))(*args)
  for k, a, b in zip(KEYS, g_ref, g):
    assert _rel(b, a) < 1e-5, k


# More states than one program holds (GpuTuning fwd_states / bwd_states, default 16):
# the states split into groups, one program each; y, du, dΔ, dz, dD and the bias gradients are
# summed over the groups (the D skip's terms counted once), and the backward reads checkpoints
# the forward wrote with other groups. D = 40 is not a multiple of the 32-channel block (the
# mask then reads the grid's second axis). N = 40 pads to 64: 4 groups each way.
@pytest.mark.parametrize("n,fwd_states,bwd_states,reverse,gap_delta,dtype", [
    (5, 4, 2, True, "bias", jnp.float32), (12, 16, 4, False, "prev", jnp.float32),
    (7, 2, 8, False, "prev", jnp.bfloat16), (40, 16, 16, True, "prev", jnp.float32)])
def test_gpu_state_groups(n, fwd_states, bwd_states, reverse, gap_delta, dtype):
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(9, 2, 9, 40, n).items()}
  if dtype != jnp.float32:
    x = {k: v.astype(dtype) if k in ("u", "delta", "B", "C", "z") else v for k, v in x.items()}
  gaps = jnp.asarray(np.random.default_rng(4).integers(0, 3, (2, 9)))
  fn = get_implementation("pallas_gpu")
  tuning = GpuTuning(fwd_states=fwd_states, bwd_states=bwd_states)
  args = [x[k] for k in KEYS]
  ct = jnp.asarray(np.random.default_rng(5).standard_normal(x["u"].shape), jnp.float32)
  kw = dict(delta_softplus=True, reverse=reverse, gaps=gaps, gap_delta=gap_delta)
  y = fn(*args, **kw, interpret=True, tuning=tuning)           # the inference forward
  y_ref = selective_scan(*args, **kw, implementation="reference")
  assert y.dtype == y_ref.dtype
  assert _rel(y.astype(jnp.float32), y_ref.astype(jnp.float32)) < (
      1e-5 if dtype == jnp.float32 else 5e-3)

  def loss(impl, *a):
    kw = dict(interpret=True, tuning=tuning) if impl == "pallas_gpu" else {}
    y = (fn if impl == "pallas_gpu" else functools.partial(selective_scan,
                                                            implementation="reference"))(
        *a, delta_softplus=True, reverse=reverse, gaps=gaps, gap_delta=gap_delta, **kw)
    return jnp.sum(y.astype(jnp.float32) * ct)

  g = jax.grad(functools.partial(loss, "pallas_gpu"), argnums=tuple(range(8)))(*args)
  g_ref = jax.grad(functools.partial(loss, "reference"), argnums=tuple(range(8)))(*args)
  tol = 1e-5 if dtype == jnp.float32 else 5e-3
  for k, a, b in zip(KEYS, g_ref, g):
    assert b.dtype == a.dtype, k
    assert _rel(b.astype(jnp.float32), a.astype(jnp.float32)) < tol, k


def test_default_states_per_program_split_where_a_launch_leaves_sms_idle():
  from toppax.pallas_kernels import gpu_scan
  assert GpuTuning().fwd_states is None and GpuTuning().bwd_states is None
  # UperNet ViM-T at batch 8 on an H100: 8 x 384 / 32 = 96 programs for 132 SMs -> 8 states.
  assert gpu_scan.states_per_program(None, 8, 384, 32, 132) == 8
  # ViM-S classification at batch 128: 3,072 programs -> 16.
  assert gpu_scan.states_per_program(None, 128, 768, 64, 132) == 16
  assert gpu_scan.states_per_program(None, 8, 384, 32, 96) == 16        # one wave already
  assert gpu_scan.states_per_program(None, 8, 384, 32, None) == 16      # SM count unknown
  assert gpu_scan.states_per_program(4, 8, 384, 32, 132) == 4           # the tuning's own
  # Interpret mode (CPU) knows no SM count: the kernels keep 16 states per program.
  x = {k: jnp.zeros((1, 4, 8)) for k in ("u", "delta", "z")}
  cfg, args = gpu_scan.KERNELS.configure(
      x["u"], x["delta"], jnp.zeros((8, 16)), jnp.zeros((1, 4, 16)), jnp.zeros((1, 4, 16)),
      None, x["z"], None, delta_softplus=True, reverse=False, gaps=None, gap_delta="prev",
      interpret=True)
  assert gpu_scan.forward_static(cfg, args, save=True).n == 16
  assert gpu_scan.backward_static(cfg, args).n == 16


@pytest.mark.parametrize("key", ["fwd_states", "bwd_states"])
def test_bad_state_groups_are_refused(key):
  fn = get_implementation("pallas_gpu")
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(0, 1, 4, 8, 4).items()}
  for bad in (0, 3, 64, True, "16"):
    tuning = {key: bad}
    with pytest.raises(ValueError, match=key):
      jax.grad(lambda u: jnp.sum(fn(u, *[x[k] for k in KEYS[1:]], delta_softplus=True,
                                    reverse=False, gaps=None, gap_delta="prev", interpret=True,
                                    tuning=tuning)))(x["u"])


def test_reduce_scatter_sums_every_state():
  # ptx.Warp in interpret mode: for every state count, lane L's k-th sum is the warp total of
  # state k ^ state_order(m)[L], from registers in state_order(m), with and without a scale.
  warp = ptx.Warp(True, 64)
  rng = np.random.default_rng(0)
  for m in (1, 2, 4, 8, 16, 32, 64):
    values = rng.standard_normal((m, 64)).astype(np.float32)        # state j on channel c
    order = np.asarray(warp.state_order(m))
    regs = [jnp.asarray(values[k ^ order, np.arange(64)]) for k in range(m)]
    assert all(np.array_equal(np.asarray(r), values[k ^ order, np.arange(64)])
               for k, r in enumerate(warp.permute([jnp.asarray(v) for v in values],
                                                  jnp.asarray(order))))
    scale = rng.standard_normal(64).astype(np.float32)                # per channel
    for s, sums in [(1.0, warp.reduce_scatter(regs)),
                    (scale, warp.reduce_scatter(regs, jnp.asarray(scale)))]:
      totals = (values * s).reshape(m, 2, 32).sum(-1)               # (state, warp)
      for k, v in enumerate(sums):
        want = totals[k ^ order, np.arange(64) // 32]
        np.testing.assert_allclose(np.asarray(v), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl,tuning", [("pallas_gpu", dict(ckpt_evry=8)),
                                         ("pallas_gpu", dict(lane_tile=128)),
                                         ("pallas_tpu", dict(block_d=64))])
def test_unknown_tuning_keys_are_refused(impl, tuning):
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(0, 1, 3, 8, 4).items()}
  with pytest.raises(ValueError, match=f"{impl} tuning: unknown key.*{next(iter(tuning))}"):
    get_implementation(impl)(*[x[k] for k in KEYS], delta_softplus=True, reverse=False,
                             gaps=None, gap_delta="prev", interpret=True, tuning=tuning)


@pytest.mark.parametrize("tuning,message", [
    (dict(fwd_backend="cuda"), "fwd_backend must be 'mosaic' or 'triton'"),
    (dict(block_d=48), "block_d must be a power of two"),
    (dict(ckpt_every=0), "ckpt_every must be an int >= 1"),
    (dict(lane_tile=96), "lane_tile must be a multiple of 128")])
def test_bad_tuning_values_are_refused(tuning, message):
  impl = "pallas_tpu" if "lane_tile" in tuning else "pallas_gpu"
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(0, 1, 3, 8, 4).items()}
  with pytest.raises(ValueError, match=message):
    get_implementation(impl)(*[x[k] for k in KEYS], delta_softplus=True, reverse=False,
                             gaps=None, gap_delta="prev", interpret=True, tuning=tuning)
  with pytest.raises(TypeError, match="GpuTuning or a dict"):
    get_implementation("pallas_gpu")(*[x[k] for k in KEYS], delta_softplus=True, reverse=False,
                                     gaps=None, gap_delta="prev", interpret=True, tuning=[1])


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_across_many_chunks_and_tiles(impl):
  length = 21
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(12, 2, length, 10, 4).items()}
  gaps = jnp.asarray(np.random.default_rng(3).integers(0, 3, (2, length)))
  fn = get_implementation(impl)
  ct = jnp.asarray(np.random.default_rng(1).standard_normal(x["u"].shape), jnp.float32)

  def loss(name, **kw):
    f = (lambda *a: fn(*a, delta_softplus=True, reverse=True, gaps=gaps, gap_delta="prev",
                       interpret=True, tuning=SMALL_TUNING[impl])) if name == impl else (
        lambda *a: selective_scan(*a, reverse=True, gaps=gaps, implementation="reference"))
    return lambda *a: jnp.sum(f(*a) * ct)

  args = [x[k] for k in KEYS]
  g_ref = jax.jit(jax.grad(loss("reference"), argnums=tuple(range(8))))(*args)
  g = jax.jit(jax.grad(loss(impl), argnums=tuple(range(8))))(*args)
  for k, a, b in zip(KEYS, g_ref, g):
    assert _rel(b, a) < 1e-5, k


# State sizes other than the 4 used above: N = 1 (a single state; the GPU backward's warp
# reduce-scatter has nothing to halve) and N = 3 (zero-padded to 4 on the GPU).
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [1, 3])
def test_gradients_at_odd_state_sizes(impl, n):
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(3, 2, 9, 8, n).items()}
  gaps = jnp.asarray(np.random.default_rng(5).integers(0, 3, (2, 9)))
  g_ref = _grads("reference", x, gaps, reverse=False, gap_delta="prev", interpret=False)
  g = _grads(impl, x, gaps, reverse=False, gap_delta="prev", interpret=True)
  for k, a, b in zip(KEYS, g_ref, g):
    assert b.shape == a.shape, k
    assert _rel(b, a) < 1e-5, k


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("length", [101, 125, 157, 197])
@pytest.mark.parametrize("reverse", [False, True])
def test_gradients_match_reference_long(impl, length, reverse):
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(5, 2, length, 20, 4).items()}
  gaps = jnp.asarray(np.random.default_rng(2).integers(0, 3, (2, length)))
  g_ref = _grads("reference", x, gaps, reverse=reverse, gap_delta="prev", interpret=False)
  g = _grads(impl, x, gaps, reverse=reverse, gap_delta="prev", interpret=True)
  for k, a, b in zip(KEYS, g_ref, g):
    assert _rel(b, a) < 1e-5, k


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_gradients(impl):
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(6, 2, 11, 8, 4).items()}
  lo = {k: (v.astype(jnp.bfloat16) if k in ("u", "delta", "B", "C", "z") else v)
        for k, v in x.items()}
  # Reference: float32 maths on the same bf16-rounded inputs.
  up = {k: v.astype(jnp.float32) for k, v in lo.items()}
  g_ref = _grads("reference", up, None, reverse=False, gap_delta="prev", interpret=False)
  g = _grads(impl, lo, None, reverse=False, gap_delta="prev", interpret=True,
             dtype=jnp.bfloat16)
  for k, a, b in zip(KEYS, g_ref, g):
    assert b.dtype == lo[k].dtype, k
    assert _rel(b, a) < 5e-3, k


def test_default_dispatch_on_cpu_is_xla():
  assert default_implementation("cpu") == "xla"
  assert default_implementation("gpu") == "pallas_gpu"
  assert default_implementation("tpu") == "pallas_tpu"


def test_kernel_that_cannot_run_falls_back_to_xla_with_warning(caplog):
  # On this CPU machine, pallas_gpu without interpret cannot lower: the answer must still be
  # right (the XLA fallback) and the fall back must be logged.
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(2, 2, 8, 4, 3).items()}
  with caplog.at_level(logging.WARNING):
    y = selective_scan(**x, implementation="pallas_gpu")
  assert "falling back to 'xla'" in caplog.text
  np.testing.assert_allclose(np.asarray(y), np.asarray(selective_scan(**x, implementation="xla")),
                             rtol=1e-6, atol=1e-6)


def test_compile_failure_falls_back_to_xla(caplog, monkeypatch):
  # On its own platform (planted: the default backend reports "gpu"), a kernel that does not
  # build gives the XLA answer and a warning naming the error.
  from toppax.pallas_kernels import gpu_scan

  def broken(*a, **k):
    raise RuntimeError("planted lowering failure")

  monkeypatch.setattr(gpu_scan.KERNELS, "forward", broken)
  monkeypatch.setattr(ops.jax, "default_backend", lambda: "gpu")
  scan_call._failure.cache_clear()
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(3, 1, 5, 4, 2).items()}
  with caplog.at_level(logging.WARNING):
    y = get_implementation("pallas_gpu")(**x, delta_softplus=True, reverse=False, gaps=None,
                                         gap_delta="prev", interpret=False)
  scan_call._failure.cache_clear()
  assert "planted lowering failure" in caplog.text
  np.testing.assert_allclose(np.asarray(y), scan_utils.numpy_scan(**x), rtol=1e-5, atol=1e-6)


def test_triton_kernels_that_do_not_build_give_way_to_pallas_triton(caplog, monkeypatch):
  # On its own platform (planted: "gpu"), where the Triton kernels do not build the op runs the
  # Pallas-Triton kernels if they build, and "xla" if neither does.
  from toppax.pallas_kernels import gpu_scan
  calls = []
  broken = {"triton"}

  def failure(self, cfg, args, training=False):
    return f"planted {cfg.tuning.kernels} failure" if cfg.tuning.kernels in broken else None

  def forward(cfg, args, save):
    calls.append(cfg.tuning.kernels)
    return jnp.zeros(args.u.shape, args.u.dtype), None

  monkeypatch.setattr(scan_call.Kernels, "failure", failure)
  monkeypatch.setattr(gpu_scan.KERNELS, "forward", forward)
  monkeypatch.setattr(ops.jax, "default_backend", lambda: "gpu")
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(3, 1, 5, 4, 2).items()}
  scan = lambda: get_implementation("pallas_gpu")(**x, delta_softplus=True, reverse=False,
                                                  gaps=None, gap_delta="prev", interpret=False)
  with caplog.at_level(logging.WARNING):
    scan()
  assert calls == ["pallas_triton"]
  assert "planted triton failure; running the Pallas-Triton kernels instead" in caplog.text
  broken.add("pallas_triton")
  y = scan()
  assert calls == ["pallas_triton"] and "falling back to 'xla'" in caplog.text
  np.testing.assert_allclose(np.asarray(y), scan_utils.numpy_scan(**x), rtol=1e-5, atol=1e-6)


def test_training_kernels_are_checked_only_where_the_scan_is_differentiated(caplog, monkeypatch):
  # Evaluation checks (builds) the inference forward only; a program that differentiates the
  # scan checks the training forward and the backward. Where only the training kernels do not
  # build, evaluation keeps its kernels and the gradient comes from "xla" (forward recomputed
  # in the backward), with a warning.
  from toppax.pallas_kernels import gpu_scan
  checked = []

  def check(kernels, cfg, specs, training):
    checked.append(training)
    return "planted training failure" if training else None

  monkeypatch.setattr(scan_call, "_check", check)
  monkeypatch.setattr(ops.jax, "default_backend", lambda: "gpu")
  # The inference kernels (planted): the XLA answer, computed apart, so that values can be
  # compared with the reference while only the dispatch is under test.
  monkeypatch.setattr(gpu_scan.KERNELS, "forward",
                      lambda cfg, args, save: (ops._xla_on_args(cfg, args), None))
  scan_call._failure.cache_clear()
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(3, 2, 6, 4, 2).items()}
  impl = functools.partial(get_implementation("pallas_gpu"), delta_softplus=True,
                           reverse=False, gaps=None, gap_delta="prev", interpret=False)
  xla = functools.partial(get_implementation("xla"), delta_softplus=True, reverse=False,
                          gaps=None, gap_delta="prev", interpret=False)
  try:
    jax.jit(lambda a: impl(**a))(x)
    assert checked == [False]                      # evaluation: the inference forward only
    loss = lambda f: (lambda a: jnp.sum(f(**a) ** 2))
    with caplog.at_level(logging.WARNING):
      grads = jax.jit(jax.grad(loss(impl)))(x)
    # The training kernels, and their Pallas-Triton alternative since they failed; once.
    assert checked == [False, True, True]
    jax.jit(jax.grad(loss(impl)))(x)
    assert checked == [False, True, True]
    assert "planted training failure; falling back to 'xla'" in caplog.text
    want = jax.grad(loss(xla))(x)
    for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"):
      np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(want[k]), rtol=1e-5,
                                 atol=1e-6, err_msg=k)
  finally:
    scan_call._failure.cache_clear()


def test_build_check_runs_once_per_build_class(caplog, monkeypatch):
  # A model's evaluation batch differs from its training batch: one build check serves every
  # batch size of a build class. A failing verdict carries over the same way (the other batch
  # falls back too, with a warning).
  from toppax.pallas_kernels import gpu_scan
  checked = []
  verdict = {"why": None}

  def check(kernels, cfg, specs, training):
    checked.append(specs[0].shape)
    return verdict["why"]

  monkeypatch.setattr(scan_call, "_check", check)
  monkeypatch.setattr(ops.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(gpu_scan.KERNELS, "forward",
                      lambda cfg, args, save: (jnp.zeros(args.u.shape, args.u.dtype), None))
  scan_call._failure.cache_clear()

  def scan(batch, length=5):
    x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(3, batch, length, 4, 2).items()}
    return get_implementation("pallas_gpu")(**x, delta_softplus=True, reverse=False, gaps=None,
                                            gap_delta="prev", interpret=False)
  try:
    scan(2), scan(3), scan(7)
    assert checked == [(2, 5, 4)]                 # one check for three batch sizes
    scan(2, length=6)
    assert checked == [(2, 5, 4), (2, 6, 4)]      # another length is another kernel
    verdict["why"] = "planted failure"
    with caplog.at_level(logging.WARNING):
      scan(2, length=7)
      y = scan(5, length=7)
    # Batch 2 checks the Triton kernels and their Pallas-Triton alternative; batch 5 nothing.
    assert checked[2:] == [(2, 7, 4), (2, 7, 4)]
    assert caplog.text.count("planted failure") == 2 and "falling back to 'xla'" in caplog.text
    assert np.asarray(y).any()                    # the XLA answer, not the planted kernels' zeros
  finally:
    scan_call._failure.cache_clear()

  # The class is the batchless signature plus the kernels' own configurations: where the batch
  # changes a kernel's code (two channels per thread from batch x D = 65,536 on), it is its own.
  def specs(batch, dim=384):
    x = scan_utils.random_inputs(0, 1, 3, 1, 16)
    shapes = dict(u=(batch, 64, dim), delta=(batch, 64, dim), A=(dim, 16), B=(batch, 64, 16),
                  C=(batch, 64, 16), D=(dim,), z=(batch, 64, dim), delta_bias=(dim,))
    args = scan_call.ScanArgs(*(jax.ShapeDtypeStruct(shapes[k], x[k].dtype) for k in KEYS),
                              gaps=None)
    return scan_call.signature(args)
  cfg, _ = gpu_scan.KERNELS.configure(*(jnp.zeros(s.shape, s.dtype) for s in specs(1)[:8]),
                                      delta_softplus=True, reverse=False, gaps=None,
                                      gap_delta="prev", interpret=False)
  cls = lambda b: gpu_scan.build_class(cfg, specs(b))
  assert cls(32) == cls(100) != cls(200)
  assert cls(scan_call.GRID_LIMIT + 1) == specs(scan_call.GRID_LIMIT + 1)
  # The check compiles the inference forward only for kernels that XLA's compile builds (the
  # Pallas-Triton ones); jax-triton builds the Triton kernels while lowering.
  from toppax.pallas_kernels import triton_scan
  monkeypatch.setattr(triton_scan, "unavailable", lambda: None)
  assert not gpu_scan.KERNELS.compile_forward(cfg)
  assert gpu_scan.KERNELS.compile_forward(gpu_scan._pallas_triton_instead(cfg)[0])


def test_mosaic_forward_compiles_once_across_batch_sizes(monkeypatch):
  # Its standalone compile check (mgpu_scan.usable) is shared by a model's batch sizes.
  from toppax.pallas_kernels import gpu_scan, mgpu_scan
  traced = []

  def forward(cfg, args):
    traced.append(args.u.shape)
    return args.u * 2

  monkeypatch.setattr(mgpu_scan, "forward", forward)
  monkeypatch.setattr(mgpu_scan, "_compiled", {})
  for batch in (2, 3, 2):
    x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(0, batch, 5, 4, 2).items()}
    cfg, args = gpu_scan.KERNELS.configure(**x, delta_softplus=True, reverse=False, gaps=None,
                                           gap_delta="prev", interpret=False)
    assert mgpu_scan._compiles(cfg, scan_call.signature(args))
  assert traced == [(2, 5, 4)]


# (dtype, N, with z, gap rule, reverse, batch): ViM's bf16 call, fp32 with a padded state and no
# gate, and a batch x D of 76,800 (past gpu_scan.WIDE_CHANNELS: two channels per thread).
EXPORT_CASES = [(jnp.bfloat16, 16, True, "bias", True, 2),
                (jnp.float32, 3, False, "prev", False, 2),
                (jnp.float32, 16, True, "prev", False, 384)]


PALLAS_TRITON = GpuTuning(kernels="pallas_triton")


def _export_grad(impl, platform, disabled, dtype, n, with_z, gap_delta, reverse, b,
                 tuning=PALLAS_TRITON):
  fn = get_implementation(impl)
  if impl == "pallas_tpu" and tuning is PALLAS_TRITON:
    tuning = None

  def f(u, delta, A, B, C, D, z, bias, gaps):
    def loss(*a):
      return jnp.sum(fn(*a, delta_softplus=True, reverse=reverse, gaps=gaps, gap_delta=gap_delta,
                        interpret=False, check_lowering=False,
                        tuning=tuning).astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=tuple(range(8)))(u, delta, A, B, C, D, z, bias)

  S = jax.ShapeDtypeStruct
  length, d = 197, 200           # D = 200 overhangs the GPU's 32- and 64-channel blocks
  seq = S((b, length, d), dtype)
  args = [seq, seq, S((d, n), jnp.float32), S((b, length, n), dtype), S((b, length, n), dtype),
          S((d,), jnp.float32), seq if with_z else None, S((d,), jnp.float32),
          S((b, length), jnp.int32)]
  with kernel_sass.gpu_target() if platform == "cuda" else contextlib.nullcontext():
    exp = export.export(jax.jit(f), platforms=[platform], disabled_checks=disabled)(*args)
  return exp.mlir_module()


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_gpu_kernels_lower_for_cuda(case):
  # Pallas lowers to Triton IR at export time; the custom call is not on export's list of
  # stable targets, hence the disabled checks (both names: jax 0.10 and 0.11).
  disabled = [export.DisabledSafetyCheck.custom_call(t)
              for t in ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")]
  text = _export_grad("pallas_gpu", "cuda", disabled, *case)
  assert text.count("selective_scan_fwd") >= 1 and text.count("selective_scan_bwd") >= 1


_CUDA_DISABLED = [export.DisabledSafetyCheck.custom_call(t)
                  for t in ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")]


def test_register_cap_reaches_the_triton_module():
  # register_cap: the cap rides in the kernel's name and lands as the module attribute
  # ttg.maxnreg in the Triton IR that XLA compiles (Triton turns it into PTX .maxnreg).
  case = (jnp.float32, 16, True, "prev", False, 2)
  tuning = GpuTuning(bwd_maxnreg=168, maxnreg=200, bwd_chunk=2, kernels="pallas_triton")
  text = _export_grad("pallas_gpu", "cuda", _CUDA_DISABLED, *case, tuning=tuning)
  assert register_cap.installed()
  assert "selective_scan_bwd_maxnreg168" in text and "selective_scan_fwd_maxnreg200" in text
  assert text.count("ttg.maxnreg") == 2
  plain = _export_grad("pallas_gpu", "cuda", _CUDA_DISABLED, *case,
                       tuning=GpuTuning(maxnreg=None, bwd_maxnreg=None, kernels="pallas_triton"))
  assert "ttg.maxnreg" not in plain
  for bad in (dict(bwd_maxnreg=300), dict(bwd_maxnreg=16), dict(maxnreg=True),
              dict(ckpt_every=4, bwd_chunk=3), dict(bwd_chunk=True)):
    with pytest.raises(ValueError, match="maxnreg|bwd_chunk"):
      _export_grad("pallas_gpu", "cuda", _CUDA_DISABLED, *case,
                   tuning=dict(bad, kernels="pallas_triton"))


@pytest.mark.parametrize("tuning,n", [({}, 16), ({"bwd_num_warps": 2}, 16), ({}, 40),
                                      ({"ckpt_every": 3, "bwd_chunk": 1}, 16)])
def test_gpu_kernels_use_no_atomics_and_explicit_fmas(tuning, n):
  # Determinism: no atomics, so two runs give identical bits. Every cross-program sum (dB/dC
  # per warp, dA/dD/dbias per batch element, state groups) is a separate output that XLA adds;
  # this checks the Triton IR that XLA compiles for both kernels, with two warps per program,
  # with state groups (N = 40: four) and with restarts from the checkpoint. XLA compiles it
  # with FP contraction off, so the state updates must be explicit fma.rn (ptx.FastMath.fma).
  with kernel_sass.gpu_target():
    modules = kernel_sass.triton_ir(GpuTuning(**tuning), dim=64, batch=2, length=9, n=n)
  assert {name.split("_maxnreg")[0] for name in modules} == {"selective_scan_fwd",
                                                             "selective_scan_bwd"}
  for name, ir in modules.items():
    assert "tt.load" in ir and "tt.store" in ir, name      # the IR text is what we think it is
    assert "atomic" not in ir, name
    assert ir.count("fma.rn.f32") >= 2 * min(n, 16), name   # a.h + B.du, C.h (or dh) per state


@pytest.mark.gpu
def test_gpu_gradients_are_bitwise_repeatable():
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU backend")
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(3, 4, 197, 256, 16).items()}
  gaps = jnp.asarray(np.random.default_rng(3).integers(0, 3, (4, 197)))
  first = _grads("pallas_gpu", x, gaps, reverse=True, gap_delta="prev", interpret=False)
  again = _grads("pallas_gpu", x, gaps, reverse=True, gap_delta="prev", interpret=False)
  for k, a, b in zip(KEYS, first, again):
    assert np.array_equal(np.asarray(a), np.asarray(b)), k


def test_gpu_kernels_lower_under_checked_shard_map():
  # jax.shard_map checks varying axes by default (check_vma=True): the kernels' outputs must be
  # typed as varying over the mesh (scan_call.out_types), and A, a replicated input, gets its
  # gradient summed over the mesh (an all-reduce). Both GPU kernels: the Triton forward and
  # backward under the gradient, the Mosaic GPU inference forward on its own.
  from toppax.pallas_kernels import mgpu_scan
  fn = get_implementation("pallas_gpu")
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
  mesh = jax.sharding.AbstractMesh((2,), ("data",), abstract_device=device)
  d, rep = P("data"), P()

  def scan(u, A, B, C):
    return fn(u, u, A, B, C, None, None, None, delta_softplus=True, reverse=False, gaps=None,
              gap_delta="prev", interpret=False, check_lowering=False, tuning=PALLAS_TRITON)

  def grad(u, A, B, C):
    loss = lambda *a: jnp.sum(jax.shard_map(scan, mesh=mesh, in_specs=(d, rep, d, d),
                                            out_specs=d, check_vma=True)(*a))
    return jax.value_and_grad(loss, argnums=(0, 1))(u, A, B, C)

  def mosaic(u, A, B, C):
    cfg = scan_call.ScanConfig(delta_softplus=True, reverse=False, gap_delta=None,
                               has_z=False, interpret=False, tuning=GpuTuning())
    zeros = jnp.zeros((u.shape[-1],), jnp.float32)
    args = scan_call.varying_like(scan_call.ScanArgs(u, u, A, B, C, zeros, None, zeros, None))
    return mgpu_scan.forward(cfg, args)

  S, named = jax.ShapeDtypeStruct, jax.sharding.NamedSharding
  b, length, dim, n = 4, 197, 256, 16
  args = [S((b, length, dim), jnp.float32, sharding=named(mesh, d)),
          S((dim, n), jnp.float32, sharding=named(mesh, rep)),
          S((b, length, n), jnp.float32, sharding=named(mesh, d)),
          S((b, length, n), jnp.float32, sharding=named(mesh, d))]
  with jax.sharding.use_abstract_mesh(mesh):
    text = export.export(jax.jit(grad), platforms=["cuda"], disabled_checks=_CUDA_DISABLED)(
        *args).mlir_module()
    assert "selective_scan_fwd" in text and "selective_scan_bwd" in text
    assert "all_reduce" in text or "all-reduce" in text
    sharded = jax.shard_map(mosaic, mesh=mesh, in_specs=(d, rep, d, d), out_specs=d,
                            check_vma=True)
    text = export.export(jax.jit(sharded), platforms=["cuda"])(*args).mlir_module()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_tpu_kernels_lower_for_tpu(case):
  text = _export_grad("pallas_tpu", "tpu", [], *case)
  assert "tpu_custom_call" in text and "selective_scan_bwd_tpu" in text


# The Mosaic GPU inference forward (gpu_scan hands it the forward when it runs on a GPU) lowers
# for CUDA with every option; its values are checked on the GPU (test_mosaic_forward_on_gpu).
@pytest.mark.parametrize("dtype,with_z,gap_delta,reverse,softplus", [
    (jnp.bfloat16, True, "bias", True, True), (jnp.float32, False, "prev", False, False),
    (jnp.float32, True, None, True, True)])
def test_mosaic_gpu_forward_lowers_for_cuda(dtype, with_z, gap_delta, reverse, softplus):
  from toppax.pallas_kernels import mgpu_scan
  S = jax.ShapeDtypeStruct
  b, length, d, n = 2, 197, 256, 16
  seq = S((b, length, d), dtype)
  args = scan_call.ScanArgs(seq, seq, S((d, n), jnp.float32), S((b, length, n), dtype),
                         S((b, length, n), dtype), S((d,), jnp.float32),
                         seq if with_z else None, S((d,), jnp.float32),
                         None if gap_delta is None else S((b, length), jnp.float32))
  cfg = scan_call.ScanConfig(delta_softplus=softplus, reverse=reverse, gap_delta=gap_delta,
                             has_z=with_z, interpret=False, tuning=GpuTuning())
  text = export.export(jax.jit(lambda a: mgpu_scan.forward(cfg, a)), platforms=["cuda"])(
      args).mlir_module()
  assert "mosaic_gpu" in text
  assert mgpu_scan.supports(args)
  if jax.default_backend() != "gpu":
    assert not mgpu_scan.usable(cfg, args)      # gpu_scan keeps its Triton forward off-GPU
  odd = args._replace(u=S((b, length, 200), dtype))
  assert not mgpu_scan.supports(odd)
  with pytest.raises(ValueError, match="multiple"):
    mgpu_scan.forward(cfg, odd)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_z,gap_delta,reverse,softplus", [
    (True, None, False, True), (True, "prev", True, True), (False, "bias", False, True),
    (True, "bias", True, False), (False, "prev", False, False)])
def test_mosaic_forward_on_gpu(dtype, with_z, gap_delta, reverse, softplus):
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU backend")
  from toppax.pallas_kernels import mgpu_scan
  length = 37                                   # several chunks and a partial one
  x = scan_utils.random_inputs(7, 3, length, 256, 16)
  if not softplus:                              # Δ must stay positive without softplus
    x["delta"] = np.abs(x["delta"]) * 0.3
    x["delta_bias"] = np.abs(x["delta_bias"]) * 0.1
  gaps = None if gap_delta is None else np.random.default_rng(2).integers(0, 4, (3, length))
  kw = {k: x[k] for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")}
  kw["z"] = x["z"] if with_z else None
  ref = scan_utils.numpy_scan(**kw, delta_softplus=softplus, reverse=reverse, gaps=gaps,
                              gap_delta=gap_delta or "prev")
  low = lambda k: jnp.asarray(kw[k]).astype(dtype) if k in ("u", "delta", "B", "C", "z") else (
      jnp.asarray(kw[k]))
  args = scan_call.prepare(*(None if kw[k] is None else low(k) for k in KEYS),
                           None if gaps is None else jnp.asarray(gaps))
  cfg = scan_call.ScanConfig(delta_softplus=softplus, reverse=reverse, gap_delta=gap_delta,
                             has_z=with_z, interpret=False, tuning=GpuTuning())
  assert mgpu_scan.usable(cfg, args)
  y = jax.jit(lambda a: mgpu_scan.forward(cfg, a))(args)
  tol = 1e-5 if dtype == jnp.float32 else 5e-3
  if dtype == jnp.float32:
    assert _rel(y, ref) < tol
  else:                                         # against the same bf16-rounded inputs in float32
    kw32 = {k: (None if v is None else np.asarray(jnp.asarray(v).astype(dtype), np.float32))
            for k, v in kw.items()}
    ref16 = scan_utils.numpy_scan(**kw32, delta_softplus=softplus, reverse=reverse, gaps=gaps,
                                  gap_delta=gap_delta or "prev")
    assert _rel(y, ref16) < tol
  # The op on a GPU takes this path for its forward and agrees with the Triton forward.
  y_op = selective_scan(*(None if kw[k] is None else low(k) for k in KEYS),
                        delta_softplus=softplus, reverse=reverse,
                        gaps=None if gaps is None else jnp.asarray(gaps),
                        gap_delta=gap_delta or "prev", implementation="pallas_gpu")
  assert _rel(y_op, y) < 1e-6


# More than 32 states, natively on the GPU (N = 33 pads to 64: four backward programs of 16
# states), against jax.grad of the lax.scan reference at "highest" precision.
@pytest.mark.gpu
@pytest.mark.parametrize("n", [33, 64])
def test_gpu_gradients_beyond_32_states(n):
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU backend")
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(8, 2, 23, 96, n).items()}
  gaps = jnp.asarray(np.random.default_rng(6).integers(0, 3, (2, 23)))
  with jax.default_matmul_precision("highest"):
    g_ref = _grads("reference", x, gaps, reverse=True, gap_delta="prev", interpret=False)
    g = _grads("pallas_gpu", x, gaps, reverse=True, gap_delta="prev", interpret=False)
  for k, a, b in zip(KEYS, g_ref, g):
    assert _rel(b, a) < 1e-5, k


# The default GPU path for training: the Triton kernels through jax-triton (custom call
# "triton_kernel_call"), with no Pallas-Triton lowering and so no deprecation warning; the
# Pallas-Triton kernels, still selectable, compute the same values.
@pytest.mark.gpu
def test_default_gpu_training_uses_triton_kernels_without_deprecation_warning():
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU backend")
  import warnings
  from toppax.pallas_kernels import gpu_scan
  cfg = scan_call.ScanConfig(delta_softplus=True, reverse=True, gap_delta="prev", has_z=True,
                             interpret=False, tuning=GpuTuning())
  assert gpu_scan.kernels_for(cfg) == "triton"
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(4, 3, 197, 256, 16).items()}
  gaps = jnp.asarray(np.random.default_rng(7).integers(0, 3, (3, 197)))
  ct = jnp.asarray(np.random.default_rng(8).standard_normal(x["u"].shape), jnp.float32)
  fn = get_implementation("pallas_gpu")

  def grads(tuning):
    def loss(*a):
      y = fn(*a, delta_softplus=True, reverse=True, gaps=gaps, gap_delta="prev",
             interpret=False, tuning=tuning)
      return jnp.sum(y * ct)
    f = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(8))))
    args = [x[k] for k in KEYS]
    return f(*args), f.lower(*args).as_text()

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    (y, g), text = grads(None)
  deprecations = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
  assert not deprecations, deprecations
  assert "triton_kernel_call" in text and "__gpu$xla.gpu.triton" not in text
  (y_p, g_p), text_p = grads({"kernels": "pallas_triton"})
  assert "__gpu$xla.gpu.triton" in text_p
  assert _rel(y, y_p) < 1e-6
  ref = lambda *a: jnp.sum(selective_scan(*a, reverse=True, gaps=gaps, gap_delta="prev",
                                          implementation="reference") * ct)
  with jax.default_matmul_precision("highest"):
    g_ref = jax.jit(jax.grad(ref, argnums=tuple(range(8))))(*[x[k] for k in KEYS])
  for k, a, b, r in zip(KEYS, g, g_p, g_ref):
    assert _rel(a, b) < 1e-5 and _rel(a, r) < 1e-5, k
