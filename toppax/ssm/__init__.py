"""Selective scan op (public API, dispatch, XLA references), causal conv and Mamba mixers."""
from toppax.ssm.ops import (GAP_DELTA_RULES, available_implementations, default_implementation,
                            get_implementation, implementations, register, selective_scan)

__all__ = ["selective_scan", "available_implementations", "default_implementation",
           "get_implementation", "implementations", "register", "GAP_DELTA_RULES"]
