"""ChenhongyiYang/PlainMamba classifier state dicts -> toppax PlainMamba (see ``from_torch``).

Keys are those of mmcls' ImageClassifier: ``backbone.*`` (PlainMamba), ``head.fc.*``
(LinearClsHead). BatchNorm layers keep their running statistics (the model uses them in
inference, so training from a converted checkpoint still works); ``num_batches_tracked`` is
consumed and dropped.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from toppax.convert.common import KeyTable
from toppax.models.plainmamba import resize_pos_embed

log = logging.getLogger(__name__)

_T = lambda x: np.swapaxes(x, -1, -2)            # torch Linear (out, in) -> flax kernel (in, out)
_CONV = lambda w: np.transpose(w, (2, 3, 1, 0))  # torch Conv2d (O, I/g, kh, kw) -> (kh, kw, I/g, O)


def ignore_key(key: str) -> bool:
  """The released checkpoints carry EMAs of every parameter as ``ema_<name with _>`` buffers
  (plain_mamba_dev/hooks/ema_checkpoint.py). The hook swaps the EMA weights into the model
  before evaluation and saving, so the regular keys are the evaluated weights: ema_* are skipped."""
  return key.startswith("ema_")


def _linear(table, model, path, key, bias=True):
  table.assign(model, f"{path}.kernel", f"{key}.weight", _T)
  if bias:
    table.assign(model, f"{path}.bias", f"{key}.bias")


def _conv(table, model, path, key, bias):
  table.assign(model, f"{path}.kernel", f"{key}.weight", _CONV)
  if bias:
    table.assign(model, f"{path}.bias", f"{key}.bias")


def _batch_norm(table, model, path, key):
  table.assign(model, f"{path}.scale", f"{key}.weight")
  table.assign(model, f"{path}.bias", f"{key}.bias")
  table.assign(model, f"{path}.mean", f"{key}.running_mean")
  table.assign(model, f"{path}.var", f"{key}.running_var")
  if f"{key}.num_batches_tracked" in table.sd:  # a training counter; absent in some exports
    table.get(f"{key}.num_batches_tracked")


def convert_into(model, table: KeyTable, *, prefix: str = "backbone."):
  """Fills ``model`` from ``table``: backbone keys under ``prefix`` (mmcls and mmseg both use
  "backbone."), the classifier under ``head.fc`` unless the model has none (num_classes 0)."""
  cfg = model.cfg
  n_ema = sum(1 for k in table.ignored if k.startswith("ema_"))
  if n_ema:
    log.info("PlainMamba checkpoint: ignoring %d ema_* buffers (the regular keys hold the "
             "evaluated EMA weights)", n_ema)
  pe = f"{prefix}patch_embed"
  _conv(table, model, "patch_embed.stem_conv", f"{pe}.stem.0", bias=False)
  _batch_norm(table, model, "patch_embed.stem_bn", f"{pe}.stem.1")
  for i in range(cfg.num_convs_patch_embed):
    # convs is a Sequential of (conv, BN, ReLU) triples.
    _conv(table, model, f"patch_embed.convs.{i}", f"{pe}.convs.{3 * i}", bias=False)
    _batch_norm(table, model, f"patch_embed.bns.{i}", f"{pe}.convs.{3 * i + 1}")
  _conv(table, model, "patch_embed.projection", f"{pe}.projection", bias=True)

  pos = table.get(f"{prefix}pos_embed")
  if pos is not None:
    want = tuple(model.pos_embed[...].shape)
    if pos.shape != want and pos.ndim == 3 and pos.shape[0] == 1 and pos.shape[2] == want[2] \
        and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
      # A checkpoint trained at another size (square grid): resize as the official forward would.
      g = math.isqrt(pos.shape[1])
      pos = resize_pos_embed(pos, (g, g), cfg.grid)
    if pos.shape != want:
      table.mark_misshaped(f"{prefix}pos_embed", f"checkpoint {pos.shape}, model expects {want} "
                           f"(img_size {cfg.img_size}, patch_size {cfg.patch_size})")
    else:
      model.pos_embed[...] = pos

  for i in range(cfg.num_layers):
    p, k = f"layers.{i}", f"{prefix}layers.{i}"
    table.assign(model, f"{p}.norm.scale", f"{k}.norm.weight")
    table.assign(model, f"{p}.norm.bias", f"{k}.norm.bias")
    m, km = f"{p}.mamba", f"{k}.mamba"
    _linear(table, model, f"{m}.in_proj", f"{km}.in_proj")
    _conv(table, model, f"{m}.conv2d", f"{km}.conv2d", bias=True)
    _linear(table, model, f"{m}.x_proj", f"{km}.x_proj", bias=False)
    _linear(table, model, f"{m}.dt_proj", f"{km}.dt_proj")
    _linear(table, model, f"{m}.out_proj", f"{km}.out_proj")
    table.assign(model, f"{m}.A_log", f"{km}.A_log")
    table.assign(model, f"{m}.D", f"{km}.D")
    table.assign(model, f"{m}.direction_Bs", f"{km}.direction_Bs")
    if i in cfg.layers_with_dwconv:
      _conv(table, model, f"{p}.dw_conv", f"{k}.dw.0", bias=False)
      _batch_norm(table, model, f"{p}.dw_bn", f"{k}.dw.1")
  table.assign(model, "ln1.scale", f"{prefix}ln1.weight")
  table.assign(model, "ln1.bias", f"{prefix}ln1.bias")
  if cfg.num_classes > 0:
    _linear(table, model, "head", "head.fc")
