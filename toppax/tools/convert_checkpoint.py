"""``--mode=convert``: an official checkpoint -> toppax parameters, written once so that later
runs need no torch and no conversion."""
from __future__ import annotations

import jax
from flax import nnx

from toppax import checkpointing, factory
from toppax.convert import from_torch


def run(config, workdir: str) -> str:
  """``--mode=convert``: ``config.init_from`` (an official .pth or a numpy .npz state dict) ->
  toppax parameters under ``<workdir>/params`` (orbax) with ``params_meta.json``. Later runs
  start from them with ``--config.init_from=<workdir>`` (no torch needed there)."""
  if not config.init_from:
    raise ValueError("--mode=convert converts config.init_from: pass "
                     "--config.init_from=/path/to/official.pth (or a .npz state dict)")
  if checkpointing.is_toppax_dir(config.init_from):
    raise ValueError(f"{config.init_from} holds toppax parameters already: use it directly as "
                     "config.init_from")
  model = from_torch(config.model.name, config.init_from, **factory.model_overrides(config))
  _, params, rngs = nnx.split(model, nnx.Param, ...)
  params, rngs = nnx.to_pure_dict(params), nnx.to_pure_dict(rngs)
  n = sum(x.size for x in jax.tree.leaves(params))
  meta = {"source": str(config.init_from), "model": config.model.to_dict(),
          "num_classes": config.data.num_classes, "num_params": int(n)}
  where = checkpointing.save_params(workdir, params, rngs, meta)
  print(f"converted {config.init_from} ({config.model.name}, {n / 1e6:.2f} M parameters) -> "
        f"{where}; use it with --config.init_from={workdir}", flush=True)
  return where
