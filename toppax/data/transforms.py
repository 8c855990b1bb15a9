"""Host-side image transforms: torchvision's RandomResizedCrop and DeiT's eval resize + centre
crop, decoding only the scale that the output needs.

A JPEG is opened lazily (header only); once the crop box is drawn, ``Image.draft`` asks libjpeg
for the largest DCT-domain reduction (1/2, 1/4, 1/8) that still leaves the box at least as
large as the output, so the bicubic resize that follows is still a downscale. A 2000x1500
photo cropped to 224 then decodes at 500x375 or smaller. Other formats and in-memory arrays
decode in full. The crop geometry (and so the distribution of crops) is torchvision's, drawn
from the same generator calls as before, so a seed gives the same boxes with or without
``draft``; only the resampling path of large reductions differs.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image


def as_image(image) -> Image.Image:
  """A PIL image (lazy when it came from a file) for a PIL image or a uint8 HxW(x3) array."""
  if isinstance(image, Image.Image):
    return image
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  return Image.fromarray(image)


def sample_crop(h: int, w: int, rng: np.random.Generator, scale=(0.08, 1.0),
                ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop box ``(top, left, height, width)``: area fraction
  uniform in ``scale``, log-uniform aspect ratio, 10 tries, then the centre crop clamped to
  the allowed ratios."""
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw = int(round(np.sqrt(target * aspect)))
    ch = int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      return top, left, ch, cw
  in_ratio = w / h
  if in_ratio < ratio[0]:
    cw, ch = w, int(round(w / ratio[0]))
  elif in_ratio > ratio[1]:
    ch, cw = h, int(round(h * ratio[1]))
  else:
    cw, ch = w, h
  return (h - ch) // 2, (w - cw) // 2, ch, cw


def _draft(im: Image.Image, need_w: float, need_h: float) -> int:
  """Lets a JPEG decode at 1/s scale while keeping at least ``need_w x need_h`` pixels of the
  full image; returns s (1 when nothing was reduced)."""
  w, h = im.size
  if im.format != "JPEG" or need_w * 2 > w or need_h * 2 > h:
    return 1
  im.draft("RGB", (max(1, math.ceil(need_w)), max(1, math.ceil(need_h))))
  rw, rh = im.size
  return next((s for s in (8, 4, 2) if -(-w // s) == rw and -(-h // s) == rh), 1)


def _rgb(im: Image.Image) -> Image.Image:
  return im if im.mode == "RGB" else im.convert("RGB")


def resized_crop(image, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
  """Crop ``box = (top, left, height, width)`` (full-resolution pixels), then resize to
  ``size = (height, width)`` with PIL's antialiased bicubic, as torchvision's ``resized_crop``
  on PIL images; uint8 (size[0], size[1], 3)."""
  im = as_image(image)
  top, left, ch, cw = box
  out_h, out_w = size
  s = _draft(im, im.size[0] * out_w / cw, im.size[1] * out_h / ch)
  if s == 1 and (ch, cw) == (out_h, out_w):
    return np.asarray(_rgb(im.crop((left, top, left + cw, top + ch))))
  # Integer crop in the (possibly reduced) image, then the exact fractional box within it.
  x0, y0 = left / s, top / s
  x1, y1 = (left + cw) / s, (top + ch) / s
  ix0, iy0 = math.floor(x0), math.floor(y0)
  ix1, iy1 = min(math.ceil(x1), im.size[0]), min(math.ceil(y1), im.size[1])
  crop = _rgb(im.crop((ix0, iy0, ix1, iy1)))
  frac = (x0 - ix0, y0 - iy0, min(x1, ix1) - ix0, min(y1, iy1) - iy0)
  return np.asarray(crop.resize((out_w, out_h), Image.BICUBIC, box=frac))


def random_resized_crop(image, size: int, rng: np.random.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """torchvision's RandomResizedCrop(size, scale, ratio) on a PIL image or an array."""
  im = as_image(image)
  box = sample_crop(im.size[1], im.size[0], rng, scale, ratio)
  return resized_crop(im, box, (size, size))


def preprocess_train(image, size: int, rng: np.random.Generator, scale=(0.08, 1.0),
                     flip: bool = True) -> np.ndarray:
  """RandomResizedCrop then a horizontal flip with probability 1/2 (DeiT's geometric part;
  the rest of the augmentation runs on the accelerator, toppax.augment)."""
  out = random_resized_crop(image, size, rng, scale=tuple(scale))
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return out


def center_crop(image, size: int, crop_fraction: float = 0.875) -> np.ndarray:
  """Resize the shorter side to ``round(size / crop_fraction)`` (bicubic) and take the centre
  ``size`` square (DeiT's eval transform). One resize of the centre box: the same pixels as
  resizing the whole image and cropping it."""
  im = as_image(image)
  w, h = im.size
  short = int(round(size / crop_fraction))
  scale = short / min(h, w)
  rh, rw = max(short, int(round(h * scale))), max(short, int(round(w * scale)))
  top, left = (rh - size) // 2, (rw - size) // 2
  if (rh, rw) == (h, w):
    return np.asarray(_rgb(im.crop((left, top, left + size, top + size))))
  s = _draft(im, rw, rh)
  fx, fy = w / rw / s, h / rh / s
  box = (left * fx, top * fy, (left + size) * fx, (top + size) * fy)
  return np.asarray(_rgb(im).resize((size, size), Image.BICUBIC, box=box))
