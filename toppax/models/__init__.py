"""Models by name: ``toppax.models.create(name, pruning=None, seed=0, **overrides)``."""
from __future__ import annotations

from typing import Callable

from flax import nnx

_BUILDERS: dict[str, Callable] = {}


def register(name: str, builder: Callable) -> None:
  _BUILDERS[name] = builder


def names() -> list[str]:
  return sorted(_BUILDERS)


def create(name: str, *, pruning=None, seed: int = 0, rngs: nnx.Rngs | None = None, **overrides):
  """Builds a model with fresh (official-style) init.

  Overrides use the official constructors' argument names (ViM: img_size, patch_size, depth,
  embed_dim, num_classes, ...). ``pruning`` is a ``toppax.pruning.PruneConfig`` or None.
  """
  if name not in _BUILDERS:
    raise ValueError(f"unknown model {name!r}; available models: {', '.join(names())}")
  rngs = rngs if rngs is not None else nnx.Rngs(params=seed, dropout=seed + 1)
  return _BUILDERS[name](pruning=pruning, rngs=rngs, **overrides)


def _vim_builder(variant):
  def build(*, pruning, rngs, **overrides):
    from toppax.models import vim
    return vim.VisionMamba(vim.config_for(variant, **overrides), pruning=pruning, rngs=rngs)
  return build


for _v in ("vim_t", "vim_s", "vim_b"):
  register(_v, _vim_builder(_v))


def _plainmamba_builder(variant):
  def build(*, pruning, rngs, **overrides):
    from toppax.models import plainmamba  # noqa: F401  (added by the PlainMamba model)
    return plainmamba.create(variant, pruning=pruning, rngs=rngs, **overrides)
  return build


for _v in ("plainmamba_l1", "plainmamba_l2", "plainmamba_l3"):
  register(_v, _plainmamba_builder(_v))
