"""Pruning under jit with static shapes: importance scores, top-k selection, gathers, gaps.

Everything here is shape-static: the number of kept tokens is a Python int from the config,
so XLA compiles one graph per input shape (docs/pruning.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

FUSED = -1  # position id of an EViT fused token (not an image token)


def importance(y_f, y_b, mode: str):
  """Per-token score (batch, L) from the gated SSM outputs of both branches (sequence order).

  The paper scores the SSM output before out_proj: y = (y_f + y_b) / 2 (backward branch already
  in sequence order). "release" reproduces ZLKong/ToP-ViM: backward branch only, unclipped, and
  indexed in flipped order (score[j] belongs to token L-1-j but is used for token j).
  """
  if mode == "release":
    return jax.lax.stop_gradient(jnp.flip(jnp.sum(y_b.astype(jnp.float32), -1), axis=1))
  y = (y_f.astype(jnp.float32) + y_b.astype(jnp.float32)) / 2
  if mode == "clip":
    s = jnp.sum(jnp.maximum(y, 0.0), -1)
  elif mode == "l1":
    s = jnp.sum(jnp.abs(y), -1)
  elif mode == "l2":
    s = jnp.sqrt(jnp.sum(y * y, -1))
  elif mode == "raw":
    s = jnp.sum(y, -1)
  else:
    raise ValueError(f"unknown importance {mode!r}")
  return jax.lax.stop_gradient(s)


def take(x, idx):
  """Gathers tokens: x (batch, L, ...) at idx (batch, K) -> (batch, K, ...)."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def scatter(buffer, positions, values):
  """Writes tokens back to their places: ``buffer`` (batch, N, ...) with ``values`` (batch, K, ...)
  at ``positions`` (batch, K); positions outside [0, N) (an EViT fused token) are dropped."""
  batch, n = buffer.shape[:2]
  pos = jnp.where((positions >= 0) & (positions < n), positions, n)
  return buffer.at[jnp.arange(batch)[:, None], pos].set(values.astype(buffer.dtype), mode="drop")


def select_keep_position(scores, cls_index, k: int):
  """Indices (batch, k), sorted, of the cls token plus the k-1 best other tokens."""
  length = scores.shape[1]
  is_cls = jnp.arange(length)[None, :] == cls_index[:, None]
  _, idx = jax.lax.top_k(jnp.where(is_cls, jnp.inf, scores), k)
  return jnp.sort(idx, axis=-1)


def select_middle(scores, cls_index, k: int):
  """The release's selection: cls score masked (for every batch element, unlike the release),
  top k-1 other tokens sorted, cls re-inserted at index (k-1) // 2."""
  batch, length = scores.shape
  is_cls = jnp.arange(length)[None, :] == cls_index[:, None]
  _, idx = jax.lax.top_k(jnp.where(is_cls, -jnp.inf, scores), k - 1)
  idx = jnp.sort(idx, axis=-1)
  half = (k - 1) // 2
  return jnp.concatenate([idx[:, :half], cls_index[:, None].astype(idx.dtype), idx[:, half:]],
                         axis=1)


def fused_token(hidden, scores, idx):
  """EViT's fused token: importance-weighted mean of the tokens not in idx (batch, 1, dim)."""
  batch, length = scores.shape
  kept = jnp.zeros((batch, length), bool).at[jnp.arange(batch)[:, None], idx].set(True)
  w = jnp.where(kept, 0.0, jax.nn.softmax(jnp.where(kept, -jnp.inf, scores), axis=-1))
  return jnp.einsum("bl,bld->bd", w.astype(hidden.dtype), hidden)[:, None, :]


def alignment_gaps(positions, n_full: int):
  """Gaps of both scan directions from sorted original positions (batch, K).

  Forward: pruned positions between a kept token and the previous kept one; backward: between
  it and the next kept one (n_full is the original length). A fused token (position FUSED, last
  in the sequence) has no spatial place: its gaps are 0 and it does not interrupt the others.
  """
  is_img = positions >= 0
  pos = jnp.where(is_img, positions, n_full)  # fused token acts as the sequence end
  prev = jnp.concatenate([jnp.full_like(pos[:, :1], -1), pos[:, :-1]], axis=1)
  nxt = jnp.concatenate([pos[:, 1:], jnp.full_like(pos[:, :1], n_full)], axis=1)
  gaps_f = jnp.where(is_img, pos - prev - 1, 0)
  gaps_b = jnp.where(is_img, nxt - pos - 1, 0)
  return gaps_f.astype(jnp.int32), gaps_b.astype(jnp.int32)
