"""CIFAR-10 (real images, 20k train / 10k test): a small ViM for 32x32 inputs and the accuracy
study of docs/RESULTS.md (``--mode=study``: dense vs EViT / removal / ToP at matched GFLOPs).

Model: ViM with patch 4 (64 patches + the middle cls token = 65 tokens), 12 bidirectional
Mamba blocks, dim 192, d_state 16 (ViM-T's width at half its depth). Pruning after blocks
3, 6 and 9 (the paper's 5/10/15 of 24 blocks, scaled to 12): at keep ratio 0.7 the token counts
are 65 -> 45 -> 31 -> 21.

Data: ../shared/data/cifar10 (cifar10-train20k.zip, cifar10-test.zip) or any folder holding
those zips (``data=DIR``; the zips are read directly, decoded once into memory). Recipe: AdamW
lr 1e-3 at batch 256, cosine, 5 warm-up epochs, wd 0.05, label smoothing 0.1, light mixup,
RandAugment n2 m9, reflect-pad-4 random crops and flips on the accelerator, drop-path 0.1, EMA.

  python -m toppax.main --config=configs/cifar10.py --mode=train     # the dense model
  python -m toppax.main --config=configs/cifar10.py --mode=study     # the whole study

Measured results, commands and seeds: docs/RESULTS.md. Arguments: ``data=DIR`` (folder with
the zips), ``epochs=N`` (dense training), ``ft_epochs=N``, ``seeds=0+1`` ('+'-separated),
``ratios=0.5+0.7+0.9``, ``part=i/n`` (this process runs every n-th study entry: n processes
on one workdir and GPU), ``runlocal`` (a seconds-long CPU smoke run of the whole study).
"""
from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, runlocal=False, data="../shared/data/cifar10", epochs=100,
                       ft_epochs=5, seeds="0+1", ratios="0.5+0.7+0.9", part="", top=False)
  c = common.base_config()
  c.model.name = "vim_t"
  c.model.img_size = 32
  c.model.patch_size = 4
  c.model.depth = 12
  c.model.embed_dim = 192
  c.model.d_state = 16
  c.model.drop_path_rate = 0.1
  c.model.dtype = "bfloat16"
  c.pruning = common.pruning(enabled=a.top, layers=(3, 6, 9), keep_ratio=0.7)

  c.data.source = "folder"
  c.data.train_dir = f"{a.data}/cifar10-train20k.zip"
  c.data.eval_dir = f"{a.data}/cifar10-test.zip"
  c.data.num_classes = 10
  c.data.mean = (0.4914, 0.4822, 0.4465)
  c.data.std = (0.2470, 0.2435, 0.2616)
  c.data.cache = True
  c.data.workers = 8

  c.aug.on_device = True          # pad-4 random crop + flip in the train step
  c.aug.pad_crop = 4
  c.aug.flip = True
  c.aug.crop_scale = (1.0, 1.0)
  c.aug.randaug_layers = 2
  c.aug.randaug_magnitude = 9
  c.aug.mixup = 0.2
  c.aug.cutmix = 0.0
  c.aug.mix_prob = 0.5
  c.aug.label_smoothing = 0.1
  c.aug.eval_crop = 1.0

  c.batch_size = 256
  c.eval_batch_size = 500
  c.num_epochs = a.epochs
  c.lr = 1e-3
  c.lr_base_batch = 256
  c.min_lr = 1e-5
  c.warmup_epochs = 5
  c.weight_decay = 0.05
  c.grad_clip = 1.0
  c.ema_decay = 0.999
  c.log_every = 100
  c.eval_every_epochs = 25
  c.checkpoint_every = 2000
  c.keep_checkpoints = 1
  c.compare = ("dense", "top", "removal", "evit")

  c.study = common.study(seeds=tuple(int(s) for s in a.seeds.split("+")),
                         keep_ratios=tuple(float(r) for r in a.ratios.split("+")),
                         ablation_ratio=0.7, finetune_epochs=a.ft_epochs, finetune_lr=1e-4,
                         part=a.part)

  c.bench.batch_sizes = (256,)
  c.bench.dtypes = ("bfloat16",)
  c.bench.variants = ("dense", "top")
  if a.runlocal:
    c.model.depth = 4
    c.model.embed_dim = 32
    c.model.d_state = 4
    c.pruning.layers = (1, 2, 3)
    common.smoke_run(c)
    c.model.dtype = "float32"
    c.data.eval_examples = 64
    c.eval_every_epochs = 0
    c.study.importances = ("clip", "l1")
    c.study.ablation_ratio = 0.5
    # Explicit arguments win over runlocal's sizes.
    given = common.given(arg)
    if "epochs" in given:
      c.total_steps = 0
    if "seeds" not in given:
      c.study.seeds = (0,)
    if "ratios" not in given:
      c.study.keep_ratios = (0.5,)
    if "ft_epochs" not in given:
      c.study.finetune_steps = 3
  return c
