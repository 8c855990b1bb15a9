"""mmsegmentation 0.29.1 decode heads in NHWC: UPerHead (pyramid pooling on the last map, FPN
top-down path, fused 3x3 bottleneck) and the auxiliary FCNHead, both ending in BaseDecodeHead's
``cls_seg`` (Dropout2d, then a 1x1 conv with bias). Parameter names follow the official modules
(``psp_modules``, ``bottleneck``, ``lateral_convs``, ``fpn_convs``, ``fpn_bottleneck``,
``convs``, ``conv_seg``) so the checkpoint mapping reads one to one."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from toppax.segmentation.layers import ConvModule, adaptive_avg_pool, resize


class ClsSeg(nnx.Module):
  """BaseDecodeHead.cls_seg: Dropout2d (whole channels per sample) then ``conv_seg``."""

  def __init__(self, channels: int, num_classes: int, dropout_ratio: float, *, dtype,
               rngs: nnx.Rngs):
    # Channel dropout: one keep decision per (sample, channel), broadcast over H and W.
    self.dropout = nnx.Dropout(dropout_ratio, broadcast_dims=(1, 2), deterministic=True,
                               rngs=rngs)
    # init_cfg Normal(std=0.01, override conv_seg), bias 0.
    self.conv_seg = nnx.Conv(channels, num_classes, kernel_size=(1, 1), dtype=dtype,
                             param_dtype=jnp.float32,
                             kernel_init=nnx.initializers.normal(0.01),
                             bias_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, x):
    return self.conv_seg(self.dropout(x))


class PPMBranch(nnx.Module):
  """One PPM branch: AdaptiveAvgPool2d(scale) then a 1x1 ConvModule (official ``psp_modules.i.1``)."""

  def __init__(self, scale: int, cin: int, channels: int, **kw):
    self.scale = scale
    self.conv = ConvModule(cin, channels, 1, **kw)

  def __call__(self, x):
    return self.conv(adaptive_avg_pool(x, self.scale))


class UPerHead(nnx.Module):
  """UPerNet decode head over four maps (largest first); returns logits at the first map's size."""

  def __init__(self, in_channels: tuple[int, ...], channels: int, num_classes: int, *,
               pool_scales=(1, 2, 3, 6), dropout_ratio: float = 0.1,
               bn_axis_name: str | None = None, dtype=None, rngs: nnx.Rngs):
    kw = dict(bn_axis_name=bn_axis_name, dtype=dtype, rngs=rngs)
    top = in_channels[-1]
    self.psp_modules = nnx.List([PPMBranch(int(s), top, channels, **kw) for s in pool_scales])
    self.bottleneck = ConvModule(top + len(pool_scales) * channels, channels, 3, padding=1, **kw)
    self.lateral_convs = nnx.List([ConvModule(c, channels, 1, **kw) for c in in_channels[:-1]])
    self.fpn_convs = nnx.List([ConvModule(channels, channels, 3, padding=1, **kw)
                               for _ in in_channels[:-1]])
    self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1, **kw)
    self.cls_seg = ClsSeg(channels, num_classes, dropout_ratio, dtype=dtype, rngs=rngs)

  def psp_forward(self, x):
    size = x.shape[1:3]
    outs = [x] + [resize(branch(x), size) for branch in self.psp_modules]
    return self.bottleneck(jnp.concatenate(outs, axis=-1))

  def __call__(self, inputs):
    laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
    laterals.append(self.psp_forward(inputs[-1]))
    for i in range(len(laterals) - 1, 0, -1):  # top-down: coarser map resized and added
      laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[1:3])
    outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
    size = outs[0].shape[1:3]
    outs = [outs[0]] + [resize(x, size) for x in outs[1:]]
    return self.cls_seg(self.fpn_bottleneck(jnp.concatenate(outs, axis=-1)))


class FCNHead(nnx.Module):
  """FCNHead(num_convs=1, kernel_size=3, concat_input=False): the auxiliary head of both models."""

  def __init__(self, in_channels: int, channels: int, num_classes: int, *, num_convs: int = 1,
               dropout_ratio: float = 0.1, bn_axis_name: str | None = None, dtype=None,
               rngs: nnx.Rngs):
    kw = dict(bn_axis_name=bn_axis_name, dtype=dtype, rngs=rngs)
    self.convs = nnx.List([ConvModule(in_channels if i == 0 else channels, channels, 3,
                                      padding=1, **kw) for i in range(num_convs)])
    self.cls_seg = ClsSeg(channels, num_classes, dropout_ratio, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    for conv in self.convs:
      x = conv(x)
    return self.cls_seg(x)
