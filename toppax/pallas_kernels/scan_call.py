"""The selective scan on a pair of Pallas kernel launchers: the static configuration of a call,
its prepared arguments, the ``custom_vjp`` that ties the forward and backward kernels together,
and a check that the kernels build for a call's signature.

A kernel module (``gpu_scan``, ``tpu_scan``) provides ``forward(cfg, args, save) -> (y,
checkpoints)`` and ``backward(cfg, args, checkpoints, dy) -> ScanArgs`` of cotangents, over the
prepared ``ScanArgs`` (optional ``D`` and ``delta_bias`` replaced by zeros, ``gaps`` as float32
or None), and exposes them as ``KERNELS``, a ``Kernels``. ``toppax.ssm.ops`` calls it with its
XLA implementation as the fallback, which runs where ``Kernels.failure`` reports that the
kernels do not build: the inference forward is checked where a program evaluates the scan, the
training kernels where it differentiates it.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from toppax.pallas_kernels.common import vary, varying_axes

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ScanConfig:
  """Everything static about one scan call; hashable, so it keys jit caches and custom_vjp."""
  delta_softplus: bool
  reverse: bool
  gap_delta: str | None        # None when no gaps are given
  has_z: bool
  interpret: bool
  tuning: Any                  # the kernels' tuning.GpuTuning or tuning.TpuTuning


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
  axes = varying_axes(*args)
  if not axes:
    return args
  return ScanArgs(*(None if x is None else vary(x, axes) for x in args))


def out_types(structs, args):
  """The types of a kernel's outputs: ``structs`` varying over the mesh axes of ``args``
  (aligned by ``varying_like``), which ``pallas_call`` needs under ``check_vma=True``."""
  axes = varying_axes(*args)
  if not axes:
    return structs
  mat = jax.sharding.ManualAxisType(varying=axes)
  return [jax.ShapeDtypeStruct(s.shape, s.dtype, manual_axis_type=mat) for s in structs]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _scan(kernels, cfg, fallback, args):
  run = _choose(kernels, cfg, fallback, args, training=False)
  if run is None:
    return fallback(cfg, args)
  y, _ = kernels.forward(run, args, save=False)
  return y


# Differentiation traces these rules, not the primal above: a program that only evaluates the
# scan checks and builds its inference forward only, and one that trains, its training kernels.
def _scan_fwd(kernels, cfg, fallback, args):
  run = _choose(kernels, cfg, fallback, args, training=True)
  if run is None:
    return fallback(cfg, args), (args,)
  y, ckpt = kernels.forward(run, args, save=True)
  return y, (args, ckpt)


def _scan_bwd(kernels, cfg, fallback, res, dy):
  if len(res) == 1:                   # the forward ran the fallback: its VJP, recomputed
    _, vjp = jax.vjp(lambda a: fallback(cfg, a), *res)
    return vjp(dy)
  args, ckpt = res
  run = _choose(kernels, cfg, fallback, args, training=True, quiet=True)   # the forward's
  return (kernels.backward(run, args, ckpt, dy),)


_scan.defvjp(_scan_fwd, _scan_bwd)


def signature(args):
  """The static signature of a call's arrays: their ShapeDtypeStructs (None stays None)."""
  return tuple(None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype) for x in args)


# CUDA's limit on a launch grid's y and z axes, where the kernels put the batch.
GRID_LIMIT = 65535
# Fields of ScanArgs whose leading axis is the batch.
_BATCHED = ("u", "delta", "B", "C", "z", "gaps")


def without_batch(specs):
  """A signature (``signature``) with the batch axis taken out of the batched arrays' shapes;
  unchanged above ``GRID_LIMIT``, where the batch could decide whether a launch builds."""
  args = ScanArgs(*specs)
  if args.u.shape[0] > GRID_LIMIT:
    return specs
  return ScanArgs(*(None if x is None else
                    (x.shape[1:], x.dtype) if name in _BATCHED else (x.shape, x.dtype)
                    for name, x in zip(ScanArgs._fields, specs)))


def _check(kernels, cfg, specs, training):
  """None if the kernels build for this static signature, else the error.

  ``training=False``: the inference forward; ``True``: the training forward (it also stores the
  checkpoints) and the backward. Each kernel is lowered: lowering is where kernels fail in
  practice. The inference forward is also compiled on its own where
  ``kernels.compile_forward(cfg)`` says so, for kernels that XLA's compile builds (Mosaic TPU,
  Pallas' Triton backend); kernels built while lowering are not (jax-triton keeps the Triton
  kernels it builds and takes them again when the model's program lowers the same call; the
  Mosaic GPU forward compiles itself once, ``mgpu_scan.usable``). A failure that only shows at
  the model's own compile is an error there, never a wrong answer.
  """
  forward, backward = kernels.forward, kernels.backward
  try:
    args = ScanArgs(*specs)
    if not training:
      lowered = jax.jit(lambda a: forward(cfg, a, save=False)).lower(args)
      if kernels.compile_forward(cfg):
        lowered.compile()
      return None
    jax.jit(lambda a: forward(cfg, a, save=True)).lower(args)
    y, ckpt = jax.eval_shape(lambda a: forward(cfg, a, save=True), args)
    jax.jit(lambda a, c, g: backward(cfg, a, c, g)).lower(args, ckpt, y)
    return None
  except Exception as e:  # any lowering/compile failure must degrade to XLA, never a wrong answer
    return f"failed to lower or compile for {specs[0]} ({type(e).__name__}: {e})"


_verdicts: dict = {}


def _failure(kernels, cfg, specs, training=False):
  """``_check``'s verdict, checked once per build class (``Kernels.build_class``) and kind
  (inference or training): a model's calls at its training batch and at its evaluation batch
  share a check, and the training kernels are checked (built) only where the scan is
  differentiated, so evaluation builds none of them."""
  key = (kernels, cfg, kernels.build_class(cfg, specs), bool(training))
  if key not in _verdicts:
    _verdicts[key] = _check(kernels, cfg, specs, bool(training))
  return _verdicts[key]


_failure.cache_clear = _verdicts.clear


def _choose(kernels, cfg, fallback, args, *, training, quiet=False):
  """The ScanConfig whose kernels run this call (``cfg``, or the kernels' alternative where
  ``cfg``'s do not build and the alternative's do), or None: run ``fallback`` (XLA's scan).
  Without a fallback (``check_lowering=False``) nothing is checked. Logs a warning each time
  it picks something else than ``cfg`` (unless ``quiet``)."""
  if fallback is None:
    return cfg
  why = kernels.failure(cfg, args, training)
  if why is None:
    return cfg
  other = kernels.alternative(cfg)
  if other is not None and kernels.failure(other[0], args, training) is None:
    if not quiet:
      log.warning("selective_scan: %s %s; running %s instead", kernels.name, why, other[1])
    return other[0]
  if not quiet:
    log.warning("selective_scan: %s %s; falling back to 'xla'", kernels.name, why)
  return None


class Kernels:
  """One Pallas implementation of the op: a kernel module's launchers and tuning type."""

  def __init__(self, name: str, forward: Callable, backward: Callable, tuning_type: type,
               alternative: Callable | None = None, build_class: Callable | None = None,
               compile_forward: Callable | None = None):
    self.name = name
    self.forward = forward
    self.backward = backward
    self.tuning_type = tuning_type
    # cfg -> (another ScanConfig to try where this one does not build, what it is) or None.
    self.alternative = alternative or (lambda cfg: None)
    # (cfg, signature) -> what the kernels built for a call depend on; calls with one build
    # class share a build check. Default: the exact signature.
    self.build_class = build_class or (lambda cfg, specs: specs)
    # cfg -> whether the build check compiles the inference forward too (kernels that XLA's
    # compile builds), not only lowers it. Default: always.
    self.compile_forward = compile_forward or (lambda cfg: True)

  def configure(self, u, delta, A, B, C, D, z, delta_bias, *, delta_softplus, reverse, gaps,
                gap_delta, interpret, tuning=None):
    """(ScanConfig, ScanArgs) of one call; ``tuning``: None (the defaults), an instance of the
    tuning type, or a dict of some of its fields."""
    cfg = ScanConfig(delta_softplus=bool(delta_softplus), reverse=bool(reverse),
                     gap_delta=None if gaps is None else gap_delta, has_z=z is not None,
                     interpret=bool(interpret),
                     tuning=self.tuning_type.of(tuning, self.name))
    return cfg, prepare(u, delta, A, B, C, D, z, delta_bias, gaps)

  def __call__(self, cfg, args, fallback: Callable | None = None):
    """y of the scan (differentiable: the backward kernel gives the gradients). With
    ``fallback`` (``(cfg, args) -> y``, XLA's scan), the kernels are checked first
    (``failure``): where they do not build, the alternative's run if they build, else
    ``fallback``, each with a warning; the inference forward is checked where the call is
    evaluated, the training kernels where it is differentiated."""
    return _scan(self, cfg, fallback, varying_like(args))

  def failure(self, cfg, args, training: bool = False) -> str | None:
    """None if the kernels build for this call's signature (checked once per build class;
    ``training``: the training forward and the backward, else the inference forward), else
    why not."""
    return _failure(self, cfg, signature(args), training)
