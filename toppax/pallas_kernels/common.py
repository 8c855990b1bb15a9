"""What the GPU and TPU scan kernels share: the static configuration, the ``custom_vjp`` around
a pair of (forward, backward) kernel launchers, and the fall back to ``"xla"`` when a kernel
does not lower or compile on the current backend.

A backend module provides ``forward(cfg, args, save) -> (y, checkpoints)`` and
``backward(cfg, args, checkpoints, dy) -> grads`` over the prepared arguments ``ScanArgs`` (optional
``D`` and ``delta_bias`` already replaced by zeros, ``gaps`` as float32 or ``None``).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from toppax.ssm import ops, reference

log = logging.getLogger(__name__)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@dataclasses.dataclass(frozen=True)
class ScanConfig:
  """Everything static about one scan call; hashable, so it keys jit caches and custom_vjp."""
  backend: str                 # "gpu" or "tpu" (module in this package)
  delta_softplus: bool
  reverse: bool
  gap_delta: str | None        # None when no gaps are given
  has_z: bool
  interpret: bool
  tuning: tuple = ()           # backend-specific (name, value) pairs

  def tune(self, name, default):
    return dict(self.tuning).get(name, default)


class ScanArgs(NamedTuple):
  u: Any
  delta: Any
  A: Any
  B: Any
  C: Any
  D: Any
  z: Any
  delta_bias: Any
  gaps: Any


def _backend(cfg):
  if cfg.backend == "gpu":
    from toppax.pallas_kernels import gpu_scan as mod
  else:
    from toppax.pallas_kernels import tpu_scan as mod
  return mod


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(cfg, args):
  y, _ = _backend(cfg).forward(cfg, args, save=False)
  return y


def _scan_fwd(cfg, args):
  y, ckpt = _backend(cfg).forward(cfg, args, save=True)
  return y, (args, ckpt)


def _scan_bwd(cfg, res, dy):
  args, ckpt = res
  grads = _backend(cfg).backward(cfg, args, ckpt, dy)
  return (grads,)


_scan.defvjp(_scan_fwd, _scan_bwd)


def prepare(u, delta, A, B, C, D, z, delta_bias, gaps):
  dim = u.shape[-1]
  D = jnp.zeros((dim,), jnp.float32) if D is None else D
  delta_bias = jnp.zeros((dim,), jnp.float32) if delta_bias is None else delta_bias
  # Gap counts are data, not parameters: they are cast once and get zero cotangents.
  gaps = None if gaps is None else jax.lax.stop_gradient(gaps.astype(jnp.float32))
  return ScanArgs(u, delta, A, B, C, D, z, delta_bias, gaps)


def varying_like(args):
  """Inside a ``shard_map`` with ``check_vma=True``: every argument made to vary over every mesh
  axis any of them varies over, so that the kernels' outputs (and the custom_vjp's cotangents)
  have one type; a replicated input's cotangent is summed over the axes by ``pcast``'s transpose.
  Elsewhere the arguments are returned as they are."""
  axes = reference.varying_axes(*args)
  if not axes:
    return args
  return ScanArgs(*(None if x is None else reference.vary(x, axes) for x in args))


def out_types(structs, args):
  """The types of a kernel's outputs: ``structs`` varying over the mesh axes of ``args``
  (aligned by ``varying_like``), which ``pallas_call`` needs under ``check_vma=True``."""
  axes = reference.varying_axes(*args)
  if not axes:
    return structs
  mat = jax.sharding.ManualAxisType(varying=axes)
  return [jax.ShapeDtypeStruct(s.shape, s.dtype, manual_axis_type=mat) for s in structs]


def _spec(x):
  return None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype)


@functools.lru_cache(maxsize=256)
def _compiles(cfg, specs):
  """Checks once per static signature that the kernels can be used; False (and a warning) if not.

  The inference forward is lowered and compiled; the training forward and the backward are
  lowered only (their Pallas -> Triton/Mosaic lowering is where kernels fail in practice).
  Compiling them standalone as well doubled a model's start-up on an H100 (each pallas_call is
  compiled again inside the model), and a failure that only shows at the model's own compile is
  an error there, never a wrong answer.
  """
  mod = _backend(cfg)
  try:
    args = ScanArgs(*specs)
    jax.jit(lambda a: mod.forward(cfg, a, save=False)).lower(args).compile()
    jax.jit(lambda a: mod.forward(cfg, a, save=True)).lower(args)
    y, ckpt = jax.eval_shape(lambda a: mod.forward(cfg, a, save=True), args)
    jax.jit(lambda a, c, g: mod.backward(cfg, a, c, g)).lower(args, ckpt, y)
    return True
  except Exception as e:  # any lowering/compile failure must degrade to XLA, never a wrong answer
    log.warning("selective_scan: pallas_%s kernel failed to lower/compile for %s (%s: %s); "
                "falling back to 'xla'", cfg.backend, specs[0], type(e).__name__, e)
    return False


def make_impl(backend: str, native_platforms: tuple[str, ...], default_tuning=(),
              tuning_keys=None):
  """The ``ops.ScanImpl`` callable for one backend, registered by ``toppax.pallas_kernels``.
  ``tuning_keys``: the keys a ``tuning=`` dict may have (a misspelt key would otherwise be
  ignored silently and the default timed under the variant's name)."""

  def impl(u, delta, A, B, C, D, z, delta_bias, *, delta_softplus, reverse, gaps, gap_delta,
           interpret, tuning=None, check_lowering=True):
    unknown = sorted(set(tuning or ()) - set(tuning_keys)) if tuning_keys is not None else []
    if unknown:
      raise ValueError(f"pallas_{backend} tuning: unknown key(s) {unknown}; known: "
                       f"{', '.join(sorted(tuning_keys))}")
    args = prepare(u, delta, A, B, C, D, z, delta_bias, gaps)
    cfg = ScanConfig(backend=backend, delta_softplus=bool(delta_softplus), reverse=bool(reverse),
                     gap_delta=None if gaps is None else gap_delta, has_z=z is not None,
                     interpret=bool(interpret),
                     tuning=tuple(sorted((tuning or dict(default_tuning)).items())))
    if not interpret and check_lowering:
      platform = jax.default_backend()
      ok = platform in native_platforms and _compiles(cfg, tuple(_spec(x) for x in args))
      if not ok:
        if platform not in native_platforms:
          log.warning("selective_scan: pallas_%s does not run on %s without interpret=True; "
                      "falling back to 'xla'", backend, platform)
        return ops._REGISTRY["xla"]()(u, delta, A, B, C, D, z, delta_bias,
                                      delta_softplus=delta_softplus, reverse=reverse, gaps=gaps,
                                      gap_delta=gap_delta, interpret=False)
    return _scan(cfg, varying_like(args))

  return impl


def softplus(x):
  # Same function as ops.softplus (logaddexp(x, 0)) in the ops both Pallas backends lower.
  return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def softplus_from_exp2(x, exp2=jnp.exp2, log2=jnp.log2, div=jnp.divide):
  """softplus as log2(1 + 2^(x log2 e)) ln 2 with Goldberg's log1p correction, log1p(e) =
  log(1 + e) e / ((1 + e) - 1), accurate where 1 + e rounds. The GPU kernels pass
  single-instruction exp2/log2/division (gpu_scan) or get them from approx_math (mgpu_scan)."""
  e = exp2(jnp.minimum(x, 20.0) * LOG2E)
  w = 1.0 + e
  return jnp.where(x > 20.0, x, jnp.where(w == 1.0, e, log2(w) * LN2 * div(e, w - 1.0)))


def softplus_series(x, exp2=jnp.exp2, log2=jnp.log2, fma=lambda a, b, c: a * b + c):
  """softplus with two special-function operations and no division: log2(1 + e) ln 2 with
  e = 2^(x log2 e) where e >= 1/16 (1 + e rounds by at most 2^-24, so the relative error is that
  of log2 itself, under 3e-6 with PTX lg2.approx), and below it the series of log1p(e) to the
  e^6 term (truncation under (1/16)^6 / 7 = 9e-9 relative; no log at all)."""
  e = exp2(jnp.minimum(x, 20.0) * LOG2E)
  series = -1.0 / 6.0                   # Horner: e (1 + e (-1/2 + e (1/3 - ... - e / 6)))
  for coef in (0.2, -0.25, 1.0 / 3.0, -0.5, 1.0):
    series = fma(e, series, coef)
  series = e * series
  return jnp.where(x > 20.0, x, jnp.where(e < 0.0625, series, log2(1.0 + e) * LN2))


def sigmoid(x):
  return 1.0 / (1.0 + jnp.exp(-x))
