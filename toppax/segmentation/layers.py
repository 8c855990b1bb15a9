"""Building blocks of the segmentation heads, with mmsegmentation / mmcv 1.x semantics in NHWC:
torch-style BatchNorm (SyncBN over a named axis), ConvModule (conv -> BN -> ReLU), bilinear
resize (``F.interpolate(mode="bilinear", align_corners=False)``) and adaptive average pooling."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class BatchNorm(nnx.BatchNorm):
  """torch ``BatchNorm2d`` / ``SyncBatchNorm`` on the last axis: eps 1e-5, momentum 0.1.

  Evaluation (``use_running_average``) normalises with the running statistics (nnx.BatchNorm).
  Training normalises with the batch mean and biased variance, taken over ``axis_name`` too when
  given (SyncBN across a data-parallel ``shard_map`` axis), and updates the running variance with
  the *unbiased* batch variance, as torch does (nnx.BatchNorm would use the biased one; it
  matters where few values are pooled, e.g. the 1x1 pyramid-pooling branch).
  """

  def __init__(self, num_features: int, *, axis_name: str | None = None, dtype=None,
               rngs: nnx.Rngs):
    super().__init__(num_features, use_running_average=True, momentum=0.9, epsilon=1e-5,
                     dtype=dtype, param_dtype=jnp.float32, axis_name=axis_name,
                     use_fast_variance=False, rngs=rngs)

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average:
      return super().__call__(x, use_running_average=True)
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    n = math.prod(x.shape[:-1])
    mean = jnp.mean(xf, axes)
    if self.axis_name is not None:
      mean = jax.lax.pmean(mean, self.axis_name)
      n = n * jax.lax.psum(1, self.axis_name)
    elif n < 2:
      raise ValueError(
          f"BatchNorm in training mode needs more than one value per channel, got input "
          f"{tuple(x.shape)}: use a larger batch, or synchronise the statistics over the "
          "data-parallel devices (create(..., bn_axis_name=<the shard_map axis>))")
    var = jnp.mean(jnp.square(xf - mean), axes)
    if self.axis_name is not None:
      var = jax.lax.pmean(var, self.axis_name)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * self.scale[...] + self.bias[...]
    m = self.momentum
    self.mean[...] = m * self.mean[...] + (1 - m) * mean
    self.var[...] = m * self.var[...] + (1 - m) * var * (n / (n - 1))
    return y.astype(self.dtype or x.dtype)


def _kaiming_fan_out_relu(key, shape, dtype=jnp.float32):
  # mmcv ConvModule.init_weights: kaiming_init(mode="fan_out", nonlinearity="relu", normal).
  kh, kw, _, cout = shape
  std = math.sqrt(2.0) / math.sqrt(cout * kh * kw)
  return std * jax.random.normal(key, shape, dtype)


class ConvModule(nnx.Module):
  """mmcv ``ConvModule(conv_cfg=None, norm_cfg=SyncBN, act_cfg=ReLU)``: a bias-free conv (the
  norm follows), BatchNorm, ReLU. Parameter names follow the official ``conv`` / ``bn``."""

  def __init__(self, cin: int, cout: int, kernel_size: int, *, padding: int = 0,
               bn_axis_name: str | None = None, dtype=None, rngs: nnx.Rngs):
    self.conv = nnx.Conv(cin, cout, kernel_size=(kernel_size, kernel_size),
                         padding=((padding, padding), (padding, padding)), use_bias=False,
                         dtype=dtype, param_dtype=jnp.float32, kernel_init=_kaiming_fan_out_relu,
                         rngs=rngs)
    self.bn = BatchNorm(cout, axis_name=bn_axis_name, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def resize(x, size: tuple[int, int]):
  """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` on NHWC: half-pixel
  centres, border-clamped, no antialiasing when shrinking (mmseg's ``resize``)."""
  size = (int(size[0]), int(size[1]))
  if tuple(x.shape[1:3]) == size:
    return x  # torch's weights are exactly (1, 0) here
  shape = (x.shape[0],) + size + (x.shape[-1],)
  return jax.image.resize(x, shape, method="bilinear", antialias=False).astype(x.dtype)


@functools.lru_cache(maxsize=None)
def _adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  # torch adaptive pooling: bin i covers [floor(i * n_in / n_out), ceil((i + 1) * n_in / n_out)).
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x, size: int):
  """``nn.AdaptiveAvgPool2d(size)`` on NHWC (bins may overlap when the size does not divide)."""
  mh = jnp.asarray(_adaptive_pool_matrix(x.shape[1], size))
  mw = jnp.asarray(_adaptive_pool_matrix(x.shape[2], size))
  y = jnp.einsum("oh,bhwc,pw->bopc", mh, x.astype(jnp.float32), mw,
                 precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype)
