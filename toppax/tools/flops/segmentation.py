"""FLOPs of the UperNet segmentation models (``toppax.segmentation``), dense and ToP-pruned.

``toppax.tools.flops`` dispatches ``upernet_*`` names here. The convention is the project's
(docs/flops.md): one FLOP is one multiply-add; convolutions and linear layers count their
multiply-adds, norms one per element, biases, activations, poolings, adds and the bilinear
resizes nothing; the backbone is counted as in classification (ViM: one SSM branch per block,
the ToP paper's convention; PlainMamba: its four scans), without cls token and classifier, up to
the last tapped block. Each row also gives ``mmcv_gflops``: what mmcv's ``get_flops`` (which
mmseg's ``tools/get_flops.py`` calls, on the decode path only) adds for that module: conv
multiply-adds plus one per output element for a bias, two per element for BatchNorm, one per
element for ReLU and poolings, nothing for GELU or functional resizes. It is given for the neck
and heads only: for the backbones it depends on which layers run as modules (Vim's fused path
calls most weights functionally) and it never sees the selective scan.

The auxiliary FCN head runs in training only (mmseg's test path is the decode head); its row is
reported with ``train_only=True`` and left out of ``model_gflops`` unless ``aux=True``.
"""
from __future__ import annotations

from toppax.tools.flops import classification

GIGA = 1e9


def _conv(out_hw: int, cin: int, cout: int, k: int, *, bias: bool, bn: bool, relu: bool):
  """(project FLOPs, mmcv FLOPs) of a k x k conv with ``out_hw`` output positions, optionally
  followed by BatchNorm and ReLU (mmcv's ConvModule: no conv bias when a norm follows)."""
  macs = out_hw * cin * cout * k * k
  ours = macs + (out_hw * cout if bn else 0)
  mmcv = macs + (out_hw * cout if bias else 0) + (2 * out_hw * cout if bn else 0) + (
      out_hw * cout if relu else 0)
  return ours, mmcv


def _row(layer, kind, positions, pair, **extra):
  ours, mmcv = pair
  return dict(layer=layer, kind=kind, tokens=positions, gflops=ours / GIGA,
              mmcv_gflops=mmcv / GIGA, **extra)


def _sum(*pairs):
  return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def _neck_rows(dim: int, grid: tuple[int, int]) -> list[dict]:
  """Vim's fpn1-fpn4 at patch 16: fpn1 two 2x2 stride-2 transposed convs (BN + GELU between),
  fpn2 one, fpn3 identity, fpn4 a 2x2 max-pool."""
  h, w = grid
  # A transposed conv's multiply-adds: every input position times in x out x k x k.
  up = lambda hin, win: (hin * win * dim * dim * 4, hin * win * dim * dim * 4 + 4 * hin * win * dim)
  bn = (4 * h * w * dim, 2 * 4 * h * w * dim)
  fpn1 = _sum(up(h, w), bn, up(2 * h, 2 * w))
  fpn2 = up(h, w)
  fpn4 = (0, h * w * dim)
  return [_row("neck fpn1 (x4)", "neck", 16 * h * w, fpn1),
          _row("neck fpn2 (x2)", "neck", 4 * h * w, fpn2),
          _row("neck fpn4 (/2)", "neck", (h // 2) * (w // 2), fpn4)]


def _uper_rows(cfg, maps: list[tuple[int, int]], dim: int) -> list[dict]:
  """mmseg's UPerHead: PPM on the last map, lateral 1x1 and fpn 3x3 convs on the others, the
  fused 3x3 bottleneck at the first map's size, and the 1x1 classifier."""
  c, k = cfg.channels, cfg.num_classes
  hw = [h * w for h, w in maps]
  ppm = _sum(*[_sum(_conv(s * s, dim, c, 1, bias=False, bn=True, relu=True),
                    (0, hw[-1] * dim)) for s in cfg.pool_scales])       # adaptive pools
  bottleneck = _conv(hw[-1], dim + len(cfg.pool_scales) * c, c, 3, bias=False, bn=True, relu=True)
  lateral = _sum(*[_conv(hw[i], dim, c, 1, bias=False, bn=True, relu=True) for i in range(3)])
  fpn = _sum(*[_conv(hw[i], c, c, 3, bias=False, bn=True, relu=True) for i in range(3)])
  fuse = _conv(hw[0], 4 * c, c, 3, bias=False, bn=True, relu=True)
  cls = _conv(hw[0], c, k, 1, bias=True, bn=False, relu=False)
  return [_row("decode: PPM + bottleneck", "head", hw[-1], _sum(ppm, bottleneck)),
          _row("decode: lateral + fpn convs", "head", sum(hw[:3]), _sum(lateral, fpn)),
          _row("decode: fpn bottleneck + cls", "head", hw[0], _sum(fuse, cls))]


def _aux_row(cfg, maps, dim) -> dict:
  h, w = maps[cfg.aux_in_index]
  pair = _sum(_conv(h * w, dim, cfg.aux_channels, 3, bias=False, bn=True, relu=True),
              _conv(h * w, cfg.aux_channels, cfg.num_classes, 1, bias=True, bn=False, relu=False))
  return _row("auxiliary FCN head (training only)", "aux", h * w, pair, train_only=True)


def block_table(name: str, img_size=512, pruning=None, *, num_classes: int = 150,
                **overrides) -> list[dict]:
  """Rows: the backbone (as ``toppax.tools.flops``, no cls token, no classifier, up to the last
  tap), the neck (ViM), the decode head's parts and the auxiliary head (``train_only``)."""
  from toppax import segmentation
  hw = img_size if isinstance(img_size, (tuple, list)) else (int(img_size), int(img_size))
  cfg = segmentation.config_for(name, num_classes=num_classes, img_size=tuple(hw), **overrides)
  arch = {k: v for k, v in cfg.backbone if k in ("embed_dim", "embed_dims", "d_state",
                                                  "patch_size")}
  if cfg.family == "vim" and hw[0] != hw[1]:
    raise ValueError(f"{name} takes square images (its img_size), got {hw[0]}x{hw[1]}")
  arch = {("embed_dim" if k == "embed_dims" else k): v for k, v in arch.items()}
  # forward_features stops at the last tapped block.
  rows = classification.backbone_rows(cfg.variant, hw, pruning, depth=cfg.out_indices[-1] + 1, **arch)
  dim = classification.arch_of(cfg.variant, **arch)["embed_dim"]
  p = classification.arch_of(cfg.variant, **arch)["patch_size"]
  if cfg.family == "vim":
    g = (hw[0] // p, hw[1] // p)
    maps = [(4 * g[0], 4 * g[1]), (2 * g[0], 2 * g[1]), g, (g[0] // 2, g[1] // 2)]
    rows += _neck_rows(dim, g)
  else:
    from toppax.models.plainmamba import grid_for
    g = grid_for(type("C", (), {"patch_size": p})(), hw)
    maps = [g] * 4
    # PlainMambaSeg's norm_layer{i} on the three earlier taps (the last uses the final norm).
    rows.append(dict(layer="tap norms", kind="neck", tokens=3 * g[0] * g[1],
                     gflops=3 * g[0] * g[1] * dim / GIGA, mmcv_gflops=0.0))
  rows += _uper_rows(cfg, maps, dim)
  rows.append(_aux_row(cfg, maps, dim))
  return rows


def model_gflops(name: str, img_size=512, pruning=None, *, aux: bool = False,
                 **overrides) -> float:
  """Total GFLOPs of one forward on one image (test path: backbone, neck, decode head; with
  ``aux`` also the training-only auxiliary head)."""
  return sum(r["gflops"] for r in block_table(name, img_size, pruning, **overrides)
             if aux or not r.get("train_only"))
