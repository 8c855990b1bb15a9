"""ToP pruning configuration (Zhan et al., NeurIPS 2024) and the static token counts it implies."""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from toppax.ssm.ops import GAP_DELTA_RULES

IMPORTANCE = ("clip", "l1", "l2", "raw", "release")
CLS_MODES = ("keep_position", "middle")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """Where and how to prune.

  Attributes:
    layers: prune after these blocks, 1-based: (5, 10, 15) prunes after the 5th, 10th, 15th block.
    keep_ratio: fraction r of the patch tokens kept at each pruning layer (float, or one per layer).
    importance: token score from the SSM output y before out_proj: "clip" (Σ_d max(0, y), the
      paper's), "l1", "l2", "raw" (Σ_d y), or "release" (ZLKong/ToP-ViM: backward branch only,
      unclipped, read in flipped order).
    alignment: pruning-aware hidden-state alignment: the scan state keeps decaying across pruned
      positions (scan ``gaps``), so kept tokens keep their original distances.
    cls_mode: "keep_position" keeps the cls token at its original place in the sorted kept
      sequence; "middle" re-inserts it in the middle of the kept tokens (the release).
    fused_token: EViT-style baseline: one extra token, the importance-weighted mean of the pruned
      ones, appended to the sequence at each pruning layer.
    gap_delta: the Δ̃ rule of alignment: "prev" (Δ of the previous kept token in scan order) or
      "bias" (softplus(dt bias), the Δ of a zero token).
  """
  layers: tuple[int, ...] = (5, 10, 15)
  keep_ratio: float | tuple[float, ...] = 0.8
  importance: str = "clip"
  alignment: bool = True
  cls_mode: str = "keep_position"
  fused_token: bool = False
  gap_delta: str = "prev"

  def __post_init__(self):
    layers = tuple(int(l) for l in (self.layers if isinstance(self.layers, Sequence)
                                    else (self.layers,)))
    object.__setattr__(self, "layers", layers)
    if isinstance(self.keep_ratio, Sequence) and not isinstance(self.keep_ratio, str):
      ratios = tuple(float(r) for r in self.keep_ratio)
      if len(ratios) != len(layers):
        raise ValueError(f"keep_ratio has {len(ratios)} values for {len(layers)} pruning layers "
                         f"{layers}: give one ratio, or one per layer")
      object.__setattr__(self, "keep_ratio", ratios)
    else:
      object.__setattr__(self, "keep_ratio", float(self.keep_ratio))
    for r in self.ratios:
      if not 0.0 < r <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {r}")
    if any(l < 1 for l in layers) or list(layers) != sorted(set(layers)):
      raise ValueError(f"pruning layers must be distinct, increasing and >= 1 (1-based), got {layers}")
    if self.importance not in IMPORTANCE:
      raise ValueError(f"importance must be one of {IMPORTANCE}, got {self.importance!r}")
    if self.cls_mode not in CLS_MODES:
      raise ValueError(f"cls_mode must be one of {CLS_MODES}, got {self.cls_mode!r}")
    if self.gap_delta not in GAP_DELTA_RULES:
      raise ValueError(f"gap_delta must be one of {GAP_DELTA_RULES}, got {self.gap_delta!r}")
    if self.alignment and self.cls_mode == "middle":
      raise ValueError("alignment needs cls_mode='keep_position': re-inserting the cls token in "
                       "the middle breaks the spatial order that the scan gaps are measured in")

  @property
  def ratios(self) -> tuple[float, ...]:
    if isinstance(self.keep_ratio, tuple):
      return self.keep_ratio
    return (self.keep_ratio,) * len(self.layers)

  @classmethod
  def release(cls) -> "PruneConfig":
    """Exactly what ZLKong/ToP-ViM does (see docs/release_vs_paper.md)."""
    return cls(layers=(5, 10, 15), keep_ratio=0.8, importance="release", alignment=False,
               cls_mode="middle", fused_token=False)

  @classmethod
  def paper(cls, model: str = "vim_s", alignment: bool = True, **kw) -> "PruneConfig":
    """The paper's schedules: ViM-S after blocks 5/10/15, ViM-T after block 10, r = 0.8."""
    layers = {"vim_t": (10,), "vim_s": (5, 10, 15), "vim_b": (5, 10, 15)}.get(model)
    if layers is None:
      raise ValueError(f"no paper schedule for {model!r}; known: vim_t, vim_s, vim_b")
    return cls(layers=layers, keep_ratio=0.8, alignment=alignment, **kw)

  def validate(self, depth: int) -> None:
    bad = [l for l in self.layers if l > depth]
    if bad:
      raise ValueError(f"pruning layers {bad} are beyond the model depth {depth} "
                       f"(layers are 1-based block indices, 1..{depth})")

  def token_counts(self, n_tokens: int, *, has_cls: bool = True) -> list[int]:
    """Sequence length after each pruning layer (static Python ints)."""
    counts, n = [], n_tokens
    for r in self.ratios:
      n = kept_count(n, r, has_cls=has_cls, fused_token=self.fused_token)
      counts.append(n)
    return counts


def kept_count(n: int, keep_ratio: float, *, has_cls: bool = True,
               fused_token: bool = False) -> int:
  """Tokens after one pruning step, a static Python int.

  With a cls token: ``K = ceil((N - 1) · r)`` made odd (so the cls token can sit in the middle),
  cls included; 197 -> 157 -> 125 -> 101 at r = 0.8. A fused token (EViT) from an earlier stage
  counts as a prunable token, and a new one is added after the selection. Without a cls token
  (PlainMamba): ``K = ceil(N · r)``.
  """
  if not 0.0 < keep_ratio <= 1.0:
    raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
  if has_cls:
    k = math.ceil((n - 1) * keep_ratio - 1e-9)
    if k % 2 == 0:
      k += 1
    k = min(k, n)
  else:
    k = math.ceil(n * keep_ratio - 1e-9)
  if k < 1:
    raise ValueError(f"keep_ratio {keep_ratio} keeps K={k} < 1 of {n} tokens: raise keep_ratio")
  # A fused token is only made when something was pruned.
  return k + (1 if fused_token and k < n else 0)
