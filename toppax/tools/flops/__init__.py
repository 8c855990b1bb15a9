"""FLOPs of every toppax model, dense and ToP-pruned, analytically (no tracing).

``model_gflops(name, img_size, pruning)``, ``block_table`` (one row per block) and
``format_table`` take the classification models (``toppax.tools.flops.classification``: ViM-T/S/B,
PlainMamba-L1/L2/L3) and the UperNet segmentation models (``upernet_*``,
``toppax.tools.flops.segmentation``). ``run(config)`` is ``--mode=flops``;
``python -m toppax.tools.flops MODEL`` prints a table without a config. docs/flops.md has the
conventions and the numbers they reproduce.
"""
from __future__ import annotations

from typing import Any

from toppax.tools.flops import classification, segmentation
from toppax.tools.flops.classification import (GAP_FLOPS_PER_STATE, MODEL_NAMES,
                                               PLAINMAMBA_ARCHS, PLAINMAMBA_TOP_SCHEDULES,
                                               SCAN_FLOPS_PER_STATE, VIM_ARCHS, _canonical,
                                               _field, _ratio, arch_of, backbone_rows,
                                               kept_tokens)

__all__ = ["model_gflops", "block_table", "format_table", "run", "main", "kept_tokens", "arch_of",
           "backbone_rows", "MODEL_NAMES", "PLAINMAMBA_TOP_SCHEDULES", "VIM_ARCHS",
           "PLAINMAMBA_ARCHS", "SCAN_FLOPS_PER_STATE", "GAP_FLOPS_PER_STATE"]


def _is_segmentation(name) -> bool:
  return str(name).strip().lower().startswith("upernet_")


def block_table(name: str, img_size=224, pruning=None, **overrides) -> list[dict]:
  """Per-row FLOPs of model ``name`` (see the two modules' ``block_table``)."""
  module = segmentation if _is_segmentation(name) else classification
  return module.block_table(name, img_size, pruning, **overrides)


def model_gflops(name: str, img_size=224, pruning=None, **overrides) -> float:
  """Total GFLOPs (multiply-adds) of one forward pass on one image; segmentation models count
  their test path (backbone, neck, decode head; ``aux=True`` adds the training-only head)."""
  module = segmentation if _is_segmentation(name) else classification
  return module.model_gflops(name, img_size, pruning, **overrides)


def _describe(pruning) -> str:
  layers = tuple(_field(pruning, "layers", ()) or ())
  if not layers:
    return "dense"
  ratio = _ratio(pruning)
  extras = [n for n in ("alignment", "fused_token") if _field(pruning, n, False)]
  return f"pruned after {layers}, keep {ratio}" + (f", {' + '.join(extras)}" if extras else "")


def format_table(name: str, img_size=224, pruning=None, **overrides) -> str:
  """Markdown table of block_table, with a total (and the ratio to dense when pruned)."""
  rows = block_table(name, img_size, pruning, **overrides)
  seg = _is_segmentation(name)
  counted = [r for r in rows if not r.get("train_only")]
  total = sum(r["gflops"] for r in counted)
  shown = f"{total:.2f}" if total >= 0.1 else f"{total:.3g}"
  title = name if seg else _canonical(name)
  cols = ("linear_gflops", "scan_gflops", "align_gflops") + (("mmcv_gflops",) if seg else ())
  lines = [f"**{title}** @ {img_size}px, {_describe(pruning)}: **{shown} GFLOPs**", "",
           "| layer | tokens | GFLOPs | linear | scan | align |" + (" mmcv get_flops |" if seg
                                                                    else ""),
           "|---|---:|---:|---:|---:|---:|" + ("---:|" if seg else "")]
  for r in rows:
    parts = [f"{r[k]:.4f}" if k in r else "" for k in cols]
    lines.append(f"| {r['layer']} | {r['tokens']} | {r['gflops']:.4f} | " + " | ".join(parts) + " |")
  lines.append(f"| **total** | | **{total:.4f}** | | | |" + (" |" if seg else ""))
  if seg:
    lines += ["", "The total is the test path (backbone, neck, decode head); the auxiliary head "
              "runs in training only. mmcv get_flops: what mmcv's counter adds for the neck and "
              "heads (docs/flops.md)."]
  if _field(pruning, "layers", ()):
    dense = model_gflops(name, img_size, None, **overrides)
    lines += ["", f"dense {dense:.2f} G; pruned / dense = {total / dense:.3f} "
              f"({100 * (1 - total / dense):.1f}% fewer FLOPs)"]
  return "\n".join(lines)


_RUNTIME_FIELDS = ("name", "img_size", "drop_path_rate", "drop_rate", "dtype",
                   "scan_implementation", "scan_layers", "remat")


def run(config: Any) -> str:
  """``--mode=flops``: print the FLOPs table of the configured model, with the config's
  architecture overrides (depth, embed_dim, patch_size, ...), pruned only when ``config.pruning``
  is present and not switched off (``enabled=False``)."""
  model = config.model
  img_size = _field(model, "img_size", None)
  img_size = 224 if img_size is None else img_size
  overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in model.items()
               if k not in _RUNTIME_FIELDS and v is not None}
  data = config.get("data") if hasattr(config, "get") else getattr(config, "data", None)
  if _field(data, "num_classes") is not None:
    overrides["num_classes"] = _field(data, "num_classes")
  pruning = config.get("pruning") if hasattr(config, "get") else getattr(config, "pruning", None)
  if pruning is not None and not (_field(pruning, "enabled", True)
                                 and _field(pruning, "layers", ())):
    pruning = None
  table = format_table(_field(model, "name"), img_size, pruning, **overrides)
  print(table)
  return table


def main(argv=None) -> None:
  """``python -m toppax.tools.flops MODEL [--img-size N] [--paper | --keep R --layers 5,10,15]``:
  the FLOPs table of a model by name, without a config file."""
  import argparse
  p = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
  p.add_argument("model", help=f"one of {', '.join(MODEL_NAMES)}")
  p.add_argument("--img-size", type=int, default=224)
  p.add_argument("--paper", action="store_true",
                 help="the ToP paper's schedule (ViM: PruneConfig.paper; PlainMamba: "
                      "PLAINMAMBA_TOP_SCHEDULES), with alignment")
  p.add_argument("--layers", default="", help="prune after these blocks, e.g. 5,10,15")
  p.add_argument("--keep", default="0.8",
                 help="keep ratio with --layers: one for all, or one per layer (0.9,0.7,0.5)")
  p.add_argument("--no-alignment", action="store_true", help="plain removal: no decay counted")
  a = p.parse_args(argv)
  try:
    key = _canonical(a.model)
    pruning = None
    if a.paper:
      if key in PLAINMAMBA_TOP_SCHEDULES:
        layers, ratios = PLAINMAMBA_TOP_SCHEDULES[key]
        pruning = dict(layers=layers, keep_ratio=ratios, alignment=not a.no_alignment)
      else:
        from toppax.pruning import PruneConfig
        pruning = PruneConfig.paper(key, alignment=not a.no_alignment)
    elif a.layers:
      try:
        layers = tuple(int(x) for x in a.layers.split(","))
      except ValueError:
        raise ValueError(f"--layers {a.layers!r}: give 1-based block numbers, comma-separated "
                         "(5,10,15)") from None
      try:
        keep = tuple(float(x) for x in a.keep.split(","))
      except ValueError:
        raise ValueError(f"--keep {a.keep!r}: give a number in (0, 1] or one per layer, "
                         "comma-separated") from None
      pruning = dict(layers=layers, keep_ratio=keep[0] if len(keep) == 1 else keep,
                     alignment=not a.no_alignment)
    print(format_table(key, a.img_size, pruning))
  except ValueError as e:
    p.error(str(e))
