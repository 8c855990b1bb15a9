"""Backend comparison for issue 4: the ViM forward scan as a Mosaic GPU (Pallas:MGPU) kernel,
timed against ``pallas_gpu`` (Triton-lowered) in the same run.

Forward only and only ViM's call (D, z, delta_bias, softplus; no reverse/gaps; D a multiple of
128): enough to compare the two Pallas GPU backends by measurement before porting every option.
One warpgroup per (128 channels, batch element); thread = channel, the 16 states in registers as
(128,) arrays in the WG_STRIDED layout; u, delta, z, B, C stream through shared memory in chunks
of ``--chunk`` steps (``plgpu.emit_pipeline``, TMA); B_t, C_t are read as shared-memory scalars.

  python3 -m toppax.tools.bench_mgpu_scan [--chunk 16] [--dim 768] [--batch 128]
"""
from __future__ import annotations

import argparse
import functools
import json

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np

from toppax.tools import bench_scan as bs

try:  # jax 0.11 registers Mosaic GPU's pallas_call lowering only when this module is imported
  from jax._src.pallas.mosaic_gpu import pallas_call_registration  # noqa: F401
except ImportError:
  pass

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
LANES = 128


def scan_fwd_mgpu(u, delta, A, B, C, D, z, delta_bias, *, chunk=16, concurrent=2):
  batch, length, dim = u.shape
  n = A.shape[1]
  if dim % LANES:
    raise ValueError(f"D = {dim} must be a multiple of {LANES} for this kernel")
  at = (A.astype(jnp.float32) * LOG2E).T                       # (N, D), pre-scaled
  params = jnp.stack([D.astype(jnp.float32), delta_bias.astype(jnp.float32)])   # (2, D)
  lay = plgpu.Layout.WG_STRIDED((LANES,), vec_size=1)
  n_chunks = pl.cdiv(length, chunk)

  def kernel(u_g, dl_g, z_g, b_g, c_g, at_g, p_g, y_g):
    di, b = jax.lax.axis_index("d"), jax.lax.axis_index("b")

    def body(idx, u_s, dl_s, z_s, b_s, c_s, at_s, p_s, y_s, hs):
      (c,) = idx
      steps = jnp.minimum(chunk, length - c * chunk)
      a2 = [plgpu.load(at_s.at[i], (), layout=lay) for i in range(n)]
      d_skip = plgpu.load(p_s.at[0], (), layout=lay)
      bias = plgpu.load(p_s.at[1], (), layout=lay)

      def step(t, hs):
        uu = plgpu.load(u_s.at[t], (), layout=lay).astype(jnp.float32)
        x = plgpu.load(dl_s.at[t], (), layout=lay).astype(jnp.float32) + bias
        zz = plgpu.load(z_s.at[t], (), layout=lay).astype(jnp.float32)
        e = jnp.exp2(jnp.minimum(x, 20.0) * LOG2E)
        w = 1.0 + e
        dt = jnp.where(x > 20.0, x, jnp.where(w == 1.0, e, jnp.log2(w) * LN2 * (e / (w - 1.0))))
        dtu = dt * uu
        y = d_skip * uu
        new = []
        for i in range(n):
          bi = b_s[t, i].astype(jnp.float32)
          ci = c_s[t, i].astype(jnp.float32)
          h = bi * dtu + jnp.exp2(a2[i] * dt) * hs[i]
          y = y + ci * h
          new.append(h)
        y = y * zz / (1.0 + jnp.exp2(zz * -LOG2E))
        y_s[t, :] = y.astype(y_s.dtype)
        return tuple(new)

      return jax.lax.fori_loop(0, steps, step, hs)

    row = pl.BlockSpec((chunk, LANES), lambda c: (c, 0))
    st = pl.BlockSpec((chunk, n), lambda c: (c, 0))
    h0 = tuple(plgpu.layout_cast(jnp.zeros((LANES,), jnp.float32), lay) for _ in range(n))
    cols = pl.ds(di * LANES, LANES)
    plgpu.emit_pipeline(
        body, grid=(n_chunks,),
        in_specs=[row, row, row, st, st, pl.BlockSpec((n, LANES), lambda c: (0, 0)),
                  pl.BlockSpec((2, LANES), lambda c: (0, 0))],
        out_specs=[row], max_concurrent_steps=concurrent, init_carry=h0)(
        u_g.at[b, :, cols], dl_g.at[b, :, cols], z_g.at[b, :, cols], b_g.at[b], c_g.at[b],
        at_g.at[:, cols], p_g.at[:, cols], y_g.at[b, :, cols])

  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct(u.shape, u.dtype), grid=(dim // LANES, batch),
      grid_names=("d", "b"), compiler_params=plgpu.CompilerParams(approx_math=True))(
      u, delta, z, B, C, at, params)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dim", type=int, default=768)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--length", type=int, default=197)
  p.add_argument("--chunks", default="8,16,32")
  p.add_argument("--concurrent", default="2,3")
  p.add_argument("--dtypes", default="float32,bfloat16")
  a = p.parse_args(argv)
  info = bs.versions()
  print(json.dumps(info), flush=True)
  out = dict(versions=info, rows=[])
  for dtype in [jnp.dtype(d) for d in a.dtypes.split(",")]:
    x = bs.inputs(jax.random.PRNGKey(0), a.batch, a.length, a.dim, 16, dtype)
    args = tuple(x[k] for k in bs.KEYS)
    ref = np.asarray(jax.jit(bs.scan_fn("reference"))(*args), np.float32)
    for impl, f in [("xla", bs.scan_fn("xla")), ("pallas_gpu", bs.scan_fn("pallas_gpu"))]:
      ms = bs.timeit(jax.jit(f), *args)
      err = bs.rel(jax.jit(f)(*args), ref)
      out["rows"].append(dict(dtype=dtype.name, impl=impl, ms=ms, rel_err=err))
      print(f"{dtype.name:9s} {impl:28s} {ms:.4f} ms  rel err {err:.1e}", flush=True)
    for ch in map(int, a.chunks.split(",")):
      for cc in map(int, a.concurrent.split(",")):
        name = f"mosaic_gpu chunk={ch} conc={cc}"
        try:
          f = jax.jit(functools.partial(scan_fwd_mgpu, chunk=ch, concurrent=cc))
          ms = bs.timeit(f, *args)
          err = bs.rel(f(*args), ref)
        except Exception as e:  # report and go on: this is a comparison, not the op
          import traceback
          print(f"{dtype.name:9s} {name:28s} failed: {type(e).__name__}: {str(e)[:300]}\n"
                + traceback.format_exc()[-2500:])
          ms, err = float("nan"), float("nan")
        out["rows"].append(dict(dtype=dtype.name, impl=name, ms=ms, rel_err=err))
        print(f"{dtype.name:9s} {name:28s} {ms:.4f} ms  rel err {err:.1e}", flush=True)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
