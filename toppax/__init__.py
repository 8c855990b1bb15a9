"""toppax: token pruning for vision state space models (ViM, PlainMamba) in JAX."""
__version__ = "0.1.0"
