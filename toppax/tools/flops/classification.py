"""Analytic FLOPs counter for ViM and PlainMamba, dense and ToP-pruned.

Conventions (docs/flops.md has the derivation and every number they give):

* One FLOP is one multiply-add (the fvcore / ptflops habit every vision paper follows), so a
  ``din -> dout`` linear layer on L tokens costs ``L * din * dout``; biases, activations and
  elementwise adds are free.
* The selective scan, which no module counter sees, is added analytically: ``9 * E * N * L`` per
  scan (Gu's estimate, state-spaces/mamba#110) plus ``E * L`` per scan for the D skip.
* ViM ("ToP convention"): per block RMSNorm ``L * D``, in_proj, out_proj, and ONE SSM branch
  (causal conv ``L * E * k``, x_proj, dt_proj, scan, D skip and z gate ``2 * E * L``), cls token
  included in L. This is what reproduces the ToP paper's ViM-T 1.45 / ViM-S 5.08 G: the paper's
  counter does not add the backward branch of the bidirectional block. ``ssm_branches=2`` counts
  it (the work the model really does).
* PlainMamba ("PlainMamba convention", tools/analysis_tools/get_flops.py of its repository): conv
  and linear multiply-adds (stem, patch projection, in_proj, 7x7 depthwise conv, x_proj, dt_proj,
  out_proj, L1's 3x3 depthwise block, head) plus ``9 * E * N * L + E * L`` for each of the four
  scan directions. Gives L1 / L2 / L3 = 3.0 / 8.1 / 14.4 G.
* Pruning changes L at block boundaries. Alignment (the scan keeps decaying over the pruned
  positions) is counted as a masked full-length scan would run it: each pruned position costs its
  decay, ``Δ·A`` and ``exp(Δ·A)·h``, i.e. ``2 * E * N`` per pruned position per scan. That is the
  +0.03 G (ViM-S) / +0.01 G (ViM-T) of the paper's ToP rows.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

GIGA = 1e9

# Scan cost per (channel, state, token): Δ·A, Δ·B·u (2), the recurrence run as an associative
# scan (4: multiply and add, each twice), C·h (2) -> 9 (state-spaces/mamba#110).
SCAN_FLOPS_PER_STATE = 9
# A pruned position inside an aligned (masked) scan only decays the state: Δ·A and exp(Δ·A)·h.
GAP_FLOPS_PER_STATE = 2

_VIM_COMMON = dict(depth=24, patch_size=16, in_chans=3, num_classes=1000, d_state=16, expand=2,
                   d_conv=4, dt_rank=None, ssm_branches=1)
VIM_ARCHS = {
  "vim_t": dict(_VIM_COMMON, embed_dim=192),
  "vim_s": dict(_VIM_COMMON, embed_dim=384),
  "vim_b": dict(_VIM_COMMON, embed_dim=768),
}

_PM_COMMON = dict(patch_size=16, in_chans=3, num_classes=1000, d_state=16, expand=2, conv_size=7,
                  dt_rank=None, stem_channels=64, directions=4, dwconv_size=3,
                  conv_full_grid=True)
PLAINMAMBA_ARCHS = {
  "plainmamba_l1": dict(_PM_COMMON, embed_dim=192, depth=24, num_convs_patch_embed=1,
                        layers_with_dwconv=(0,)),
  "plainmamba_l2": dict(_PM_COMMON, embed_dim=384, depth=24, num_convs_patch_embed=2,
                        layers_with_dwconv=()),
  "plainmamba_l3": dict(_PM_COMMON, embed_dim=448, depth=36, num_convs_patch_embed=2,
                        layers_with_dwconv=()),
}

MODEL_NAMES = tuple(VIM_ARCHS) + tuple(PLAINMAMBA_ARCHS)
_ALIASES = {
  "vim_tiny": "vim_t", "vim_small": "vim_s", "vim_base": "vim_b",
  "vim-t": "vim_t", "vim-s": "vim_s", "vim-b": "vim_b",
  "plainmamba-l1": "plainmamba_l1", "plainmamba-l2": "plainmamba_l2",
  "plainmamba-l3": "plainmamba_l3", "plain_mamba_l1": "plainmamba_l1",
  "plain_mamba_l2": "plainmamba_l2", "plain_mamba_l3": "plainmamba_l3",
}

# ToP schedules for PlainMamba: (layers after which to prune, keep ratio per layer). With
# alignment on (its decay counted) each removes 41.6% +- 0.1% of the dense FLOPs, the reduction
# the ToP paper reports for PlainMamba-L3 (14.4 -> 8.4 G). L1 needs harder pruning for the same
# total: its unprunable stem and patch projection are 24% of it.
# docs/flops.md lists the tokens per layer and the search that found them.
PLAINMAMBA_TOP_SCHEDULES = {
  # Searched so that ToP (alignment on, its decay counted) is 41.6% +- 0.1% below dense.
  "plainmamba_l1": ((3, 9, 15), (0.5, 0.5, 0.5)),
  "plainmamba_l2": ((5, 8, 11), (0.6, 0.6, 0.6)),
  "plainmamba_l3": ((8, 15, 22), (0.6, 0.6, 0.6)),
}


# --------------------------------------------------------------------------------------------
# Token counts


def kept_tokens(n: int, keep_ratio: float, *, has_cls: bool = True,
                fused_token: bool = False) -> int:
  """Sequence length after one pruning step: exactly the model's rule, toppax.pruning.kept_count
  (ViM: ``K = ceil((N - 1) r)`` made odd, cls included; PlainMamba: ``ceil(N r)``; +1 for a new
  EViT fused token when anything was pruned)."""
  from toppax.pruning.config import kept_count
  return kept_count(n, keep_ratio, has_cls=has_cls, fused_token=fused_token)


def _field(obj, key, default=None):
  # PruneConfig, ml_collections.ConfigDict, a SimpleNamespace or a plain dict all work.
  if obj is None:
    return default
  if isinstance(obj, Mapping):
    return obj.get(key, default)
  return getattr(obj, key, default)


def _ratio(pruning):
  """keep_ratio, or the config's per-layer ``keep_ratios`` where given (they win, as in
  train.prune_config)."""
  per_layer = _field(pruning, "keep_ratios", ()) or ()
  return tuple(per_layer) if per_layer else _field(pruning, "keep_ratio", 1.0)


def _schedule(pruning, depth: int):
  """(layers, ratios, alignment, fused) from any PruneConfig-like object, validated."""
  layers = _field(pruning, "layers", ()) or ()
  if isinstance(layers, int):
    layers = (layers,)
  layers = tuple(int(l) for l in layers)
  alignment = bool(_field(pruning, "alignment", False))
  fused = bool(_field(pruning, "fused_token", False))
  ratio = _ratio(pruning)
  if isinstance(ratio, Sequence) and not isinstance(ratio, str):
    ratios = tuple(float(r) for r in ratio)
    if len(ratios) != len(layers):
      raise ValueError(f"keep_ratio has {len(ratios)} values for {len(layers)} pruning layers "
                       f"{layers}: give one ratio, or one per layer")
  else:
    ratios = (float(ratio),) * len(layers)
  for r in ratios:
    if not 0.0 < r <= 1.0:
      raise ValueError(f"keep_ratio must be in (0, 1], got {r}")
  if list(layers) != sorted(set(layers)) or any(l < 1 for l in layers):
    raise ValueError(f"pruning layers must be distinct, increasing and >= 1 (1-based block "
                     f"indices), got {layers}")
  bad = [l for l in layers if l > depth]
  if bad:
    raise ValueError(f"pruning layers {bad} are beyond the model depth {depth} "
                     f"(layers are 1-based block indices, 1..{depth})")
  return layers, ratios, alignment, fused


def _token_plan(n0: int, depth: int, pruning, has_cls: bool):
  """Per block: (sequence length, pruned positions a masked scan would still run over)."""
  layers, ratios, alignment, fused = _schedule(pruning, depth)
  cut = dict(zip(layers, ratios))
  plan, n, n_fused = [], n0, 0
  for b in range(1, depth + 1):
    # Image positions not in the sequence: what alignment's scan gaps stand for.
    gaps = n0 - (n - n_fused)
    plan.append((n, gaps if alignment else 0))
    if b in cut:
      n = kept_tokens(n, cut[b], has_cls=has_cls, fused_token=fused)
      n_fused = 1 if fused and n < n0 else 0
  return plan


# --------------------------------------------------------------------------------------------
# Model specs


def _canonical(name: str) -> str:
  key = str(name).strip().lower()
  key = _ALIASES.get(key, key)
  if key not in MODEL_NAMES:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
  return key


def _spec(name: str, overrides: dict) -> tuple[str, dict]:
  key = _canonical(name)
  base = VIM_ARCHS.get(key) or PLAINMAMBA_ARCHS[key]
  unknown = sorted(set(overrides) - set(base))
  if unknown:
    raise ValueError(f"unknown override(s) {unknown} for {key}; valid: {sorted(base)}")
  spec = dict(base, **overrides)
  if spec["dt_rank"] is None:
    spec["dt_rank"] = math.ceil(spec["embed_dim"] / 16)
  spec["layers_with_dwconv"] = tuple(spec.get("layers_with_dwconv", ()))
  return key, spec


def _hw(img_size) -> tuple[int, int]:
  if isinstance(img_size, Sequence):
    h, w = img_size
    return int(h), int(w)
  return int(img_size), int(img_size)


def _row(layer: str, kind: str, tokens, flops: float, **parts) -> dict:
  row = dict(layer=layer, kind=kind, tokens=tokens, gflops=flops / GIGA)
  row.update({k: v / GIGA for k, v in parts.items()})
  return row


# --------------------------------------------------------------------------------------------
# ViM


def _vim_rows(spec: dict, img_size, pruning, *, cls_token: bool = True,
              head: bool = True) -> list[dict]:
  h, w = _hw(img_size)
  p = spec["patch_size"]
  gh, gw = h // p, w // p  # timm PatchEmbed: stride-p conv, no padding
  n0 = gh * gw + (1 if cls_token else 0)
  d = spec["embed_dim"]
  e = spec["expand"] * d
  n_state, r, k = spec["d_state"], spec["dt_rank"], spec["d_conv"]
  branches = spec["ssm_branches"]

  rows = [_row("patch_embed", "embed", gh * gw, gh * gw * d * spec["in_chans"] * p * p)]
  for b, (n, gaps) in enumerate(_token_plan(n0, spec["depth"], pruning, has_cls=cls_token), 1):
    linear = n * d + n * d * 2 * e + n * e * d  # RMSNorm, in_proj, out_proj
    branch_linear = n * e * k + n * e * (r + 2 * n_state) + n * r * e  # conv, x_proj, dt_proj
    scan = SCAN_FLOPS_PER_STATE * e * n_state * n + 2 * e * n  # + D skip, z gate
    align = GAP_FLOPS_PER_STATE * e * n_state * gaps
    rows.append(_row(f"block {b}", "block", n,
                     linear + branches * (branch_linear + scan + align),
                     linear_gflops=linear + branches * branch_linear,
                     scan_gflops=branches * scan, align_gflops=branches * align))
  # The head reads the cls token only; the final RMSNorm on it is noise (d FLOPs) but counted.
  if head:
    rows.append(_row("head", "head", 1, d + d * spec["num_classes"]))
  return rows


# --------------------------------------------------------------------------------------------
# PlainMamba


def _pm_rows(spec: dict, img_size, pruning, *, head: bool = True) -> list[dict]:
  h, w = _hw(img_size)
  c0, cin = spec["stem_channels"], spec["in_chans"]
  # Stem: 7x7 stride-2 conv (pad 3), then num_convs 3x3 convs at that resolution.
  sh, sw = (h + 1) // 2, (w + 1) // 2
  stem = sh * sw * c0 * cin * 49 + spec["num_convs_patch_embed"] * sh * sw * c0 * c0 * 9
  # Projection: (p/2)x(p/2) stride-(p/2) conv after corner padding, so the grid rounds up.
  q = spec["patch_size"] // 2
  gh, gw = -(-sh // q), -(-sw // q)
  n0 = gh * gw
  d = spec["embed_dim"]
  e = spec["expand"] * d
  proj = n0 * d * c0 * q * q
  n_state, r = spec["d_state"], spec["dt_rank"]
  dirs = spec["directions"]
  rows = [_row("stem", "embed", sh * sw, stem), _row("patch_embed", "embed", n0, proj)]

  for b, (n, gaps) in enumerate(_token_plan(n0, spec["depth"], pruning, has_cls=False), 1):
    # The depthwise conv runs on the H x W grid with the pruned positions zero-filled, so by
    # default it costs the full grid whatever the pruning (conv_full_grid=False: kept outputs).
    conv_tokens = n0 if spec["conv_full_grid"] else n
    linear = (n * d * 2 * e + conv_tokens * e * spec["conv_size"] ** 2
              + n * e * (r + 2 * n_state) + n * r * e + n * e * d)
    if b - 1 in spec["layers_with_dwconv"]:  # L1's 3x3 depthwise conv after the mixer
      linear += (n0 if spec["conv_full_grid"] else n) * d * spec["dwconv_size"] ** 2
    scan = dirs * (SCAN_FLOPS_PER_STATE * e * n_state * n + e * n)
    align = dirs * GAP_FLOPS_PER_STATE * e * n_state * gaps
    rows.append(_row(f"block {b}", "block", n, linear + scan + align, linear_gflops=linear,
                     scan_gflops=scan, align_gflops=align))
  # Mean pooling is free; the head is a linear layer on the pooled feature.
  if head:
    rows.append(_row("head", "head", 1, d * spec["num_classes"]))
  return rows


# --------------------------------------------------------------------------------------------
# Public API


def arch_of(name: str, **overrides) -> dict:
  """The architecture fields of classification model ``name`` with ``overrides``."""
  return _spec(name, overrides)[1]


def backbone_rows(name: str, img_size, pruning=None, *, depth: int, **overrides) -> list[dict]:
  """``block_table`` rows of ``name`` as a segmentation backbone: no cls token, no classifier,
  the first ``depth`` blocks."""
  key, spec = _spec(name, {**overrides, "depth": depth})
  if key in VIM_ARCHS:
    return _vim_rows(spec, img_size, pruning, cls_token=False, head=False)
  return _pm_rows(spec, img_size, pruning, head=False)


def block_table(name: str, img_size=224, pruning=None, **overrides) -> list[dict]:
  """Per-row FLOPs: patch embedding (and PlainMamba's stem), one row per block, the head.


  Each row: ``layer`` (label), ``kind`` ("embed" / "block" / "head"), ``tokens`` (sequence length
  the row runs on), ``gflops``; block rows also split it into ``linear_gflops`` (projections,
  convs, norm), ``scan_gflops`` and ``align_gflops`` (the alignment decay over pruned positions).
  """
  key, spec = _spec(name, overrides)
  h, w = _hw(img_size)
  p = spec["patch_size"]
  if min(h, w) < 1:
    raise ValueError(f"img_size {img_size} gives no patch tokens: give a positive image size")
  # ViM's strided patch embedding would drop the pixels past the last whole patch (the model
  # refuses such sizes); PlainMamba pads them, as its official patch embedding does.
  for side in sorted({h, w}) if key in VIM_ARCHS else []:
    if side < p:
      raise ValueError(f"img_size {img_size} gives no patch tokens for {key}: use an image size "
                       f"of at least its patch_size {p}")
    if side % p:
      raise ValueError(f"img_size {img_size} is not a multiple of {key}'s patch_size {p} (the "
                       f"model refuses such images, so their FLOPs are not counted): use "
                       f"{side // p * p} or {side // p * p + p}")
  if key in VIM_ARCHS:
    return _vim_rows(spec, img_size, pruning)
  return _pm_rows(spec, img_size, pruning)


def model_gflops(name: str, img_size=224, pruning=None, **overrides) -> float:
  """Total GFLOPs (multiply-adds) of one forward pass on one image.

  ``pruning`` is a toppax.pruning.PruneConfig or anything with ``layers`` (1-based blocks to prune
  after), ``keep_ratio`` (float or one per layer), ``alignment`` and ``fused_token``. Overrides
  replace architecture fields (``embed_dim``, ``depth``, ``d_state``, ...; ViM also
  ``ssm_branches``, PlainMamba ``conv_full_grid``).
  """
  return sum(row["gflops"] for row in block_table(name, img_size, pruning, **overrides))
