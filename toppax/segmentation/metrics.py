"""Segmentation metrics as mmseg computes them (``mmseg.core.evaluation.metrics``).

Per batch, on the device: the per-class areas of intersection, union, prediction and label,
counted over the pixels whose label is not ``ignore_index`` (predictions and labels outside
``0..num_classes-1`` count for no class, as ``torch.histc`` over that range). On the host: the
areas summed over the dataset (int64), then

  aAcc = sum(intersect) / sum(label)          (pixel accuracy)
  IoU_c = intersect_c / union_c, Acc_c = intersect_c / label_c   (NaN when the denominator is 0)
  mIoU = nanmean(IoU), mAcc = nanmean(Acc)    (classes absent from both prediction and labels
                                               are left out, as mmseg's nanmean)

``summarize`` returns fractions in [0, 1]; ``format_table`` prints percentages with two
decimals (mmseg's tables) and ``write_json`` stores the summary.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

AREAS = ("intersect", "union", "pred", "label")


def intersect_and_union(pred, label, num_classes: int, ignore_index: int = 255):
  """int32 (4, num_classes): areas of intersection, union, prediction and label of one batch
  (any shape, ``pred`` and ``label`` alike); jit-friendly (static ``num_classes``)."""
  import jax.numpy as jnp
  pred, label = jnp.asarray(pred).astype(jnp.int32), jnp.asarray(label).astype(jnp.int32)
  valid = label != ignore_index
  pred_ok = valid & (pred >= 0) & (pred < num_classes)
  label_ok = valid & (label >= 0) & (label < num_classes)

  def count(values, keep):
    # Pixels not kept go to an extra bin that is dropped.
    return jnp.bincount(jnp.where(keep, values, num_classes).ravel(),
                        length=num_classes + 1)[:num_classes].astype(jnp.int32)

  area_pred = count(pred, pred_ok)
  area_label = count(label, label_ok)
  area_inter = count(label, label_ok & (pred == label))
  return jnp.stack([area_inter, area_pred + area_label - area_inter, area_pred, area_label])


class Accumulator:
  """Sums the (4, num_classes) areas of every batch on the host (int64: no overflow over a
  dataset)."""

  def __init__(self, num_classes: int):
    self.areas = np.zeros((4, num_classes), np.int64)

  def add(self, areas):
    self.areas += np.asarray(areas, np.int64)

  def summary(self, class_names=None) -> dict:
    return summarize(self.areas, class_names)


def summarize(areas, class_names=None) -> dict:
  """{"aAcc", "mIoU", "mAcc", "IoU": [...], "Acc": [...], "classes": [...], "areas": {...}}
  from the dataset's summed areas (fractions; NaN for classes without a denominator)."""
  inter, union, pred, label = (np.asarray(a, np.float64) for a in np.asarray(areas))
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = inter / union
    acc = inter / label
    a_acc = inter.sum() / label.sum() if label.sum() else float("nan")
  n = len(inter)
  names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
  if len(names) != n:
    raise ValueError(f"{len(names)} class names for {n} classes")

  def nanmean(x):
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")

  return {"aAcc": float(a_acc), "mIoU": nanmean(iou), "mAcc": nanmean(acc),
          "IoU": [float(v) for v in iou], "Acc": [float(v) for v in acc], "classes": names,
          "areas": {k: [int(v) for v in a] for k, a in zip(AREAS, np.asarray(areas))}}


def _pct(v: float) -> str:
  return "nan" if math.isnan(v) else f"{100 * v:.2f}"


def format_table(summary: dict, per_class: bool = True) -> str:
  """mmseg's two tables: per-class IoU / Acc, then aAcc / mIoU / mAcc (percent)."""
  lines = []
  if per_class:
    width = max(5, *(len(c) for c in summary["classes"]))
    lines += [f"| {'Class':<{width}} |   IoU  |   Acc  |", f"|{'-' * (width + 2)}|--------|--------|"]
    for name, iou, acc in zip(summary["classes"], summary["IoU"], summary["Acc"]):
      lines.append(f"| {name:<{width}} | {_pct(iou):>6} | {_pct(acc):>6} |")
    lines.append("")
  lines += ["|  aAcc  |  mIoU  |  mAcc  |", "|--------|--------|--------|",
            f"| {_pct(summary['aAcc']):>6} | {_pct(summary['mIoU']):>6} | "
            f"{_pct(summary['mAcc']):>6} |"]
  return "\n".join(lines)


def write_json(summary: dict, path: str, **extra) -> str:
  """Writes the summary (NaN as null) and ``extra`` fields to ``path``; returns the path."""
  def clean(v):
    if isinstance(v, float) and math.isnan(v):
      return None
    if isinstance(v, list):
      return [clean(x) for x in v]
    if isinstance(v, dict):
      return {k: clean(x) for k, x in v.items()}
    return v
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(clean({**summary, **extra}), f, indent=2)
  return path
