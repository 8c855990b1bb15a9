"""Selective scan op (public API, dispatch, XLA references), causal conv and Mamba mixers."""
from toppax.ssm.ops import (GAP_DELTA_RULES, available_implementations, default_implementation,
                            implementations, register, selective_scan)
import toppax.pallas_kernels  # noqa: E402,F401  registers "pallas_gpu" and "pallas_tpu" (lazy)

__all__ = ["selective_scan", "available_implementations", "default_implementation",
           "implementations", "register", "GAP_DELTA_RULES"]
