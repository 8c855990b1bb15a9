"""Vision Mamba (hustvl/Vim), the released ``*_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2``
variants, with ToP token pruning (toppax.pruning).

Mirrors vim/models_mamba.py (VisionMamba, Block with fused add + RMSNorm, residual in fp32,
cls token inserted at index M // 2 of the M patch tokens, head on the cls token).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from toppax.models.layers import DropPath, RMSNorm, trunc_normal
from toppax.pruning import PruneConfig, TokenRestorer, Tokens, full_positions, prune
from toppax.ssm.mamba import BiMambaV2


REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_CHOICES = (*REMAT_POLICIES, "auto")


def remat_policy(remat: str) -> str:
  """``remat`` with "auto" resolved for the backend this traces for."""
  if remat == "auto":
    return "block" if jax.default_backend() == "gpu" else "none"
  return remat


@dataclasses.dataclass(frozen=True)
class ViMConfig:
  img_size: int = 224
  patch_size: int = 16
  stride: int | None = None  # None: = patch_size (the released models)
  depth: int = 24
  embed_dim: int = 192
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  channels: int = 3
  num_classes: int = 1000
  drop_rate: float = 0.0
  drop_path_rate: float = 0.1
  norm_epsilon: float = 1e-5
  # False: Vim's segmentation backbone (no cls token; the position embedding has no cls row).
  cls_token: bool = True
  # Rotary position embedding of the hidden states and the residual before every block
  # (Vim's if_rope + if_rope_residual, used by its ViM-S segmentation config).
  rope: bool = False
  # False: the two scan branches are summed, not averaged (Vim's if_divide_out=False).
  divide_out: bool = True
  dtype: str = "float32"  # activation / matmul dtype; params, norms and scan state stay fp32
  scan_implementation: str | None = None
  # Run runs of identical blocks as one lax.scan over stacked parameters: compiles each block
  # body (and its scan kernels) once instead of `depth` times. Numerically identical.
  scan_layers: bool = True
  # Rematerialisation in training: "none" keeps every block's activations for the backward;
  # "block" keeps only each block's inputs and recomputes the block in the backward; "dots"
  # keeps the matmul outputs and recomputes the rest; "auto": "block" on GPUs, "none"
  # elsewhere. On an H100 (ViM-S, bf16, batch 128) "block" trains faster than "none" and needs
  # a tenth of the memory: the step is bound by memory traffic, which recomputing saves
  # (docs/RESULTS.md#training-step); on a CPU the extra forward costs time.
  remat: str = "auto"

  def __post_init__(self):
    check_image_size(self.img_size, self.patch_size, self.stride)
    if self.remat not in REMAT_CHOICES:
      raise ValueError(f"remat must be one of {sorted(REMAT_CHOICES)}, got {self.remat!r}")
    if self.rope and (self.cls_token or self.num_patches % 2):
      raise ValueError(f"rope=True needs an even number of patch tokens and no cls token (as "
                       f"Vim's segmentation backbone); got {self.num_patches} patches, "
                       f"cls_token={self.cls_token}")

  @property
  def grid(self) -> tuple[int, int]:
    s = self.stride or self.patch_size
    g = (self.img_size - self.patch_size) // s + 1
    return g, g

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def num_tokens(self) -> int:
    return self.num_patches + (1 if self.cls_token else 0)

  @property
  def cls_index(self) -> int:
    return self.num_patches // 2


def check_image_size(img_size: int, patch_size: int, stride: int | None = None) -> None:
  """Raises unless the patch embedding covers an ``img_size`` image exactly: Vim's strided conv
  would drop the pixels past the last whole patch without a word."""
  s = stride or patch_size
  if img_size < patch_size or (img_size - patch_size) % s:
    lo = max(patch_size, patch_size + (img_size - patch_size) // s * s)
    what = (f"a multiple of patch_size {patch_size}" if s == patch_size else
            f"patch_size {patch_size} plus a multiple of the stride {s}")
    raise ValueError(f"img_size {img_size} is not {what}: the patch embedding would "
                     f"{'see no patch' if img_size < patch_size else 'drop the last pixels'}. "
                     f"Use img_size {lo} or {lo + s} (and resize the images to it)")


def rope_tables(embed_dim: int, grid: int, pt_seq_len: int = 14):
  """``(cos, sin)``, each (grid * grid, embed_dim) float32: Vim's
  ``VisionRotaryEmbeddingFast(dim=embed_dim // 2, pt_seq_len=14, ft_seq_len=grid)``. Per token
  (row-major), the first half of the channels rotates with the row, the second half with the
  column; channel pairs (2k, 2k + 1) share one frequency, 10000 ** (-4k / embed_dim), at
  positions ``arange(grid) / grid * 14``."""
  d = embed_dim // 2
  freqs = 1.0 / 10000.0 ** (np.arange(0, d, 2)[:d // 2].astype(np.float32) / np.float32(d))
  t = np.arange(grid, dtype=np.float32) / np.float32(grid) * np.float32(pt_seq_len)
  f = np.repeat(np.outer(t, freqs), 2, axis=-1)                       # (grid, d)
  rows = np.broadcast_to(f[:, None, :], (grid, grid, d))
  cols = np.broadcast_to(f[None, :, :], (grid, grid, d))
  table = np.concatenate([rows, cols], axis=-1).reshape(grid * grid, 2 * d).astype(np.float32)
  return np.cos(table), np.sin(table)


def apply_rope(x, cos, sin):
  """``x cos + rotate_half(x) sin`` with rotate_half((x0, x1)) = (-x1, x0) per channel pair."""
  pairs = x.reshape(x.shape[:-1] + (-1, 2))
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return x * cos + rotated * sin


class PatchEmbed(nnx.Module):

  def __init__(self, cfg: ViMConfig, *, rngs: nnx.Rngs):
    p, s = cfg.patch_size, cfg.stride or cfg.patch_size
    self.proj = nnx.Conv(cfg.channels, cfg.embed_dim, kernel_size=(p, p), strides=(s, s),
                         padding="VALID", dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32,
                         kernel_init=nnx.initializers.lecun_normal(),
                         bias_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, x):
    x = self.proj(x)                       # (B, gh, gw, dim): row-major flatten == torch's
    return x.reshape(x.shape[0], -1, x.shape[-1])


class Block(nnx.Module):
  """Add -> RMSNorm -> mixer, as Vim's Block. Returns (mixer output, fp32 residual, (y_f, y_b)):
  the residual stream before the mixer output is added, and the mixer's gated SSM outputs (what
  ToP's importance scores)."""

  def __init__(self, cfg: ViMConfig, drop_path: float, *, gap_delta: str, rngs: nnx.Rngs):
    self.mixer = BiMambaV2(cfg.embed_dim, d_state=cfg.d_state, d_conv=cfg.d_conv,
                           expand=cfg.expand, n_layer=cfg.depth, dtype=jnp.dtype(cfg.dtype),
                           scan_implementation=cfg.scan_implementation, gap_delta=gap_delta,
                           divide_out=cfg.divide_out, rngs=rngs)
    self.norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_epsilon)
    self.drop_path = DropPath(drop_path, rngs=rngs)

  def __call__(self, hidden, residual, *, gaps_f=None, gaps_b=None, rope=None):
    """``rope``: the (cos, sin) tables of the tokens' positions, or None. Vim rotates the hidden
    states and the residual before the add; the rotation is linear, so rotating the sum is the
    same."""
    if residual is None:
      residual = hidden.astype(jnp.float32)
    else:
      residual = residual + self.drop_path(hidden).astype(jnp.float32)
    if rope is not None:
      residual = apply_rope(residual, *rope)
    normed = self.norm(residual, out_dtype=self.mixer.dtype)
    out, ys = self.mixer(normed, gaps_f=gaps_f, gaps_b=gaps_b)
    return out, residual, ys


class VisionMamba(nnx.Module):
  """ViM: ``model(images)`` takes NHWC float images and returns logits.

  The forward reads as the data flows: embed -> for each stage: blocks -> (pruning step) -> ...
  -> final norm -> head on the cls token. With ``pruning`` (a PruneConfig), tokens are pruned
  after the configured blocks; ``model(images, return_info=True)`` also returns ``info`` with
  ``positions`` (one (B, K_i) int array per stage: the original token index of each token in
  sequence order, -1 for an EViT fused token), ``scores`` (one (B, N_i) array per stage) and
  ``tokens`` (the sequence lengths).

  ``cls_token=False`` builds the segmentation backbone (no cls token, every token prunable) and
  ``num_classes=0`` no classifier head; ``forward_features`` reads the blocks' outputs as maps.
  """

  def __init__(self, cfg: ViMConfig, *, pruning: PruneConfig | None = None,
               rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    if pruning is not None:
      pruning.validate(cfg.depth)
      # Raises now if some stage would keep K < 1.
      pruning.token_counts(cfg.num_tokens, has_cls=cfg.cls_token)
    self.cfg = cfg
    self.pruning = pruning
    dim = cfg.embed_dim
    self.patch_embed = PatchEmbed(cfg, rngs=rngs)
    if cfg.cls_token:
      self.cls_token = nnx.Param(trunc_normal(0.02)(rngs.params(), (1, 1, dim)))
    self.pos_embed = nnx.Param(trunc_normal(0.02)(rngs.params(), (1, cfg.num_tokens, dim)))
    self.pos_drop = nnx.Dropout(cfg.drop_rate, deterministic=True, rngs=rngs)
    dpr = [0.0] + list(np.linspace(0, cfg.drop_path_rate, cfg.depth))  # Vim's inter_dpr quirk
    gap_delta = pruning.gap_delta if pruning is not None else "prev"
    self.layers = nnx.List([Block(cfg, float(dpr[i]), gap_delta=gap_delta, rngs=rngs)
                            for i in range(cfg.depth)])
    self.norm_f = RMSNorm(dim, eps=cfg.norm_epsilon)
    self.drop_path = DropPath(cfg.drop_path_rate, rngs=rngs)
    if cfg.num_classes:
      self.head = nnx.Linear(dim, cfg.num_classes, param_dtype=jnp.float32,
                             kernel_init=trunc_normal(0.02), bias_init=nnx.initializers.zeros,
                             rngs=rngs)

  def _check_images(self, images):
    cfg = self.cfg
    want = (cfg.img_size, cfg.img_size, cfg.channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
      got = tuple(images.shape)
      if images.ndim != 4:
        fix = "pass a 4-D batch (batch, H, W, C)"
      elif got[1] == cfg.channels and got[3] != cfg.channels:
        fix = "the images look channels-first (NCHW): transpose them with x.transpose(0, 2, 3, 1)"
      elif got[3] != cfg.channels:
        fix = f"give the images {cfg.channels} channels"
      else:
        fix = f"resize the images or create the model with img_size={got[1]}"
      raise ValueError(
          f"expected NHWC images of shape (batch, {cfg.img_size}, {cfg.img_size}, {cfg.channels})"
          f" for this model (img_size={cfg.img_size}), got {got}; {fix}")

  def embed(self, images) -> Tokens:
    """Patch tokens (cls token at index M // 2 when there is one) plus the position embedding,
    as the start of the residual stream. Block 0 adds its (zero) input to that stream: exactly
    Vim's "residual = hidden" start, in the same form as every other block, so all blocks can
    share one scan body."""
    cfg = self.cfg
    x = self.patch_embed(images.astype(jnp.dtype(cfg.dtype)))
    b = x.shape[0]
    if cfg.cls_token:
      c = cfg.cls_index
      cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, cfg.embed_dim))
      x = jnp.concatenate([x[:, :c], cls, x[:, c:]], axis=1)
    x = self.pos_drop(x + self.pos_embed[...].astype(x.dtype))
    return Tokens(jnp.zeros_like(x), x.astype(jnp.float32), full_positions(b, x.shape[1]))

  def __call__(self, images, *, return_info: bool = False):
    self._check_images(images)
    if not self.cfg.num_classes:
      raise ValueError("this ViM has no classifier head (num_classes=0): use "
                       "forward_features(images, taps=...)")
    return self._classify(images, return_info=return_info)

  def forward_features(self, images, *, taps):
    """The outputs of blocks ``taps`` (0-based) as NHWC maps (batch, grid_h, grid_w, dim):
    each block's mixer output (what Vim's segmentation backbone taps), in the activation dtype.
    When pruned, every position of the grid is filled: kept tokens with their own output, pruned
    ones with the output they had when they were pruned (``toppax.pruning.TokenRestorer``).
    Returns ``(maps, info)``, ``info`` as ``model(images, return_info=True)``'s."""
    self._check_images(images)
    taps = tuple(sorted(int(t) for t in taps))
    bad = [t for t in taps if not 0 <= t < self.cfg.depth]
    if bad:
      raise ValueError(f"taps {bad} outside the blocks 0..{self.cfg.depth - 1} (0-based)")
    return self._features(images, taps=taps)

  # Compiled as a whole: op-by-op dispatch of 2 x depth scans is slow, and under an outer jit
  # (the functional train step) this nests at no cost.
  @nnx.jit(static_argnames=("return_info",))
  def _classify(self, images, *, return_info: bool = False):
    tokens, info, _ = self._encode(images, taps=())
    residual = tokens.residual + self.drop_path(tokens.hidden).astype(jnp.float32)
    normed = self.norm_f(residual, out_dtype=jnp.float32)
    # The cls token's place in the sequence: fixed without pruning, per sample after it.
    cls_seq = jnp.argmax(tokens.positions == self.cfg.cls_index, axis=1)
    logits = self.head(jnp.take_along_axis(normed, cls_seq[:, None, None], axis=1)[:, 0])
    return (logits, info) if return_info else logits

  @nnx.jit(static_argnames=("taps",))
  def _features(self, images, *, taps):
    _, info, maps = self._encode(images, taps=taps)
    return maps, info

  def _encode(self, images, taps):
    """embed -> blocks, pruned after the configured blocks, read out after ``taps``.

    Returns (the tokens after the last block, info, maps at the taps)."""
    cfg, pr = self.cfg, self.pruning
    tokens = self.embed(images)
    n_full = tokens.hidden.shape[1]
    cls_position = cfg.cls_index if cfg.cls_token else None
    prune_after = dict(zip(pr.layers, pr.ratios)) if pr is not None else {}
    info = {"positions": [], "scores": [], "tokens": [n_full]}
    restorer = TokenRestorer() if taps else None
    maps, gaps, done = [], None, 0
    # Feature maps need no block after the last tap.
    end = taps[-1] + 1 if taps else cfg.depth
    # Stage boundaries, counted in blocks done: after a tapped block and before a pruning step.
    for stop in sorted(b for b in {t + 1 for t in taps} | set(prune_after) if b <= end):
      tokens, scan_outputs = self._run_blocks(range(done, stop), tokens, gaps,
                                              scan_outputs=stop in prune_after)
      done = stop
      if stop - 1 in taps:
        maps.append(self._to_map(restorer.read(tokens)))
      if stop in prune_after:
        tokens, step = prune(tokens, scan_outputs, prune_after[stop], pr, n_full=n_full,
                             cls_position=cls_position, restorer=restorer)
        gaps = step.gaps
        info["positions"].append(step.positions)
        info["scores"].append(step.scores)
        info["tokens"].append(tokens.hidden.shape[1])
    tokens, _ = self._run_blocks(range(done, end), tokens, gaps, scan_outputs=False)
    return tokens, info, maps

  def _to_map(self, full):
    """(batch, num_tokens, dim) in sequence order -> (batch, grid_h, grid_w, dim), cls dropped."""
    cfg = self.cfg
    if cfg.cls_token:
      c = cfg.cls_index
      full = jnp.concatenate([full[:, :c], full[:, c + 1:]], axis=1)
    return full.reshape(full.shape[0], *cfg.grid, full.shape[-1])

  def _run_blocks(self, ids, tokens: Tokens, gaps, *, scan_outputs: bool):
    """Blocks ``ids`` in order. Returns the tokens after the last block and, with
    ``scan_outputs``, that block's gated SSM outputs ``(y_f, y_b)`` (what the pruning step
    scores), else None.

    Runs of blocks that share a graph go through one ``lax.scan`` over their stacked state. The
    block whose scan outputs are wanted runs after that scan, on its own: a scan body that also
    returned them would compile to another XLA program, which rounds differently (a keep-all
    pruning step would then not reproduce the dense model bit for bit)."""
    ids = list(ids)
    last = ids.pop() if scan_outputs and ids else None
    rope = self._rope(tokens.positions)
    hidden, residual = self._scan_blocks(ids, tokens.hidden, tokens.residual, gaps, rope)
    ys = None
    if last is not None:
      gaps_f, gaps_b = gaps if gaps is not None else (None, None)
      hidden, residual, ys = self.layers[last](hidden, residual, gaps_f=gaps_f, gaps_b=gaps_b,
                                               rope=rope)
    return tokens._replace(hidden=hidden, residual=residual), ys

  def _rope(self, positions):
    """The RoPE (cos, sin) rows of the tokens at ``positions`` (batch, L), or None."""
    if not self.cfg.rope:
      return None
    cos, sin = rope_tables(self.cfg.embed_dim, self.cfg.grid[0])
    return jnp.asarray(cos)[positions], jnp.asarray(sin)[positions]

  def _scan_blocks(self, ids, hidden, residual, gaps, rope=None):
    """Blocks ``ids``; a ``lax.scan`` over their stacked state when they share a graph (compiles
    the block body, and its scan kernels, once instead of once per block)."""
    gaps_f, gaps_b = gaps if gaps is not None else (None, None)
    layers = [self.layers[i] for i in ids]
    graphdef = nnx.graphdef(layers[0]) if layers else None
    if (len(layers) < 2 or not self.cfg.scan_layers
        or any(nnx.graphdef(l) != graphdef for l in layers[1:])):
      for layer in layers:
        hidden, residual, _ = layer(hidden, residual, gaps_f=gaps_f, gaps_b=gaps_b, rope=rope)
      return hidden, residual
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(l) for l in layers])

    def body(carry, state):
      layer = nnx.merge(graphdef, state)
      h, r, _ = layer(*carry, gaps_f=gaps_f, gaps_b=gaps_b, rope=rope)
      return (h, r), nnx.state(layer, nnx.RngState)  # advanced drop-path streams

    remat = remat_policy(self.cfg.remat)
    if remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
    (hidden, residual), rng_states = jax.lax.scan(body, (hidden, residual), stacked)
    for j, layer in enumerate(layers):
      nnx.update(layer, jax.tree.map(lambda x: x[j], rng_states))
    return hidden, residual


VARIANTS = {
    "vim_t": dict(embed_dim=192),
    "vim_s": dict(embed_dim=384),
    "vim_b": dict(embed_dim=768),
}

OFFICIAL_NAMES = {
    "vim_t": "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "vim_s": "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
    "vim_b": "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2",
}


def config_for(name: str, **overrides) -> ViMConfig:
  fields = {f.name for f in dataclasses.fields(ViMConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(f"unknown ViM override(s) {unknown}; valid: {sorted(fields)}")
  return ViMConfig(**{**VARIANTS[name], **overrides})
