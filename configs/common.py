"""Shared config pieces: argument parsing (big_vision's ``parse_arg``), the base recipe, pruning.

A config is ``get_config(arg)`` returning an ``ml_collections.ConfigDict``; ``arg`` is a comma
list such as ``"runlocal,top,res=384"``. Everything a run reads is declared here, so a typo in
``--config.x=...`` fails under ``lock_config=True`` instead of being silently ignored.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def parse_arg(arg, lazy=False, **spec):
  """``parse_arg("top,res=384", top=False, res=224, runlocal=False)`` -> ConfigDict.

  Flags without ``=`` are booleans set to True; values are cast to the type of their default.
  Unknown names raise (``lazy=False``), so ``vim_s.py:tpo`` fails loudly.
  """
  out = ml_collections.ConfigDict(spec)
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    key, eq, value = item.partition("=")
    if key not in spec:
      if lazy:
        out[key] = value if eq else True
        continue
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(spec)}")
    default = spec[key]
    if not eq:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes", "y")
    else:
      out[key] = type(default)(value)
  return out


def given(arg):
  """The argument names present in ``arg`` (``"runlocal,epochs=3"`` -> ``{"runlocal", "epochs"}``),
  so that explicit arguments win over ``runlocal``'s defaults."""
  return {item.partition("=")[0] for item in (arg or "").split(",") if item}


def pruning(enabled=False, layers=(5, 10, 15), keep_ratio=0.8, importance="clip",
            alignment=True, cls_mode="keep_position", fused_token=False, gap_delta="prev"):
  """``toppax.pruning.PruneConfig`` as plain fields (built by ``toppax.factory.prune_config``).

  ``keep_ratio`` is one float for every pruning layer; ``keep_ratios``, when not empty, gives one
  ratio per layer and wins (``--config.pruning.keep_ratios="(0.8,0.7,0.6)"``). Both fields always
  exist so that either can be set from the command line (a flag keeps its field's type)."""
  if isinstance(keep_ratio, (tuple, list)):
    ratios = tuple(float(r) for r in keep_ratio)
    uniform = len(set(ratios)) == 1
    keep_ratio, keep_ratios = (ratios[0], ()) if uniform else (0.8, ratios)
  else:
    keep_ratio, keep_ratios = float(keep_ratio), ()
  return ml_collections.ConfigDict(dict(
      enabled=enabled, layers=tuple(layers), keep_ratio=keep_ratio, keep_ratios=keep_ratios,
      importance=importance, alignment=alignment, cls_mode=cls_mode, fused_token=fused_token,
      gap_delta=gap_delta))


def paper_pruning(model_name, variant="top"):
  """The paper's schedule (PruneConfig.paper) with ToP, plain removal or EViT's fused token."""
  from toppax.pruning import PruneConfig
  p = PruneConfig.paper(model_name)
  return pruning(enabled=True, layers=p.layers, keep_ratio=p.keep_ratio,
                 alignment=(variant == "top"), fused_token=(variant == "evit"))


def base_config():
  """DeiT / Vim recipe defaults (Vim's main.py: AdamW lr 5e-4 at batch 512, wd 0.05, 300 epochs,
  5 warm-up epochs, label smoothing 0.1, mixup 0.8 / cutmix 1.0, RandAugment m9 n2, EMA)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.multihost = False   # jax.distributed.initialize() (also when TOPPAX_MULTIHOST=1)

  c.model = ml_collections.ConfigDict()
  c.model.name = "vim_s"
  c.model.img_size = 224
  c.model.patch_size = 16
  c.model.depth = config_dict.placeholder(int)       # None: the variant's own
  c.model.embed_dim = config_dict.placeholder(int)
  c.model.d_state = config_dict.placeholder(int)
  c.model.drop_path_rate = 0.1
  c.model.dtype = "float32"                          # activations; params stay fp32
  c.model.scan_implementation = config_dict.placeholder(str)
  c.model.scan_layers = config_dict.placeholder(bool)  # None: lax.scan over equal blocks (ViM)
  c.model.remat = config_dict.placeholder(str)   # ViM training: auto, none, block or dots
  c.pruning = pruning()
  c.init_from = ""         # official .pth / npz state dict (toppax.convert.from_torch), or ""

  c.data = ml_collections.ConfigDict()
  # "digits" (scikit-learn, embedded), "folder" (class-per-folder tree), "tfds".
  c.data.source = "tfds"
  c.data.name = "imagenet2012"    # tfds name
  c.data.data_dir = config_dict.placeholder(str)    # tfds data_dir
  c.data.train_dir = ""           # folder source: <class>/*.jpg tree, or a .zip of one
  c.data.eval_dir = ""
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.num_classes = 1000
  c.data.eval_examples = 0        # 0: all; >0: the first N (smoke runs)
  c.data.mean = (0.485, 0.456, 0.406)
  c.data.std = (0.229, 0.224, 0.225)
  c.data.workers = 8              # worker processes decoding images (0: this process)
  c.data.prefetch = 2             # batches decoded ahead of the train step
  c.data.cache = False            # decode every image once into memory (small datasets)

  c.aug = ml_collections.ConfigDict()
  c.aug.crop_scale = (0.08, 1.0)  # random-resized-crop area range; (1, 1): none
  c.aug.flip = True
  c.aug.on_device = False         # True: crop/flip on the accelerator (cached, equal-size images)
  c.aug.pad_crop = 4              # on_device: reflect-pad by this many pixels, random crop
  c.aug.randaug_layers = 2        # RandAugment n
  c.aug.randaug_magnitude = 9     # RandAugment m (of 10)
  c.aug.mixup = 0.8
  c.aug.cutmix = 1.0
  c.aug.mix_prob = 1.0
  c.aug.switch_prob = 0.5
  c.aug.label_smoothing = 0.1
  c.aug.eval_crop = 0.875         # eval: resize to img/0.875, centre crop (DeiT)

  c.batch_size = 1024             # global
  c.eval_batch_size = 256
  c.num_epochs = 300
  c.total_steps = 0               # >0 overrides num_epochs (smoke tests)
  c.lr = 5e-4                     # at batch 512, scaled linearly to batch_size
  c.lr_base_batch = 512
  c.min_lr = 1e-5
  c.warmup_epochs = 5
  c.weight_decay = 0.05
  c.b1 = 0.9
  c.b2 = 0.999
  c.grad_clip = 0.0               # 0: off (Vim's recipe has none; set for ToP fine-tuning)
  c.ema_decay = 0.99996           # 0: no EMA
  c.eval_ema = True

  c.log_every = 50
  c.eval_every_epochs = 5.0       # may be fractional; 0: only at the end
  c.checkpoint_every = 1000       # steps
  c.keep_checkpoints = 3
  c.compare = ()                  # after training: evaluate these variants side by side
  c.max_steps_per_run = 0         # >0: stop after this many steps in this process (tests)
  # A damaged latest checkpoint: False stops with CheckpointError; True moves it aside (to
  # checkpoints/damaged-<step>) and resumes from the one before.
  c.resume_fallback = False
  # A step with a non-finite loss or gradient: False stops (nothing non-finite is ever saved);
  # True drops that step's update and goes on, counted as train/skipped_steps.
  c.skip_nonfinite = False

  c.bench = ml_collections.ConfigDict()
  c.bench.batch_sizes = (128, 256)
  c.bench.dtypes = ("bfloat16", "float32")
  c.bench.variants = ("dense", "top")
  c.bench.infer = True            # time the jitted forward on one device
  c.bench.train = True            # time one data-parallel train step
  c.bench.devices = (0,)          # device counts for the train step; 0 = all local devices
  c.bench.repeats = 10
  c.bench.warmup = 2
  return c


def study(seeds=(0, 1), keep_ratios=(0.5, 0.7, 0.9), methods=("top", "removal", "evit"),
          importance="clip", importances=("clip", "l1", "l2", "raw"), ablation_ratio=0.7,
          finetune_epochs=5, finetune_lr=1e-4, finetune_min_lr=1e-6, finetune_drop_path=0.0,
          finetune_ema_decay=0.0, finetune_steps=0, part=""):
  """``--mode=study`` (toppax.study): dense training per seed, then every method at every keep
  ratio zero-shot and after ``finetune_epochs`` of pruned fine-tuning (lr, no warm-up, cosine
  to ``finetune_min_lr``); the importance ablation with ToP at ``ablation_ratio``.
  ``finetune_steps > 0`` overrides the epochs (smoke runs). ``part="i/n"``: n processes share a
  workdir (e.g. several on one GPU); part 0 trains the dense models, the others share the
  entries and compile theirs meanwhile."""
  return ml_collections.ConfigDict(dict(
      seeds=tuple(seeds), keep_ratios=tuple(keep_ratios), methods=tuple(methods),
      importance=importance, importances=tuple(importances), ablation_ratio=ablation_ratio,
      finetune_epochs=finetune_epochs, finetune_lr=finetune_lr, finetune_min_lr=finetune_min_lr,
      finetune_drop_path=finetune_drop_path, finetune_ema_decay=finetune_ema_decay,
      finetune_steps=finetune_steps, part=part))


def apply_top_finetune(c, model_name, variant="top"):
  """ToP fine-tuning (paper §4.1) with the paper's ViM pruning schedule."""
  c.pruning = paper_pruning(model_name, variant)
  return finetune_recipe(c)


def finetune_recipe(c):
  """ToP fine-tuning (paper §4.1): from a dense checkpoint, 30 epochs, lr 5e-6 at batch 512
  scaled linearly, weight decay 1e-8, drop-path 0 (the pruning schedule is set by the caller)."""
  c.num_epochs = 30
  c.lr = 5e-6
  c.min_lr = 1e-6
  c.warmup_epochs = 0
  c.weight_decay = 1e-8
  c.model.drop_path_rate = 0.0
  c.grad_clip = 1.0
  c.batch_size = 512
  return c


def apply_data_args(c, a):
  """The data/bench arguments every model config takes: folder=DIR, data_dir=DIR, bench."""
  if a.folder:
    # Any class-per-folder tree: <folder>/train/<class>/* and <folder>/val/<class>/*.
    c.data.source = "folder"
    c.data.train_dir = f"{a.folder}/train"
    c.data.eval_dir = f"{a.folder}/val"
  if a.data_dir:
    c.data.data_dir = a.data_dir
  if a.bench:
    c.bench.devices = (1, 0)        # one device, then all local devices (data parallel)
  return c


def smoke_run(c):
  """Training and bench sizes of a seconds-long CPU smoke run (``runlocal``); the model sizes
  are the caller's."""
  c.batch_size = 16
  c.eval_batch_size = 16
  c.total_steps = 10
  c.log_every = 2
  c.checkpoint_every = 5
  c.data.eval_examples = 64
  c.data.workers = 0
  c.ema_decay = 0.9
  c.bench.batch_sizes = (8,)
  c.bench.dtypes = ("float32",)
  c.bench.repeats = 3
  return c
