"""The Triton scan kernels: the forward (``forward_kernel``, also the training forward that
stores checkpoints) and the backward (``backward_kernel``), written in Triton's language and
called through jax-triton (``triton_scan``). docs/kernels.md explains their design.

Each kernel is written once per static configuration (``Static``: shapes, options, tuning) by
running its algorithm below over ``triton_src`` Values: the states of a thread's channels are n
separate ``(BD,)`` vectors kept in Python lists, so the generated kernel is unrolled over states
and over the steps of a checkpoint interval, with one Triton ``for`` loop over intervals. Every
sum over states stays inside a thread; only the backward's dB and dC (sums over channels) cross
lanes, through warp shuffles. exp2, log2, reciprocals and the shuffles are single PTX
instructions (inline assembly); with ``interpret`` the kernel uses Triton's own operations
instead (``tl.exp2``, ``tl.gather``), which Triton's interpreter runs on a CPU.

Pointers: every array is contiguous and row-major. A program (grid ``(groups, D / BD, batch)``)
owns one block of BD channels of one batch element (and one group of states): its base
pointers are offset once, so a step adds only ``t * row_stride``.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib

from toppax.pallas_kernels.common import LN2, LOG2E
from toppax.pallas_kernels.triton_src import Src, is_static, lit

F32 = "tl.float32"


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything one kernel is specialised on."""
  kind: str                   # "fwd" or "bwd"
  reverse: bool
  delta_softplus: bool
  gap_delta: str | None
  has_z: bool
  interpret: bool
  batch: int
  length: int
  dim: int
  n_all: int                  # states after padding to a power of two
  n: int                      # states per program
  block_d: int
  chunk: int                  # fwd: steps per loop iteration (ckpt_every when saving); bwd: K
  save: bool = False          # fwd: store the checkpoints
  rows_ahead: int = 0         # fwd look-ahead of u, delta, z (and gaps)
  bc_ahead: int = 0           # fwd look-ahead of B_t, C_t
  sub: int = 0                # bwd sub-chunk
  warps: int = 1              # bwd warps per program
  maxnreg: int | None = None  # register cap, applied by triton_scan when it compiles

  @property
  def groups(self):
    return self.n_all // self.n


class Math:
  """Single-instruction special functions (PTX ``ex2/lg2/rcp.approx.ftz``; Triton would emit
  denormal-safe sequences and a libdevice polynomial) and explicit FMAs; with ``interpret``,
  Triton's own operations."""

  def __init__(self, src, interpret):
    self.src, self.interpret = src, interpret

  def _approx(self, op, x):
    return self.src.let(f'tl.inline_asm_elementwise("{op}.approx.ftz.f32 $0, $1;", "=r,r", '
                        f'[{lit(x)}], dtype={F32}, is_pure=True, pack=1)')

  def exp2(self, x):
    return self.src.call("tl.exp2", x) if self.interpret else self._approx("ex2", x)

  def log2(self, x):
    return self.src.call("tl.log2", x) if self.interpret else self._approx("lg2", x)

  def rcp(self, x):
    return self.src.let(f"1.0 / {lit(x)}") if self.interpret else self._approx("rcp", x)

  def fma(self, a, b, c):
    return self.src.call("tl.fma", a, b, c)

  def softplus(self, x):
    """``common.softplus_series``: log2(1 + e) ln 2 with e = 2^(x log2 e), and below e = 1/16
    the series of log1p(e); x itself above 20."""
    src = self.src
    e = self.exp2(src.call("tl.minimum", x, 20.0) * LOG2E)
    series = -1.0 / 6.0
    for coef in (0.2, -0.25, 1.0 / 3.0, -0.5, 1.0):
      series = self.fma(e, series, coef)
    series = e * series
    big = self.log2(1.0 + e) * LN2
    return src.where(x > 20.0, x, src.where(e < 0.0625, series, big))

  def sigmoid(self, x):
    return self.rcp(1.0 + self.exp2(x * -LOG2E))


class Block:
  """The program's place in the grid and its row loads / stores: (BD,) rows of channels-last
  arrays, masked where the block overhangs D."""

  def __init__(self, src, st: Static):
    self.src, self.st = src, st
    self.group = src.let("tl.program_id(0)")
    self.col = src.let(f"tl.program_id(1) * {st.block_d}")
    self.batch = src.let("tl.program_id(2).to(tl.int64)")
    self.offs = src.let(f"tl.arange(0, {st.block_d})")
    self.mask = None
    if st.dim % st.block_d:
      self.mask = src.let(f"{self.col} + {self.offs} < {st.dim}")

  def base(self, ptr, batch_stride, lead=None):
    """``ptr`` moved to this program's batch element (and ``lead`` elements more)."""
    off = self.batch * batch_stride
    return self.src.let(f"{ptr} + {lit(off if lead is None else off + lead)}")

  def load(self, base, index=0):
    """Row ``base[index + c]`` for the block's channels c, as fp32."""
    mask = "" if self.mask is None else f", mask={self.mask}, other=0.0"
    return self.src.let(f"tl.load({base} + {lit(index)} + {self.offs}{mask}).to({F32})")

  def store(self, base, value, index=0):
    mask = "" if self.mask is None else f", mask={self.mask}"
    self.src.emit(f"tl.store({base} + {lit(index)} + {self.offs}, "
                  f"{lit(value)}.to({base}.dtype.element_ty){mask})")

  def scalar(self, base, index):
    return self.src.let(f"tl.load({base} + {lit(index)}).to({F32})")


class Inputs:
  """The base pointers of the arrays both kernels read, and the per-channel constants: A log2 e
  per state, the D skip (with state groups only group 0 adds it), delta_bias and the "bias" gap
  rule's tilde = softplus(delta_bias)."""

  def __init__(self, src, st, blk, fm, names):
    seq, state = st.length * st.dim, st.length * st.n_all
    self.u = blk.base(names["u"], seq, blk.col)
    self.delta = blk.base(names["delta"], seq, blk.col)
    self.z = blk.base(names["z"], seq, blk.col) if st.has_z else None
    group_states = src.let(f"{blk.group} * {st.n}")
    self.B = blk.base(names["B"], state, group_states)
    self.C = blk.base(names["C"], state, group_states)
    self.gaps = blk.base(names["gaps"], st.length) if st.gap_delta is not None else None
    at = src.let(f"{names['at']} + {group_states} * {st.dim} + {blk.col}")
    self.a2 = [blk.load(at, i * st.dim) * LOG2E for i in range(st.n)]
    self.d_skip = blk.load(src.let(f"{names['dskip']} + {blk.col}"))
    if st.groups > 1:
      self.d_skip = src.where(src.let(f"{blk.group} == 0"), self.d_skip, 0.0)
    self.bias = blk.load(src.let(f"{names['bias']} + {blk.col}"))
    self.tilde = None
    if st.gap_delta == "bias":
      self.tilde = fm.softplus(self.bias) if st.delta_softplus else self.bias

  def row(self, st, t):
    """The element offset of row t of a (batch, L, D) array."""
    return t * st.dim

  def gap(self, blk, t):
    return blk.scalar(self.gaps, t)


def _t_of(st, s):
  return st.length - 1 - s if st.reverse else s


def _seq_out(src, st, blk, name):
  """Base pointer of a per-channel (batch, L, D) output, or with state groups of the group's
  fp32 partial in a (groups, batch, L, D) array."""
  seq = st.length * st.dim
  if st.groups == 1:
    return blk.base(name, seq, blk.col)
  lead = src.let(f"{blk.group}.to(tl.int64) * {st.batch * seq} + {blk.col}")
  return blk.base(name, seq, lead)


def _vec_out(src, st, blk, name):
  """Base pointer of a per-channel (batch, D) output (or (groups, batch, D) partials)."""
  if st.groups == 1:
    return blk.base(name, st.dim, blk.col)
  lead = src.let(f"{blk.group}.to(tl.int64) * {st.batch * st.dim} + {blk.col}")
  return blk.base(name, st.dim, lead)


def _params(st, outputs):
  ins = ["u", "delta"] + (["z"] if st.has_z else []) + ["B", "C"]
  ins += ["gaps"] if st.gap_delta is not None else []
  ins += ["at", "dskip", "bias"]
  return ins, outputs


def forward_source(st: Static):
  """(Src, parameter names) of the forward: each thread holds all n states of its channels,
  C.h is summed inside the thread, and B_t, C_t enter as scalars (one address across the warp),
  so no value crosses lanes. With ``save`` it stores the state every ``chunk`` steps (the
  checkpoints the backward starts from), the partial chunk first in scan order."""
  src = Src()
  ins, outs = _params(st, ["y"] + (["ck"] if st.save else []))
  names = {p: p for p in ins + outs}
  blk = Block(src, st)
  fm = Math(src, st.interpret)
  x_in = Inputs(src, st, blk, fm, names)
  y_out = _seq_out(src, st, blk, "y")
  n, last = st.n, st.length - 1
  ck = None
  if st.save:
    n_ck = max(st.length // st.chunk, 1)
    ck = blk.base("ck", n_ck * st.n_all * st.dim,
                  src.let(f"{blk.group} * {st.n * st.dim} + {blk.col}"))

  def load_rows(s):
    t = _t_of(st, src.minimum(s, last))   # past the end: a harmless in-bounds reload
    r = x_in.row(st, t)
    x = dict(u=blk.load(x_in.u, r), dr=blk.load(x_in.delta, r) + x_in.bias)
    if st.gap_delta is not None:
      x["g"] = x_in.gap(blk, t)
    if st.has_z:
      x["z"] = blk.load(x_in.z, r)
    return x

  def load_bc(s):
    t = _t_of(st, src.minimum(s, last))
    return ([blk.scalar(x_in.B, t * st.n_all + i) for i in range(n)],
            [blk.scalar(x_in.C, t * st.n_all + i) for i in range(n)])

  def step(s, x, bc, hs, prev):
    b, c = bc
    dt = fm.softplus(x["dr"]) if st.delta_softplus else x["dr"]
    dec = dt
    if st.gap_delta is not None:
      dec = fm.fma(x["g"], prev if st.gap_delta == "prev" else x_in.tilde, dt)
    dtu = dt * x["u"]
    y = x_in.d_skip * x["u"]
    new = []
    for i in range(n):
      # a h + b dtu: the multiply fused into the FMA is the one on the loop-carried path.
      h = fm.fma(fm.exp2(x_in.a2[i] * dec), hs[i], b[i] * dtu)
      y = fm.fma(c[i], h, y)
      new.append(h)
    if st.has_z:
      z = x["z"]
      y = y * z * fm.sigmoid(z)
    blk.store(y_out, y, x_in.row(st, _t_of(st, s)))
    return new, dt

  def run(base, steps, carry):
    # Software pipelining: the rows of step s + rows_ahead and the B, C scalars of step
    # s + bc_ahead are loaded while step s computes; the queues ride in the loop carry.
    hs, prev, rq, bq = carry
    for i in range(steps):
      s = base + i
      rq = rq + [load_rows(s + st.rows_ahead)]
      bq = bq + [load_bc(s + st.bc_ahead)]
      hs, prev = step(s, rq[0], bq[0], hs, prev)
      rq, bq = rq[1:], bq[1:]
    return hs, prev, rq, bq

  head = st.length % st.chunk
  zeros = lambda: src.let(f"tl.full(({st.block_d},), 0.0, {F32})")
  carry = ([zeros() for _ in range(n)], zeros(),
           [load_rows(s) for s in range(st.rows_ahead)],
           [load_bc(s) for s in range(st.bc_ahead)])
  carry = run(0, head, carry)

  def body(c, carry):
    if st.save:
      for i in range(n):
        blk.store(ck, carry[0][i], c * (st.n_all * st.dim) + i * st.dim)
    return run(head + c * st.chunk, st.chunk, carry)

  src.fori(0, st.length // st.chunk, body, carry)
  return src, ins + outs


class Warp:
  """Cross-lane work of the backward: a (BD,) vector with BD = 32 x warps holds one channel per
  thread (element i on lane i % 32 of warp i // 32), so ``shfl.sync`` exchanges values between
  the channels of a warp. With ``interpret``, ``tl.gather`` moves the same elements."""

  def __init__(self, src, blk, interpret):
    self.src, self.interpret = src, interpret
    self.offs = blk.offs
    self.lane = src.let(f"{blk.offs} & 31")
    self.warp_start = src.let(f"{blk.offs} & -32")

  def shfl_xor(self, x, offset):
    """Every lane gets lane ``lane ^ offset``'s x (``shfl.sync.bfly``)."""
    if self.interpret:
      return self.src.call("tl.gather", x, self.offs ^ offset, 0)
    return self.src.let(
        f'tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, {offset}, 0x1f, 0xffffffff;", '
        f'"=r,r", [{x}], dtype={F32}, is_pure=True, pack=1)')

  def shfl_idx(self, x, lane):
    """Every lane gets lane ``lane`` (a per-lane int32 vector) of its warp's x (shfl.sync.idx)."""
    if self.interpret:
      return self.src.call("tl.gather", x, self.warp_start + lane, 0)
    return self.src.let(
        f'tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", '
        f'"=r,r,r", [{x}, {lane}], dtype={F32}, is_pure=True, pack=1)')

  def state_order(self, m):
    """The lane-dependent order of m per-state registers that makes ``reduce_scatter`` need no
    selects: lane L keeps state k ^ order[L] in its register k. For each halving level of the
    reduce-scatter (lane offset o, half h of the values still held), order[L] has the bit h set
    when lane L has bit o set: the registers a lane ships at a level (its upper half) hold the
    states its partner keeps (the partner's lower half), and vice versa."""
    order, length = self.src.let(f"{self.lane} * 0"), m
    for offset in (16, 8, 4, 2, 1):
      if length > 1:
        length //= 2
        order = order + self.src.where(self.src.let(f"({self.lane} & {offset}) != 0"), length, 0)
    return order

  def permute(self, vals, order):
    """Register k of the result holds vals[k ^ order] (a lane-dependent XOR of the index, by
    selects one bit at a time; its own inverse)."""
    bit = 1
    while bit < len(vals):
      flip = self.src.let(f"({order} & {bit}) != 0")
      vals = [self.src.where(flip, vals[k ^ bit], vals[k]) for k in range(len(vals))]
      bit *= 2
    return vals

  def reduce_scatter(self, vals, scale):
    """Sums m (BD,) vectors times ``scale``, held in ``state_order(m)``, over the 32 lanes of each
    warp and spreads the m sums over the lanes: entry k is, on lane L, the warp total of state
    k ^ state_order(m)[L]. Each halving level keeps the lower half and ships the upper half to
    the partner lane: m - 1 shuffles and adds, plus one per level left once one value remains."""
    vals = [v * scale for v in vals]
    for offset in (16, 8, 4, 2, 1):
      if len(vals) > 1:
        half = len(vals) // 2
        vals = [vals[j] + self.shfl_xor(vals[j + half], offset) for j in range(half)]
      else:
        vals = [vals[0] + self.shfl_xor(vals[0], offset)]
    return vals


def backward_source(st: Static):
  """(Src, parameter names) of the backward, in the forward's layout with one channel per
  thread: the state, its adjoint and dA are n separate (BD,) vectors and B_t, C_t reach every
  lane; only dB and dC cross lanes, through one warp reduce-scatter each per step. a_t h_{t-1}
  is taken as h_t - B_t dt_t u_t, so a chunk keeps K states, not K + 1.

  Per checkpoint interval of K = ``chunk`` steps, last to first, it walks sub-chunks of ``sub``
  steps, last first: the interval's first pass recomputes all K states from the checkpoint and
  runs the adjoint over the last sub-chunk; each earlier sub-chunk recomputes its states from
  the checkpoint again, so only ``sub`` states are live in registers at a time. The rows of the
  first pass and of every adjoint step are loaded at the interval's start, where one wait
  covers them all.

  With state groups the program handles one group of n states and du, the delta gradient, dz,
  dD and the bias gradients are this group's partials (``gpu_scan.backward`` sums them): every
  term of those is a sum over states, except the D skip's, which only group 0 adds."""
  src = Src()
  outs = ["du", "ddelta"] + (["dz"] if st.has_z else []) + ["dB", "dC", "dA", "dD", "dbias"]
  outs += ["dtilde"] if st.gap_delta == "bias" else []
  ins, outs = _params(st, outs)
  ins = ins + ["ck", "dy"]
  names = {p: p for p in ins + outs}
  blk = Block(src, st)
  fm = Math(src, st.interpret)
  x_in = Inputs(src, st, blk, fm, names)
  warp = Warp(src, blk, st.interpret)
  n, seq = st.n, st.length * st.dim
  prev_rule = st.gap_delta == "prev"
  n_ck = max(st.length // st.chunk, 1)
  ck = blk.base("ck", n_ck * st.n_all * st.dim, src.let(f"{blk.group} * {n * st.dim} + {blk.col}"))
  dy = blk.base("dy", seq, blk.col)
  du, ddelta = _seq_out(src, st, blk, "du"), _seq_out(src, st, blk, "ddelta")
  dz = _seq_out(src, st, blk, "dz") if st.has_z else None
  dA = blk.base("dA", st.n_all * st.dim, src.let(f"{blk.group} * {n * st.dim} + {blk.col}"))
  dD, dbias = _vec_out(src, st, blk, "dD"), _vec_out(src, st, blk, "dbias")
  dtilde = _vec_out(src, st, blk, "dtilde") if st.gap_delta == "bias" else None
  # dB, dC: (n_d x warps, batch, L, N_all) partial sums, one per warp; this lane's warp row.
  part = src.let(f"((tl.program_id(1) * {st.warps} + {blk.offs} // 32).to(tl.int64) * "
                 f"{st.batch} + {blk.batch}) * {st.length * st.n_all} + {blk.group} * {n}")
  dB_p, dC_p = src.let(f"dB + {part}"), src.let(f"dC + {part}")

  # Every per-state value of a lane (A, the checkpoints, the recomputed states, their adjoints,
  # dA) is kept in the warp's state order, so that the dB/dC reduce-scatter needs no selects;
  # sums over states do not care. B_t and C_t reach each lane in that order: lane L loads entry
  # L of the row (one coalesced load per 32 states) and shfl.idx hands entry j ^ order to each.
  order = warp.state_order(n)           # register k of a lane holds state k ^ order
  a2 = warp.permute(x_in.a2, order)
  fetch_lane = src.minimum(warp.lane, n - 1) if n < 32 else warp.lane

  def put(ptrs, t, vals, scale):
    """Stores the warp sums of vals[j] * scale (state j ^ order) as row t of a dB / dC partial."""
    for k, v in enumerate(warp.reduce_scatter(vals, scale)):   # sum k: state k ^ order
      src.emit(f"tl.store({ptrs} + {lit(t * st.n_all)} + ({order} ^ {k}), {v})")

  def dt_of(dr):
    return fm.softplus(dr) if st.delta_softplus else dr

  def fetch(ptr, t):
    """Entry L of a B or C row on lane L (state L)."""
    return src.let(f"tl.load({ptr} + {lit(t * st.n_all)} + {fetch_lane}).to({F32})")

  def spread(row):
    """A fetched row's entries in this lane's order: a function j -> state j ^ order."""
    return lambda j: warp.shfl_idx(row, order ^ j)

  def load_walk(s):
    """What the recompute of step s reads: u, raw delta, the gap, B_t (fetched)."""
    t = _t_of(st, s)
    r = x_in.row(st, t)
    x = dict(u=blk.load(x_in.u, r), d=blk.load(x_in.delta, r), b=fetch(x_in.B, t))
    if st.gap_delta is not None:
      x["g"] = x_in.gap(blk, t)
    return x

  def load_adjoint(s):
    """What the adjoint of step s reads: dy, z, C_t (fetched)."""
    t = _t_of(st, s)
    r = x_in.row(st, t)
    x = dict(dout=blk.load(dy, r), c=fetch(x_in.C, t))
    if st.has_z:
      x["z"] = blk.load(x_in.z, r)
    return x

  def prev_before(base):
    """The "prev" gap rule's delta of the step before ``base`` (0 before the first step)."""
    if is_static(base) and base == 0:
      return src.let(f"tl.full(({st.block_d},), 0.0, {F32})")
    t = _t_of(st, src.maximum(base - 1, 0))
    return dt_of(blk.load(x_in.delta, x_in.row(st, t)) + x_in.bias)

  def advance(s, h, prev, pre):
    """Step s (scan order) from the state h before it: (its inputs x, the state after it)."""
    pre = load_walk(s) if pre is None else pre
    x = dict(u=pre["u"], dr=pre["d"] + x_in.bias)
    x["dt"] = dt = dt_of(x["dr"])
    dec = dt
    if st.gap_delta is not None:
      x["g"] = pre["g"]
      dec = fm.fma(x["g"], prev if prev_rule else x_in.tilde, dt)
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
    dh, dA_acc, gcarry, dD_acc, dbias_acc, dtilde_acc = carry
    for i in reversed(range(len(xs))):
      t = _t_of(st, base + i)
      r = x_in.row(st, t)
      x, h = xs[i], hs[i]
      u, dt, dec = x["u"], x["dt"], x["dec"]
      c_row = spread(adj[i]["c"])
      c = [c_row(j) for j in range(n)]
      dout = adj[i]["dout"]
      if st.has_z:
        z = adj[i]["z"]
        sz = fm.sigmoid(z)
        y_pre = x_in.d_skip * u
        for j in range(n):
          y_pre = fm.fma(c[j], h[j], y_pre)
        blk.store(dz, dout * y_pre * sz * fm.fma(z, 1.0 - sz, 1.0), r)
        dy_t = dout * z * sz
      else:
        dy_t = dout
      dD_acc = fm.fma(dy_t, u, dD_acc)
      put(dC_p, t, h, dy_t)
      dh = [fm.fma(c[j], dy_t, dh[j]) for j in range(n)]
      dtu = dt * u
      put(dB_p, t, dh, dtu)
      neg_dtu = -dtu
      dbu = ddec = None
      new_dh, new_dA = [], []
      b_row = spread(fetch(x_in.B, t))
      for j in range(n):
        b = b_row(j)
        dbu = dh[j] * b if dbu is None else fm.fma(dh[j], b, dbu)
        a = fm.exp2(a2[j] * dec)
        da = dh[j] * fm.fma(b, neg_dtu, h[j])   # dh_t a_t h_{t-1}
        new_dA.append(fm.fma(da, dec, dA_acc[j]))
        ddec = da * a2[j] if ddec is None else fm.fma(da, a2[j], ddec)
        new_dh.append(a * dh[j])
      dh, dA_acc = new_dh, new_dA
      ddec = ddec * LN2
      ddt = fm.fma(dbu, u, ddec)
      if prev_rule:
        ddt = ddt + gcarry
        gcarry = x["g"] * ddec
      elif st.gap_delta == "bias":
        dtilde_acc = fm.fma(x["g"], ddec, dtilde_acc)
      ddr = ddt * fm.sigmoid(x["dr"]) if st.delta_softplus else ddt
      dbias_acc = dbias_acc + ddr
      blk.store(du, fm.fma(dbu, dt, dy_t * x_in.d_skip), r)
      blk.store(ddelta, ddr, r)
    return dh, dA_acc, gcarry, dD_acc, dbias_acc, dtilde_acc

  zeros = lambda: src.let(f"tl.full(({st.block_d},), 0.0, {F32})")
  carry = ([zeros() for _ in range(n)], [zeros() for _ in range(n)], zeros(), zeros(), zeros(),
           zeros())
  head, full = st.length % st.chunk, st.length // st.chunk

  def interval(base, steps, h, carry):
    # Recomputes (K / sub + 1) / 2 times the interval's steps: 6 per 4 at K = 4, sub = 2.
    if steps == 0:
      return carry
    walk_rows = [load_walk(base + i) for i in range(steps)]
    adj_rows = [load_adjoint(base + i) for i in range(steps)]
    prev0 = prev_before(base) if prev_rule else None
    xs, hs = walk(base, steps, h, prev0, walk_rows)
    starts = list(range(0, steps, st.sub))
    for a in reversed(starts):
      if a == starts[-1]:               # the first pass's last sub-chunk
        sub_x, sub_h = xs[a:], hs[a:]
      else:                             # from the checkpoint again, up to the sub-chunk's end
        sub_x, sub_h = (v[a:] for v in walk(base, a + st.sub, h, prev0))
      carry = chunk_bwd(base + a, sub_x, sub_h, carry, adj_rows[a:a + len(sub_x)])
    return carry

  def body(i, carry):
    c = full - 1 - i
    ck_row = c * (st.n_all * st.dim)
    h = warp.permute([blk.load(ck, ck_row + j * st.dim) for j in range(n)], order)
    return interval(head + c * st.chunk, st.chunk, h, carry)

  carry = src.fori(0, full, body, carry)
  _, dA_acc, _, dD_acc, dbias_acc, dtilde_acc = interval(0, head, [zeros() for _ in range(n)],
                                                         carry)
  dA_acc = warp.permute(dA_acc, order)  # back to state j in entry j
  for j in range(n):
    blk.store(dA, dA_acc[j], j * st.dim)
  blk.store(dD, dD_acc)
  blk.store(dbias, dbias_acc)
  if dtilde is not None:
    blk.store(dtilde, dtilde_acc)
  return src, ins + outs


KERNEL_NAMES = {"fwd": "selective_scan_triton_fwd", "bwd": "selective_scan_triton_bwd"}


@functools.lru_cache(maxsize=256)
def python_kernel(st: Static):
  """The kernel as a plain Python function over Triton's language (for ``triton.jit`` or
  Triton's interpreter); its source is ``.toppax_source``."""
  src, params = (forward_source if st.kind == "fwd" else backward_source)(st)
  tag = hashlib.sha1(repr(st).encode()).hexdigest()[:12]
  return src.function(KERNEL_NAMES[st.kind], params, tag)


@functools.lru_cache(maxsize=256)
def jit_kernel(st: Static):
  """The kernel as a ``triton.jit`` function; ``toppax_maxnreg`` carries its register cap to
  ``triton_scan``'s lowering."""
  import triton
  kernel = triton.jit(python_kernel(st))
  kernel.toppax_maxnreg = st.maxnreg
  return kernel
