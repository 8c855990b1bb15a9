"""Shared inputs and float64 numpy oracles for the selective-scan suites (XLA and kernels)."""
from __future__ import annotations

import numpy as np


def softplus(x):
  return np.logaddexp(x, 0.0)


def random_inputs(seed, batch, length, dim, n, *, dtype=np.float32):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s)
  return dict(
      u=f(batch, length, dim).astype(dtype),
      delta=(0.5 * f(batch, length, dim) - 1.0).astype(dtype),
      A=(-np.exp(0.5 * f(dim, n))).astype(np.float32),
      B=f(batch, length, n).astype(dtype),
      C=f(batch, length, n).astype(dtype),
      D=f(dim).astype(np.float32),
      z=f(batch, length, dim).astype(dtype),
      delta_bias=(0.5 * f(dim) - 1.0).astype(np.float32),
  )


def numpy_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, *, delta_softplus=True,
               reverse=False, gaps=None, gap_delta="prev"):
  """Float64 step-by-step oracle, including alignment gaps (docs/design.md#token-pruning)."""
  u, delta, A, B, C = (np.asarray(x, np.float64) for x in (u, delta, A, B, C))
  batch, length, dim = u.shape
  if delta_bias is not None:
    delta = delta + np.asarray(delta_bias, np.float64)
  if delta_softplus:
    delta = softplus(delta)
  h = np.zeros((batch, dim, A.shape[1]))
  y = np.zeros_like(u)
  order = list(range(length - 1, -1, -1)) if reverse else list(range(length))
  prev = None
  for t in order:
    dec = delta[:, t]
    if gaps is not None:
      if gap_delta == "prev":
        tilde = delta[:, prev] if prev is not None else delta[:, t]
      else:
        bias = np.zeros(dim) if delta_bias is None else np.asarray(delta_bias, np.float64)
        tilde = np.broadcast_to(softplus(bias) if delta_softplus else bias, (batch, dim))
      dec = dec + np.asarray(gaps, np.float64)[:, t, None] * tilde
    h = np.exp(dec[:, :, None] * A) * h + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
    y[:, t] = (h * C[:, t, None, :]).sum(-1)
    prev = t
  if D is not None:
    y = y + u * np.asarray(D, np.float64)
  if z is not None:
    z = np.asarray(z, np.float64)
    y = y * z / (1 + np.exp(-z))
  return y


def random_keep(seed, batch, full_length, kept):
  """Sorted kept positions (batch, kept) and the gaps of both scan directions."""
  rng = np.random.default_rng(seed)
  pos = np.sort(np.stack([rng.choice(full_length, kept, replace=False) for _ in range(batch)]), -1)
  prev = np.concatenate([np.full((batch, 1), -1), pos[:, :-1]], 1)
  nxt = np.concatenate([pos[:, 1:], np.full((batch, 1), full_length)], 1)
  return pos, pos - prev - 1, nxt - pos - 1


def rel(a, b):
  """Relative L2 error of a against b, in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def compact(full, pos):
  """The inputs at the kept positions ``pos`` (batch, kept): per-token arrays gathered."""
  return {k: (np.take_along_axis(v, pos[..., None], axis=1) if v.ndim == 3 and k != "A" else v)
          for k, v in full.items()}


def masked_oracle(full, pos, *, reverse, gap_delta, delta_softplus=True):
  """Full-length scan where pruned positions have u = 0 and Δ = Δ̃, read at kept positions."""
  batch, length, _ = full["u"].shape
  delta_eff = np.asarray(full["delta"], np.float64) + full["delta_bias"]
  delta_eff = softplus(delta_eff) if delta_softplus else delta_eff
  keep = np.zeros((batch, length), bool)
  np.put_along_axis(keep, pos, True, axis=1)
  u = np.where(keep[..., None], full["u"], 0.0)
  d_full = delta_eff.copy()
  for b in range(batch):
    order = range(length - 1, -1, -1) if reverse else range(length)
    last = None
    for t in order:
      if keep[b, t]:
        last = t
      elif gap_delta == "prev":
        d_full[b, t] = delta_eff[b, last] if last is not None else 1.0
      else:
        bias = full["delta_bias"]
        d_full[b, t] = softplus(bias) if delta_softplus else bias
  y = numpy_scan(u, d_full, full["A"], full["B"], full["C"], full["D"], full["z"], None,
                 delta_softplus=False, reverse=reverse)
  return np.take_along_axis(y, pos[..., None], axis=1)
