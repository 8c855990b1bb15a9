"""The Triton scan kernels (``triton_kernels``, launched through jax-triton by ``triton_scan``) on
a CPU machine.

- Torch-free: the kernel source, its compile for sm_90 with the triton wheel (the register cap,
  the one-channel-per-lane layout the backward's shuffles rely on, no atomics), and jax-triton's
  own lowering of forward+backward for CUDA, under a stand-in for jaxlib's CUDA Triton runtime
  (its kernel-call objects only carry what jax-triton compiled): the register cap reaches the
  PTX, no Pallas lowering (and so no deprecation warning) takes part, and a checked shard_map
  types the outputs.
- With torch: the kernels' values through Triton's interpreter against the float64 reference
  and against the Pallas-Triton kernels (Pallas' interpreter).
Values on a GPU: tests/test_scan_kernels.py with --run-gpu.
"""
import dataclasses
import functools
import json
import logging
import os
import sys
import warnings

import jax
from jax import export
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

from toppax.pallas_kernels import gpu_scan, scan_call, triton_kernels, triton_scan
from toppax.pallas_kernels.tuning import GpuTuning
from toppax.ssm import get_implementation, selective_scan
from tests import scan_utils

KEYS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _static(kind, **kw):
  base = dict(kind=kind, reverse=False, delta_softplus=True, gap_delta=None, has_z=True,
              interpret=False, batch=2, length=9, dim=64, n_all=4, n=4, block_d=32, chunk=4,
              save=kind == "fwd", rows_ahead=2, bc_ahead=1, sub=2, warps=1,
              maxnreg=168 if kind == "bwd" else None)
  return triton_kernels.Static(**{**base, **kw})


def test_source_is_written_once_per_configuration():
  st = _static("bwd")
  fn = triton_kernels.python_kernel(st)
  assert triton_kernels.python_kernel(st) is fn                 # cached
  text = fn.toppax_source
  assert text.startswith("def selective_scan_triton_bwd(u, delta, z, B, C, at, dskip, bias, ck, "
                         "dy, du, ddelta, dz, dB, dC, dA, dD, dbias):")
  assert "atomic" not in text                                   # deterministic sums
  # Per adjoint step two reduce-scatters of 4 states over 32 lanes, 6 shuffles each (2 + 1
  # halving, then 1 at each of the 3 levels left); one interval of 4 steps in the loop and the
  # partial head of 1 after it.
  assert text.count("shfl.sync.bfly") == 2 * 6 * (4 + 1)
  assert text.count("for i") == 1                               # one loop, over intervals
  interp = triton_kernels.python_kernel(dataclasses.replace(st, interpret=True)).toppax_source
  assert "inline_asm" not in interp and "tl.gather" in interp
  other = triton_kernels.python_kernel(dataclasses.replace(st, reverse=True)).toppax_source
  assert other != text


def _compile(st, dtype="float32"):
  pytest.importorskip("triton")
  from toppax.tools import kernel_sass
  return kernel_sass.compile_triton_kernel(st, dtype, st.warps if st.kind == "bwd" else 1)


@pytest.mark.parametrize("warps", [1, 2])
def test_backward_compiles_capped_with_one_channel_per_lane(warps):
  st = _static("bwd", block_d=32 * warps, warps=warps, gap_delta="prev")
  kernel = _compile(st)
  assert kernel.metadata.name == "selective_scan_triton_bwd"
  assert ".maxnreg 168" in kernel.asm["ptx"]
  from toppax.tools import kernel_sass
  assert kernel_sass.count("bwd", kernel, st.chunk)["registers"] <= 168
  # The shuffles exchange channels between lanes: every tensor must hold element i on lane
  # i % 32 of warp i // 32 (one layout, one element per thread).
  layouts = [ln for ln in kernel.asm["ttgir"].splitlines() if ln.startswith("#blocked")]
  assert layouts == [f"#blocked = #ttg.blocked<{{sizePerThread = [1], threadsPerWarp = [32], "
                     f"warpsPerCTA = [{warps}], order = [0]}}>"]
  assert "atom." not in kernel.asm["ptx"] and "red." not in kernel.asm["ptx"]
  assert "shfl.sync.bfly" in kernel.asm["ptx"]


def test_forward_compiles_with_bf16_rows_and_state_groups():
  st = _static("fwd", n_all=8, n=4, block_d=64, gap_delta="bias", reverse=True)
  kernel = _compile(st, "bfloat16")
  assert ".maxnreg" not in kernel.asm["ptx"] and "shfl" not in kernel.asm["ptx"]
  assert "ex2.approx.ftz.f32" in kernel.asm["ptx"]


class _FakeTritonRuntime:
  """What jax-triton needs of jaxlib's CUDA Triton runtime (``jax._src.lib.gpu_triton``) to
  lower a call: its objects keep the compiled kernels instead of serialising them."""

  def __init__(self):
    self.calls = []
    runtime = self

    class TritonKernel:
      def __init__(self, name, num_warps, num_ctas, shared, ptx, ttir, cc):
        self.name, self.num_warps, self.ptx, self.cc = name, num_warps, ptx, cc

    class TritonKernelCall:
      def __init__(self, kernel, gx, gy, gz, params):
        self.kernel, self.grid, self.params = kernel, (gx, gy, gz), params
        runtime.calls.append(self)

      def to_proto(self, name, metadata):
        return f"{name}:{self.kernel.name}:{self.grid}".encode()

    self.attrs = dict(
        get_compute_capability=lambda device: 90, get_serialized_metadata=lambda *a: b"",
        TritonKernel=TritonKernel, TritonKernelCall=TritonKernelCall,
        create_array_parameter=lambda zeroed, align: ("array", zeroed, align),
        create_scalar_parameter=lambda value, dtype: ("scalar", value, dtype))


@pytest.fixture
def jax_triton_on_cpu(monkeypatch):
  """jax-triton importable here, lowering for CUDA through a stand-in runtime."""
  pytest.importorskip("triton")
  import importlib.util
  if importlib.util.find_spec("jax_triton") is None:
    pytest.skip("jax-triton is not installed (pip install jax-triton --no-deps)")
  from jax._src.lib import gpu_triton
  runtime = _FakeTritonRuntime()
  for name, value in runtime.attrs.items():
    monkeypatch.setattr(gpu_triton, name, value, raising=False)
  stale = [m for m in sys.modules if m == "jax_triton" or m.startswith("jax_triton.")]
  for m in stale:
    monkeypatch.delitem(sys.modules, m)
  triton_scan._load.cache_clear()
  cache_dir = os.environ.get("TRITON_CACHE_DIR")   # jax-triton's import empties it
  yield runtime
  triton_scan._load.cache_clear()
  if cache_dir is None:
    os.environ.pop("TRITON_CACHE_DIR", None)
  else:
    os.environ["TRITON_CACHE_DIR"] = cache_dir
  for m in [m for m in sys.modules if m == "jax_triton" or m.startswith("jax_triton.")]:
    del sys.modules[m]


_DISABLED = [export.DisabledSafetyCheck.custom_call("triton_kernel_call")]


def _export_grad(tuning=None, dtype=jnp.float32, n=16, d=200, b=2, length=197):
  fn = get_implementation("pallas_gpu")

  def f(*a):
    def loss(*a):
      return jnp.sum(fn(*a, delta_softplus=True, reverse=True, gaps=None, gap_delta="prev",
                        interpret=False, check_lowering=False,
                        tuning=tuning).astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=tuple(range(8)))(*a)

  S = jax.ShapeDtypeStruct
  seq = S((b, length, d), dtype)
  args = [seq, seq, S((d, n), jnp.float32), S((b, length, n), dtype), S((b, length, n), dtype),
          S((d,), jnp.float32), seq, S((d,), jnp.float32)]
  return export.export(jax.jit(f), platforms=["cuda"], disabled_checks=_DISABLED)(*args)


def test_jax_triton_lowers_both_kernels_capped_without_deprecation(jax_triton_on_cpu):
  cfg = scan_call.ScanConfig(delta_softplus=True, reverse=False, gap_delta=None, has_z=True,
                             interpret=False, tuning=GpuTuning())
  assert gpu_scan.kernels_for(cfg) == "triton"            # the default picks jax-triton
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    text = _export_grad().mlir_module()
  assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]
  assert "triton_kernel_call" in text and "__gpu$xla.gpu.triton" not in text
  assert triton_scan.cap_installed()
  calls = {c.kernel.name: c for c in jax_triton_on_cpu.calls}
  assert set(calls) == {"selective_scan_triton_fwd", "selective_scan_triton_bwd"}
  fwd, bwd = calls["selective_scan_triton_fwd"], calls["selective_scan_triton_bwd"]
  assert fwd.grid == (1, 7, 2) and bwd.grid == (1, 7, 2)  # D = 200: blocks of 32
  assert ".maxnreg 168" in bwd.kernel.ptx and ".maxnreg" not in fwd.kernel.ptx
  for c in calls.values():
    assert "atom." not in c.kernel.ptx and "red." not in c.kernel.ptx
  jax_triton_on_cpu.calls.clear()
  _export_grad(GpuTuning(bwd_maxnreg=None, maxnreg=200), jnp.bfloat16, n=40)
  ptx = {c.kernel.name: c.kernel.ptx for c in jax_triton_on_cpu.calls}
  assert ".maxnreg 200" in ptx["selective_scan_triton_fwd"]
  assert ".maxnreg" not in ptx["selective_scan_triton_bwd"]
  assert {c.grid for c in jax_triton_on_cpu.calls} == {(4, 7, 2)}   # N = 40: 4 groups of 16


def test_kernels_are_kept_on_disk_and_read_back(jax_triton_on_cpu, tmp_path, monkeypatch):
  # Where the persistent compilation cache is on, a process that lowers the same kernels again
  # (its in-process cache empty) reads their PTX from the folder instead of building them; an
  # unreadable entry is built again and rewritten.
  from jax_triton import triton_lib
  built = []
  build = triton_lib.compile_ttir_to_ptx_inplace

  def counting(ttir, *a):
    built.append(1)
    return build(ttir, *a)

  monkeypatch.setattr(triton_lib, "compile_ttir_to_ptx_inplace", counting)
  folder = tmp_path / "toppax_triton"
  assert triton_scan.install_kernel_cache(str(folder))
  small = dict(n=4, d=32, b=1, length=8)

  def lower():
    triton_lib._COMPILED_KERNEL_CACHE.clear()      # a fresh process
    jax_triton_on_cpu.calls.clear()
    _export_grad(**small)
    return {c.kernel.name: c.kernel.ptx for c in jax_triton_on_cpu.calls}

  first = lower()
  assert len(built) == 2 and len(list(folder.glob("*.json"))) == 2
  assert lower() == first and len(built) == 2      # read back, nothing built
  entry = sorted(folder.glob("*.json"))[0]
  entry.write_text("{not json")
  assert lower() == first and len(built) == 3      # the damaged one built again
  assert json.loads(entry.read_text())["binary"] in first.values()
  assert not list(folder.glob("*.tmp"))


def test_jax_triton_lowers_under_checked_shard_map(jax_triton_on_cpu):
  fn = get_implementation("pallas_gpu")
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
  mesh = jax.sharding.AbstractMesh((2,), ("data",), abstract_device=device)
  d, rep = P("data"), P()

  def scan(u, A, B, C):
    return fn(u, u, A, B, C, None, None, None, delta_softplus=True, reverse=False, gaps=None,
              gap_delta="prev", interpret=False, check_lowering=False)

  def grad(u, A, B, C):
    loss = lambda *a: jnp.sum(jax.shard_map(scan, mesh=mesh, in_specs=(d, rep, d, d),
                                            out_specs=d, check_vma=True)(*a))
    return jax.value_and_grad(loss, argnums=(0, 1))(u, A, B, C)

  S, named = jax.ShapeDtypeStruct, jax.sharding.NamedSharding
  b, length, dim, n = 4, 37, 64, 16
  args = [S((b, length, dim), jnp.float32, sharding=named(mesh, d)),
          S((dim, n), jnp.float32, sharding=named(mesh, rep)),
          S((b, length, n), jnp.float32, sharding=named(mesh, d)),
          S((b, length, n), jnp.float32, sharding=named(mesh, d))]
  with jax.sharding.use_abstract_mesh(mesh):
    text = export.export(jax.jit(grad), platforms=["cuda"], disabled_checks=_DISABLED)(
        *args).mlir_module()
  assert text.count("triton_kernel_call") >= 2
  assert "all_reduce" in text or "all-reduce" in text     # A's gradient, summed over the mesh


def test_register_cap_warns_and_compiles_uncapped_where_it_cannot(jax_triton_on_cpu, monkeypatch,
                                                                   caplog):
  from jax_triton import triton_lib
  monkeypatch.setattr(triton_scan, "_cap_installed", None)
  monkeypatch.delattr(triton_lib, "get_cuda_backend")
  with caplog.at_level(logging.WARNING):
    assert triton_scan.install_register_cap() is False
  assert "without a register cap" in caplog.text


def test_without_jax_triton_the_pallas_kernels_run_with_a_warning(monkeypatch, caplog):
  monkeypatch.setattr(triton_scan, "_load", lambda: (None, "jax-triton is not usable here (x)"))
  monkeypatch.setattr(gpu_scan, "_warned", set())
  cfg = scan_call.ScanConfig(delta_softplus=True, reverse=False, gap_delta=None, has_z=False,
                             interpret=False, tuning=GpuTuning())
  with caplog.at_level(logging.WARNING):
    assert gpu_scan.kernels_for(cfg) == "pallas_triton"
  assert "pip install 'jax-triton" in caplog.text
  explicit = dataclasses.replace(cfg, tuning=GpuTuning(kernels="pallas_triton"))
  assert gpu_scan.kernels_for(explicit) == "pallas_triton"
  with pytest.raises(ValueError, match="kernels must be 'triton'"):
    GpuTuning(kernels="triton_lang")


# Values through Triton's interpreter (torch): both directions and gap rules, D not a multiple
# of the block, several checkpoint intervals with a partial head, state groups, two warps per
# backward program, bf16; against the float64 reference and the Pallas-Triton kernels.
INTERPRET_CASES = [
    dict(reverse=False, gap_delta="prev", dim=70, n=4, tuning={}),
    dict(reverse=True, gap_delta="bias", dim=40, n=5, tuning=dict(fwd_states=4, bwd_states=2)),
    dict(reverse=True, gap_delta="prev", dim=64, n=3,
         tuning=dict(bwd_num_warps=2, ckpt_every=3, block_d=64, rows_ahead=2)),
    dict(reverse=False, gap_delta=None, dim=24, n=16, tuning=dict(bwd_chunk=4),
         dtype=jnp.bfloat16),
]


@pytest.mark.parametrize("case", INTERPRET_CASES,
                         ids=[f"{'rev' if c['reverse'] else 'fwd'}-{c['gap_delta']}-n{c['n']}"
                              for c in INTERPRET_CASES])
def test_interpreter_values_match_reference_and_pallas(case):
  pytest.importorskip("torch")
  pytest.importorskip("triton")
  dtype = case.get("dtype", jnp.float32)
  length = 11
  x = {k: jnp.asarray(v) for k, v in
       scan_utils.random_inputs(3, 2, length, case["dim"], case["n"]).items()}
  x = {k: v.astype(dtype) if k in ("u", "delta", "B", "C", "z") else v for k, v in x.items()}
  gaps = None
  if case["gap_delta"] is not None:
    gaps = jnp.asarray(np.random.default_rng(4).integers(0, 3, (2, length)))
  kw = dict(delta_softplus=True, reverse=case["reverse"], gaps=gaps,
            gap_delta=case["gap_delta"] or "prev")
  ct = jnp.asarray(np.random.default_rng(5).standard_normal(x["u"].shape), jnp.float32)
  fn = get_implementation("pallas_gpu")

  def run(kernels):
    tuning = dict(case["tuning"], kernels=kernels)
    f = lambda *a: fn(*a, **kw, interpret=True, tuning=tuning)
    args = [x[k] for k in KEYS]
    y = f(*args)
    g = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * ct),
                 argnums=tuple(range(8)))(*args)
    return [y] + list(g)

  up = {k: v.astype(jnp.float32) for k, v in x.items()}
  ref_f = functools.partial(selective_scan, **kw, implementation="reference")
  args32 = [up[k] for k in KEYS]
  ref = [ref_f(*args32)] + list(jax.grad(lambda *a: jnp.sum(ref_f(*a) * ct),
                                         argnums=tuple(range(8)))(*args32))
  got, pallas = run("triton"), run("pallas_triton")
  tol = 1e-5 if dtype == jnp.float32 else 1e-2        # bf16: the outputs' own rounding
  for name, a, b, r in zip(("y",) + KEYS, got, pallas, ref):
    assert a.dtype == b.dtype and a.shape == r.shape, name
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.all(np.isfinite(a32)), name                  # the interpreter's outputs start NaN
    assert scan_utils.rel(a32, r) < tol, name
    assert scan_utils.rel(a32, b32) < (2e-6 if dtype == jnp.float32 else 1e-2), name  # bf16 ulps


def test_jax_triton_call_under_vmap_runs_per_element(jax_triton_on_cpu):
  # jax-triton has no batching rule; triton_scan runs the calls one element after another.
  fn = get_implementation("pallas_gpu")

  def loss(u, B, C, A):
    y = fn(u, u, A, B, C, None, None, None, delta_softplus=True, reverse=False, gaps=None,
           gap_delta="prev", interpret=False, check_lowering=False)
    return jnp.sum(y)

  S = jax.ShapeDtypeStruct
  b, length, dim, n = 2, 9, 32, 4
  f = jax.vmap(jax.grad(loss, argnums=(0, 3)), in_axes=(0, 0, 0, None))
  args = [S((3, b, length, dim), jnp.float32), S((3, b, length, n), jnp.float32),
          S((3, b, length, n), jnp.float32), S((dim, n), jnp.float32)]
  exp = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=_DISABLED)(*args)
  assert [o.shape for o in exp.out_avals] == [(3, b, length, dim), (3, dim, n)]
  assert exp.mlir_module().count("triton_kernel_call") >= 2
