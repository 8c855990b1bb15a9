"""Small building blocks shared by the models (RMSNorm with fp32 math, stochastic depth)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
  """RMSNorm as mamba-ssm's reference: fp32 math, ``x * rsqrt(mean(x^2) + eps) * weight``."""

  def __init__(self, dim: int, *, eps: float = 1e-5):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))

  def __call__(self, x, out_dtype=None):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.weight[...]).astype(out_dtype or x.dtype)


class DropPath(nnx.Module):
  """Stochastic depth per sample (timm's DropPath); inactive when ``deterministic``.

  The rate is state (a Variable), not a static attribute, so blocks that differ only in their
  drop-path rate share one graph definition and can be stacked and scanned (ViM's layer scan).
  """

  def __init__(self, rate: float, *, rngs: nnx.Rngs | None = None, deterministic: bool = True):
    self.rate = nnx.Variable(jnp.asarray(rate, jnp.float32))
    self.deterministic = deterministic
    self.rngs = rngs["dropout"].fork() if rngs is not None else nnx.data(None)

  def __call__(self, x):
    if self.deterministic:
      return x
    if self.rngs is None:
      raise ValueError("DropPath in training mode needs rngs with a 'dropout' stream")
    keep = 1.0 - self.rate[...]
    mask = jax.random.bernoulli(self.rngs(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def trunc_normal(std: float):
  """timm's ``trunc_normal_(std=std)`` initialiser: N(0, std) truncated at +-2 (absolute)."""
  return lambda key, shape, dtype=jnp.float32: std * jax.random.truncated_normal(
      key, -2.0 / std, 2.0 / std, shape, dtype)
