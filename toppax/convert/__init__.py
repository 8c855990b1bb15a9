"""Official PyTorch checkpoints -> toppax models (torch optional: numpy state dicts work too)."""
from __future__ import annotations

from toppax.convert.common import ConversionError, KeyTable, load_state_dict

__all__ = ["from_torch", "ConversionError", "load_state_dict"]


def from_torch(name: str, state_dict, *, pruning=None, **overrides):
  """Builds model ``name`` and fills it from an official state dict.

  Args:
    name: "vim_t", "vim_s", "vim_b" (hustvl/Vim) or "plainmamba_l1/l2/l3".
    state_dict: official key -> numpy array or torch tensor (the released checkpoints' "model"
      entry; a full checkpoint dict with "model" works too), or a path to a .pth file (needs torch).
    pruning: optional ``toppax.pruning.PruneConfig``.
    **overrides: official constructor arguments (img_size, patch_size, depth, embed_dim,
      num_classes, ...). A different img_size resamples the position embedding (ViM: bicubic as
      torch, cls row kept and moved to the new middle index).
  Every key must be used exactly once with a matching shape; otherwise one ConversionError lists
  every missing, unused and mis-shaped key.
  """
  from toppax import models
  if name not in models.names():
    raise ValueError(f"unknown model {name!r}; available models: {', '.join(models.names())}")
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


def run(config, workdir: str) -> str:
  """``--mode=convert``: ``config.init_from`` (an official .pth or a numpy .npz state dict) ->
  toppax parameters under ``<workdir>/params`` (orbax) with ``params_meta.json``. Later runs
  start from them with ``--config.init_from=<workdir>`` (no torch needed there)."""
  import jax
  from flax import nnx

  from toppax import checkpointing, train
  if not config.init_from:
    raise ValueError("--mode=convert converts config.init_from: pass "
                     "--config.init_from=/path/to/official.pth (or a .npz state dict)")
  if checkpointing.is_toppax_dir(config.init_from):
    raise ValueError(f"{config.init_from} holds toppax parameters already: use it directly as "
                     "config.init_from")
  model = from_torch(config.model.name, config.init_from, **train.model_overrides(config))
  _, params, rngs = nnx.split(model, nnx.Param, ...)
  params, rngs = nnx.to_pure_dict(params), nnx.to_pure_dict(rngs)
  n = sum(x.size for x in jax.tree.leaves(params))
  meta = {"source": str(config.init_from), "model": config.model.to_dict(),
          "num_classes": config.data.num_classes, "num_params": int(n)}
  where = checkpointing.save_params(workdir, params, rngs, meta)
  print(f"converted {config.init_from} ({config.model.name}, {n / 1e6:.2f} M parameters) -> "
        f"{where}; use it with --config.init_from={workdir}", flush=True)
  return where
