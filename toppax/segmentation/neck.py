"""ViM's multi-scale neck (VisionMambaSeg fpn1..fpn4): four maps at strides 4, 8, 16, 32 made from
four stride-16 token maps, as in BEiT/ViTDet-style plain-backbone segmentation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen, nnx

from toppax.segmentation.layers import BatchNorm


def _deconv(dim: int, *, dtype, rngs: nnx.Rngs):
  # torch ConvTranspose2d(dim, dim, 2, stride=2): non-overlapping 2x2 upsampling. Its (in, out,
  # kh, kw) weight maps to this kernel flipped in kh and kw (see toppax.convert.segmentation).
  return nnx.ConvTranspose(dim, dim, kernel_size=(2, 2), strides=(2, 2), padding="VALID",
                           dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _max_pool(x, k: int):
  return linen.max_pool(x, (k, k), strides=(k, k), padding="VALID")  # floor mode, as torch


class ViMNeck(nnx.Module):
  """``patch_size == 16``: fpn1 = deconv -> BN -> GELU -> deconv (stride 4), fpn2 = deconv
  (stride 8), fpn3 = identity (16), fpn4 = 2x2 max-pool (32). ``patch_size == 8``: fpn1 = deconv,
  fpn2 = identity, fpn3 = 2x2 and fpn4 = 4x4 max-pool. The BN is the official SyncBatchNorm."""

  def __init__(self, dim: int, patch_size: int, *, bn_axis_name: str | None = None, dtype=None,
               rngs: nnx.Rngs):
    if patch_size not in (8, 16):
      raise ValueError(f"ViM's segmentation neck exists for patch_size 16 or 8 (as the official "
                       f"VisionMambaSeg), got {patch_size}")
    self.patch_size = patch_size
    kw = dict(dtype=dtype, rngs=rngs)
    if patch_size == 16:
      self.fpn1_deconv1 = _deconv(dim, **kw)
      self.fpn1_bn = BatchNorm(dim, axis_name=bn_axis_name, dtype=dtype, rngs=rngs)
      self.fpn1_deconv2 = _deconv(dim, **kw)
      self.fpn2_deconv = _deconv(dim, **kw)
    else:
      self.fpn1_deconv = _deconv(dim, **kw)

  def __call__(self, maps):
    if len(maps) != 4:
      raise ValueError(f"the neck takes four maps, got {len(maps)}")
    a, b, c, d = maps
    if self.patch_size == 16:
      a = self.fpn1_deconv2(jax.nn.gelu(self.fpn1_bn(self.fpn1_deconv1(a)), approximate=False))
      return [a, self.fpn2_deconv(b), c, _max_pool(d, 2)]
    return [self.fpn1_deconv(a), b, _max_pool(c, 2), _max_pool(d, 4)]
