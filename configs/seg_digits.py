"""The embedded segmentation default: a small ViM UperNet on scenes of scikit-learn's digits.

No download: each 64x64 scene holds one of the 1,797 bundled 8x8 digits (the same 80/20 split
as configs/digits.py), upscaled to 32-51 px and placed at random on a dark, noisy canvas; the
pixels of the digit's square take its class (0-9), the rest is background, class 10
(toppax.data.seg_synthetic.SegDigitsSource, label_mode "box"). A 4-block ViM (patch 8, dim 64:
64 tokens, no cls token) under mmseg's UperNet (neck fpn1-fpn4, UPerHead, FCN auxiliary head)
trains from scratch, dense; then the same weights are evaluated dense, ToP-pruned (alignment)
and with plain removal (blocks 2 and 3, keep ratio 0.7: 64 -> 45 -> 32 tokens), printing mIoU,
GFLOPs and img/s, and ``segmentation.png`` shows images, ground truth, predictions and the
tokens each stage keeps.

  python -m toppax.main --config=configs/seg_digits.py

Expected on 2 CPU cores: a few minutes in all (docs/segmentation.md has the measured table).
Arguments: `runlocal` (a seconds-long smoke run), `top` (train with ToP pruning on),
`steps=N` (training iterations).
"""
from configs import _seg, common


def get_config(arg=None):
  a = common.parse_arg(arg, runlocal=False, top=False, steps=800)
  c = _seg.base("upernet_vim_t", "top" if a.top else None)
  c.model.img_size, c.model.patch_size = 64, 8
  c.model.depth, c.model.embed_dim, c.model.d_state = 4, 64, 8
  c.model.drop_path_rate = 0.0
  c.model.out_indices = (0, 1, 2, 3)
  # The sequential lax.scan: on a CPU it runs these 64-token scans about twice as fast as the
  # associative scan (the default there). Drop this line on a GPU.
  c.model.scan_implementation = "reference"
  c.model.channels, c.model.aux_channels = 64, 32
  c.pruning.layers, c.pruning.keep_ratio, c.pruning.keep_ratios = (2, 3), 0.7, ()

  c.data.source, c.data.num_classes, c.data.scene_size = "seg_digits", 11, 64
  # One digit of 32-51 px per scene, labelled by its square. With strokes as labels ("ink") or
  # two smaller digits, the background is 85-90% of the pixels and these short from-scratch runs
  # settle on background-plus-blobs (about 8-30% mIoU) instead of reading the digits.
  c.data.digit_size = (0.5, 0.8)
  c.data.max_digits = 1
  c.data.label_mode = "box"
  c.data.train_examples, c.data.eval_examples = 2048, 256
  c.data.workers = 0
  c.data.mean, c.data.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
  # The scenes are 64 px, whole-image evaluation. The generator already draws each digit's
  # position and size, so training takes the scene as it is: no rescale (a 2x rescale crops
  # digits in half) and no flip (a mirrored 2 reads as a 5); mmseg's colour distortion stays.
  c.seg.scale, c.seg.crop_size, c.seg.eval_canvas = (64, 64), (64, 64), (64, 64)
  c.seg.ratio_range, c.seg.flip_prob = (1.0, 1.0), 0.0
  c.seg.test_mode = "whole"
  c.seg.pictures = 4

  # From scratch and small: a higher rate than the ImageNet-initialised recipes, no layer decay.
  c.lr, c.weight_decay, c.layer_decay = 1e-3, 0.05, 0.0
  c.grad_clip = 1.0
  c.batch_size = c.lr_base_batch = 16
  c.total_steps, c.warmup_steps = a.steps, 50
  c.eval_batch_size = 64
  c.log_every, c.checkpoint_every, c.eval_every_steps = 50, 200, 0
  c.eval_every_epochs = 0.0
  c.keep_checkpoints = 2
  c.compare = ("dense", "top", "removal")
  if a.runlocal:
    c.total_steps, c.warmup_steps = 6, 2
    c.batch_size = c.lr_base_batch = 8
    c.data.train_examples, c.data.eval_examples = 64, 16
    c.eval_batch_size = 8
    c.log_every, c.checkpoint_every = 2, 3
    c.seg.pictures = 2
  return c
