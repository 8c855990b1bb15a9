"""Vision Mamba (hustvl/Vim), the released ``*_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2``
variants, with ToP token pruning (toppax.pruning).

Mirrors vim/models_mamba.py (VisionMamba, Block with fused add + RMSNorm, residual in fp32,
cls token inserted at index M // 2 of the M patch tokens, head on the cls token).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from toppax.models.layers import DropPath, RMSNorm
from toppax.pruning import ops as prune_ops
from toppax.pruning.config import PruneConfig, kept_count
from toppax.ssm.mamba import BiMambaV2


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
  dtype: str = "float32"  # activation / matmul dtype; params, norms and scan state stay fp32
  scan_implementation: str | None = None
  # Run runs of identical blocks as one lax.scan over stacked parameters: compiles each block
  # body (and its scan kernels) once instead of `depth` times. Numerically identical.
  scan_layers: bool = True

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
    return self.num_patches + 1

  @property
  def cls_index(self) -> int:
    return self.num_patches // 2


def _trunc_normal(std):
  return lambda key, shape, dtype=jnp.float32: std * jax.random.truncated_normal(
      key, -2.0 / std, 2.0 / std, shape, dtype)


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
  """Add -> RMSNorm -> mixer, returning (mixer output, fp32 residual), as Vim's Block."""

  def __init__(self, cfg: ViMConfig, drop_path: float, *, gap_delta: str, rngs: nnx.Rngs):
    self.mixer = BiMambaV2(cfg.embed_dim, d_state=cfg.d_state, d_conv=cfg.d_conv,
                           expand=cfg.expand, n_layer=cfg.depth, dtype=jnp.dtype(cfg.dtype),
                           scan_implementation=cfg.scan_implementation, gap_delta=gap_delta,
                           rngs=rngs)
    self.norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_epsilon)
    self.drop_path = DropPath(drop_path, rngs=rngs)

  def __call__(self, hidden, residual, *, gaps_f=None, gaps_b=None):
    if residual is None:
      residual = hidden.astype(jnp.float32)
    else:
      residual = residual + self.drop_path(hidden).astype(jnp.float32)
    normed = self.norm(residual, out_dtype=self.mixer.dtype)
    out, ys = self.mixer(normed, gaps_f=gaps_f, gaps_b=gaps_b)
    return out, residual, ys


class VisionMamba(nnx.Module):
  """ViM classifier. ``model(images)`` takes NHWC float images and returns logits.

  With ``pruning`` (a PruneConfig), tokens are pruned after the configured blocks;
  ``model(images, return_info=True)`` also returns ``info`` with ``positions`` (one (B, K_i)
  int array per stage: the original token index of each token in sequence order, -1 for an
  EViT fused token) and ``scores`` (one (B, N_i) array per stage).
  """

  def __init__(self, cfg: ViMConfig, *, pruning: PruneConfig | None = None,
               rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    if cfg.img_size < cfg.patch_size:
      raise ValueError(f"img_size {cfg.img_size} is smaller than patch_size {cfg.patch_size}")
    if pruning is not None:
      pruning.validate(cfg.depth)
      pruning.token_counts(cfg.num_tokens)  # raises early if some stage would keep K < 1
    self.cfg = cfg
    self.pruning = pruning
    dim = cfg.embed_dim
    self.patch_embed = PatchEmbed(cfg, rngs=rngs)
    self.cls_token = nnx.Param(_trunc_normal(0.02)(rngs.params(), (1, 1, dim)))
    self.pos_embed = nnx.Param(_trunc_normal(0.02)(rngs.params(), (1, cfg.num_tokens, dim)))
    self.pos_drop = nnx.Dropout(cfg.drop_rate, deterministic=True, rngs=rngs)
    dpr = [0.0] + list(np.linspace(0, cfg.drop_path_rate, cfg.depth))  # Vim's inter_dpr quirk
    gap_delta = pruning.gap_delta if pruning is not None else "prev"
    self.layers = nnx.List([Block(cfg, float(dpr[i]), gap_delta=gap_delta, rngs=rngs)
                            for i in range(cfg.depth)])
    self.norm_f = RMSNorm(dim, eps=cfg.norm_epsilon)
    self.drop_path = DropPath(cfg.drop_path_rate, rngs=rngs)
    self.head = nnx.Linear(dim, cfg.num_classes, param_dtype=jnp.float32,
                           kernel_init=_trunc_normal(0.02), bias_init=nnx.initializers.zeros,
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

  def embed(self, images):
    cfg = self.cfg
    x = self.patch_embed(images.astype(jnp.dtype(cfg.dtype)))
    b = x.shape[0]
    c = cfg.cls_index
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, cfg.embed_dim))
    x = jnp.concatenate([x[:, :c], cls, x[:, c:]], axis=1)
    return self.pos_drop(x + self.pos_embed[...].astype(x.dtype))

  def __call__(self, images, *, return_info: bool = False):
    self._check_images(images)
    return self._forward(images, return_info=return_info)

  # Compiled as a whole: op-by-op dispatch of 2 x depth scans is slow, and under an outer jit
  # (the functional train step) this nests at no cost.
  @nnx.jit(static_argnames=("return_info",))
  def _forward(self, images, *, return_info: bool = False):
    cfg, pr = self.cfg, self.pruning
    hidden = self.embed(images)
    batch, n_full = hidden.shape[0], hidden.shape[1]
    positions = jnp.broadcast_to(jnp.arange(n_full, dtype=jnp.int32), (batch, n_full))
    prune_at = dict(zip(pr.layers, pr.ratios)) if pr is not None else {}
    info = {"positions": [], "scores": [], "tokens": [n_full]}
    # Block 0 adds its (zero) input to the residual stream: exactly Vim's "residual = hidden"
    # start, in the same form as every other block, so all blocks can share one scan body.
    residual = hidden.astype(jnp.float32)
    hidden = jnp.zeros_like(hidden)
    gaps_f, gaps_b = None, None
    start = 0
    for p in sorted(prune_at) + [None]:
      stop = cfg.depth if p is None else p - 1
      hidden, residual = self._run_blocks(range(start, stop), hidden, residual, gaps_f, gaps_b)
      if p is None:
        break
      hidden, residual, (y_f, y_b) = self.layers[p - 1](hidden, residual, gaps_f=gaps_f,
                                                        gaps_b=gaps_b)
      start, i = p, p - 1
      scores = prune_ops.importance(y_f, y_b, pr.importance)
      k = kept_count(hidden.shape[1], prune_at[i + 1], has_cls=True)
      cls_seq = jnp.argmax(positions == cfg.cls_index, axis=1)
      if pr.cls_mode == "middle":
        idx = prune_ops.select_middle(scores, cls_seq, k)
      else:
        idx = prune_ops.select_keep_position(scores, cls_seq, k)
      new_hidden = prune_ops.take(hidden, idx)
      new_residual = prune_ops.take(residual, idx)
      new_positions = prune_ops.take(positions, idx)
      if pr.fused_token and k < hidden.shape[1]:
        new_hidden = jnp.concatenate(
            [new_hidden, prune_ops.fused_token(hidden, scores, idx)], axis=1)
        new_residual = jnp.concatenate(
            [new_residual, prune_ops.fused_token(residual, scores, idx)], axis=1)
        new_positions = jnp.concatenate(
            [new_positions, jnp.full((batch, 1), prune_ops.FUSED, jnp.int32)], axis=1)
      hidden, residual, positions = new_hidden, new_residual, new_positions
      if pr.alignment:
        gaps_f, gaps_b = prune_ops.alignment_gaps(positions, n_full)
      info["positions"].append(positions)
      info["scores"].append(scores)
      info["tokens"].append(hidden.shape[1])
    residual = residual + self.drop_path(hidden).astype(jnp.float32)
    hidden = self.norm_f(residual, out_dtype=jnp.float32)
    # The cls token's place in the sequence: fixed without pruning, per sample after it.
    cls_seq = jnp.argmax(positions == cfg.cls_index, axis=1)
    feature = jnp.take_along_axis(hidden, cls_seq[:, None, None], axis=1)[:, 0]
    logits = self.head(feature)
    return (logits, info) if return_info else logits

  def _run_blocks(self, ids, hidden, residual, gaps_f, gaps_b):
    """Blocks ``ids`` in order; a ``lax.scan`` over their stacked state when they share a graph."""
    layers = [self.layers[i] for i in ids]
    graphdef = nnx.graphdef(layers[0]) if layers else None
    if (len(layers) < 2 or not self.cfg.scan_layers
        or any(nnx.graphdef(l) != graphdef for l in layers[1:])):
      for layer in layers:
        hidden, residual, _ = layer(hidden, residual, gaps_f=gaps_f, gaps_b=gaps_b)
      return hidden, residual
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(l) for l in layers])

    def body(carry, state):
      layer = nnx.merge(graphdef, state)
      h, r, _ = layer(*carry, gaps_f=gaps_f, gaps_b=gaps_b)
      return (h, r), nnx.state(layer, nnx.RngState)  # advanced drop-path streams

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
