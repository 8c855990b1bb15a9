"""The bodies of the Triton-lowered scan kernels: the forward (``fwd_kernel``) and the backward
(``bwd_kernel``). ``gpu_scan`` launches them; docs/kernels.md explains their design.

Both hold whole channels per thread: the state of a program's channels is n separate (BD,)
vectors, one per state, so every sum over states stays inside a thread and only the backward's
dB and dC (sums over channels) cross lanes. Rows are read by indexing Refs (``u_ref[t, :]``), so
L is only a loop bound, and ``reverse`` only changes which row a step reads.
"""
from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from toppax.pallas_kernels.common import LN2, LOG2E
from toppax.pallas_kernels.ptx import FastMath, Warp


class Rows:
  """Loads and stores of one (L, BD) channels-last block, masked where the block overhangs D."""

  def __init__(self, block_d, dim, axis=0):
    self.mask = None
    if dim % block_d:                   # grid axis ``axis`` walks the blocks of D
      self.mask = pl.program_id(axis) * block_d + jnp.arange(block_d) < dim

  @staticmethod
  def _view(ref, t):
    # Masked Pallas loads index with arrays only (a Python int breaks interpret mode); a tuple
    # indexes several leading axes at once.
    if t is None:
      return ref
    ts = t if isinstance(t, tuple) else (t,)
    return ref.at[tuple(jnp.asarray(i, jnp.int32) for i in ts)]

  def load(self, ref, t=None):
    view = self._view(ref, t)
    if self.mask is None:
      return view[...].astype(jnp.float32)
    mask = jnp.broadcast_to(self.mask, view.shape)
    return pltriton.load(view, mask=mask, other=0).astype(jnp.float32)

  def store(self, ref, value, t=None):
    view = self._view(ref, t)
    value = value.astype(view.dtype)
    if self.mask is None:
      view[...] = value
    else:
      pltriton.store(view, value, mask=jnp.broadcast_to(self.mask, view.shape))


def _scan_order(cfg, length):
  return (lambda s: length - 1 - s) if cfg.reverse else (lambda s: s)


def _setup(cfg, block_d, dim, groups, a_ref, d_ref, bias_ref, n):
  """What both kernels start with: the row loader (with state groups, grid axis 1 walks D), the
  fast math, and the per-channel constants: A log2(e) per state (ddec rescales by ln 2), the D
  skip (with state groups only group 0, grid axis 0, adds its terms: the others get 0),
  delta_bias, and the "bias" gap rule's Δ̃ = softplus(delta_bias)."""
  rows = Rows(block_d, dim, axis=1 if groups > 1 else 0)
  fm = FastMath(cfg.interpret)
  a2 = [rows.load(a_ref, i) * LOG2E for i in range(n)]
  d_skip, bias = rows.load(d_ref), rows.load(bias_ref)
  if groups > 1:
    d_skip = jnp.where(pl.program_id(0) == 0, d_skip, 0.0)
  tilde = None
  if cfg.gap_delta == "bias":
    tilde = fm.softplus(bias) if cfg.delta_softplus else bias
  return rows, fm, a2, d_skip, bias, tilde


def fwd_kernel(*refs, cfg, length, block_d, dim, n, chunk, save, rows_ahead, groups):
  """The forward: each thread holds all n states of its channels, C.h is summed inside the
  thread, and B_t, C_t enter as scalars (one address across the warp), so no value crosses
  lanes. With ``save`` it stores the state every ``chunk`` steps (the checkpoints the backward
  starts from). With ``groups`` > 1 the program runs one group of n states (grid axis 0) and
  writes its part of y (the gate is linear in it; only group 0 adds the D skip)."""
  it = iter(refs)
  r = dict(u=next(it), delta=next(it))
  r["z"] = next(it) if cfg.has_z else None
  r["B"], r["C"] = next(it), next(it)
  r["gaps"] = next(it) if cfg.gap_delta is not None else None
  a_ref, d_ref, bias_ref = next(it), next(it), next(it)
  y_ref = next(it)
  ck_ref = next(it) if save else None

  rows, fm, a2, d_skip, bias, tilde = _setup(cfg, block_d, dim, groups, a_ref, d_ref, bias_ref, n)
  t_of = _scan_order(cfg, length)

  # Software pipelining: the rows of step s + rows_ahead and the B, C scalars of step
  # s + bc_ahead are loaded while step s computes; the queues ride in the loop carry.
  bc_ahead = cfg.tuning.bc_ahead
  last = length - 1

  def load_rows(s):
    t = t_of(jnp.minimum(s, last))      # past the end: a harmless in-bounds reload
    x = dict(u=rows.load(r["u"], t), dr=rows.load(r["delta"], t) + bias)
    if cfg.gap_delta is not None:
      x["g"] = r["gaps"][t]
    if cfg.has_z:
      x["z"] = rows.load(r["z"], t)
    return x

  def load_bc(s):
    t = t_of(jnp.minimum(s, last))
    return ([r["B"][t, i].astype(jnp.float32) for i in range(n)],
            [r["C"][t, i].astype(jnp.float32) for i in range(n)])

  def step(s, x, bc, hs, prev):
    b, c = bc
    dt = fm.softplus(x["dr"]) if cfg.delta_softplus else x["dr"]
    dec = dt
    if cfg.gap_delta is not None:
      dec = fm.fma(x["g"], prev if cfg.gap_delta == "prev" else tilde, dt)
    dtu = dt * x["u"]
    y = d_skip * x["u"]
    new = []
    for i in range(n):
      # a h + b dtu: the multiply fused into the FMA is the one on the loop-carried path.
      h = fm.fma(fm.exp2(a2[i] * dec), hs[i], b[i] * dtu)
      y = fm.fma(c[i], h, y)
      new.append(h)
    if cfg.has_z:
      z = x["z"]
      y = y * z * fm.sigmoid(z)
    rows.store(y_ref, y, t_of(s))
    return new, dt

  def run(base, steps, carry):
    hs, prev, rq, bq = carry
    for i in range(steps):
      s = base + i
      rq = rq + [load_rows(s + rows_ahead)]
      bq = bq + [load_bc(s + bc_ahead)]
      hs, prev = step(s, rq[0], bq[0], hs, prev)
      rq, bq = rq[1:], bq[1:]
    return hs, prev, rq, bq

  head = length % chunk
  hs = [jnp.zeros((block_d,), jnp.float32) for _ in range(n)]
  prev = jnp.zeros((block_d,), jnp.float32)
  carry = (hs, prev, [load_rows(s) for s in range(rows_ahead)],
           [load_bc(s) for s in range(bc_ahead)])
  # The partial chunk goes first in scan order, so checkpoints sit at head + c * chunk.
  carry = run(0, head, carry)

  def body(c, carry):
    if save:
      for i in range(n):
        rows.store(ck_ref, carry[0][i], (c, i))
    return run(head + c * chunk, chunk, carry)

  jax.lax.fori_loop(0, length // chunk, body, carry)


def bwd_kernel(*refs, cfg, length, block_d, dim, n, chunk, sub, warps, groups):
  """The backward in the forward's layout, one channel per thread: the state, its adjoint and
  dA are n separate (BD,) vectors and B_t, C_t reach every lane; only dB and dC cross lanes,
  through one warp reduce-scatter each per step. a_t h_{t-1} is taken as h_t - B_t Δ_t u_t, so
  a chunk keeps K states, not K + 1.

  Per checkpoint interval of K = ``chunk`` steps, last to first, it walks sub-chunks of ``sub``
  steps, last first: the interval's first pass recomputes all K states from the checkpoint and
  runs the adjoint over the last sub-chunk; each earlier sub-chunk recomputes its states from the
  checkpoint again, so only ``sub`` states are live in registers at a time. The rows of the
  first pass and of every adjoint step are loaded at the interval's start, where one wait
  covers them all (restarts load theirs again, from cache: reusing the loaded values lets the
  compiler merge the restart into the first pass, and spill).

  With ``groups`` > 1 the program handles one group of n states (grid axis 0) and du, Δ's
  gradient, dz, dD and the bias gradients are this group's partials (``backward`` sums them):
  every term of those is a sum over states, except the D skip's, which only group 0 adds."""
  it = iter(refs)
  r = dict(u=next(it), delta=next(it))
  r["z"] = next(it) if cfg.has_z else None
  r["B"], r["C"] = next(it), next(it)
  r["gaps"] = next(it) if cfg.gap_delta is not None else None
  a_ref, d_ref, bias_ref, ck_ref, dy_ref = (next(it) for _ in range(5))
  du_ref, ddelta_ref = next(it), next(it)
  dz_ref = next(it) if cfg.has_z else None
  dB_ref, dC_ref, dA_ref, dD_ref, dbias_ref = (next(it) for _ in range(5))
  dtilde_ref = next(it) if cfg.gap_delta == "bias" else None

  rows, fm, a2, d_skip, bias, tilde = _setup(cfg, block_d, dim, groups, a_ref, d_ref, bias_ref, n)
  warp = Warp(cfg.interpret, block_d)
  t_of = _scan_order(cfg, length)
  prev_rule = cfg.gap_delta == "prev"
  wid = jnp.arange(block_d, dtype=jnp.int32) // 32

  # Every per-state value of a lane (A, the checkpoints, the recomputed states, their adjoints,
  # dA) is kept in the warp's state order, so that the dB/dC reduce-scatter needs no selects;
  # sums over states do not care. B_t and C_t reach each lane in that order: lane L loads entry
  # L of the row (one coalesced load per 32 states) and shfl.idx hands entry j ^ order to each.
  order = warp.state_order(n)           # register k of a lane holds state k ^ order
  a2 = warp.permute(a2, order)

  def put(ref, t, vals, scale):
    """Stores the warp sums of vals[j] * scale (state j ^ order) as row t of a dB / dC partial."""
    for k, v in enumerate(warp.reduce_scatter(vals, scale)):   # sum k: state k ^ order
      idx = order ^ k
      if warps == 1:
        ref[t, idx] = v.astype(ref.dtype)
      else:
        ref[wid, t, idx] = v.astype(ref.dtype)

  def dt_of(dr):
    return fm.softplus(dr) if cfg.delta_softplus else dr

  def fetch(ref, t):
    """Entry L of a B or C row on lane L (state L)."""
    return ref[t, jnp.minimum(warp.lane, n - 1)].astype(jnp.float32)

  def spread(row):
    """A fetched row's entries in this lane's order: a function j -> state j ^ order."""
    return lambda j: warp.shfl_idx(row, order ^ j)

  def load_walk(s):
    """What the recompute of step s reads: u, raw Δ, the gap, B_t (fetched)."""
    t = t_of(s)
    x = dict(u=rows.load(r["u"], t), d=rows.load(r["delta"], t), b=fetch(r["B"], t))
    if cfg.gap_delta is not None:
      x["g"] = r["gaps"][t]
    return x

  def load_adjoint(s):
    """What the adjoint of step s reads: dy, z, C_t (fetched)."""
    t = t_of(s)
    x = dict(dout=rows.load(dy_ref, t), c=fetch(r["C"], t))
    if cfg.has_z:
      x["z"] = rows.load(r["z"], t)
    return x

  def prev_before(base):
    """The "prev" gap rule's Δ of the step before ``base`` (0 before the first step)."""
    if isinstance(base, int) and base == 0:
      return jnp.zeros((block_d,), jnp.float32)
    return dt_of(rows.load(r["delta"], t_of(jnp.maximum(base - 1, 0))) + bias)

  def advance(s, h, prev, pre=None):
    """Step s (scan order) from the state h before it: (its inputs x, the state after it).
    ``pre``: its rows from load_walk, loaded earlier (None: load them here)."""
    pre = load_walk(s) if pre is None else pre
    x = dict(u=pre["u"], dr=pre["d"] + bias)
    x["dt"] = dt = dt_of(x["dr"])
    dec = dt
    if cfg.gap_delta is not None:
      x["g"] = pre["g"]
      dec = fm.fma(x["g"], prev if prev_rule else tilde, dt)
    x["dec"] = dec
    dtu = dt * x["u"]
    b = spread(pre["b"])
    return x, [fm.fma(fm.exp2(a2[j] * dec), h[j], b(j) * dtu) for j in range(n)]

  def walk(base, stop, h, prev, pre=None):
    """Steps base ... base + stop - 1 from the state h before the first: their inputs and
    states. ``pre``: the interval's rows from load_walk, by step (None: load them here)."""
    xs, hs = [], []
    for i in range(stop):
      x, h = advance(base + i, h, prev, None if pre is None else pre[i])
      prev = x["dt"]
      xs.append(x)
      hs.append(h)
    return xs, hs

  def chunk_bwd(base, xs, hs, carry, adj):
    """The adjoint over steps base ... base + len(xs) - 1 (scan order), last first, from their
    inputs xs and states hs (the state after each step) and their rows from load_adjoint."""
    steps = len(xs)
    dh, dA, gcarry, dD, dbias, dtilde = carry
    for i in reversed(range(steps)):
      t = t_of(base + i)
      x, h = xs[i], hs[i]
      u, dt, dec = x["u"], x["dt"], x["dec"]
      rows_in = adj[i]
      c_row = spread(rows_in["c"])
      c = [c_row(j) for j in range(n)]
      dout = rows_in["dout"]
      if cfg.has_z:
        z = rows_in["z"]
        sz = fm.sigmoid(z)
        y_pre = d_skip * u
        for j in range(n):
          y_pre = fm.fma(c[j], h[j], y_pre)
        rows.store(dz_ref, dout * y_pre * sz * fm.fma(z, 1.0 - sz, 1.0), t)
        dy = dout * z * sz
      else:
        dy = dout
      dD = fm.fma(dy, u, dD)
      put(dC_ref, t, h, dy)
      dh = [fm.fma(c[j], dy, dh[j]) for j in range(n)]
      dtu = dt * u
      put(dB_ref, t, dh, dtu)
      neg_dtu = -dtu
      dbu = jnp.zeros_like(u)
      ddec = jnp.zeros_like(u)
      new_dh, new_dA = [], []
      b_row = spread(fetch(r["B"], t))
      for j in range(n):
        b = b_row(j)
        dbu = fm.fma(dh[j], b, dbu)
        a = fm.exp2(a2[j] * dec)
        da = dh[j] * fm.fma(b, neg_dtu, h[j])   # dh_t a_t h_{t-1}
        new_dA.append(fm.fma(da, dec, dA[j]))
        ddec = fm.fma(da, a2[j], ddec)
        new_dh.append(a * dh[j])
      dh, dA = new_dh, new_dA
      ddec = ddec * LN2
      ddt = fm.fma(dbu, u, ddec)
      if prev_rule:
        ddt = ddt + gcarry
        gcarry = x["g"] * ddec
      elif cfg.gap_delta == "bias":
        dtilde = fm.fma(x["g"], ddec, dtilde)
      ddr = ddt * fm.sigmoid(x["dr"]) if cfg.delta_softplus else ddt
      dbias = dbias + ddr
      rows.store(du_ref, fm.fma(dbu, dt, dy * d_skip), t)
      rows.store(ddelta_ref, ddr, t)
    return dh, dA, gcarry, dD, dbias, dtilde

  zeros = lambda: jnp.zeros((block_d,), jnp.float32)
  carry = ([zeros() for _ in range(n)], [zeros() for _ in range(n)], zeros(), zeros(), zeros(),
           zeros())
  head, full = length % chunk, length // chunk

  def interval(base, steps, h, carry):
    # Recomputes (K / sub + 1) / 2 times the interval's steps: 6 per 4 at K = 4, sub = 2.
    if steps == 0:
      return carry
    walk_rows = [load_walk(base + i) for i in range(steps)]
    adj_rows = [load_adjoint(base + i) for i in range(steps)]
    prev0 = prev_before(base) if prev_rule else None
    xs, hs = walk(base, steps, h, prev0, walk_rows)
    starts = list(range(0, steps, sub))
    for a in reversed(starts):
      if a == starts[-1]:               # the first pass's last sub-chunk
        sub_x, sub_h = xs[a:], hs[a:]
      else:                             # from the checkpoint again, up to the sub-chunk's end
        sub_x, sub_h = (v[a:] for v in walk(base, a + sub, h, prev0))
      carry = chunk_bwd(base + a, sub_x, sub_h, carry, adj_rows[a:a + len(sub_x)])
    return carry

  def body(i, carry):
    c = full - 1 - i
    ck = warp.permute([rows.load(ck_ref, (c, j)) for j in range(n)], order)
    return interval(head + c * chunk, chunk, ck, carry)

  carry = jax.lax.fori_loop(0, full, body, carry)
  _, dA, _, dD, dbias, dtilde = interval(0, head, [zeros() for _ in range(n)], carry)
  dA = warp.permute(dA, order)          # back to state j in entry j
  for j in range(n):
    rows.store(dA_ref, dA[j], j)
  rows.store(dD_ref, dD)
  rows.store(dbias_ref, dbias)
  if dtilde_ref is not None:
    rows.store(dtilde_ref, dtilde)
