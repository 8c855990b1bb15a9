"""The one body behind configs/plainmamba_l{1,2,3}.py (model name and official recipe differ)."""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import common

# plain_mamba_configs/plain_mamba_l*_in1k_300e.py: drop-path rate, global batch (GPUs x 256),
# warm-up epochs, gradient-norm clip, EMA momentum (EMACheckpointHook; L1 has none).
RECIPES = {
    "plainmamba_l1": dict(drop_path_rate=0.2, batch_size=2048, warmup_epochs=15, grad_clip=5.0,
                          ema_decay=0.0),
    "plainmamba_l2": dict(drop_path_rate=0.2, batch_size=2048, warmup_epochs=20, grad_clip=1.0,
                          ema_decay=1 - 1e-4),
    "plainmamba_l3": dict(drop_path_rate=0.4, batch_size=1024, warmup_epochs=20, grad_clip=1.0,
                          ema_decay=1 - 1e-4),
}


def top_schedule(model_name):
  """(layers, keep ratios) of the ToP schedule: toppax.tools.flops owns them (docs/flops.md)."""
  from toppax.tools.flops import PLAINMAMBA_TOP_SCHEDULES
  layers, ratios = PLAINMAMBA_TOP_SCHEDULES[model_name]
  return tuple(layers), tuple(ratios)


def _model(model_name, img_size, drop_path_rate):
  # PlainMamba's own constructor names (toppax.models.plainmamba.PlainMambaConfig); unset
  # placeholders keep the variant's value.
  m = ml_collections.ConfigDict()
  m.name = model_name
  m.img_size = img_size
  m.patch_size = 16
  m.num_layers = config_dict.placeholder(int)
  m.embed_dims = config_dict.placeholder(int)
  m.d_state = config_dict.placeholder(int)
  m.drop_path_rate = drop_path_rate
  m.dtype = "float32"
  m.scan_implementation = config_dict.placeholder(str)
  return m


def get_config(model_name, arg=None):
  a = common.parse_arg(arg, runlocal=False, top=False, removal=False, bench=False, res=224,
                       folder="", data_dir="")
  recipe = RECIPES[model_name]
  c = common.base_config()
  c.model = _model(model_name, a.res, recipe["drop_path_rate"])
  # mmcls recipe (imagenet_bs1024_adamw_swin + the PlainMamba configs): AdamW lr 5e-4 at batch
  # 512 scaled linearly, wd 0.05, cosine to 1% of the peak, 300 epochs; mixup 0.8 / cutmix 1.0
  # (one of the two per batch), label smoothing 0.1, RandAugment m9 n2. The official optimizer
  # also exempts norms, biases, pos_embed, A_log, D and direction_Bs from weight decay.
  c.batch_size = recipe["batch_size"]
  c.warmup_epochs = recipe["warmup_epochs"]
  c.grad_clip = recipe["grad_clip"]
  c.ema_decay = recipe["ema_decay"]
  c.min_lr = c.lr * c.batch_size / c.lr_base_batch * 1e-2
  # The PlainMamba schedule, disabled unless asked for: bench and compare variants ("top",
  # "removal") of a dense run read it too.
  layers, ratios = top_schedule(model_name)
  c.pruning = common.pruning(enabled=False, layers=layers, keep_ratio=ratios)
  variant = "top" if a.top else "removal" if a.removal else ""
  if variant:
    # ToP fine-tuning (paper §4.1) as for ViM (common.apply_top_finetune), with the PlainMamba
    # schedule: removal is the same schedule without alignment.
    c.pruning = common.pruning(enabled=True, layers=layers, keep_ratio=ratios,
                               alignment=(variant == "top"))
    common.finetune_recipe(c)
  common.apply_data_args(c, a)
  if a.runlocal:
    # A seconds-long smoke run on CPU: random init, 64 px (4x4 token grid), 4 thin layers.
    c.model.img_size = 64
    c.model.num_layers = 4
    c.model.embed_dims = 32
    c.model.d_state = 8
    common.smoke_run(c)
    if c.pruning.enabled:
      c.pruning.layers = (2,)
      c.pruning.keep_ratio, c.pruning.keep_ratios = 0.5, ()
  return c
