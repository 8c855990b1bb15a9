"""Maths and typing helpers that the selective-scan op (``toppax.ssm``) and its kernels share.

This module imports only jax, so ``toppax.ssm`` can use it without loading Pallas.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def softplus(x):
  """log(1 + e^x), the step size Mamba derives from ``delta + delta_bias``."""
  return jnp.logaddexp(x, 0.0)


def softplus_series(x, exp2=jnp.exp2, log2=jnp.log2, fma=lambda a, b, c: a * b + c):
  """softplus with two special-function operations and no division, for the GPU kernels (which
  pass single-instruction exp2 / log2 / fma): log2(1 + e) ln 2 with e = 2^(x log2 e) where
  e >= 1/16 (1 + e rounds by at most 2^-24, so the relative error is that of log2 itself, under
  3e-6 with PTX lg2.approx), and below it the series of log1p(e) to the e^6 term (truncation
  under (1/16)^6 / 7 = 9e-9 relative; no log at all)."""
  e = exp2(jnp.minimum(x, 20.0) * LOG2E)
  series = -1.0 / 6.0                   # Horner: e (1 + e (-1/2 + e (1/3 - ... - e / 6)))
  for coef in (0.2, -0.25, 1.0 / 3.0, -0.5, 1.0):
    series = fma(e, series, coef)
  series = e * series
  return jnp.where(x > 20.0, x, jnp.where(e < 0.0625, series, log2(1.0 + e) * LN2))


def sigmoid(x):
  return 1.0 / (1.0 + jnp.exp(-x))


def varying_axes(*xs) -> frozenset:
  """The mesh axes any of xs varies over inside a ``shard_map`` with ``check_vma=True`` (empty
  elsewhere, and for None entries)."""
  axes = set()
  for x in xs:
    if x is None:
      continue
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)   # jax >= 0.10; earlier: aval.vma
    axes |= set(manual.varying if manual is not None else getattr(aval, "vma", ()))
  return frozenset(axes)


def vary(x, axes):
  """x made to vary over ``axes`` as well (``lax.pcast``; its transpose sums the cotangent
  over the axes added, as a replicated input's gradient needs)."""
  missing = tuple(sorted(set(axes) - varying_axes(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x
