"""mmseg's two test modes (``EncoderDecoder.whole_inference`` / ``slide_inference``) as jittable
functions of a segmentation model and a batch of NHWC images. Both return logits (before the
softmax, whose argmax is the same) at ``out_size`` (the original image size, when the images
were resized for testing) or at the input size."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from toppax.segmentation.layers import resize


def _size(out_size):
  return None if out_size is None else (int(out_size[0]), int(out_size[1]))


@nnx.jit(static_argnames=("out_size",))
def whole_inference(model, images, *, out_size=None):
  """The whole image at once (PlainMamba's test mode), resized to ``out_size`` if given."""
  logits = model(images)
  return logits if out_size is None else resize(logits, _size(out_size))


def slide_windows(h: int, w: int, crop: tuple[int, int], stride: tuple[int, int]):
  """mmseg's crop grid: ``(y1, y2, x1, x2)`` per window, row-major; the last window of a row or
  column is shifted back to end at the border, so windows overlap there."""
  (hc, wc), (hs, ws) = crop, stride
  rows = max(h - hc + hs - 1, 0) // hs + 1
  cols = max(w - wc + ws - 1, 0) // ws + 1
  out = []
  for r in range(rows):
    for c in range(cols):
      y2, x2 = min(r * hs + hc, h), min(c * ws + wc, w)
      out.append((max(y2 - hc, 0), y2, max(x2 - wc, 0), x2))
  return out


def _pair(v, what):
  if isinstance(v, (tuple, list)):
    a, b = v
  else:
    a = b = v
  if int(a) < 1 or int(b) < 1:
    raise ValueError(f"{what} must be positive, got {v}")
  return int(a), int(b)


@nnx.jit(static_argnames=("crop_size", "stride", "out_size", "crop_batch"))
def slide_inference(model, images, *, crop_size=None, stride=None, out_size=None,
                    crop_batch=None):
  """Sliding-window inference (ViM's test mode): windows of ``crop_size`` (default the model's
  img_size) every ``stride`` pixels (default two thirds of the crop, the official 341 at 512),
  each run through ``model``; overlapping logits are averaged, then resized to ``out_size``.

  The windows of all images run through the model as one batch, or ``crop_batch`` windows per
  call when memory is short. Call it on a model in eval mode.
  """
  h, w = int(images.shape[1]), int(images.shape[2])
  if crop_size is None:
    crop_size = model.cfg.img_size
  crop = _pair(crop_size, "crop_size")
  stride = _pair(stride if stride is not None else (crop[0] * 2 // 3, crop[1] * 2 // 3), "stride")
  windows = slide_windows(h, w, crop, stride)
  if (h < crop[0] or w < crop[1]) and model.cfg.family == "vim":
    raise ValueError(f"image {h}x{w} is smaller than the {crop[0]}x{crop[1]} window that ViM "
                     f"takes: resize it so that both sides are at least {crop[0]}x{crop[1]}, "
                     "or pad it")
  b = images.shape[0]
  # Windows stacked along the batch, window-major: (windows * B, hc, wc, 3).
  crops = jnp.concatenate([images[:, y1:y2, x1:x2] for y1, y2, x1, x2 in windows], axis=0)
  step = len(crops) if crop_batch is None else int(crop_batch)
  logits = jnp.concatenate([model(crops[i:i + step]) for i in range(0, len(crops), step)])
  preds = jnp.zeros((b, h, w, logits.shape[-1]), logits.dtype)
  count = np.zeros((1, h, w, 1), np.float32)
  for j, (y1, y2, x1, x2) in enumerate(windows):
    preds = preds.at[:, y1:y2, x1:x2].add(logits[j * b:(j + 1) * b])
    count[:, y1:y2, x1:x2] += 1
  preds = preds / jnp.asarray(count)
  return preds if out_size is None else resize(preds, _size(out_size))
