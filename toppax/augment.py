"""On-device augmentation inside the jitted train step: RandAugment-style ops, mixup/cutmix,
label smoothing, normalisation.

The photometric and geometric ops are dm-pix's (deepmind/dm_pix, maintained, pure JAX, so they
jit and shard with the step and cost no host CPU). RandAugment follows Cubuk et al. 2020 as
timm's ``rand-m9-mstd0.5-inc1`` does: ``n`` ops per image drawn uniformly, magnitude m/10 with a
random sign; the op list is a cheap subset (no equalize/autocontrast/posterize, which need
histograms). Mixup/cutmix mirror timm's ``Mixup`` in batch mode (one lambda per batch, the
partner is the reversed batch, cutmix lambda corrected to the clipped box). Randomness comes
from a key folded with the step, so a resumed run repeats it exactly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


# The ops (timm's rand_augment_ops names). Ranges at magnitude 10 follow timm (rotate 30 deg,
# shear 0.3, enhance factors 1 +- 0.9, solarize down to 0.5), except translate: 0.3 of the side
# instead of timm's 0.45, which pushes small digits off a 16 px canvas.
OPS = ("Identity", "Brightness", "Contrast", "Color", "Rotate", "TranslateX", "TranslateY",
       "ShearX", "Solarize")


def _one_layer(image, op, m):
  """Applies op ``op`` (an index into OPS) with signed magnitude ``m`` in [-1, 1].

  Branch-free: the geometric ops become one affine resampling whose matrix is the identity
  unless a geometric op was drawn, and the photometric ops get neutral factors unless drawn.
  A ``lax.switch`` over separate dm-pix calls does the same under vmap but evaluates every
  branch and took 2.5x longer to compile on CPU.
  """
  import dm_pix  # only RandAugment needs it: a bare accelerator image can run with 0 layers
  h, w = image.shape[:2]
  is_op = lambda name: op == OPS.index(name)
  angle = jnp.where(is_op("Rotate"), jnp.deg2rad(30.0) * m, 0.0)
  shear = jnp.where(is_op("ShearX"), 0.3 * m, 0.0)
  dx = jnp.where(is_op("TranslateX"), 0.3 * m * w, 0.0)
  dy = jnp.where(is_op("TranslateY"), 0.3 * m * h, 0.0)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  # affine_transform maps output (row, col, channel) to input coordinates: input = M out + off.
  rot = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
  rot = rot.at[0, 0].set(cos).at[0, 1].set(-sin).at[1, 0].set(sin).at[1, 1].set(cos)
  matrix = rot.at[1, 0].add(shear)
  centre = jnp.array([(h - 1) / 2, (w - 1) / 2, 0.0])
  offset = centre - matrix @ centre - jnp.stack([dy, dx, 0.0])
  image = dm_pix.affine_transform(image, matrix, offset=offset, order=1, mode="constant",
                                  cval=0.5)
  image = dm_pix.adjust_brightness(image, jnp.where(is_op("Brightness"), 0.4 * m, 0.0))
  image = dm_pix.adjust_contrast(image, jnp.where(is_op("Contrast"), 1.0 + 0.9 * m, 1.0))
  image = dm_pix.adjust_saturation(image, jnp.where(is_op("Color"), 1.0 + 0.9 * m, 1.0))
  image = dm_pix.solarize(image, jnp.where(is_op("Solarize"), 1.0 - 0.5 * jnp.abs(m), 2.0))
  return jnp.clip(image, 0.0, 1.0)


def rand_augment(key, images, *, num_layers: int, magnitude: float):
  """RandAugment on a float batch in [0, 1] (B, H, W, C): ``num_layers`` ops per image."""
  if num_layers <= 0 or magnitude <= 0:
    return images

  def one(key, image):
    for k in jax.random.split(key, num_layers):
      k_op, k_sign, k_std = jax.random.split(k, 3)
      op = jax.random.randint(k_op, (), 0, len(OPS))
      # timm's mstd0.5: magnitude jittered by N(0, 0.5) levels, clipped to [0, 10].
      level = jnp.clip(magnitude + 0.5 * jax.random.normal(k_std), 0.0, 10.0) / 10.0
      image = _one_layer(image, op, jnp.where(jax.random.bernoulli(k_sign), level, -level))
    return image

  return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


def smooth_one_hot(labels, num_classes: int, smoothing: float):
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def mix(key, images, targets, *, mixup: float, cutmix: float, prob: float, switch_prob: float):
  """timm ``Mixup`` (mode='batch'): returns mixed images and soft targets."""
  if (mixup <= 0 and cutmix <= 0) or prob <= 0:
    return images, targets
  k_apply, k_switch, k_lam, k_box = jax.random.split(key, 4)
  use_cutmix = (jax.random.uniform(k_switch) < switch_prob if mixup > 0 and cutmix > 0
                else jnp.asarray(cutmix > 0))
  alpha = jnp.where(use_cutmix, max(cutmix, 1e-6), max(mixup, 1e-6))
  lam = jax.random.beta(k_lam, alpha, alpha)
  lam = jnp.where(jax.random.uniform(k_apply) < prob, lam, 1.0)
  partner = images[::-1]
  b, h, w = images.shape[:3]
  # Cutmix box of area (1 - lam), clipped to the image; lambda becomes the kept fraction.
  cut = jnp.sqrt(1.0 - lam)
  ch, cw = (h * cut).astype(jnp.int32), (w * cut).astype(jnp.int32)
  ky, kx = jax.random.split(k_box)
  cy = jax.random.randint(ky, (), 0, h)
  cx = jax.random.randint(kx, (), 0, w)
  y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
  x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, :, :, None]
  lam_cut = 1.0 - ((y1 - y0) * (x1 - x0)) / (h * w)
  cut_images = jnp.where(box, partner, images)
  mix_images = lam * images + (1.0 - lam) * partner
  images = jnp.where(use_cutmix, cut_images, mix_images)
  lam = jnp.where(use_cutmix, lam_cut, lam)
  return images, lam * targets + (1.0 - lam) * targets[::-1]


def normalize(images, mean, std):
  """uint8 or [0, 1] float images -> (x - mean) / std in float32."""
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 255.0
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def pad_crop_flip(key, images, *, pad: int, flip: bool):
  """CIFAR-style augmentation on device: reflect-pad by ``pad`` pixels, take a random crop of
  the original size per image, mirror half of the images (when ``flip``)."""
  b, h, w, c = images.shape
  k_y, k_x, k_f = jax.random.split(key, 3)
  if pad > 0:
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    ys = jax.random.randint(k_y, (b,), 0, 2 * pad + 1)
    xs = jax.random.randint(k_x, (b,), 0, 2 * pad + 1)
    images = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (h, w, c)))(
        padded, ys, xs)
  if flip:
    mirror = jax.random.bernoulli(k_f, 0.5, (b,))[:, None, None, None]
    images = jnp.where(mirror, images[:, :, ::-1], images)
  return images


def train_inputs(key, batch, config):
  """(normalised images, soft targets) for one train step, all on device."""
  aug = config.aug
  k_ra, k_mix = jax.random.split(key)
  images = batch["image"].astype(jnp.float32) / 255.0
  if aug.get("on_device", False):
    # The host sent the images as stored (toppax.input_pipeline); crop and flip here. The key
    # is folded, not split, so the RandAugment/mix streams are those of host-side cropping.
    images = pad_crop_flip(jax.random.fold_in(key, 7), images, pad=int(aug.pad_crop),
                           flip=bool(aug.flip))
  images = rand_augment(k_ra, images, num_layers=aug.randaug_layers,
                        magnitude=aug.randaug_magnitude)
  targets = smooth_one_hot(batch["label"], config.data.num_classes, aug.label_smoothing)
  images, targets = mix(k_mix, images, targets, mixup=aug.mixup, cutmix=aug.cutmix,
                        prob=aug.mix_prob, switch_prob=aug.switch_prob)
  return normalize(images, config.data.mean, config.data.std), targets
