"""selective_scan against goldens from state-spaces/mamba's ``selective_scan_ref`` (float64).

Goldens: tests/goldens/scan_<case>.npz, one case per file, channels-last (our layout); how they
were made is in tests/README.md. Float64 runs check the math tightly (the goldens carry fp64
accuracy); float32 runs check the production dtype at a tolerance scaled by max|y|, since an
elementwise relative bound is meaningless for outputs that cross zero. Pallas kernels are checked
in interpret mode on CPU (a few cases; gradients are slow there) and natively under --run-gpu.
"""
from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toppax.ssm import selective_scan

GOLDENS = sorted((pathlib.Path(__file__).parent / "goldens").glob("scan_*.npz"))
GRAD_GOLDENS = [p for p in GOLDENS if "grad_u" in np.load(p).files]
IMPLS = ("reference", "xla")
OPTIONAL = ("D", "z", "delta_bias")
ARGS = ("u", "delta", "A", "B", "C") + OPTIONAL


def _ids(paths):
  return [p.stem[len("scan_"):] for p in paths]


@pytest.fixture
def x64():
  prev = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", prev)


def _load(path):
  d = dict(np.load(path))
  flags = dict(delta_softplus=bool(d["delta_softplus"]), reverse=bool(d["reverse"]))
  return d, flags


def _args(d, dtype):
  return {k: jnp.asarray(d[k], dtype) for k in ARGS if k in d}


def _scan(flags, impl):
  # Jitted: eager dispatch of the associative scan's many small ops is far slower than a compile.
  return jax.jit(functools.partial(selective_scan, **flags, implementation=impl))


def _scaled_err(got, want):
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / max(1.0, np.max(np.abs(want))))


def test_goldens_present():
  assert len(GOLDENS) >= 10 and len(GRAD_GOLDENS) >= 2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("path", GOLDENS, ids=_ids(GOLDENS))
def test_forward_float64(path, impl, x64):
  d, flags = _load(path)
  y = _scan(flags, impl)(**_args(d, jnp.float64))
  assert y.dtype == jnp.float64
  assert y.shape == d["y"].shape
  err = _scaled_err(y, d["y"])
  assert err < 1e-10, f"{path.stem} [{impl}]: max |y - golden| / max(1, max|golden|) = {err:.2e}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("path", GOLDENS, ids=_ids(GOLDENS))
def test_forward_float32(path, impl):
  d, flags = _load(path)
  y = _scan(flags, impl)(**_args(d, jnp.float32))
  assert y.dtype == jnp.float32
  err = _scaled_err(y, d["y"])
  assert err < 1e-5, f"{path.stem} [{impl}]: max |y - golden| / max(1, max|golden|) = {err:.2e}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("path", GRAD_GOLDENS, ids=_ids(GRAD_GOLDENS))
def test_gradients_float64(path, impl, x64):
  d, flags = _load(path)
  args = _args(d, jnp.float64)
  g = jnp.asarray(d["g"], jnp.float64)
  names = tuple(args)

  def loss(*vals):
    y = selective_scan(**dict(zip(names, vals)), **flags, implementation=impl)
    return jnp.sum(y * g)

  grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))(*args.values())
  bad = []
  for name, got in zip(names, grads):
    want = d[f"grad_{name}"]
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = _scaled_err(got, want)
    if err > 1e-9:
      bad.append(f"grad_{name}: {err:.2e}")
  assert not bad, f"{path.stem} [{impl}] gradient mismatch (scaled max err): " + ", ".join(bad)


KERNELS = ("pallas_gpu", "pallas_tpu")
# Interpret mode is slow: a representative subset (reverse, no softplus, L=1, everything on).
INTERPRET_CASES = [p for p in GOLDENS if p.stem[len("scan_"):] in
                   ("all", "reverse_all", "all_len1", "plain_no_softplus", "reverse_all_no_softplus")]


def _kernel_or_skip(impl):
  from toppax.ssm import ops
  if impl not in ops.implementations():
    pytest.skip(f"{impl} is not registered")
  try:
    ops.get_implementation(impl)
  except ImportError as e:
    pytest.skip(f"{impl} cannot be imported: {e}")


def _check_grads_f32(path, impl, **kw):
  d, flags = _load(path)
  args = _args(d, jnp.float32)
  g = jnp.asarray(d["g"], jnp.float32)
  names = tuple(args)

  def loss(*vals):
    return jnp.sum(selective_scan(**dict(zip(names, vals)), **flags, implementation=impl, **kw) * g)

  grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))(*args.values())
  bad = [f"grad_{n}: {_scaled_err(x, d[f'grad_{n}']):.2e}" for n, x in zip(names, grads)
         if _scaled_err(x, d[f"grad_{n}"]) > 1e-5]
  assert not bad, f"{path.stem} [{impl}] float32 gradient mismatch (scaled max err): " + ", ".join(bad)


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("path", INTERPRET_CASES, ids=_ids(INTERPRET_CASES))
def test_kernel_interpret_forward_float32(path, impl):
  _kernel_or_skip(impl)
  d, flags = _load(path)
  y = selective_scan(**_args(d, jnp.float32), **flags, implementation=impl, interpret=True)
  err = _scaled_err(y, d["y"])
  assert err < 1e-5, f"{path.stem} [{impl}, interpret]: scaled max err {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("path", GRAD_GOLDENS, ids=_ids(GRAD_GOLDENS))
def test_kernel_interpret_gradients_float32(path, impl):
  _kernel_or_skip(impl)
  _check_grads_f32(path, impl, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ("xla", "reference", "pallas_gpu"))
@pytest.mark.parametrize("path", GOLDENS, ids=_ids(GOLDENS))
def test_gpu_float32(path, impl):
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU backend")
  if impl.startswith("pallas"):
    _kernel_or_skip(impl)
  d, flags = _load(path)
  # "highest": the XLA scans contract over N with dots, which would otherwise run in TF32.
  with jax.default_matmul_precision("highest"):
    y = _scan(flags, impl)(**_args(d, jnp.float32))
    err = _scaled_err(y, d["y"])
    assert err < 1e-5, f"{path.stem} [{impl}, gpu]: scaled max err {err:.2e}"
    if "g" in d:
      _check_grads_f32(path, impl)
