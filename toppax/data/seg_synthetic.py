"""Generated segmentation scenes with exact per-pixel labels, deterministic from a seed.

``SegDigitsSource``: scikit-learn's bundled digits (the same 80/20 split as DigitsSource) placed
at random positions and scales on a ``size`` x ``size`` canvas. Scene i draws, from
``np.random.default_rng([seed, split, i])``: a dark background colour with mild noise, then 1 to
``max_digits`` digits, each upscaled (bilinear) from 8x8 to a side in ``digit_size`` (fractions
of the canvas, default [1/4, 1/2]), placed
fully inside the canvas and tinted with a bright random colour. A pixel is labelled with the
digit's class (0..9) where that digit's ink is at least 1/4 of full scale, else it keeps what
was under it (``label_mode="box"``: every pixel of the digit's square); background is class 10.
Later digits cover earlier ones in image and label alike.

``CifarScenesSource``: a real-image proxy built from the CIFAR-10 class-folder zips
(../shared/data/cifar10/). Every fourth image of the zip (index % 4 == 0, all classes) is a
background photo, the rest are objects. Scene i draws a background photo, upscales it to the
scene size (bilinear), blurs it (Gaussian, radius size/32) and scales each channel by a factor in
[0.6, 1.4] plus an offset in [-30, 30] (a texture with no object of its own: label 10, background),
then pastes 2 to ``max_objects`` object photos as opaque squares, each upscaled (bilinear) to a
side in [size/5, size/2] at a random position fully inside the scene. The label of every pixel of
a pasted square is that photo's class (0..9); later pastes cover earlier ones. Train scenes come
from cifar10-train20k.zip, validation scenes from cifar10-test.zip.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from toppax.data.sources import DigitsSource, FolderSource

BACKGROUND = 10
DIGIT_CLASSES = tuple(str(d) for d in range(10)) + ("background",)


def _split_id(split: str) -> int:
  if split in ("train", "training"):
    return 0
  if split in ("validation", "val", "test", "eval"):
    return 1
  raise ValueError(f"splits are 'train' and 'validation', got {split!r}")


class _Scenes:
  """``num`` square scenes of ``side`` pixels, each made from its index (``load``)."""
  num: int
  side: int

  def __len__(self):
    return self.num

  def size(self, index):
    return self.side, self.side


class SegDigitsSource(_Scenes):
  """Digits on a canvas (see the module docstring); ``num`` scenes, labels 0..9 + 10."""
  classes = DIGIT_CLASSES
  num_classes = len(DIGIT_CLASSES)

  def __init__(self, split: str, size: int = 64, num: int | None = None, max_digits: int = 3,
               seed: int = 0, digit_size: tuple[float, float] = (0.25, 0.5),
               label_mode: str = "ink"):
    if label_mode not in ("ink", "box"):
      raise ValueError(f"label_mode must be 'ink' (the digit's strokes) or 'box' (its whole "
                       f"square), got {label_mode!r}")
    self.label_mode = label_mode
    self.split_id = _split_id(split)
    self.digits = DigitsSource("train" if self.split_id == 0 else "test")
    self.side, self.max_digits, self.seed = size, max_digits, seed
    lo, hi = (int(round(f * size)) for f in digit_size)
    if not 4 <= lo <= hi <= size:
      raise ValueError(f"digit_size {digit_size} gives digit sides {lo}..{hi} px on a {size} px "
                       "canvas: give fractions with 4 px <= min <= max <= the canvas")
    self.digit_sides = (lo, hi)
    self.num = num or (4096 if self.split_id == 0 else 512)

  def load(self, index):
    n = self.side
    rng = np.random.default_rng([self.seed, self.split_id, int(index)])
    bg = rng.integers(0, 60, 3)
    image = np.clip(bg + rng.normal(0, 8, (n, n, 3)), 0, 255)
    label = np.full((n, n), BACKGROUND, np.uint8)
    for _ in range(int(rng.integers(1, self.max_digits + 1))):
      k = int(rng.integers(len(self.digits)))
      side = int(rng.integers(self.digit_sides[0], self.digit_sides[1] + 1))
      top, left = int(rng.integers(0, n - side + 1)), int(rng.integers(0, n - side + 1))
      ink = Image.fromarray(self.digits.images[k][..., 0]).resize((side, side), Image.BILINEAR)
      ink = np.asarray(ink, np.float32) / 255.0
      colour = rng.integers(150, 256, 3)
      region = image[top:top + side, left:left + side]
      np.maximum(region, ink[..., None] * colour, out=region)
      box = label[top:top + side, left:left + side]
      if self.label_mode == "box":
        box[...] = self.digits.labels[k]
      else:
        box[ink >= 0.25] = self.digits.labels[k]
    return image.astype(np.uint8), label


class CifarScenesSource(_Scenes):
  """CIFAR photos pasted onto textured backgrounds (see the module docstring)."""
  classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck", "background")
  num_classes = len(classes)

  def __init__(self, zip_path: str, split: str, size: int = 128, num: int | None = None,
               max_objects: int = 5, seed: int = 0):
    self.split_id = _split_id(split)
    self.photos = FolderSource(zip_path)
    if self.photos.num_classes != 10:
      raise ValueError(f"{zip_path} has {self.photos.num_classes} class folders; CIFAR scenes "
                       "need the 10 CIFAR-10 classes")
    idx = np.arange(len(self.photos))
    self.backgrounds, self.objects = idx[idx % 4 == 0], idx[idx % 4 != 0]
    self.side, self.max_objects, self.seed = size, max_objects, seed
    self.num = num or (len(self.objects) if self.split_id == 0 else len(self.objects) // 4)

  def load(self, index):
    n = self.side
    rng = np.random.default_rng([self.seed, self.split_id, int(index)])
    bg, _ = self.photos.read(int(rng.choice(self.backgrounds)))
    bg = Image.fromarray(bg).resize((n, n), Image.BILINEAR)
    bg = bg.filter(ImageFilter.GaussianBlur(radius=n / 32))
    gain, offset = rng.uniform(0.6, 1.4, 3), rng.uniform(-30, 30, 3)
    image = np.clip(np.asarray(bg, np.float32) * gain + offset, 0, 255).astype(np.uint8)
    label = np.full((n, n), BACKGROUND, np.uint8)
    for _ in range(int(rng.integers(2, self.max_objects + 1))):
      photo, cls = self.photos.read(int(rng.choice(self.objects)))
      side = int(rng.integers(n // 5, n // 2 + 1))
      top, left = int(rng.integers(0, n - side + 1)), int(rng.integers(0, n - side + 1))
      patch = Image.fromarray(photo).resize((side, side), Image.BILINEAR)
      image[top:top + side, left:left + side] = np.asarray(patch)
      label[top:top + side, left:left + side] = cls
    return image, label
