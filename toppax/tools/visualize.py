"""Kept-token pictures and keep-ratio curves (PNG through matplotlib's Agg canvas).

``info["positions"]`` (from ``model(images, return_info=True)``) holds, per pruning stage, the
original token index of every token still in the sequence. A ViM sequence has the cls token at
``cls_index = num_patches // 2``, so patch p is token p before it and token p + 1 after it; an
EViT fused token has position -1. PlainMamba has no cls token: token index = raster patch index.
Each stage's positions are a subset of the previous stage's (pruning only removes), so a stage's
picture needs only its own positions.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas, never through pyplot: no
global backend switch, no figure registry to leak, and the same code runs headless in CI and
inline in a notebook (a Figure displays itself in Jupyter).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

FUSED = -1  # toppax.pruning.ops.FUSED: an EViT fused token stands for no single patch


# --- token index -> patch index --------------------------------------------------------------


def layout(model, image_hw: tuple[int, int] | None = None) -> dict:
  """``{"grid": (gh, gw), "cls_index": int | None, "layers": (...)}`` of a toppax model.

  ViM: the grid and cls position of its config. PlainMamba takes any input size divisible by
  its patch size, so its grid comes from ``image_hw`` (the model input's height and width) when
  given.
  """
  cfg = model.cfg
  pruning = getattr(model, "pruning", None)
  layers = tuple(pruning.layers) if pruning is not None else ()
  if hasattr(cfg, "cls_index"):  # ViM
    return {"grid": tuple(cfg.grid), "cls_index": int(cfg.cls_index), "layers": layers}
  if image_hw is not None:
    p = cfg.patch_size
    grid = (int(image_hw[0]) // p, int(image_hw[1]) // p)
  else:
    grid = tuple(cfg.grid)
  return {"grid": grid, "cls_index": None, "layers": layers}


def patch_indices(token_positions, num_patches: int, *, cls_index: int | None = None):
  """Raster patch indices of the image tokens among ``token_positions`` (one example, (K,)).

  The cls token (``cls_index``) and fused tokens (-1) are dropped: they cover no patch.
  ``cls_index=None`` means no cls token (PlainMamba). Raises on indices outside the sequence,
  which is what a wrong ``cls_index``/grid (or the positions of another model) looks like.
  """
  pos = np.asarray(token_positions).reshape(-1).astype(np.int64)
  n_tokens = num_patches + (cls_index is not None)
  bad = pos[(pos < FUSED) | (pos >= n_tokens)]
  if bad.size:
    raise ValueError(f"token positions {sorted(set(bad.tolist()))[:8]} are outside a sequence of "
                     f"{n_tokens} tokens ({num_patches} patches"
                     f"{'' if cls_index is None else ' + cls'}): wrong grid or cls_index?")
  pos = pos[pos != FUSED]
  if cls_index is None:
    return pos
  pos = pos[pos != cls_index]
  return np.where(pos > cls_index, pos - 1, pos)


def kept_mask(token_positions, grid: tuple[int, int], *, cls_index: int | None = None):
  """(gh, gw) bool: True where the patch's token is still in the sequence."""
  gh, gw = grid
  mask = np.zeros(gh * gw, bool)
  mask[patch_indices(token_positions, gh * gw, cls_index=cls_index)] = True
  return mask.reshape(gh, gw)


def _example(positions, index: int):
  # A stage's positions are (B, K) from the model, or (K,) for a single example.
  arr = np.asarray(positions)
  return arr[index] if arr.ndim == 2 else arr


def stage_masks(positions: Sequence, grid: tuple[int, int], *, cls_index: int | None = None,
                index: int = 0) -> np.ndarray:
  """(S, gh, gw) kept masks of example ``index``, one per pruning stage."""
  if len(positions) == 0:
    return np.zeros((0,) + tuple(grid), bool)
  return np.stack([kept_mask(_example(p, index), grid, cls_index=cls_index) for p in positions])


# --- greyed images ---------------------------------------------------------------------------


def _pixel_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """Patch mask (gh, gw) -> pixel mask (H, W). Pixel (y, x) lies in patch (y·gh // H, x·gw // W):
  exact for the model's own input size, and a nearest-patch map for a larger display image."""
  gh, gw = mask.shape
  h, w = hw
  rows = np.arange(h) * gh // h
  cols = np.arange(w) * gw // w
  return mask[rows[:, None], cols[None, :]]


def grey_out(image: np.ndarray, mask: np.ndarray, *, grey: float = 0.5, alpha: float = 1.0):
  """``image`` (H, W[, C]) with the patches where ``mask`` (gh, gw) is False greyed.

  ``grey`` is a fraction of the dtype's range (0.5 -> 128 for uint8; float images are taken to be
  in [0, 1]); ``alpha`` = 1 paints pruned patches solid grey, < 1 blends towards it. Kept pixels
  are returned unchanged, bit for bit.
  """
  image = np.asarray(image)
  if image.ndim not in (2, 3):
    raise ValueError(f"expected one image (H, W) or (H, W, C), got shape {image.shape}")
  pruned = ~_pixel_mask(np.asarray(mask, bool), image.shape[:2])
  if image.ndim == 3:
    pruned = pruned[..., None]
  if np.issubdtype(image.dtype, np.integer):
    info = np.iinfo(image.dtype)
    grey_value = info.min + grey * (info.max - info.min)
  else:
    grey_value = grey
  blended = (1.0 - alpha) * image.astype(np.float64) + alpha * grey_value
  if np.issubdtype(image.dtype, np.integer):
    blended = np.clip(np.round(blended), info.min, info.max)
  return np.where(pruned, blended.astype(image.dtype), image)


def greyed_images(image: np.ndarray, positions: Sequence, grid: tuple[int, int], *,
                  cls_index: int | None = None, index: int = 0, grey: float = 0.5,
                  alpha: float = 1.0) -> list[np.ndarray]:
  """One greyed copy of ``image`` per pruning stage, from ``info["positions"]``.

  ``image`` is the picture of example ``index`` (any size: patches map to pixel blocks by
  proportion, so a higher-resolution original can stand in for the model input). ``grid`` and
  ``cls_index`` describe the model's token sequence (``layout(model)``).
  """
  masks = stage_masks(positions, grid, cls_index=cls_index, index=index)
  return [grey_out(image, m, grey=grey, alpha=alpha) for m in masks]


# --- figures ---------------------------------------------------------------------------------


def _new_figure(figsize):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=figsize, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _show(ax, image, title):
  image = np.asarray(image)
  if image.ndim == 2:
    # A fixed range: imshow would otherwise stretch a grey-only panel to black and white.
    top = np.iinfo(image.dtype).max if np.issubdtype(image.dtype, np.integer) else 1.0
    ax.imshow(image, cmap="gray", vmin=0, vmax=top, interpolation="nearest")
  else:
    ax.imshow(image, interpolation="nearest")
  ax.set_title(title, fontsize=9)
  ax.set_xticks([])
  ax.set_yticks([])


def _draw_grid(ax, grid, hw):
  gh, gw = grid
  h, w = hw
  for r in range(1, gh):
    ax.axhline(r * h / gh - 0.5, color="white", lw=0.3, alpha=0.5)
  for c in range(1, gw):
    ax.axvline(c * w / gw - 0.5, color="white", lw=0.3, alpha=0.5)


def plot_kept_tokens(images, positions: Sequence, grid: tuple[int, int], *,
                     cls_index: int | None = None, layers: Sequence[int] = (),
                     indices: Sequence[int] | None = None, titles: Sequence[str] | None = None,
                     path: str | None = None, grey: float = 0.5, alpha: float = 1.0,
                     draw_grid: bool = True, panel_size: float = 2.0):
  """A figure with one row per example and one column per stage: the input, then the image with
  the pruned patches greyed after each pruning stage. Saved as PNG when ``path`` is given.

  ``images``: (B, H, W[, C]) pictures of the examples (uint8, or float in [0, 1]) or one image;
  ``positions``: ``info["positions"]``; ``indices``: which examples to draw (default all);
  ``layers``: the blocks each stage follows, for the column titles (``layout(model)["layers"]``).
  """
  images = np.asarray(images)
  # One picture: (H, W) or (H, W, C); a batch: (B, H, W, C), or (B, H, W) of grey images.
  single = images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (1, 3, 4))
  if indices is None:
    indices = [0] if single else list(range(images.shape[0]))
  indices = list(indices)
  n_patches = grid[0] * grid[1]
  n_stages = len(positions)
  fig = _new_figure((panel_size * (n_stages + 1), panel_size * len(indices) + 0.3))
  axes = fig.subplots(len(indices), n_stages + 1, squeeze=False)
  for row, i in enumerate(indices):
    image = images if single else images[i]
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    prefix = f"{titles[row]}: " if titles is not None else ""
    _show(axes[row, 0], image, f"{prefix}input, {n_patches} patches")
    masks = stage_masks(positions, grid, cls_index=cls_index, index=i)
    for s, mask in enumerate(masks):
      after = f"after block {layers[s]}" if s < len(layers) else f"stage {s + 1}"
      _show(axes[row, s + 1], grey_out(image, mask, grey=grey, alpha=alpha),
            f"{after}: {int(mask.sum())} kept")
    if draw_grid:
      for ax in axes[row]:
        _draw_grid(ax, grid, image.shape[:2])
  if path:
    fig.savefig(path, dpi=120)
  return fig


def show_kept_tokens(model, inputs, display_images=None, *, indices=None, path=None, **kw):
  """Runs ``model(inputs, return_info=True)`` and draws its kept tokens per stage.

  ``inputs``: the (normalised) NHWC batch the model takes; ``display_images``: what to draw
  (default ``inputs``, which should then be in [0, 1]). Returns ``(figure, logits, info)``.
  """
  if getattr(model, "pruning", None) is None:
    raise ValueError("the model has no pruning config: create it with pruning=PruneConfig(...)")
  logits, info = model(inputs, return_info=True)
  lay = layout(model, image_hw=np.shape(inputs)[1:3])
  shown = np.asarray(inputs if display_images is None else display_images)
  fig = plot_kept_tokens(shown, [np.asarray(p) for p in info["positions"]], lay["grid"],
                         cls_index=lay["cls_index"], layers=lay["layers"], indices=indices,
                         path=path, **kw)
  return fig, logits, info


def label_colors(num_classes: int) -> np.ndarray:
  """(num_classes + 1, 3) uint8 colours: a fixed palette per class, black for ignored (255)."""
  rng = np.random.default_rng(0)
  palette = rng.integers(40, 256, (num_classes, 3)).astype(np.uint8)
  return np.concatenate([palette, np.zeros((1, 3), np.uint8)])


def colorize(label, num_classes: int) -> np.ndarray:
  """A label map (H, W) as an RGB picture; 255 (ignored) is black."""
  label = np.asarray(label).astype(np.int64)
  return label_colors(num_classes)[np.where((label >= 0) & (label < num_classes), label,
                                            num_classes)]


def plot_segmentation(images, labels, predictions: Mapping[str, np.ndarray], positions, grid, *,
                      num_classes: int, path: str | None = None, panel_size: float = 2.0):
  """One row per example: the image, its ground truth, each prediction (``{"dense": (B, H, W),
  "top": ...}``) and, when ``positions`` is given (``info["positions"]`` of the pruned model),
  the image with the tokens each pruning stage dropped greyed out."""
  images = np.asarray(images)
  stages = list(positions) if positions is not None else []
  cols = 2 + len(predictions) + len(stages)
  fig = _new_figure((panel_size * cols, panel_size * len(images) + 0.3))
  axes = fig.subplots(len(images), cols, squeeze=False)
  for i, image in enumerate(images):
    _show(axes[i, 0], image, "image")
    label = np.asarray(labels[i])
    _show(axes[i, 1], colorize(label, num_classes), "ground truth")
    for j, (name, pred) in enumerate(predictions.items()):
      pred = np.asarray(pred[i])
      valid = label != 255
      acc = float((pred == label)[valid].mean()) if label.shape == pred.shape and valid.any() \
          else float("nan")
      title = f"{name}" + (f" (pixel acc {100 * acc:.0f}%)" if acc == acc else "")
      _show(axes[i, 2 + j], colorize(pred, num_classes), title)
    for s, mask in enumerate(stage_masks([np.asarray(p) for p in stages], grid, index=i)):
      _show(axes[i, 2 + len(predictions) + s], grey_out(image, mask),
            f"stage {s + 1}: {int(mask.sum())} kept")
  if path:
    fig.savefig(path, dpi=120)
  return fig


def flops_vs_keep_ratio(name: str, keep_ratios: Sequence[float], layers: Sequence[int], *,
                        img_size=224, **overrides) -> dict:
  """GFLOPs per image of ``name`` pruned after ``layers`` at each keep ratio: ToP (alignment),
  plain removal, and the dense model (toppax.tools.flops)."""
  from toppax.pruning import PruneConfig
  from toppax.tools import flops
  out = {"keep_ratio": [float(r) for r in keep_ratios], "ToP": [], "removal": []}
  for r in keep_ratios:
    for key, alignment in (("ToP", True), ("removal", False)):
      p = PruneConfig(layers=tuple(layers), keep_ratio=float(r), alignment=alignment)
      out[key].append(float(flops.model_gflops(name, img_size=img_size, pruning=p, **overrides)))
  out["dense"] = float(flops.model_gflops(name, img_size=img_size, **overrides))
  return out


def plot_vs_keep_ratio(keep_ratios: Sequence[float], series: Mapping[str, Sequence[float]], *,
                       ylabel: str, dense: float | None = None, title: str | None = None,
                       path: str | None = None, percent: bool = False):
  """Lines of ``series`` (name -> one value per keep ratio) against the keep ratio, with the
  dense model as a dashed line; accuracy (``percent=True`` shows fractions as %) or GFLOPs."""
  scale = 100.0 if percent else 1.0
  fig = _new_figure((4.8, 3.4))
  ax = fig.add_subplot()
  for name, values in series.items():
    if len(values) != len(keep_ratios):
      raise ValueError(f"series {name!r} has {len(values)} values for {len(keep_ratios)} ratios")
    ax.plot(keep_ratios, np.asarray(values, float) * scale, marker="o", label=name)
  if dense is not None:
    ax.axhline(dense * scale, color="black", ls="--", lw=1, label="dense")
  ax.set_xlabel("keep ratio r (per pruning stage)")
  return _finish(fig, ax, ylabel, percent, title, path)


def plot_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str,
                ylabel: str, title: str | None = None, ax=None, path: str | None = None,
                percent: bool = False):
  """Training curves: ``curves`` maps a name to (steps, values). Draws into ``ax`` when given
  (several panels in one figure), else into a new figure; returns the figure."""
  fig = ax.figure if ax is not None else _new_figure((4.8, 3.4))
  ax = ax if ax is not None else fig.add_subplot()
  for name, (x, y) in curves.items():
    ax.plot(x, np.asarray(y, float) * (100.0 if percent else 1.0), marker="." if len(x) < 40
            else None, label=name)
  ax.set_xlabel(xlabel)
  return _finish(fig, ax, ylabel, percent, title, path)


def new_figure(ncols: int = 1, nrows: int = 1, panel=(4.8, 3.4)):
  """(figure, axes array) on an Agg canvas, for several ``plot_curves`` panels side by side."""
  fig = _new_figure((panel[0] * ncols, panel[1] * nrows))
  return fig, fig.subplots(nrows, ncols, squeeze=False)


def _finish(fig, ax, ylabel, percent, title, path):
  ax.set_ylabel(ylabel + (" (%)" if percent else ""))
  if title:
    ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if path:
    fig.savefig(path, dpi=120)
  return fig
