"""The embedded default: a small ViM on scikit-learn's bundled digits (no download needed).

1,797 real 8x8 grey handwritten digits (UCI optdigits test set, shipped inside the scikit-learn
wheel), split 80/20 with a fixed seed (1,438 train / 359 test), upsampled to 16x16x3. A 6-block
ViM (dim 64, 17 tokens) trains from scratch, then the same weights are evaluated dense, ToP-pruned
(alignment) and plain-removal-pruned, printing accuracy, GFLOPs and img/s side by side.

  python -m toppax.main --config=configs/digits.py

Expected on 2 CPU cores: about 5 minutes in all; test top-1 about 98-99% dense and about 80%
for the pruned models, which get no pruned fine-tuning (docs/training.md has the measured table). Arguments: `runlocal` (a
seconds-long smoke run), `top` (train with pruning on, the ToP recipe applied from scratch).
"""
from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, runlocal=False, top=False, epochs=15)
  c = common.base_config()
  c.model.name = "vim_t"
  c.model.img_size = 16
  c.model.patch_size = 4
  c.model.depth = 6
  c.model.embed_dim = 64
  c.model.d_state = 8
  c.model.drop_path_rate = 0.05
  # Pruned after blocks 2 and 4: 17 -> 13 -> 9 tokens (static counts, PruneConfig.token_counts).
  c.pruning = common.pruning(enabled=a.top, layers=(2, 4), keep_ratio=0.7)

  c.data.source = "digits"
  c.data.num_classes = 10
  c.data.mean = (0.5, 0.5, 0.5)
  c.data.std = (0.5, 0.5, 0.5)
  c.data.workers = 0

  # Digits are not mirror-symmetric and only 8x8: mild crops, one weak RandAugment op, no mixing.
  c.aug.crop_scale = (0.7, 1.0)
  c.aug.flip = False
  c.aug.randaug_layers = 1
  c.aug.randaug_magnitude = 5
  c.aug.mixup = 0.0
  c.aug.cutmix = 0.0
  c.aug.label_smoothing = 0.1
  c.aug.eval_crop = 1.0

  c.batch_size = 64
  c.eval_batch_size = 128
  c.num_epochs = a.epochs
  c.lr = 2e-3
  c.lr_base_batch = 64
  c.min_lr = 1e-5
  c.warmup_epochs = 2
  c.weight_decay = 0.05
  c.grad_clip = 1.0
  c.ema_decay = 0.99
  c.log_every = 50
  c.eval_every_epochs = 10
  c.checkpoint_every = 200
  c.keep_checkpoints = 2
  c.compare = ("dense", "top", "removal")

  c.bench.batch_sizes = (128,)
  c.bench.dtypes = ("float32",)
  c.bench.repeats = 5
  if a.runlocal:
    if "epochs" not in common.given(arg):    # explicit arguments win over runlocal's
      c.num_epochs = 1
      c.total_steps = 6
    c.log_every = 2
    c.checkpoint_every = 3
    c.data.eval_examples = 100
    c.compare = ("dense", "top")
  return c
