"""A per-thread register limit (PTX ``.maxnreg``) for a Triton-lowered Pallas kernel, by a patch
of jax's Pallas-to-Triton lowering.

ptxas gives the scan's backward 255 registers when left alone, which fits 8 one-warp programs
on an SM; under a cap of 168 it fits 12 and runs faster. Neither Pallas' ``CompilerParams`` nor
XLA (which compiles Pallas' Triton kernels, custom call ``__gpu$xla.gpu.triton``) takes a
register option. Triton itself carries one as the module attribute ``ttg.maxnreg``, which its
TritonGPU-to-LLVM conversion turns into ``nvvm.maxnreg`` and the NVPTX backend into
``.maxnreg``. So the kernel's name carries the cap (``<name>_maxnreg<cap>``: part of the traced
kernel, so jit caches stay correct) and a wrapper around Pallas' Triton lowering puts the
attribute on that kernel's module. If the lowering function is not where this jax keeps it, a
warning is logged and kernels compile uncapped (same results, the compiler's register count).
"""
from __future__ import annotations

import functools
import logging
import re

log = logging.getLogger(__name__)

TAG = "_maxnreg"
_installed = None                       # None: not tried yet; then True / False


def kernel_name(base, cap):
  """``base`` with the register cap ``cap`` (None: no cap) for the lowering wrapper to find."""
  if cap is None:
    return base
  install()
  return f"{base}{TAG}{cap}"


def installed():
  """Whether the lowering wrapper is in place (None before the first capped kernel)."""
  return _installed


def install():
  """Wraps Pallas' Triton lowering (once) so that a capped kernel's module gets ``ttg.maxnreg``."""
  global _installed
  if _installed is not None:
    return
  try:
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering
    original = lowering.lower_jaxpr_to_triton_module
  except (ImportError, AttributeError) as e:
    log.warning("selective_scan: cannot cap registers on this jax (%s); kernels compile "
                "without a register cap", e)
    _installed = False
    return
  pattern = re.compile(re.escape(TAG) + r"(\d+)$")

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
  _installed = True
