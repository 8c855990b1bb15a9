"""``"pallas_tpu"``: the selective scan for TPUs, Mosaic Pallas kernels forward and backward.

Lanes are channels: D is padded to a multiple of the lane tile (128) and each program owns a
(N, D_tile) fp32 state in VMEM scratch. The grid is (batch, D / D_tile, L / seq_tile); the
sequence axis is "arbitrary" (sequential on one core) so the state carries from one sequence
tile to the next; ``reverse`` maps sequence tile l to tile n_l - 1 - l and walks rows backwards,
so no flipped copies are made. L is padded to whole sequence tiles with u = 0 (padded steps
leave a zero state zero, and get zero cotangents, in either direction).

Rows of u, delta, z are read as aligned (8 or 16, D_tile) slabs and split statically. B and C are
passed as (batch, L, N, 1) so that step t reads an (N, 1) column by a dynamic index on a leading
axis, which broadcasts over lanes without a transpose.

Backward: the forward saves the state (and the previous step's Δ, for the "prev" gap rule)
at the start of every sequence tile. The backward visits tiles in reverse scan order,
recomputes the tile's states into a VMEM scratch (seq_tile + 1, N, D_tile), then runs the
adjoint recurrence. dA, dD, d(delta_bias) accumulate in output blocks that stay resident across
the sequence axis (one partial per batch element); dB and dC are reduced over the lane tile and
written per channel tile; XLA sums the partials. Deterministic, no atomics.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from toppax.pallas_kernels.common import sigmoid, softplus
from toppax.pallas_kernels.scan_call import Kernels, ScanArgs, out_types
from toppax.pallas_kernels.tuning import TpuTuning

_SQUEEZED = pl.squeezed if hasattr(pl, "squeezed") else None
_PARALLEL = getattr(pltpu, "PARALLEL", "parallel")
_ARBITRARY = getattr(pltpu, "ARBITRARY", "arbitrary")


def _round_up(x, m):
  return -(-x // m) * m


def _geometry(cfg, args):
  batch, length, dim = args.u.shape
  lane = cfg.tuning.lane_tile
  # Packed dtypes tile 16 rows per vreg: slabs stay whole tiles.
  sub = 8 * max(1, 4 // min(jnp.dtype(x.dtype).itemsize for x in (args.u, args.delta)))
  n_l = -(-length // cfg.tuning.max_seq_tile)
  seq_tile = _round_up(-(-length // n_l), sub)
  return dict(batch=batch, length=length, dim=dim, lane=lane, sub=sub, seq_tile=seq_tile,
              n_l=n_l, l_pad=seq_tile * n_l, d_pad=_round_up(dim, lane), n=args.A.shape[1])


def _interpret(cfg):
  if not cfg.interpret:
    return False
  # TPU interpret mode simulates Mosaic's memory semantics (uninitialised scratch is NaN,
  # out-of-bounds reads raise); plain interpret=True where this jax lacks it.
  return pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True


def _padded(cfg, args, g):
  """Channels-last inputs padded to whole tiles, B/C/gaps as leading-axis columns."""
  pl_, pd = g["l_pad"] - g["length"], g["d_pad"] - g["dim"]
  seq = lambda x: jnp.pad(x, ((0, 0), (0, pl_), (0, pd)))
  col = lambda x: jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pl_), (0, 0)))[..., None]
  xs = dict(u=seq(args.u), delta=seq(args.delta), B=col(args.B), C=col(args.C),
            A=jnp.pad(args.A.astype(jnp.float32).T, ((0, 0), (0, pd))),
            D=jnp.pad(args.D.astype(jnp.float32), (0, pd))[None],
            bias=jnp.pad(args.delta_bias.astype(jnp.float32), (0, pd))[None])
  if cfg.has_z:
    xs["z"] = seq(args.z)
  if cfg.gap_delta is not None:
    xs["gaps"] = jnp.pad(args.gaps, ((0, 0), (0, pl_)))[..., None, None]
  return xs


def _tile_of(cfg, n_l):
  return (lambda l: n_l - 1 - l) if cfg.reverse else (lambda l: l)


def _in_specs(cfg, g, tile_of):
  seq = pl.BlockSpec((_SQUEEZED, g["seq_tile"], g["lane"]), lambda b, d, l: (b, tile_of(l), d))
  col = pl.BlockSpec((_SQUEEZED, g["seq_tile"], g["n"], 1), lambda b, d, l: (b, tile_of(l), 0, 0))
  specs = dict(u=seq, delta=seq, B=col, C=col,
               A=pl.BlockSpec((g["n"], g["lane"]), lambda b, d, l: (0, d)),
               D=pl.BlockSpec((1, g["lane"]), lambda b, d, l: (0, d)),
               bias=pl.BlockSpec((1, g["lane"]), lambda b, d, l: (0, d)))
  if cfg.has_z:
    specs["z"] = seq
  if cfg.gap_delta is not None:
    specs["gaps"] = pl.BlockSpec((_SQUEEZED, g["seq_tile"], 1, 1),
                                 lambda b, d, l: (b, tile_of(l), 0, 0))
  return seq, specs


_ORDER = ("u", "delta", "z", "B", "C", "gaps", "A", "D", "bias")


class _Tile:
  """Scan-order access to one sequence tile: local step k -> row, slab-wise loads/stores."""

  def __init__(self, cfg, seq_tile, sub):
    self.cfg, self.seq_tile, self.sub = cfg, seq_tile, sub
    self.n_sub = seq_tile // sub

  def slab(self, j):
    """Row offset of the j-th slab in scan order."""
    jj = self.n_sub - 1 - j if self.cfg.reverse else j
    return pl.multiple_of(jj * self.sub, self.sub)

  def row(self, j, i):
    """(dynamic row of step i of slab j, static row inside the slab)."""
    ii = self.sub - 1 - i if self.cfg.reverse else i
    return self.slab(j) + ii, ii

  def load(self, ref, j):
    return ref[pl.ds(self.slab(j), self.sub), :].astype(jnp.float32)

  def store(self, ref, j, rows):
    """rows: list in scan order of (1, lane) values."""
    if self.cfg.reverse:
      rows = rows[::-1]
    ref[pl.ds(self.slab(j), self.sub), :] = jnp.concatenate(rows, axis=0).astype(ref.dtype)


def _tilde(cfg, prev_dt, bias):
  if cfg.gap_delta == "prev":
    return prev_dt
  return softplus(bias) if cfg.delta_softplus else bias


def _fwd_kernel(*refs, cfg, g, save):
  names = [k for k in _ORDER if k != "z" or cfg.has_z]
  names = [k for k in names if k != "gaps" or cfg.gap_delta is not None]
  r = dict(zip(names, refs))
  rest = refs[len(names):]
  y_ref = rest[0]
  ck_ref, ckp_ref = (rest[1], rest[2]) if save else (None, None)
  h_ref, prev_ref = rest[-2], rest[-1]
  tile = _Tile(cfg, g["seq_tile"], g["sub"])

  @pl.when(pl.program_id(2) == 0)
  def _():
    h_ref[...] = jnp.zeros_like(h_ref)
    prev_ref[...] = jnp.zeros_like(prev_ref)

  if save:
    ck_ref[...] = h_ref[...]
    ckp_ref[...] = prev_ref[...]
  A, Dv, bias = r["A"][...], r["D"][...], r["bias"][...]

  def slab(j, carry):
    h, prev = carry
    U, DR = tile.load(r["u"], j), tile.load(r["delta"], j) + bias
    Z = tile.load(r["z"], j) if cfg.has_z else None
    ys = []
    for i in range(tile.sub):
      t, ii = tile.row(j, i)
      u, dt = U[ii:ii + 1], DR[ii:ii + 1]
      dt = softplus(dt) if cfg.delta_softplus else dt
      dec = dt
      if cfg.gap_delta is not None:
        dec = dt + r["gaps"][t] * _tilde(cfg, prev, bias)
      h = jnp.exp(A * dec) * h + r["B"][t] * (dt * u)
      y = jnp.sum(h * r["C"][t], axis=0, keepdims=True) + Dv * u
      if Z is not None:
        z = Z[ii:ii + 1]
        y = y * z * sigmoid(z)
      ys.append(y)
      prev = dt
    tile.store(y_ref, j, ys)
    return h, prev

  h, prev = jax.lax.fori_loop(0, tile.n_sub, slab, (h_ref[...], prev_ref[...]))
  h_ref[...] = h
  prev_ref[...] = prev


def _bwd_kernel(*refs, cfg, g):
  names = [k for k in _ORDER if k != "z" or cfg.has_z]
  names = [k for k in names if k != "gaps" or cfg.gap_delta is not None]
  r = dict(zip(names, refs))
  it = iter(refs[len(names):])
  ck_ref, ckp_ref, dy_ref = next(it), next(it), next(it)
  du_ref, ddelta_ref = next(it), next(it)
  dz_ref = next(it) if cfg.has_z else None
  dB_ref, dC_ref, dA_ref, dD_ref, dbias_ref = (next(it) for _ in range(5))
  dtilde_ref = next(it) if cfg.gap_delta == "bias" else None
  hs_ref, dts_ref, dh_ref, gc_ref = next(it), next(it), next(it), next(it)
  tile = _Tile(cfg, g["seq_tile"], g["sub"])
  A, Dv, bias = r["A"][...], r["D"][...], r["bias"][...]

  @pl.when(pl.program_id(2) == 0)
  def _():
    dh_ref[...] = jnp.zeros_like(dh_ref)
    gc_ref[...] = jnp.zeros_like(gc_ref)
    dA_ref[...] = jnp.zeros_like(dA_ref)
    dD_ref[...] = jnp.zeros_like(dD_ref)
    dbias_ref[...] = jnp.zeros_like(dbias_ref)
    if dtilde_ref is not None:
      dtilde_ref[...] = jnp.zeros_like(dtilde_ref)

  # Recompute this tile's states from its checkpoint: hs[k] is the state before local step k.
  hs_ref[0] = ck_ref[...]
  dts_ref[0] = ckp_ref[...]

  def recompute(j, h):
    DR = tile.load(r["delta"], j) + bias
    U = tile.load(r["u"], j)
    for i in range(tile.sub):
      t, ii = tile.row(j, i)
      k = j * tile.sub + i
      dt = softplus(DR[ii:ii + 1]) if cfg.delta_softplus else DR[ii:ii + 1]
      dec = dt
      if cfg.gap_delta is not None:
        dec = dt + r["gaps"][t] * _tilde(cfg, dts_ref[k], bias)
      h = jnp.exp(A * dec) * h + r["B"][t] * (dt * U[ii:ii + 1])
      hs_ref[k + 1] = h
      dts_ref[k + 1] = dt
    return h

  jax.lax.fori_loop(0, tile.n_sub, recompute, hs_ref[0])

  def adjoint(jr, carry):
    dh, gcarry, dA, dD, dbias, dtilde = carry
    j = tile.n_sub - 1 - jr
    U, DR, DY = tile.load(r["u"], j), tile.load(r["delta"], j) + bias, tile.load(dy_ref, j)
    Z = tile.load(r["z"], j) if cfg.has_z else None
    dus, ddrs, dzs = [], [], []
    for i in reversed(range(tile.sub)):
      t, ii = tile.row(j, i)
      k = j * tile.sub + i
      u, dr, dout = U[ii:ii + 1], DR[ii:ii + 1], DY[ii:ii + 1]
      dt = softplus(dr) if cfg.delta_softplus else dr
      h, h_prev, c, b = hs_ref[k + 1], hs_ref[k], r["C"][t], r["B"][t]
      dec = dt
      if cfg.gap_delta is not None:
        gap = r["gaps"][t]
        dec = dt + gap * _tilde(cfg, dts_ref[k], bias)
      if Z is not None:
        z = Z[ii:ii + 1]
        sz = sigmoid(z)
        y_pre = jnp.sum(h * c, axis=0, keepdims=True) + Dv * u
        dzs.append(dout * y_pre * sz * (1.0 + z * (1.0 - sz)))
        dy = dout * z * sz
      else:
        dy = dout
      dD = dD + dy * u
      dh = dh + c * dy
      dC_ref[t] = jnp.sum(h * dy, axis=1, keepdims=True)
      dB_ref[t] = jnp.sum(dh * (dt * u), axis=1, keepdims=True)
      dbu = jnp.sum(dh * b, axis=0, keepdims=True)
      a = jnp.exp(A * dec)
      da = dh * h_prev * a
      dA = dA + da * dec
      ddec = jnp.sum(da * A, axis=0, keepdims=True)
      ddt = dbu * u + ddec
      if cfg.gap_delta == "prev":
        ddt = ddt + gcarry
        gcarry = gap * ddec              # flows to Δ of the previous step in scan order
      elif cfg.gap_delta == "bias":
        dtilde = dtilde + gap * ddec
      ddr = ddt * sigmoid(dr) if cfg.delta_softplus else ddt
      dbias = dbias + ddr
      dus.append(dy * Dv + dbu * dt)
      ddrs.append(ddr)
      dh = a * dh
    # Rows were produced last-to-first in scan order.
    tile.store(du_ref, j, dus[::-1])
    tile.store(ddelta_ref, j, ddrs[::-1])
    if dz_ref is not None:
      tile.store(dz_ref, j, dzs[::-1])
    return dh, gcarry, dA, dD, dbias, dtilde

  zeros = jnp.zeros_like(dD_ref)
  carry = (dh_ref[...], gc_ref[...], dA_ref[...], dD_ref[...], dbias_ref[...],
           dtilde_ref[...] if dtilde_ref is not None else zeros)
  dh, gcarry, dA, dD, dbias, dtilde = jax.lax.fori_loop(0, tile.n_sub, adjoint, carry)
  dh_ref[...] = dh
  gc_ref[...] = gcarry
  dA_ref[...] = dA
  dD_ref[...] = dD
  dbias_ref[...] = dbias
  if dtilde_ref is not None:
    dtilde_ref[...] = dtilde


def _params():
  return pltpu.CompilerParams(dimension_semantics=(_PARALLEL, _PARALLEL, _ARBITRARY))


def _nbytes(*xs):
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in xs))


def forward(cfg, args, save):
  g = _geometry(cfg, args)
  xs = _padded(cfg, args, g)
  tile_of = _tile_of(cfg, g["n_l"])
  seq, specs = _in_specs(cfg, g, tile_of)
  names = [k for k in _ORDER if k in xs]
  f32 = jnp.float32
  out_shape = [jax.ShapeDtypeStruct((g["batch"], g["l_pad"], g["d_pad"]), args.u.dtype)]
  out_specs = [seq]
  if save:
    out_shape += [jax.ShapeDtypeStruct((g["batch"], g["n_l"], g["n"], g["d_pad"]), f32),
                  jax.ShapeDtypeStruct((g["batch"], g["n_l"], 1, g["d_pad"]), f32)]
    out_specs += [
        pl.BlockSpec((_SQUEEZED, _SQUEEZED, g["n"], g["lane"]),
                     lambda b, d, l: (b, tile_of(l), 0, d)),
        pl.BlockSpec((_SQUEEZED, _SQUEEZED, 1, g["lane"]), lambda b, d, l: (b, tile_of(l), 0, d))]
  elems = g["batch"] * g["l_pad"] * g["d_pad"] * g["n"]
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, g=g, save=save),
      grid=(g["batch"], g["d_pad"] // g["lane"], g["n_l"]),
      in_specs=[specs[k] for k in names], out_specs=out_specs,
      out_shape=out_types(out_shape, args),
      scratch_shapes=[pltpu.VMEM((g["n"], g["lane"]), f32), pltpu.VMEM((1, g["lane"]), f32)],
      compiler_params=_params(), interpret=_interpret(cfg), name="selective_scan_fwd_tpu",
      cost_estimate=pl.CostEstimate(flops=7 * elems, transcendentals=elems,
                                    bytes_accessed=_nbytes(*xs.values(), *out_shape)),
  )(*[xs[k] for k in names])
  y = outs[0][:, :g["length"], :g["dim"]]
  return y, (tuple(outs[1:]) if save else None)


def backward(cfg, args, ckpt, dy):
  g = _geometry(cfg, args)
  xs = _padded(cfg, args, g)
  # The adjoint visits tiles in reverse scan order.
  bwd_tile = _tile_of(dataclasses.replace(cfg, reverse=not cfg.reverse), g["n_l"])
  seq_b, specs = _in_specs(cfg, g, bwd_tile)
  names = [k for k in _ORDER if k in xs]
  f32 = jnp.float32
  ck_spec = pl.BlockSpec((_SQUEEZED, _SQUEEZED, g["n"], g["lane"]),
                         lambda b, d, l: (b, bwd_tile(l), 0, d))
  ckp_spec = pl.BlockSpec((_SQUEEZED, _SQUEEZED, 1, g["lane"]),
                          lambda b, d, l: (b, bwd_tile(l), 0, d))
  dy_p = jnp.pad(dy, ((0, 0), (0, g["l_pad"] - g["length"]), (0, g["d_pad"] - g["dim"])))
  in_specs = [specs[k] for k in names] + [ck_spec, ckp_spec, seq_b]
  inputs = [xs[k] for k in names] + [ckpt[0], ckpt[1], dy_p]

  n_d = g["d_pad"] // g["lane"]
  shp = (g["batch"], g["l_pad"], g["d_pad"])
  out_shape = [jax.ShapeDtypeStruct(shp, args.u.dtype), jax.ShapeDtypeStruct(shp, args.delta.dtype)]
  out_specs = [seq_b, seq_b]
  if cfg.has_z:
    out_shape.append(jax.ShapeDtypeStruct(shp, args.z.dtype))
    out_specs.append(seq_b)
  part_col = pl.BlockSpec((_SQUEEZED, _SQUEEZED, g["seq_tile"], g["n"], 1),
                          lambda b, d, l: (d, b, bwd_tile(l), 0, 0))
  out_shape += [jax.ShapeDtypeStruct((n_d, g["batch"], g["l_pad"], g["n"], 1), f32)] * 2
  out_specs += [part_col, part_col]
  out_shape.append(jax.ShapeDtypeStruct((g["batch"], g["n"], g["d_pad"]), f32))
  out_specs.append(pl.BlockSpec((_SQUEEZED, g["n"], g["lane"]), lambda b, d, l: (b, 0, d)))
  n_vec = 3 if cfg.gap_delta == "bias" else 2
  out_shape += [jax.ShapeDtypeStruct((g["batch"], 1, g["d_pad"]), f32)] * n_vec
  out_specs += [pl.BlockSpec((_SQUEEZED, 1, g["lane"]), lambda b, d, l: (b, 0, d))] * n_vec
  scratch = [pltpu.VMEM((g["seq_tile"] + 1, g["n"], g["lane"]), f32),
             pltpu.VMEM((g["seq_tile"] + 1, 1, g["lane"]), f32),
             pltpu.VMEM((g["n"], g["lane"]), f32), pltpu.VMEM((1, g["lane"]), f32)]
  elems = g["batch"] * g["l_pad"] * g["d_pad"] * g["n"]
  outs = list(pl.pallas_call(
      functools.partial(_bwd_kernel, cfg=cfg, g=g),
      grid=(g["batch"], n_d, g["n_l"]), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_types(out_shape, args), scratch_shapes=scratch, compiler_params=_params(),
      interpret=_interpret(cfg), name="selective_scan_bwd_tpu",
      cost_estimate=pl.CostEstimate(flops=25 * elems, transcendentals=3 * elems,
                                    bytes_accessed=_nbytes(*inputs, *out_shape)),
  )(*inputs))
  L, D = g["length"], g["dim"]
  cut = lambda x: None if x is None else x[:, :L, :D]
  du, ddelta = cut(outs.pop(0)), cut(outs.pop(0))
  dz = cut(outs.pop(0)) if cfg.has_z else None
  dB_p, dC_p, dA_p, dD_p, dbias_p = (outs.pop(0) for _ in range(5))
  dbias = dbias_p.sum((0, 1))[:D]
  if cfg.gap_delta == "bias":
    dtilde = outs.pop(0).sum((0, 1))[:D]
    b32 = args.delta_bias.astype(f32)
    dbias = dbias + (dtilde * sigmoid(b32) if cfg.delta_softplus else dtilde)
  return ScanArgs(
      u=du, delta=ddelta, A=dA_p.sum(0).T[:D].astype(args.A.dtype),
      B=dB_p.sum(0)[:, :L, :, 0].astype(args.B.dtype),
      C=dC_p.sum(0)[:, :L, :, 0].astype(args.C.dtype),
      D=dD_p.sum((0, 1))[:D].astype(args.D.dtype), z=dz,
      delta_bias=dbias.astype(args.delta_bias.dtype),
      gaps=None if args.gaps is None else jnp.zeros_like(args.gaps))


KERNELS = Kernels("pallas_tpu", forward, backward, TpuTuning)
