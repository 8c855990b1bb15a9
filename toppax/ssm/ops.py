"""The public selective-scan op: argument checks, the implementation registry and dispatch.

Semantics follow mamba-ssm's ``selective_scan_fn`` (delta_bias, then softplus; D skip;
``y * silu(z)``), channels-last. Alignment (``gaps``) is masked decay accumulation:
``h_t = exp((Δ_t + g_t Δ̃_t) A) h_{t-1} + Δ_t B_t u_t`` (docs/design.md#the-selective-scan-op).

Implementations: ``"reference"`` (``lax.scan``) and ``"xla"`` (``associative_scan``), both in
``toppax.ssm.reference``; ``"pallas_gpu"`` and ``"pallas_tpu"``, whose kernels
(``toppax.pallas_kernels``) are imported on first use. On its own platform a Pallas
implementation runs ``"xla"`` instead, with a warning, when its kernels do not build for a call.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Protocol

import jax
import jax.numpy as jnp

from toppax.pallas_kernels.common import softplus
from toppax.ssm import reference

log = logging.getLogger(__name__)

GAP_DELTA_RULES = ("prev", "bias")


class ScanImpl(Protocol):

  def __call__(self, u, delta, A, B, C, D, z, delta_bias, *, delta_softplus: bool,
               reverse: bool, gaps, gap_delta: str, interpret: bool): ...


_REGISTRY: dict[str, Callable[[], ScanImpl]] = {}
# Backends each implementation can run on natively (interpret mode runs kernels anywhere).
_PLATFORMS: dict[str, tuple[str, ...]] = {}


def register(name: str, loader: Callable[[], ScanImpl], platforms=("cpu", "gpu", "tpu")):
  """Registers an implementation; ``loader`` imports lazily so optional backends stay optional."""
  _REGISTRY[name] = loader
  _PLATFORMS[name] = tuple(platforms)


def implementations() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get_implementation(name: str) -> ScanImpl:
  """The implementation registered as ``name``, loaded. Pallas ones also take ``tuning=`` (a
  ``toppax.pallas_kernels.tuning`` dataclass or a dict of its fields) and
  ``check_lowering=False`` (skip the build check and its fall back to "xla")."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown selective_scan implementation {name!r}; "
                     f"choose one of {sorted(_REGISTRY)} or None")
  return _REGISTRY[name]()


def available_implementations(platform: str | None = None) -> dict[str, str]:
  """``{name: "ok" | reason}`` for the given (default: current) backend."""
  platform = platform or jax.default_backend()
  out = {}
  for name, loader in _REGISTRY.items():
    if platform not in _PLATFORMS[name]:
      out[name] = f"not for {platform} (runs on {', '.join(_PLATFORMS[name])}; CPU via interpret=True)"
      continue
    try:
      loader()
      out[name] = "ok"
    except Exception as e:  # an optional backend that cannot import is reported, not fatal
      out[name] = f"unavailable: {type(e).__name__}: {e}"
  return out


def default_implementation(platform: str | None = None) -> str:
  platform = platform or jax.default_backend()
  preferred = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform)
  if preferred in _REGISTRY:
    try:
      _REGISTRY[preferred]()
      return preferred
    except Exception as e:
      log.warning("selective_scan: %s unavailable (%s); using 'xla'", preferred, e)
  return "xla"


def compute_dtype(*xs):
  """fp32 state for fp32/bf16/fp16 inputs; fp64 when any input is fp64 (x64 tests)."""
  return jnp.float64 if any(x is not None and x.dtype == jnp.float64 for x in xs) else jnp.float32


def effective_delta(delta, delta_bias, delta_softplus):
  if delta_bias is not None:
    delta = delta + delta_bias
  return softplus(delta) if delta_softplus else delta


def gap_decay(delta_eff, gaps, delta_bias, *, delta_softplus, reverse, gap_delta):
  """``g_t · Δ̃_t``: the decay that pruned positions before token t (in scan order) add."""
  if gap_delta == "prev":
    # Δ̃_t is Δ of the previous kept token in scan order. The first token in scan order
    # has no predecessor; its gap cannot matter (the state is still zero), so any value works.
    if reverse:
      tilde = jnp.concatenate([delta_eff[:, 1:], delta_eff[:, -1:]], axis=1)
    else:
      tilde = jnp.concatenate([delta_eff[:, :1], delta_eff[:, :-1]], axis=1)
  elif gap_delta == "bias":
    # Zero-input Δ: what the dt projection gives for a zero token.
    bias = jnp.zeros(delta_eff.shape[-1:], delta_eff.dtype) if delta_bias is None else delta_bias
    tilde = jnp.broadcast_to(softplus(bias) if delta_softplus else bias, delta_eff.shape)
  else:
    raise ValueError(f"gap_delta must be one of {GAP_DELTA_RULES}, got {gap_delta!r}")
  return gaps.astype(delta_eff.dtype)[..., None] * tilde


def _xla_impl(core, u, delta, A, B, C, D, z, delta_bias, *, delta_softplus, reverse, gaps,
              gap_delta, interpret):
  del interpret  # only meaningful for Pallas kernels
  out_dtype = u.dtype
  ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
  cast = lambda x: None if x is None else x.astype(ct)
  u, delta, A, B, C, D, z, delta_bias = map(cast, (u, delta, A, B, C, D, z, delta_bias))
  delta = effective_delta(delta, delta_bias, delta_softplus)
  delta_gap = None
  if gaps is not None:
    delta_gap = gap_decay(delta, gaps, delta_bias, delta_softplus=delta_softplus,
                          reverse=reverse, gap_delta=gap_delta)
  y = core(u, delta, A, B, C, delta_gap, reverse=reverse)
  if D is not None:
    y = y + u * D
  if z is not None:
    y = y * jax.nn.silu(z)
  return y.astype(out_dtype)


def _kernel_impl(kernels, platforms, u, delta, A, B, C, D, z, delta_bias, *, delta_softplus,
                 reverse, gaps, gap_delta, interpret, tuning=None, check_lowering=True):
  """A Pallas implementation (``kernels``: a ``toppax.pallas_kernels.scan_call.Kernels``).
  Outside interpret mode it checks, once per build class, that the kernels run here and build;
  where they do not, it warns and runs the kernels' alternative if that builds (the GPU's
  Pallas-Triton kernels for its Triton ones), else "xla", so the answer is right either way.
  The inference forward is checked where a program evaluates the scan, the training kernels
  where it is differentiated: evaluation builds no training kernels."""
  arrays = (u, delta, A, B, C, D, z, delta_bias)
  options = dict(delta_softplus=delta_softplus, reverse=reverse, gaps=gaps, gap_delta=gap_delta)
  cfg, args = kernels.configure(*arrays, **options, interpret=interpret, tuning=tuning)
  if interpret or not check_lowering:
    return kernels(cfg, args)
  platform = jax.default_backend()
  if platform not in platforms:
    log.warning("selective_scan: %s does not run on %s without interpret=True; falling back "
                "to 'xla'", kernels.name, platform)
    return get_implementation("xla")(*arrays, **options, interpret=False)
  return kernels(cfg, args, fallback=_xla_on_args)


def _xla_on_args(cfg, args):
  """The "xla" implementation on a kernel call's prepared arguments (``scan_call.ScanArgs``):
  the Pallas implementations' fallback."""
  return _xla_impl(reference.scan_associative, *args[:8], delta_softplus=cfg.delta_softplus,
                   reverse=cfg.reverse, gaps=args.gaps, gap_delta=cfg.gap_delta or "prev",
                   interpret=False)


def _load_pallas_gpu():
  from toppax.pallas_kernels import gpu_scan   # imports jax only; kernels load on first call
  return functools.partial(_kernel_impl, gpu_scan.KERNELS, _PLATFORMS["pallas_gpu"])


def _load_pallas_tpu():
  from toppax.pallas_kernels import tpu_scan   # imports Pallas' Mosaic TPU backend
  return functools.partial(_kernel_impl, tpu_scan.KERNELS, _PLATFORMS["pallas_tpu"])


register("reference", lambda: functools.partial(_xla_impl, reference.scan_reference))
register("xla", lambda: functools.partial(_xla_impl, reference.scan_associative))
register("pallas_gpu", _load_pallas_gpu, platforms=("gpu", "cuda"))
register("pallas_tpu", _load_pallas_tpu, platforms=("tpu",))


def _check(u, delta, A, B, C, D, z, delta_bias, gaps):
  if u.ndim != 3:
    raise ValueError(f"selective_scan: u must be (batch, L, D), got shape {u.shape}")
  batch, length, dim = u.shape
  if delta.shape != u.shape:
    raise ValueError(f"selective_scan: delta shape {delta.shape} != u shape {u.shape}")
  if A.ndim != 2 or A.shape[0] != dim:
    raise ValueError(f"selective_scan: A must be (D={dim}, N), got {A.shape}")
  n = A.shape[1]
  for name, x in (("B", B), ("C", C)):
    if x.shape != (batch, length, n):
      raise ValueError(f"selective_scan: {name} must be (batch, L, N)={(batch, length, n)}, got {x.shape}")
  for name, x in (("D", D), ("delta_bias", delta_bias)):
    if x is not None and x.shape != (dim,):
      raise ValueError(f"selective_scan: {name} must be ({dim},), got {x.shape}")
  if z is not None and z.shape != u.shape:
    raise ValueError(f"selective_scan: z shape {z.shape} != u shape {u.shape}")
  if gaps is not None and gaps.shape != (batch, length):
    raise ValueError(f"selective_scan: gaps must be (batch, L)={(batch, length)}, got {gaps.shape}")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, *, delta_softplus=True,
                   reverse=False, gaps=None, implementation=None, interpret=False,
                   gap_delta="prev"):
  """Selective scan (Mamba S6), channels-last.

  Args:
    u, delta, z: (batch, L, D). B, C: (batch, L, N). A: (D, N), negative. D, delta_bias: (D,).
    delta_softplus: apply softplus to ``delta + delta_bias``.
    reverse: scan from the last token to the first (ViM's backward branch), no flips.
    gaps: optional (batch, L) counts of pruned positions between each token and the previous
      kept one in scan order (before it when forward, after it when ``reverse``). The state decays
      across them with no input (hidden-state alignment, docs/design.md#token-pruning).
    implementation: "reference" (lax.scan), "xla" (associative_scan), "pallas_gpu", "pallas_tpu",
      or None for the best available on the current backend.
    interpret: run Pallas kernels in interpret mode (CPU tests).
    gap_delta: the Δ̃ rule for alignment: "prev" (Δ of the previous kept token in scan order)
      or "bias" (softplus(delta_bias), the zero-input Δ).
  Returns:
    y: (batch, L, D) in u's dtype; the state and accumulation are float32 (float64 for fp64 inputs).
  """
  _check(u, delta, A, B, C, D, z, delta_bias, gaps)
  if gap_delta not in GAP_DELTA_RULES:
    raise ValueError(f"gap_delta must be one of {GAP_DELTA_RULES}, got {gap_delta!r}")
  impl = get_implementation(default_implementation() if implementation is None else implementation)
  return impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus=delta_softplus,
              reverse=reverse, gaps=gaps, gap_delta=gap_delta, interpret=interpret)
