"""The one body behind configs/seg_*.py: the official UperNet recipes on ADE20K.

Vim (seg/configs/vim/upernet/upernet_vim_{tiny,small}_24_512_slide_60k.py): AdamW lr 1e-4,
weight decay 0.05, Vim's layer-wise decay 0.92, poly decay with 1,500 linear warm-up iterations,
60k iterations at batch 32 (4 GPUs x 8), slide inference (512 windows, stride 341).
PlainMamba (plain_mamba_seg_configs/l{1,2,3}_upernet.py): AdamW lr 6e-5, weight decay 0.01 with
its no-decay keys, poly with the same warm-up, 160k iterations at batch 16 (8 GPUs x 2), whole
inference. Both: mmseg's ADE20K pipeline (random rescale 0.5-2.0 of 2048x512, 512 crops with
cat_max_ratio 0.75, flip, photometric distortion), cross-entropy + 0.4 x the auxiliary head's,
SyncBN over the data-parallel batch, the backbone started from the official classification
checkpoint (``--config.init_from=<.pth>``; the classifier is dropped, and for Vim also the cls
token and its position-embedding row, the patch rows resampled).

Each configs/seg_<model>.py takes these arguments: `top`, `removal`, `evit` (train with the
backbone pruned: the paper's schedule with alignment, plain removal, or EViT's fused token),
`folder=DIR` (ADEChallengeData2016 as a folder or a .zip), `data_dir=DIR` (the TFDS copy,
scene_parse150), `steps=N` (iterations), `runlocal` (a seconds-long CPU smoke run on generated
scenes). Evaluate an official mmseg checkpoint (or a workdir) with ``--mode=eval
--config.init_from=...``; training ends with the dense / ToP / removal / EViT comparison.
"""
from __future__ import annotations

import ml_collections

from configs import common


def seg_section(family: str):
  """``config.seg``: the pipeline (toppax.data.segmentation.SegAugment), inference and loss."""
  return ml_collections.ConfigDict(dict(
      scale=(2048, 512), ratio_range=(0.5, 2.0), crop_size=(512, 512), cat_max_ratio=0.75,
      flip_prob=0.5, photometric=True,
      eval_bucket=0,                 # 0: the pipeline's default rounding of eval canvases
      eval_canvas=(),                # (H, W): one fixed eval canvas for every image
      test_mode="slide" if family == "vim" else "whole",
      slide_stride=(341, 341),       # slide windows every this many pixels (mmseg: 341 at 512)
      aux_weight=0.4,                # auxiliary FCN head's loss weight
      pictures=0,                    # after training: image / truth / predictions / kept tokens
  ))


def base(model_name: str, arg=None):
  a = common.parse_arg(arg, runlocal=False, top=False, removal=False, evit=False, folder="",
                       data_dir="", steps=0)
  family = "vim" if "vim" in model_name else "plainmamba"
  c = common.base_config()
  # Model fields: toppax.segmentation.create's keyword arguments; None keeps the official value.
  ph = ml_collections.config_dict.placeholder
  c.model = ml_collections.ConfigDict()
  c.model.name = model_name
  c.model.img_size = 512                       # ViM: its input size; PlainMamba: the crop
  c.model.dtype = "float32"
  c.model.scan_implementation = ph(str)
  c.model.drop_path_rate = ph(float)
  if family == "vim":
    c.model.depth, c.model.embed_dim, c.model.patch_size = ph(int), ph(int), ph(int)
  else:
    c.model.num_layers, c.model.embed_dims = ph(int), ph(int)
  c.model.d_state = ph(int)
  c.model.out_indices = ph(tuple)              # the four tapped blocks (0-based)
  c.model.channels = ph(int)                   # decode head
  c.model.aux_channels = ph(int)
  c.seg = seg_section(family)
  # --mode=bench: the forward and the train step at 512, bf16, batch 8 / 16 / 32 per device.
  c.bench.batch_sizes, c.bench.dtypes = (8, 16, 32), ("bfloat16",)

  c.data.source = "ade20k"
  c.data.name = "scene_parse150"               # the TFDS copy (source="tfds")
  c.data.num_classes = 150
  c.data.workers = 8
  # mmseg's ADE20K normalisation: mean (123.675, 116.28, 103.53), std (58.395, 57.12, 57.375).
  c.data.mean = (123.675 / 255, 116.28 / 255, 103.53 / 255)
  c.data.std = (58.395 / 255, 57.12 / 255, 57.375 / 255)

  c.schedule = "poly"
  c.warmup_steps = 1500
  c.warmup_ratio = 1e-6
  c.poly_power = 1.0
  c.min_lr = 0.0
  c.warmup_epochs = 0
  c.b1, c.b2 = 0.9, 0.999
  c.grad_clip = 0.0
  c.ema_decay = 0.0
  c.eval_ema = False
  if family == "vim":
    c.lr, c.weight_decay = 1e-4, 0.05
    c.layer_decay, c.layer_decay_num_layers = 0.92, 24
    c.batch_size, c.total_steps = 32, 60000
    c.eval_every_steps = c.checkpoint_every = 4000
  else:
    c.lr, c.weight_decay = 6e-5, 0.01
    c.batch_size, c.total_steps = 16, 160000
    c.eval_every_steps = c.checkpoint_every = 8000
  c.lr_base_batch = c.batch_size           # the recipes' lr is for their own batch: no scaling
  c.eval_batch_size = 8
  c.log_every = 50

  # ToP on the backbone: the paper's classification schedule of the backbone's variant.
  variants = [v for v in ("top", "removal", "evit") if a[v]]
  if len(variants) > 1:
    raise ValueError(f"config arguments {', '.join(variants)} exclude each other: give at most "
                     "one of top, removal, evit")
  variant = variants[0] if variants else "top"
  if family == "vim":
    c.pruning = common.paper_pruning(model_name.split("_", 1)[1], variant)
  else:
    # PlainMamba: the schedules that cut 41.6% of the classifier's FLOPs (docs/flops.md).
    from toppax.tools.flops import PLAINMAMBA_TOP_SCHEDULES
    layers, ratios = PLAINMAMBA_TOP_SCHEDULES[model_name.split("_", 1)[1]]
    c.pruning = common.pruning(enabled=True, layers=layers, keep_ratio=ratios,
                               alignment=variant == "top", fused_token=variant == "evit")
  c.pruning.enabled = bool(variants)
  c.compare = ("dense", "top", "removal", "evit")

  if a.folder:
    c.data.train_dir = c.data.eval_dir = a.folder        # ADEChallengeData2016 folder or .zip
  if a.data_dir:
    c.data.source, c.data.data_dir = "tfds", a.data_dir
  if a.steps:
    c.total_steps = a.steps
  if a.runlocal:
    # A seconds-long CPU smoke run on generated digit scenes: a 4-block backbone at 64 px.
    c.data.source, c.data.num_classes, c.data.scene_size = "seg_digits", 11, 64
    c.data.train_examples, c.data.eval_examples = 256, 16
    c.model.img_size = 64
    if family == "vim":
      c.model.depth, c.model.embed_dim = 4, 32
    else:
      c.model.num_layers, c.model.embed_dims = 4, 32
    c.model.out_indices = (0, 1, 2, 3)
    c.model.channels, c.model.aux_channels = 16, 8
    c.seg.scale, c.seg.crop_size, c.seg.eval_canvas = (256, 64), (64, 64), (64, 64)
    c.seg.slide_stride = (48, 48)
    c.batch_size, c.eval_batch_size = 4, 4
    c.total_steps, c.warmup_steps = 6, 2
    c.lr_base_batch = 4
    c.log_every, c.checkpoint_every, c.eval_every_steps = 2, 3, 0
    c.data.workers = 0
    c.compare = ("dense", "top")
    c.pruning.layers = (2,)
    if c.get("layer_decay_num_layers"):
      c.layer_decay_num_layers = 4
  return c
