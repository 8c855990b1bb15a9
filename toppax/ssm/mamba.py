"""ViM's bidirectional Mamba mixer ("bimamba v2", hustvl/Vim mamba_simple.Mamba), channels-last.

Parameter names follow the official state_dict (in_proj, conv1d, x_proj, dt_proj, A_log, D and
the backward branch's *_b copies, out_proj) so that conversion is a table. The backward branch
runs the conv and the scan in reverse order instead of flipping tensors (docs/kernels.md).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from toppax.ssm.conv import causal_conv1d
from toppax.ssm.ops import selective_scan


def _uniform(key, shape, bound):
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _torch_linear(din, dout, *, bias, rngs, dtype, scale=1.0):
  # torch.nn.Linear's default init (kaiming_uniform a=sqrt(5) == U(+-1/sqrt(fan_in))).
  bound = 1.0 / math.sqrt(din)
  return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                    kernel_init=lambda k, s, d=jnp.float32: scale * _uniform(k, s, bound),
                    bias_init=nnx.initializers.zeros)


def _dt_bias_init(key, shape, dt_min, dt_max, floor):
  # softplus(bias) log-uniform in [dt_min, dt_max] (mamba_simple.Mamba's dt init).
  dt = jnp.exp(jax.random.uniform(key, shape) * (math.log(dt_max) - math.log(dt_min))
               + math.log(dt_min))
  dt = jnp.maximum(dt, floor)
  return dt + jnp.log(-jnp.expm1(-dt))


class DepthwiseConv1d(nnx.Module):
  """Holds Mamba's short-conv parameters: kernel (W, D) and bias (D,)."""

  def __init__(self, channels: int, width: int, *, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(width)  # torch Conv1d default with fan_in = 1 * width
    self.kernel = nnx.Param(_uniform(rngs.params(), (width, channels), bound))
    self.bias = nnx.Param(_uniform(rngs.params(), (channels,), bound))


class BiMambaV2(nnx.Module):
  """``out_proj((y_f + y_b) / 2)`` with y_f, y_b the gated scans of two independent branches
  (``divide_out=False``: ``out_proj(y_f + y_b)``, as Vim's models built without
  ``if_divide_out``)."""

  def __init__(self, d_model: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2,
               dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
               n_layer: int = 1, dtype=jnp.float32, scan_implementation: str | None = None,
               gap_delta: str = "prev", divide_out: bool = True, rngs: nnx.Rngs):
    self.d_model, self.d_state = d_model, d_state
    self.d_inner = expand * d_model
    self.dt_rank = math.ceil(d_model / 16)
    self.dtype = dtype
    self.scan_implementation = scan_implementation
    self.gap_delta = gap_delta
    self.divide_out = divide_out
    di, r = self.d_inner, self.dt_rank
    self.in_proj = _torch_linear(d_model, 2 * di, bias=False, rngs=rngs, dtype=dtype)
    # out_proj is rescaled by 1/sqrt(n_layer) in the official init (GPT-2 scheme).
    self.out_proj = _torch_linear(di, d_model, bias=False, rngs=rngs, dtype=dtype,
                                  scale=1.0 / math.sqrt(n_layer))
    for sfx in ("", "_b"):
      setattr(self, "conv1d" + sfx, DepthwiseConv1d(di, d_conv, rngs=rngs))
      setattr(self, "x_proj" + sfx, _torch_linear(di, r + 2 * d_state, bias=False, rngs=rngs,
                                                  dtype=dtype))
      setattr(self, "dt_proj" + sfx, nnx.Linear(
          r, di, use_bias=True, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
          kernel_init=lambda k, s, d=jnp.float32: _uniform(k, s, r ** -0.5),
          bias_init=lambda k, s, d=jnp.float32: _dt_bias_init(k, s, dt_min, dt_max,
                                                               dt_init_floor)))
      a = np.broadcast_to(np.log(np.arange(1, d_state + 1, dtype=np.float32)), (di, d_state))
      setattr(self, "A_log" if not sfx else "A_b_log", nnx.Param(jnp.array(a)))
      setattr(self, "D" + sfx, nnx.Param(jnp.ones((di,), jnp.float32)))

  def _branch(self, x, z, *, backward: bool, gaps):
    sfx = "_b" if backward else ""
    conv = getattr(self, "conv1d" + sfx)
    x_proj, dt_proj = getattr(self, "x_proj" + sfx), getattr(self, "dt_proj" + sfx)
    a_log = getattr(self, "A_b_log" if backward else "A_log")
    d_skip = getattr(self, "D" + sfx)
    xc = jax.nn.silu(causal_conv1d(x, conv.kernel[...].astype(x.dtype),
                                   conv.bias[...].astype(x.dtype), reverse=backward))
    x_dbl = x_proj(xc)
    r, n = self.dt_rank, self.d_state
    dt, b, c = x_dbl[..., :r], x_dbl[..., r:r + n], x_dbl[..., r + n:]
    # dt_proj's bias is the scan's delta_bias (applied in fp32 before softplus), as in mamba-ssm.
    delta = jnp.dot(dt, dt_proj.kernel[...].astype(dt.dtype))
    return selective_scan(xc, delta, -jnp.exp(a_log[...]), b, c, d_skip[...], z=z,
                          delta_bias=dt_proj.bias[...], delta_softplus=True, reverse=backward,
                          gaps=gaps, implementation=self.scan_implementation,
                          gap_delta=self.gap_delta)

  def __call__(self, hidden, *, gaps_f=None, gaps_b=None):
    """hidden (batch, L, d_model) -> (out (batch, L, d_model), (y_f, y_b) gated SSM outputs).

    ``gaps_f`` / ``gaps_b`` are the alignment gaps of the forward / backward scan
    (pruned positions before / after each kept token), or None.
    """
    xz = self.in_proj(hidden.astype(self.dtype))
    x, z = jnp.split(xz, 2, axis=-1)
    y_f = self._branch(x, z, backward=False, gaps=gaps_f)
    y_b = self._branch(x, z, backward=True, gaps=gaps_b)
    y = y_f + y_b
    out = self.out_proj(y / 2 if self.divide_out else y)
    return out, (y_f, y_b)
