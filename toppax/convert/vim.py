"""hustvl/Vim state dicts -> toppax ViM (see ``from_torch``)."""
from __future__ import annotations

import math

import numpy as np

from toppax.convert.common import KeyTable, torch_bicubic_resize

_T = lambda x: np.swapaxes(x, -1, -2)  # torch Linear (out, in) -> flax kernel (in, out)


def resample_pos_embed(pos_embed: np.ndarray, new_grid: tuple[int, int]) -> np.ndarray:
  """Resamples a ViM position embedding (1, M + 1, dim) with the cls row at M // 2.

  The cls row is taken out from the middle (not from index 0 as Vim's fine-tuning script
  assumes), the M patch rows are resized as a square grid with torch-compatible bicubic
  interpolation (align_corners=False), and the cls row is put back at the new M' // 2.
  """
  _, n, dim = pos_embed.shape
  m = n - 1
  g = math.isqrt(m)
  if g * g != m:
    raise ValueError(f"pos_embed has {m} patch rows, not a square grid: cannot resample")
  cls_old = m // 2
  cls_row = pos_embed[:, cls_old:cls_old + 1]
  patches = np.concatenate([pos_embed[:, :cls_old], pos_embed[:, cls_old + 1:]], 1)
  grid = torch_bicubic_resize(patches[0].reshape(g, g, dim), *new_grid).reshape(1, -1, dim)
  m_new = grid.shape[1]
  out = np.concatenate([grid[:, :m_new // 2], cls_row, grid[:, m_new // 2:]], 1)
  return out.astype(pos_embed.dtype)


def resample_grid_pos_embed(pos_embed: np.ndarray, new_grid: tuple[int, int]) -> np.ndarray:
  """Resamples a position embedding without cls row, (1, g * g, dim), to ``new_grid`` with
  torch-compatible bicubic interpolation (align_corners=False)."""
  _, m, dim = pos_embed.shape
  g = math.isqrt(m)
  if g * g != m:
    raise ValueError(f"pos_embed has {m} rows, not a square grid: cannot resample")
  grid = torch_bicubic_resize(pos_embed[0].reshape(g, g, dim), *new_grid)
  return grid.reshape(1, -1, dim).astype(pos_embed.dtype)


def convert_into(model, table: KeyTable, *, prefix: str = ""):
  """Fills ``model`` from ``table``; official keys are looked up under ``prefix`` ("backbone."
  in mmseg segmentation checkpoints). A model without cls token (``cfg.cls_token`` False) or
  without classifier (``cfg.num_classes`` 0) takes neither key."""
  cfg = model.cfg
  with_cls = getattr(cfg, "cls_token", True)
  k_ = lambda key: prefix + key
  table.assign(model, "patch_embed.proj.kernel", k_("patch_embed.proj.weight"),
               lambda w: np.transpose(w, (2, 3, 1, 0)))
  table.assign(model, "patch_embed.proj.bias", k_("patch_embed.proj.bias"))
  if with_cls:
    table.assign(model, "cls_token", k_("cls_token"))
  pe = table.get(k_("pos_embed"))
  if pe is not None:
    want = tuple(model.pos_embed[...].shape)
    extra = 1 if with_cls else 0
    if pe.ndim == 3 and pe.shape[0] == 1 and pe.shape[2] == cfg.embed_dim \
        and pe.shape != want and math.isqrt(pe.shape[1] - extra) ** 2 == pe.shape[1] - extra:
      pe = resample_pos_embed(pe, cfg.grid) if with_cls else resample_grid_pos_embed(pe, cfg.grid)
    if pe.shape != want:
      table.mark_misshaped(k_("pos_embed"), f"checkpoint {pe.shape}, model expects {want}")
    else:
      model.pos_embed[...] = pe
  for i in range(cfg.depth):
    p, k = f"layers.{i}.mixer", k_(f"layers.{i}.mixer")
    table.assign(model, f"{p}.in_proj.kernel", f"{k}.in_proj.weight", _T)
    table.assign(model, f"{p}.out_proj.kernel", f"{k}.out_proj.weight", _T)
    for sfx in ("", "_b"):
      table.assign(model, f"{p}.conv1d{sfx}.kernel", f"{k}.conv1d{sfx}.weight",
                   lambda w: np.transpose(w[:, 0, :]) if w.ndim == 3 else w)
      table.assign(model, f"{p}.conv1d{sfx}.bias", f"{k}.conv1d{sfx}.bias")
      table.assign(model, f"{p}.x_proj{sfx}.kernel", f"{k}.x_proj{sfx}.weight", _T)
      table.assign(model, f"{p}.dt_proj{sfx}.kernel", f"{k}.dt_proj{sfx}.weight", _T)
      table.assign(model, f"{p}.dt_proj{sfx}.bias", f"{k}.dt_proj{sfx}.bias")
      table.assign(model, f"{p}.D{sfx}", f"{k}.D{sfx}")
    table.assign(model, f"{p}.A_log", f"{k}.A_log")
    table.assign(model, f"{p}.A_b_log", f"{k}.A_b_log")
    table.assign(model, f"layers.{i}.norm.weight", k_(f"layers.{i}.norm.weight"))
  table.assign(model, "norm_f.weight", k_("norm_f.weight"))
  if cfg.num_classes > 0:
    table.assign(model, "head.kernel", k_("head.weight"), _T)
    table.assign(model, "head.bias", k_("head.bias"))
