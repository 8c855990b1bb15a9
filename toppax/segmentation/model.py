"""UperNet semantic segmentation on ViM and PlainMamba backbones (mmseg ``EncoderDecoder``).

The backbone is the toppax classification model built without a classifier (ViM also without a
cls token) and read at four blocks through ``forward_features(images, taps=...)``. ViM's maps go
through the fpn1..fpn4 neck (strides 4/8/16/32); PlainMamba's are normalised (``norm_layer{i}``,
the last tap by the backbone's final ``ln1``) and stay at stride 16. UPerHead decodes them, an
FCNHead reads one map (auxiliary loss), and the decode logits are resized bilinearly to the
input (``align_corners=False``).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from toppax.segmentation.heads import FCNHead, UPerHead
from toppax.segmentation.layers import resize
from toppax.segmentation.neck import ViMNeck


@dataclasses.dataclass(frozen=True)
class SegConfig:
  """Head settings under the official config names (decode_head / auxiliary_head / out_indices).

  ``backbone`` holds the keyword arguments the backbone was built with (official names).
  """
  name: str
  family: str                       # "vim" | "plainmamba"
  variant: str                      # the backbone's toppax model name
  img_size: int | tuple[int, int]
  num_classes: int = 150
  out_indices: tuple[int, ...] = (5, 11, 17, 23)
  channels: int = 512               # decode_head.channels
  aux_channels: int = 256           # auxiliary_head.channels
  aux_in_index: int = 3             # auxiliary_head.in_index (which of the four maps)
  pool_scales: tuple[int, ...] = (1, 2, 3, 6)
  dropout_ratio: float = 0.1
  bn_axis_name: str | None = None   # SyncBN: the data-parallel axis to average statistics over
  dtype: str = "float32"
  backbone: tuple = ()              # ((name, value), ...) passed to the backbone


def _tap_norm(dim: int, *, rngs: nnx.Rngs):
  """``norm_layer{i}`` of PlainMambaSeg: LayerNorm(eps=1e-6), torch's two-pass variance."""
  return nnx.LayerNorm(dim, epsilon=1e-6, use_fast_variance=False, dtype=jnp.float32,
                       param_dtype=jnp.float32, rngs=rngs)


class UperNet(nnx.Module):
  """``model(images)``: NHWC float images -> logits (B, H, W, num_classes) at the input size.

  ``model(images, return_info=True)`` -> ``(logits, info)`` with ``info["features"]`` (the four
  NHWC maps the decode head reads), ``info["decode"]`` (decode-head logits before the resize),
  ``info["aux"]`` (auxiliary-head logits) and, with pruning, the backbone's ``positions``,
  ``scores`` and ``tokens``. ``model.train()`` / ``model.eval()`` switch BatchNorm between batch
  and running statistics and turn dropout / drop-path on and off.
  """

  def __init__(self, cfg: SegConfig, backbone: nnx.Module, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.backbone = backbone
    bcfg = backbone.cfg
    dim = bcfg.embed_dim if cfg.family == "vim" else bcfg.embed_dims
    dtype = jnp.dtype(cfg.dtype)
    kw = dict(bn_axis_name=cfg.bn_axis_name, dtype=dtype, rngs=rngs)
    if cfg.family == "vim":
      self.neck = ViMNeck(dim, bcfg.patch_size, **kw)
    else:
      # One norm per tap except the backbone's last layer, whose final norm (ln1) is used.
      last = bcfg.num_layers - 1
      self.tap_norms = nnx.Dict({f"norm_layer{i}": _tap_norm(dim, rngs=rngs)
                                 for i in cfg.out_indices if i != last})
    self.decode_head = UPerHead((dim,) * 4, cfg.channels, cfg.num_classes,
                                pool_scales=cfg.pool_scales, dropout_ratio=cfg.dropout_ratio, **kw)
    self.auxiliary_head = FCNHead(dim, cfg.aux_channels, cfg.num_classes,
                                  dropout_ratio=cfg.dropout_ratio, **kw)

  def check_images(self, images):
    """ViM takes images of exactly its img_size (larger ones: ``slide_inference``); PlainMamba
    any size its backbone accepts (multiples of the patch size)."""
    cfg = self.cfg
    if images.ndim != 4 or images.shape[-1] != 3:
      nchw = images.ndim == 4 and images.shape[1] == 3
      raise ValueError(f"expected NHWC images (batch, H, W, 3), got {tuple(images.shape)}"
                       + ("; they look channels-first (NCHW): transpose them with "
                          "x.transpose(0, 2, 3, 1)" if nchw else ""))
    if cfg.family == "vim":
      s = cfg.img_size
      if tuple(images.shape[1:3]) != (s, s):
        raise ValueError(
            f"{cfg.name} takes {s}x{s} images (its img_size, as the official model), got "
            f"{images.shape[1]}x{images.shape[2]}: run larger images through "
            f"toppax.segmentation.slide_inference(model, images) (crops of {s}, as the official "
            f"test mode), or create the model with img_size={images.shape[1]} if square")
    else:
      from toppax.models.plainmamba import grid_for
      grid_for(self.backbone.cfg, tuple(images.shape[1:3]))

  def __call__(self, images, *, return_info: bool = False):
    self.check_images(images)
    return self._forward(images, return_info=return_info)

  @nnx.jit(static_argnames=("return_info",))
  def _forward(self, images, *, return_info: bool = False):
    features, binfo = self.extract_features(images)
    decode = self.decode_head(features)
    aux = self.auxiliary_head(features[self.cfg.aux_in_index])
    logits = resize(decode, images.shape[1:3]).astype(jnp.float32)
    if not return_info:
      return logits
    info = {"features": features, "decode": decode.astype(jnp.float32),
            "aux": aux.astype(jnp.float32)}
    if self.backbone.pruning is not None:
      info.update({k: binfo[k] for k in ("positions", "scores", "tokens") if k in binfo})
    return logits, info

  def extract_features(self, images):
    """The four NHWC maps the decode head reads, and the backbone's info."""
    cfg = self.cfg
    maps, binfo = self.backbone.forward_features(images, taps=tuple(cfg.out_indices))
    if cfg.family == "vim":
      return self.neck(list(maps)), binfo
    last = self.backbone.cfg.num_layers - 1
    feats = []
    for i, x in zip(cfg.out_indices, maps):
      norm = self.backbone.ln1 if i == last else self.tap_norms[f"norm_layer{i}"]
      feats.append(norm(x).astype(x.dtype))
    return feats, binfo
