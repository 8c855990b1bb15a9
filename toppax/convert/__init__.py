"""Official PyTorch checkpoints -> toppax models (torch optional: numpy state dicts work too)."""
from __future__ import annotations

from toppax.convert.common import ConversionError, KeyTable, load_state_dict

__all__ = ["from_torch", "ConversionError", "load_state_dict"]


def from_torch(name: str, state_dict, *, pruning=None, **overrides):
  """Builds model ``name`` and fills it from an official state dict.

  Args:
    name: "vim_t", "vim_s", "vim_b" (hustvl/Vim), "plainmamba_l1/l2/l3", or a segmentation model
      of ``toppax.segmentation.names()`` ("upernet_vim_t", ...: an mmseg checkpoint, see
      ``toppax.convert.segmentation.from_torch``; ``num_classes`` defaults to 150 there).
    state_dict: official key -> numpy array or torch tensor (the released checkpoints' "model"
      entry; a full checkpoint dict with "model" or "state_dict" works too), or a path to a .pth
      or .npz file (read without torch, and without running code from the file).
    pruning: optional ``toppax.pruning.PruneConfig``.
    **overrides: official constructor arguments (img_size, patch_size, depth, embed_dim,
      num_classes, ...). A different img_size resamples the position embedding (ViM: bicubic as
      torch, cls row kept and moved to the new middle index).
  Every key must be used exactly once with a matching shape; otherwise one ConversionError lists
  every missing, unused and mis-shaped key.
  """
  from toppax import models
  if name.startswith("upernet_"):
    from toppax.convert import segmentation
    return segmentation.from_torch(name, state_dict, pruning=pruning, **overrides)
  if name not in models.names():
    from toppax import segmentation
    raise ValueError(f"unknown model {name!r}; available models: "
                     f"{', '.join(models.names() + segmentation.names())}")
  sd = load_state_dict(state_dict)
  model = models.create(name, pruning=pruning, **overrides)
  if name.startswith("vim"):
    from toppax.convert import vim as conv
    table = KeyTable(sd)
  else:
    from toppax.convert import plainmamba as conv
    table = KeyTable(sd, ignore=conv.ignore_key)
  conv.convert_into(model, table)
  table.finish(f"{name} with {overrides or 'default settings'}")
  return model

