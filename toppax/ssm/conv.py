"""Depthwise causal 1-D convolution (Mamba's short conv), channels-last, both directions."""
from __future__ import annotations

import jax.numpy as jnp


def causal_conv1d(x, kernel, bias=None, *, reverse=False):
  """``out[t] = sum_k kernel[k] * x[t - (W-1) + k] + bias`` (zero padded), per channel.

  x: (batch, L, D); kernel: (W, D) (official torch weight (D, 1, W) transposed); bias: (D,).
  ``reverse=True`` is the same convolution run over the flipped sequence and flipped back
  (ViM's backward branch), computed without materialising flipped copies.
  """
  width = kernel.shape[0]
  length = x.shape[1]
  pad = [(0, 0), (width - 1, 0) if not reverse else (0, width - 1), (0, 0)]
  xp = jnp.pad(x, pad)
  out = jnp.zeros(x.shape, jnp.promote_types(x.dtype, kernel.dtype))
  for k in range(width):
    # Forward: tap k reads x[t - (W-1) + k]; reverse: the mirrored tap reads x[t + (W-1) - k].
    start = k if not reverse else width - 1 - k
    out = out + xp[:, start:start + length, :] * kernel[k]
  if bias is not None:
    out = out + bias
  return out.astype(x.dtype)
