"""Segmentation pipelines with mmseg's ADE20K semantics, on grain.

Training (per example, host side): random rescale (a ratio uniform in ``ratio_range`` times
``scale``, then mmcv's keep-ratio rule: the largest size with long side <= scale's long and
short side <= scale's short), random crop to ``crop_size`` redrawn up to 10 times until no class
covers ``cat_max_ratio`` or more of the crop's counted pixels, horizontal flip with
``flip_prob``, photometric distortion, pad to ``crop_size`` (image 0, label 255). Images are
resampled bilinearly (PIL, antialiased when shrinking; mmseg's default cv2 bilinear is not),
labels always with nearest neighbour. Only the crop box is resampled from the decoded image
(the same pixels as rescaling the whole image, then cropping), and a JPEG halved or more by the
rescale decodes at the reduced scale. Normalisation is left to the train step: batches hold
uint8 images (``toppax.augment.normalize`` with mmseg's mean/std, 123.675/255 ...).

Evaluation: each image is rescaled to ``scale`` keeping its aspect ratio (no crop); its label
stays at the original size, on which the metrics count. See ``seg_eval_batches`` for the
batch format.

Every batch is a pure function of ``(seed, step)`` as in toppax.data.loader (same sampler,
TrainPlan and per-process slices).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from toppax.data import loader, transforms
from toppax.data.seg_sources import IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class SegAugment:
  """mmseg's ADE20K pipeline settings (configs/_base_/datasets/ade20k.py)."""
  scale: tuple[int, int] = (2048, 512)          # (long, short) bound of the rescale
  ratio_range: tuple[float, float] = (0.5, 2.0)
  crop_size: tuple[int, int] = (512, 512)       # (h, w)
  cat_max_ratio: float = 0.75
  flip_prob: float = 0.5
  photometric: bool = True
  ignore_index: int = IGNORE_INDEX

  @classmethod
  def from_config(cls, config) -> "SegAugment":
    """From ``config.seg`` (any field left out keeps mmseg's ADE20K value)."""
    seg = config.get("seg", None) or {}
    kw = {f.name: seg.get(f.name) for f in dataclasses.fields(cls) if seg.get(f.name) is not None}
    for k in ("scale", "ratio_range", "crop_size"):
      if k in kw:
        kw[k] = tuple(kw[k])
    return cls(**kw)


def rescale_size(h: int, w: int, scale) -> tuple[int, int]:
  """mmcv's keep-ratio rule: (new_h, new_w) with long side <= max(scale), short <= min(scale),
  as large as possible."""
  f = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(h * f + 0.5), int(w * f + 0.5)


def _resample(image: Image.Image, full: tuple[int, int], box: tuple[int, int, int, int],
              resample) -> Image.Image:
  """The ``box = (top, left, height, width)`` crop of ``image`` resized to ``full = (h, w)``,
  resampling only the box."""
  w0, h0 = image.size
  fy, fx = h0 / full[0], w0 / full[1]
  top, left, ch, cw = box
  s = transforms._draft(image, full[1], full[0]) if resample != Image.NEAREST else 1
  src = (left * fx / s, top * fy / s, (left + cw) * fx / s, (top + ch) * fy / s)
  if s == 1 and (fy, fx) == (1.0, 1.0):
    return image.crop((left, top, left + cw, top + ch))
  return image.resize((cw, ch), resample, box=src)


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """mmseg's PhotoMetricDistortion on uint8 RGB, each step with probability 1/2: brightness
  +-32, contrast x[0.5, 1.5] (first or last, at random), saturation x[0.5, 1.5], hue +-18
  degrees/2 (OpenCV's 0..180 hue, PIL's 0..255 here), every step clipped to uint8."""
  def convert(x, alpha=1.0, beta=0.0):
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)
  if rng.integers(2):
    img = convert(img, beta=rng.uniform(-32, 32))
  mode = rng.integers(2)
  if mode == 1 and rng.integers(2):
    img = convert(img, alpha=rng.uniform(0.5, 1.5))
  sat = rng.uniform(0.5, 1.5) if rng.integers(2) else None
  hue = int(rng.integers(-18, 18)) if rng.integers(2) else None
  if sat is not None or hue is not None:
    hsv = np.array(Image.fromarray(img).convert("HSV"))
    if sat is not None:
      hsv[..., 1] = convert(hsv[..., 1], alpha=sat)
    if hue is not None:
      hsv[..., 0] = (hsv[..., 0].astype(np.int32) + round(hue * 256 / 180)) % 256
    img = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
  if mode == 0 and rng.integers(2):
    img = convert(img, alpha=rng.uniform(0.5, 1.5))
  return img


def train_example(image, label: np.ndarray, rng: np.random.Generator, aug: SegAugment):
  """(uint8 (ch, cw, 3), int32 (ch, cw)) of one training example (mmseg's train pipeline)."""
  im = transforms.as_image(image)
  lab = Image.fromarray(np.asarray(label, np.uint8))
  w, h = im.size
  lo, hi = aug.ratio_range
  ratio = rng.random() * (hi - lo) + lo
  full = rescale_size(h, w, (int(aug.scale[0] * ratio), int(aug.scale[1] * ratio)))
  ch, cw = min(aug.crop_size[0], full[0]), min(aug.crop_size[1], full[1])

  def draw():
    return (int(rng.integers(0, full[0] - ch + 1)), int(rng.integers(0, full[1] - cw + 1)),
            ch, cw)

  box = draw()
  crop = np.asarray(_resample(lab, full, box, Image.NEAREST))
  if aug.cat_max_ratio < 1.0:
    for _ in range(10):
      counts = np.bincount(crop.ravel(), minlength=256)
      counts[aug.ignore_index] = 0
      counts = counts[counts > 0]
      if len(counts) > 1 and counts.max() / counts.sum() < aug.cat_max_ratio:
        break
      box = draw()
      crop = np.asarray(_resample(lab, full, box, Image.NEAREST))
  img = np.asarray(transforms._rgb(_resample(im, full, box, Image.BILINEAR)))
  if rng.random() < aug.flip_prob:
    img, crop = img[:, ::-1], crop[:, ::-1]
  if aug.photometric:
    img = _photometric(img, rng)
  out_img = np.zeros(aug.crop_size + (3,), np.uint8)
  out_lab = np.full(aug.crop_size, aug.ignore_index, np.int32)
  out_img[:ch, :cw] = img
  out_lab[:ch, :cw] = crop
  return out_img, out_lab


class TrainSegExample:
  """Slot ``step * local_batch + j`` -> {"image", "label"} (picklable for grain workers)."""

  def __init__(self, source, plan: loader.TrainPlan, seed: int, aug: SegAugment):
    self.source, self.plan, self.seed, self.aug = source, plan, seed, aug

  def __call__(self, slot) -> dict:
    step, j = divmod(int(slot), self.plan.local_batch)
    epoch, idx = loader.train_indices(self.plan, self.seed, step)
    index = int(idx[j])
    image, label = self.source.load(index)
    rng = np.random.default_rng([self.seed, epoch, index, 2])
    image, label = train_example(image, label, rng, self.aug)
    return {"image": image, "label": label}


def seg_train_batches(source, plan: loader.TrainPlan, config, start_step: int,
                      stop_step: int) -> loader.Batches:
  """Host-local ``{"image": uint8 (b, ch, cw, 3), "label": int32 (b, ch, cw)}`` (255 = ignore)
  for steps ``start_step .. stop_step - 1``, a pure function of ``(config.seed, step)``;
  ``config.data.workers`` processes, ``config.data.prefetch`` batches ahead each."""
  grain = loader.import_grain()
  local = plan.local_batch
  example = TrainSegExample(source, plan, config.seed, SegAugment.from_config(config))
  ds = grain.MapDataset.range(start_step * local, stop_step * local).map(example)
  return loader.run(ds.batch(local, drop_remainder=True), config.data.workers,
                    config.data.prefetch)


# --- evaluation -----------------------------------------------------------------------------------


def _up(n: int, bucket: int) -> int:
  return -(-n // bucket) * bucket


@dataclasses.dataclass(frozen=True)
class SegEvalBatch:
  """One step of the eval plan: this host's example indices (-1: padding) and the two canvases
  every example of the global batch fits."""
  indices: np.ndarray            # (local_batch,)
  canvas: tuple[int, int]        # (H, W) of "image"
  label_canvas: tuple[int, int]  # (H, W) of "label"


def seg_eval_plan(sizes, scale, global_batch: int, process_index: int = 0,
                  process_count: int = 1, bucket: int = 256,
                  canvas: tuple[int, int] | None = None) -> list[SegEvalBatch]:
  """Groups the eval examples (``sizes``: (N, 2) original (h, w)) into global batches of one
  shape each: the image canvas is the rescaled size rounded up to ``bucket`` pixels (or the
  fixed ``canvas``), the label canvas the original size rounded up likewise. Examples are sorted
  by their canvases (the metrics are sums, so order does not matter), each group is cut into
  global batches padded with -1, and every process takes its slice: the same plan on every
  host, few distinct shapes (compilations)."""
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(f"eval_batch_size {global_batch} must be a positive multiple of the "
                     f"{process_count} processes: set config.eval_batch_size")
  sizes = np.asarray(sizes).reshape(-1, 2)
  keys = []
  for h, w in sizes:
    rh, rw = rescale_size(int(h), int(w), scale)
    if canvas is not None and (rh > canvas[0] or rw > canvas[1]):
      raise ValueError(f"an eval image rescales to {rh}x{rw}, larger than the fixed canvas "
                       f"{canvas}: raise config.seg.eval_canvas or leave it unset (buckets)")
    img_canvas = tuple(canvas) if canvas is not None else (_up(rh, bucket), _up(rw, bucket))
    keys.append(img_canvas + (_up(int(h), bucket), _up(int(w), bucket)))
  local = global_batch // process_count
  plan = []
  for key in sorted(set(keys)):
    members = np.array([i for i, k in enumerate(keys) if k == key], np.int64)
    steps = -(-len(members) // global_batch)
    idx = np.full(steps * global_batch, -1, np.int64)
    idx[:len(members)] = members
    for step in idx.reshape(steps, process_count, local)[:, process_index]:
      plan.append(SegEvalBatch(step, key[:2], key[2:]))
  return plan


def eval_example(image, label: np.ndarray, scale, canvas, label_canvas) -> dict:
  """The rescaled image on ``canvas`` (zeros beyond it) and the original label on
  ``label_canvas`` (255 beyond it), with both true sizes."""
  im = transforms.as_image(image)
  w, h = im.size
  rh, rw = rescale_size(h, w, scale)
  img = np.asarray(transforms._rgb(_resample(im, (rh, rw), (0, 0, rh, rw), Image.BILINEAR)))
  out = np.zeros(tuple(canvas) + (3,), np.uint8)
  out[:rh, :rw] = img
  lab = np.full(tuple(label_canvas), IGNORE_INDEX, np.int32)
  lab[:h, :w] = label
  return {"image": out, "image_size": np.array([rh, rw], np.int32), "label": lab,
          "label_size": np.array([h, w], np.int32), "mask": np.float32(1)}


class EvalSegExample:
  def __init__(self, source, plan: list[SegEvalBatch], scale):
    self.source, self.scale = source, tuple(scale)
    self.local = len(plan[0].indices) if plan else 1
    self.plan = plan

  def __call__(self, slot) -> dict:
    step, j = divmod(int(slot), self.local)
    b = self.plan[step]
    index = int(b.indices[j])
    if index < 0:
      return {"image": np.zeros(b.canvas + (3,), np.uint8), "image_size": np.zeros(2, np.int32),
              "label": np.full(b.label_canvas, IGNORE_INDEX, np.int32),
              "label_size": np.zeros(2, np.int32), "mask": np.float32(0)}
    image, label = self.source.load(index)
    return eval_example(image, label, self.scale, b.canvas, b.label_canvas)


def seg_eval_batches(source, config, num_examples: int | None = None,
                     batch_size: int | None = None) -> loader.Batches:
  """Host-local eval batches (shapes fixed within a batch, few distinct ones; see
  ``seg_eval_plan``)::

    image       uint8 (b, H, W, 3)   rescaled image at the top-left, zeros beyond image_size
    image_size  int32 (b, 2)         (h, w) of the rescaled image
    label       int32 (b, Hl, Wl)    original-size label at the top-left, 255 beyond label_size
    label_size  int32 (b, 2)         original (h, w)
    mask        float32 (b,)         0 for padding examples (their labels are all 255)

  The model runs on ``image`` (whole, or slide windows over it); its logits over
  ``[:h, :w]`` of image_size are resized (bilinear) to label_size inside the label canvas
  (e.g. ``jax.image.scale_and_translate`` with a static output shape) before counting; labels
  beyond label_size are 255 and never count. ``config.seg.eval_bucket`` (default: half the
  short side of ``scale``, at least 32; 256 for ADE20K) sets the
  rounding; ``config.seg.eval_canvas = (H, W)`` fixes one image canvas for all.
  """
  import jax
  grain = loader.import_grain()
  aug = SegAugment.from_config(config)
  seg = config.get("seg", None) or {}
  n = len(source) if not num_examples else min(num_examples, len(source))
  sizes = [source.size(i) for i in range(n)]
  plan = seg_eval_plan(sizes, aug.scale, batch_size or config.eval_batch_size,
                       jax.process_index(), jax.process_count(),
                       bucket=seg.get("eval_bucket", None) or max(32, min(aug.scale) // 2),
                       canvas=seg.get("eval_canvas", None))
  local = len(plan[0].indices)
  ds = grain.MapDataset.range(len(plan) * local).map(EvalSegExample(source, plan, aug.scale))
  return loader.run(ds.batch(local, drop_remainder=True), config.data.workers,
                    config.data.prefetch)
