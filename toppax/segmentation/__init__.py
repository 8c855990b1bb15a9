"""Semantic segmentation: UperNet on ViM and PlainMamba, as the official mmsegmentation models.

``toppax.segmentation.create(name, num_classes=150, img_size=None, pruning=None, seed=0,
**overrides)`` builds one of ``names()`` with the official config's defaults;
``whole_inference`` and ``slide_inference`` are mmseg's two test modes; checkpoints load with
``toppax.convert.from_torch``. docs/segmentation.md describes the models.
"""
from __future__ import annotations

import dataclasses

from flax import nnx

from toppax.segmentation.inference import slide_inference, whole_inference
from toppax.segmentation.model import SegConfig, UperNet

__all__ = ["create", "names", "config_for", "slide_inference", "whole_inference", "UperNet",
           "SegConfig"]

# Official configs: Vim seg/configs/vim/upernet/upernet_vim_{tiny,small}_24_512_slide_60k.py over
# _base_/models/upernet_vim.py; PlainMamba plain_mamba_seg_configs/l{1,2,3}_upernet.py.
_SPECS = {
    "upernet_vim_t": dict(family="vim", variant="vim_t", img_size=512, channels=192,
                          aux_in_index=2, out_indices=(5, 11, 17, 23), backbone={}),
    # The small config turns on RoPE (hidden states and residual) and leaves if_divide_out off.
    "upernet_vim_s": dict(family="vim", variant="vim_s", img_size=512, channels=384,
                          aux_in_index=2, out_indices=(5, 11, 17, 23),
                          backbone=dict(rope=True, divide_out=False)),
    "upernet_plainmamba_l1": dict(family="plainmamba", variant="plainmamba_l1", img_size=224,
                                  channels=512, aux_in_index=3, out_indices=(5, 11, 17, 23),
                                  backbone=dict(drop_path_rate=0.1)),
    "upernet_plainmamba_l2": dict(family="plainmamba", variant="plainmamba_l2", img_size=224,
                                  channels=512, aux_in_index=3, out_indices=(5, 11, 17, 23),
                                  backbone=dict(drop_path_rate=0.2)),
    "upernet_plainmamba_l3": dict(family="plainmamba", variant="plainmamba_l3", img_size=224,
                                  channels=512, aux_in_index=3, out_indices=(8, 17, 26, 35),
                                  backbone=dict(drop_path_rate=0.3)),
}

# Keyword arguments that configure the heads; every other override goes to the backbone.
HEAD_KEYS = ("out_indices", "channels", "aux_channels", "aux_in_index", "pool_scales",
             "dropout_ratio", "bn_axis_name")


def names() -> list[str]:
  return sorted(_SPECS)


def config_for(name: str, *, num_classes: int = 150, img_size=None, **overrides) -> SegConfig:
  """The SegConfig of ``name`` with overrides (head keys above; the rest go to the backbone)."""
  if name not in _SPECS:
    raise ValueError(f"unknown segmentation model {name!r}; available: {', '.join(names())}")
  spec = dict(_SPECS[name])
  backbone = dict(spec.pop("backbone"))
  head = {k: overrides.pop(k) for k in HEAD_KEYS if k in overrides}
  if "dtype" in overrides:
    head["dtype"] = backbone["dtype"] = overrides.pop("dtype")
  # Lists become tuples: the config is static (hashed) under jit.
  backbone.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
  default_size = spec.pop("img_size")
  cfg = SegConfig(name=name, img_size=default_size if img_size is None else img_size,
                  num_classes=int(num_classes), backbone=tuple(sorted(backbone.items())),
                  **{**spec, **head})
  cfg = dataclasses.replace(cfg, out_indices=tuple(int(i) for i in cfg.out_indices),
                            pool_scales=tuple(int(s) for s in cfg.pool_scales))
  if len(cfg.out_indices) != 4 or list(cfg.out_indices) != sorted(set(cfg.out_indices)) \
      or cfg.out_indices[0] < 0:
    raise ValueError(f"out_indices must be four distinct block indices in increasing order "
                     f"(0-based, as the official configs), got {cfg.out_indices}")
  if not 0 <= cfg.aux_in_index < 4:
    raise ValueError(f"aux_in_index picks one of the four maps (0..3), got {cfg.aux_in_index}")
  if cfg.num_classes < 1:
    raise ValueError(f"num_classes must be positive, got {cfg.num_classes}")
  return cfg


def build_backbone(cfg: SegConfig, *, pruning=None, rngs: nnx.Rngs):
  """The classification backbone without classifier (ViM also without cls token)."""
  kw = dict(cfg.backbone)
  if cfg.family == "vim":
    from toppax.models import vim
    if not isinstance(cfg.img_size, int):
      raise ValueError(f"ViM segmentation takes square images: img_size must be an int, got "
                       f"{cfg.img_size}")
    bcfg = vim.config_for(cfg.variant, img_size=cfg.img_size, cls_token=False, num_classes=0,
                          **kw)
    backbone = vim.VisionMamba(bcfg, pruning=pruning, rngs=rngs)
    depth = bcfg.depth
  else:
    from toppax.models import plainmamba
    backbone = plainmamba.create(cfg.variant, img_size=cfg.img_size, num_classes=0,
                                 pruning=pruning, rngs=rngs, **kw)
    depth = backbone.cfg.num_layers
  if cfg.out_indices[-1] >= depth:
    raise ValueError(f"out_indices {cfg.out_indices} reach past the backbone's {depth} blocks")
  return backbone


def create(name: str, *, num_classes: int = 150, img_size=None, pruning=None, seed: int = 0,
           rngs: nnx.Rngs | None = None, **overrides) -> UperNet:
  """Builds segmentation model ``name`` (see ``names()``) with fresh init, in eval mode.

  Defaults are the official configs: taps (out_indices) (5, 11, 17, 23) ((8, 17, 26, 35) for
  PlainMamba-L3), UPerHead with pool scales (1, 2, 3, 6) and 192 (ViM-T) / 384 (ViM-S) / 512
  (PlainMamba) channels, FCNHead with 256 channels on map 2 (ViM) / 3 (PlainMamba), SyncBN
  (``bn_axis_name``), dropout 0.1. ``img_size=None`` is the official one: 512 for ViM (the input
  size), 224 for PlainMamba (the position-embedding grid; any input size works). Other overrides
  use the official argument names of the heads (``channels``, ``aux_channels``,
  ``aux_in_index``, ``pool_scales``, ``dropout_ratio``, ``out_indices``) or of the backbone
  (``depth``, ``embed_dim``, ``embed_dims``, ``num_layers``, ``drop_path_rate``, ...).
  """
  cfg = config_for(name, num_classes=num_classes, img_size=img_size, **overrides)
  rngs = rngs if rngs is not None else nnx.Rngs(params=seed, dropout=seed + 1)
  backbone = build_backbone(cfg, pruning=pruning, rngs=rngs)
  return UperNet(cfg, backbone, rngs=rngs)
