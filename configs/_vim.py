"""The one body behind configs/vim_{t,s,b}.py (they differ in the model name only)."""
from __future__ import annotations

from configs import common


def get_config(model_name, arg=None):
  a = common.parse_arg(arg, runlocal=False, top=False, removal=False, evit=False, bench=False,
                       res=224, folder="", data_dir="")
  c = common.base_config()
  c.model.name = model_name
  c.model.img_size = a.res
  if model_name == "vim_b":
    c.model.drop_path_rate = 0.5    # Vim's ViM-B recipe; T and S use 0.1 (Vim README)
  variants = [v for v in ("top", "removal", "evit") if a[v]]
  if len(variants) > 1:
    raise ValueError(f"config arguments {', '.join(variants)} exclude each other: give at most "
                     "one of top, removal, evit")
  variant = variants[0] if variants else ""
  if variant:
    c = common.apply_top_finetune(c, model_name, variant)
  common.apply_data_args(c, a)
  if a.bench and not variant:
    # --mode=bench's pruned variants use the paper's schedule of this model (off for training).
    paper = common.paper_pruning(model_name)
    c.pruning.layers, c.pruning.keep_ratio = paper.layers, float(paper.keep_ratio)
  if a.runlocal:
    # A seconds-long smoke run on CPU: random-init model, tiny shapes, folder or tfds data.
    c.model.img_size = 32
    c.model.patch_size = 8
    c.model.depth = 4
    c.model.embed_dim = 64
    common.smoke_run(c)
    c.pruning.layers = (2,)         # also for :bench's pruned variants on the 4-block model
  return c
