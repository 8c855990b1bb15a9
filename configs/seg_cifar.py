"""The dense-prediction study on real images: does ToP keep mIoU at fewer FLOPs?

ADE20K is not available here, so the scenes are built from real CIFAR-10 photos
(toppax.data.seg_synthetic.CifarScenesSource): each 128x128 scene is a background photo, upscaled,
blurred and colour-jittered into a texture (class 10, background), with 2-5 other CIFAR photos
pasted on it as opaque squares of 25-64 px at random places; every pixel of a pasted square is
labelled with that photo's class (0-9). Train scenes come from cifar10-train20k.zip, test scenes
from cifar10-test.zip (../shared/data/cifar10/). A ViM-T-width UperNet (12 blocks, dim 192, patch
8: 256 tokens, no cls token; decode head with 192 channels as the official ViM-T config) trains
dense from scratch; then every method (ToP, plain removal, EViT) at two keep ratios is evaluated
zero-shot and after the same short fine-tune, two seeds (``--mode=study``, toppax.study).

  python -m toppax.main --config=configs/seg_cifar.py:data=/path/to/cifar10 --mode=study \\
    --workdir=study_seg_cifar

Arguments: `data=DIR` (the folder holding the two CIFAR-10 zips), `steps=N` (dense training
iterations), `ft_steps=N`, `seeds=0+1`, `ratios=0.5+0.7`, `cpu` (the study at CPU scale: 64 px
scenes, 6 blocks of width 64, 64 tokens, pruning after blocks 2 and 4, no random rescale, 1,500
steps and 200 fine-tuning steps; about 45 minutes on 2 cores), `runlocal` (a CPU smoke run on
64 px digit scenes).
"""
from configs import _seg, common


def get_config(arg=None):
  a = common.parse_arg(arg, data="../shared/data/cifar10", steps=3000, ft_steps=300,
                       seeds="0+1", ratios="0.5+0.7", runlocal=False, size=128,
                       cpu=False)
  c = _seg.base("upernet_vim_t")
  c.model.img_size, c.model.patch_size = a.size, 8
  c.model.depth, c.model.embed_dim = 12, 192
  c.model.out_indices = (2, 5, 8, 11)
  c.model.channels = 192
  c.model.drop_path_rate = 0.05
  c.model.dtype = "bfloat16"

  c.data.source, c.data.num_classes, c.data.scene_size = "cifar_scenes", 11, a.size
  c.data.train_dir = f"{a.data}/cifar10-train20k.zip"
  c.data.eval_dir = f"{a.data}/cifar10-test.zip"
  c.data.train_examples, c.data.eval_examples = 20000, 1000
  c.data.workers = 8
  c.seg.scale, c.seg.crop_size = (4 * a.size, a.size), (a.size, a.size)
  c.seg.eval_canvas, c.seg.test_mode = (a.size, a.size), "whole"

  c.lr, c.weight_decay, c.layer_decay = 1e-3, 0.05, 0.0
  c.batch_size = c.lr_base_batch = 32
  c.eval_batch_size = 100
  c.total_steps, c.warmup_steps = a.steps, 200
  c.log_every, c.checkpoint_every, c.eval_every_steps = 100, 1000, 0
  c.eval_every_epochs = 0.0
  c.keep_checkpoints = 1
  # The paper's ViM-S points (after blocks 5, 10, 15 of 24) scaled to 12 blocks.
  c.pruning.layers, c.pruning.keep_ratios = (3, 6, 9), ()
  c.compare = ()
  c.study = common.study(seeds=tuple(int(s) for s in a.seeds.split("+")),
                         keep_ratios=tuple(float(r) for r in a.ratios.split("+")),
                         importances=("clip",), ablation_ratio=float(a.ratios.split("+")[0]),
                         finetune_steps=a.ft_steps, finetune_lr=2e-4, finetune_min_lr=0.0,
                         finetune_drop_path=0.0)
  if a.cpu:
    given = common.given(arg)
    size = 64
    c.model.img_size, c.data.scene_size = size, size
    c.model.depth, c.model.embed_dim, c.model.d_state = 6, 64, 8
    c.model.out_indices, c.model.channels, c.model.aux_channels = (1, 2, 4, 5), 64, 32
    c.model.scan_implementation = "reference"   # the sequential scan: faster on a CPU
    c.model.dtype, c.model.drop_path_rate = "float32", 0.0
    c.seg.scale, c.seg.crop_size, c.seg.eval_canvas = (size, size), (size, size), (size, size)
    # Short from-scratch runs at 64 px learn far less under mmseg's 0.5-2x rescale (on the
    # digit scenes: 43% against 82% mIoU in 500 steps); the scenes already vary object size.
    c.seg.ratio_range = (1.0, 1.0)
    c.pruning.layers = (2, 4)
    c.batch_size = c.lr_base_batch = 16
    c.data.workers = 2
    c.total_steps = a.steps if "steps" in given else 1500
    c.warmup_steps = 100
    c.study.finetune_steps = a.ft_steps if "ft_steps" in given else 200
  if a.runlocal:
    c.data.source, c.data.scene_size = "seg_digits", 64
    c.data.train_examples, c.data.eval_examples = 64, 16
    c.model.img_size, c.model.depth, c.model.embed_dim = 64, 4, 32
    c.model.out_indices, c.model.channels, c.model.aux_channels = (0, 1, 2, 3), 16, 8
    c.model.dtype = "float32"
    c.seg.scale, c.seg.crop_size, c.seg.eval_canvas = (256, 64), (64, 64), (64, 64)
    c.pruning.layers = (2,)
    c.batch_size = c.lr_base_batch = c.eval_batch_size = 8
    c.total_steps, c.warmup_steps = 4, 1
    c.log_every, c.checkpoint_every = 2, 100
    c.data.workers = 0
    c.study.finetune_steps, c.study.keep_ratios, c.study.seeds = 2, (0.5,), (0,)
    c.study.ablation_ratio = 0.5
  return c
