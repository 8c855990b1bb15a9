"""Official mmsegmentation checkpoints -> toppax UperNet models (``toppax.segmentation``).

mmseg state dicts hold ``backbone.*`` (VisionMambaSeg / PlainMambaSeg, with ViM's fpn1..fpn4 neck
and PlainMamba's ``norm_layer{i}``), ``decode_head.*`` (UPerHead) and ``auxiliary_head.*``
(FCNHead). ``num_batches_tracked`` counters are ignored. ``from_classification`` starts a
segmentation model from an official *classification* checkpoint, as the official training does.
"""
from __future__ import annotations

import math

import numpy as np

from toppax.convert.common import ConversionError, KeyTable, load_state_dict, torch_bicubic_resize

_CONV = lambda w: np.transpose(w, (2, 3, 1, 0))  # torch Conv2d (O, I, kh, kw) -> (kh, kw, I, O)
# torch ConvTranspose2d (I, O, kh, kw) -> nnx.ConvTranspose (kh, kw, I, O), spatially flipped:
# flax's transposed conv does not flip the kernel, torch's (a conv gradient) does.
_DECONV = lambda w: np.ascontiguousarray(np.transpose(w[:, :, ::-1, ::-1], (2, 3, 0, 1)))


def _ignore(key: str) -> bool:
  return key.endswith(".num_batches_tracked")


def _bn(table, module, path, key):
  table.assign(module, f"{path}.scale", f"{key}.weight")
  table.assign(module, f"{path}.bias", f"{key}.bias")
  table.assign(module, f"{path}.mean", f"{key}.running_mean")
  table.assign(module, f"{path}.var", f"{key}.running_var")


def _conv_module(table, module, path, key):
  table.assign(module, f"{path}.conv.kernel", f"{key}.conv.weight", _CONV)
  _bn(table, module, f"{path}.bn", f"{key}.bn")


def _cls_seg(table, head, key):
  table.assign(head, "cls_seg.conv_seg.kernel", f"{key}.conv_seg.weight", _CONV)
  table.assign(head, "cls_seg.conv_seg.bias", f"{key}.conv_seg.bias")


def convert_heads(model, table: KeyTable):
  """decode_head.* (UPerHead) and auxiliary_head.* (FCNHead)."""
  head, k = model.decode_head, "decode_head"
  for i in range(len(head.psp_modules)):
    # psp_modules.i is Sequential(AdaptiveAvgPool2d, ConvModule): the conv is entry 1.
    _conv_module(table, head, f"psp_modules.{i}.conv", f"{k}.psp_modules.{i}.1")
  _conv_module(table, head, "bottleneck", f"{k}.bottleneck")
  for i in range(len(head.lateral_convs)):
    _conv_module(table, head, f"lateral_convs.{i}", f"{k}.lateral_convs.{i}")
    _conv_module(table, head, f"fpn_convs.{i}", f"{k}.fpn_convs.{i}")
  _conv_module(table, head, "fpn_bottleneck", f"{k}.fpn_bottleneck")
  _cls_seg(table, head, k)
  aux, k = model.auxiliary_head, "auxiliary_head"
  for i in range(len(aux.convs)):
    _conv_module(table, aux, f"convs.{i}", f"{k}.convs.{i}")
  _cls_seg(table, aux, k)


def convert_neck(neck, table: KeyTable, prefix: str = "backbone."):
  """VisionMambaSeg's fpn1 = Sequential(deconv, BN, GELU, deconv), fpn2 = Sequential(deconv)."""
  def deconv(path, key):
    table.assign(neck, f"{path}.kernel", f"{prefix}{key}.weight", _DECONV)
    table.assign(neck, f"{path}.bias", f"{prefix}{key}.bias")
  if neck.patch_size == 16:
    deconv("fpn1_deconv1", "fpn1.0")
    _bn(table, neck, "fpn1_bn", f"{prefix}fpn1.1")
    deconv("fpn1_deconv2", "fpn1.3")
    deconv("fpn2_deconv", "fpn2.0")
  else:
    deconv("fpn1_deconv", "fpn1.0")


def official_rope_tables(embed_dim: int, grid: int, pt_seq_len: int = 14):
  """The buffers of Vim's RoPE (``toppax.models.vim.rope_tables``)."""
  from toppax.models.vim import rope_tables
  return rope_tables(embed_dim, grid, pt_seq_len)


def _check_rope(model, table: KeyTable, prefix: str):
  """ViM-S's RoPE tables are buffers of the official state dict, fixed by the architecture:
  consumed and checked against the official formula for the model's grid."""
  keys = [f"{prefix}rope.freqs_cos", f"{prefix}rope.freqs_sin"]
  present = [k for k in keys if k in table.sd]
  if not present:
    return
  cfg = model.backbone.cfg
  if not getattr(cfg, "rope", False):
    for k in present:
      table.mark_misshaped(k, "the model has no RoPE (create it with rope=True, as the official "
                              "upernet_vim_s config)")
    return
  g = cfg.img_size // cfg.patch_size
  want = dict(zip(keys, official_rope_tables(cfg.embed_dim, g)))
  for k in present:
    value = table.get(k)
    if value.shape != want[k].shape or not np.allclose(value, want[k], atol=1e-5):
      table.mark_misshaped(k, f"checkpoint {value.shape} is not the RoPE table of the model's "
                              f"{g}x{g} token grid (check img_size / patch_size / embed_dim)")


def convert_into(model, table: KeyTable):
  """Fills a ``toppax.segmentation`` UperNet from an mmseg state dict in ``table``."""
  cfg = model.cfg
  if cfg.family == "vim":
    from toppax.convert import vim
    vim.convert_into(model.backbone, table, prefix="backbone.")
    _check_rope(model, table, "backbone.")
    convert_neck(model.neck, table)
  else:
    from toppax.convert import plainmamba
    plainmamba.convert_into(model.backbone, table, prefix="backbone.")
    for name in model.tap_norms:  # norm_layer{i}
      table.assign(model.tap_norms, f"{name}.scale", f"backbone.{name}.weight")
      table.assign(model.tap_norms, f"{name}.bias", f"backbone.{name}.bias")
  convert_heads(model, table)


def _describe(name, overrides):
  return f"{name} with {overrides or 'default settings'}"


def from_torch(name: str, state_dict_or_path, *, num_classes: int = 150, pruning=None,
               **overrides):
  """Builds segmentation model ``name`` and fills it from an official mmseg checkpoint.

  Args:
    name: one of ``toppax.segmentation.names()``.
    state_dict_or_path: an mmseg state dict (``backbone.*``, ``decode_head.*``,
      ``auxiliary_head.*``), a checkpoint dict wrapping it (``{"state_dict": ..., "meta": ...}``)
      or a path to a .pth / .npz file.
    num_classes: classes of the heads (150 for ADE20K).
    pruning: optional ``toppax.pruning.PruneConfig`` applied inside the backbone.
    **overrides: ``toppax.segmentation.create`` keyword arguments (img_size, channels, ...).
  Every key must be used once with a matching shape (``num_batches_tracked`` aside); otherwise
  one ConversionError lists every missing, unused and mis-shaped key. Returns the model in eval
  mode.
  """
  from toppax import segmentation
  sd = load_state_dict(state_dict_or_path)
  if not any(k.startswith("decode_head.") for k in sd) and (
      "head.weight" in sd or "head.fc.weight" in sd):
    raise ConversionError(
        "this is a classification checkpoint (it has a classifier head and no decode_head.*): "
        "start a segmentation model from it with "
        f"toppax.convert.segmentation.from_classification({name!r}, ...)")
  model = segmentation.create(name, num_classes=num_classes, pruning=pruning, **overrides)
  table = KeyTable(sd, ignore=_ignore)
  convert_into(model, table)
  table.finish(_describe(name, dict(overrides, num_classes=num_classes)))
  model.eval()
  return model


def classification_to_segmentation(name: str, sd: dict, grid: tuple[int, int]) -> dict:
  """The backbone part of an official classification state dict, keyed as the segmentation
  backbone (``backbone.*``): the classifier is dropped; for ViM the cls token and its
  position-embedding row (at M // 2, where the released models insert it) are dropped and the
  patch rows resampled to ``grid`` (torch bicubic)."""
  if name.startswith("upernet_vim"):
    out = {}
    for k, v in sd.items():
      if k.startswith("head.") or k in ("cls_token", "rope.freqs_cos", "rope.freqs_sin"):
        continue
      if k == "pos_embed":
        v = np.asarray(v)
        m = v.shape[1] - 1
        g = math.isqrt(m)
        if g * g != m or "cls_token" not in sd:
          raise ConversionError(f"expected a classification pos_embed with a cls row and a "
                                f"square grid, got {v.shape} (cls_token present: "
                                f"{'cls_token' in sd})")
        c = m // 2
        patches = np.concatenate([v[:, :c], v[:, c + 1:]], axis=1)[0].reshape(g, g, -1)
        if (g, g) != tuple(grid):
          patches = torch_bicubic_resize(patches, *grid)
        v = patches.reshape(1, -1, v.shape[-1]).astype(np.float32)
      out["backbone." + k] = v
    return out
  return {k: v for k, v in sd.items() if k.startswith("backbone.")}


def from_classification(name: str, state_dict_or_path, *, num_classes: int = 150, pruning=None,
                        seed: int = 0, **overrides):
  """A segmentation model whose backbone starts from an official classification checkpoint (the
  released ViM / PlainMamba ImageNet weights), as the official segmentation training does: the
  classifier is dropped, ViM's cls token and its position-embedding row are dropped and the
  position embedding is resampled to the segmentation grid (PlainMamba's stays at its 14x14
  grid and is resized on the fly). The neck, PlainMamba's tap norms and the heads keep their
  fresh initialisation (``seed``). Every backbone parameter must come from the checkpoint.
  """
  from toppax import segmentation
  sd = load_state_dict(state_dict_or_path)
  model = segmentation.create(name, num_classes=num_classes, pruning=pruning, seed=seed,
                              **overrides)
  grid = model.backbone.cfg.grid
  table = KeyTable(classification_to_segmentation(name, sd, grid), ignore=_ignore)
  if model.cfg.family == "vim":
    from toppax.convert import vim
    vim.convert_into(model.backbone, table, prefix="backbone.")
  else:
    from toppax.convert import plainmamba
    plainmamba.convert_into(model.backbone, table, prefix="backbone.")
  table.finish(f"the backbone of {_describe(name, overrides)}")
  return model
