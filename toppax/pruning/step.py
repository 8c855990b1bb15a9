"""One ToP pruning step between two blocks, shared by ViM and PlainMamba.

The token sequence travels between blocks as ``Tokens``: the stream each block reads
(``hidden``), ViM's separate fp32 residual stream (``residual``, None for PlainMamba) and where
each token came from (``positions``: its index in the unpruned sequence; ``FUSED`` for an EViT
fused token). ``prune`` scores the tokens from the last block's SSM outputs, keeps the best
``K`` (a Python int from the static length and the keep ratio), gathers every stream, appends the
fused token of the EViT baseline and returns the alignment gaps of the new sequence. Shapes are
static throughout, so XLA compiles one graph per input shape (docs/pruning.md).

``TokenRestorer`` serves dense heads: it keeps, for every position of the unpruned sequence, the
last ``hidden`` that position had, so a feature map of every position can be read at any block.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from toppax.pruning import ops
from toppax.pruning.config import PruneConfig, kept_count


class Tokens(NamedTuple):
  hidden: jax.Array                 # (batch, L, dim): the stream the next block reads
  residual: jax.Array | None        # (batch, L, dim) fp32 residual stream (ViM), or None
  positions: jax.Array              # (batch, L) int32 index in the unpruned sequence


class Pruned(NamedTuple):
  """What one pruning step decided: the scores it used (batch, L before), the kept positions
  (batch, K, sequence order) and, with alignment, the gaps of both scan directions."""
  scores: jax.Array
  positions: jax.Array
  gaps: tuple[jax.Array, jax.Array] | None


def full_positions(batch: int, length: int) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def _select(scores, positions, k: int, config: PruneConfig, cls_position: int | None):
  """Indices (batch, k) into the current sequence: the cls token (when there is one) kept as
  ``config.cls_mode`` says, the other places taken by the best scores, in sequence order."""
  if cls_position is None:
    _, idx = jax.lax.top_k(scores, k)
    return jnp.sort(idx, axis=-1)
  cls_seq = jnp.argmax(positions == cls_position, axis=1)   # the cls token's place, per sample
  if config.cls_mode == "middle":
    return ops.select_middle(scores, cls_seq, k)
  return ops.select_keep_position(scores, cls_seq, k)


def prune(tokens: Tokens, scan_outputs, keep_ratio: float, config: PruneConfig, *,
          n_full: int, cls_position: int | None = None,
          restorer: "TokenRestorer | None" = None) -> tuple[Tokens, Pruned]:
  """Prunes ``tokens`` after a block.

  Args:
    tokens: the sequence after the block.
    scan_outputs: ``(y_f, y_b)``, the block's gated SSM outputs before out_proj in sequence
      order (ViM's two branches; PlainMamba passes its summed directions twice).
    keep_ratio: fraction of the prunable tokens kept (``kept_count``).
    config: importance, cls handling, alignment and the EViT fused token.
    n_full: the unpruned sequence length (the positions' range).
    cls_position: the cls token's position in the unpruned sequence (ViM classification), or
      None when every token is prunable.
    restorer: a ``TokenRestorer`` to record the tokens this step drops (dense heads), or None.
  Returns:
    the pruned ``Tokens`` and the step's ``Pruned`` record. The gaps count the pruned positions
    before (forward scan) and after (backward scan) each kept token in sequence order; models
    whose scans run in another order (PlainMamba's zig-zags) derive theirs from the positions.
  """
  length = tokens.hidden.shape[1]
  scores = ops.importance(*scan_outputs, config.importance)
  k = kept_count(length, keep_ratio, has_cls=cls_position is not None)
  if k == length:
    # Keeping every token selects them all in their order: the step is the identity (known
    # statically), and skipping it keeps the graph, and so the numbers, of the unpruned model.
    gaps = ops.alignment_gaps(tokens.positions, n_full) if config.alignment else None
    return tokens, Pruned(scores, tokens.positions, gaps)
  if restorer is not None:
    restorer.before_prune(tokens, n_full)
  idx = _select(scores, tokens.positions, k, config, cls_position)
  kept = Tokens(ops.take(tokens.hidden, idx),
                None if tokens.residual is None else ops.take(tokens.residual, idx),
                ops.take(tokens.positions, idx))
  if config.fused_token and k < length:
    fuse = lambda x, kept_x: jnp.concatenate([kept_x, ops.fused_token(x, scores, idx)], axis=1)
    batch = tokens.positions.shape[0]
    kept = Tokens(fuse(tokens.hidden, kept.hidden),
                  None if tokens.residual is None else fuse(tokens.residual, kept.residual),
                  jnp.concatenate([kept.positions, jnp.full((batch, 1), ops.FUSED, jnp.int32)],
                                  axis=1))
  gaps = ops.alignment_gaps(kept.positions, n_full) if config.alignment else None
  return kept, Pruned(scores, kept.positions, gaps)


class TokenRestorer:
  """Token restoration for dense prediction: a feature of every position of the unpruned
  sequence at any block, with static shapes.

  A kept token contributes its current ``hidden``; a pruned position keeps the ``hidden`` it had
  when it was pruned (``before_prune`` records every current token just before a step, so the
  positions that step drops keep that value). Before the first step nothing is stored: the
  sequence is still whole and in order.
  """

  def __init__(self):
    self.buffer = None

  def before_prune(self, tokens: Tokens, n_full: int) -> None:
    if self.buffer is None:
      batch, _, dim = tokens.hidden.shape
      self.buffer = jnp.zeros((batch, n_full, dim), tokens.hidden.dtype)
    self.buffer = ops.scatter(self.buffer, tokens.positions, tokens.hidden)

  def read(self, tokens: Tokens) -> jax.Array:
    """(batch, n_full, dim): every position's feature, in the unpruned sequence's order."""
    if self.buffer is None:
      return tokens.hidden
    return ops.scatter(self.buffer, tokens.positions, tokens.hidden)
