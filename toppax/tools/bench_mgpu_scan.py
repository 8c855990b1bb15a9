"""Backend comparison for the inference forward of the scan: Mosaic GPU
(``toppax.pallas_kernels.mgpu_scan``) against the Triton-lowered forward (``gpu_scan``,
``GpuTuning(fwd_backend="triton")``) and associative_scan, in one run, over the Mosaic kernel's
chunk size and pipeline depth. ViM's call (D, z, delta_bias, softplus) at batch 128, L 197, N 16.

  python3 -m toppax.tools.bench_mgpu_scan [--chunks 4,8,16] [--concurrent 2] [--dim 768]
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from toppax.pallas_kernels import gpu_scan, mgpu_scan
from toppax.pallas_kernels.scan_call import ScanConfig, prepare
from toppax.pallas_kernels.tuning import GpuTuning
from toppax.tools import bench_scan as bs


def _cfg(**tuning):
  return ScanConfig(delta_softplus=True, reverse=False, gap_delta=None, has_z=True,
                    interpret=False, tuning=GpuTuning(**tuning))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dim", type=int, default=768)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--length", type=int, default=197)
  p.add_argument("--chunks", default="4,8,16")
  p.add_argument("--concurrent", default="2")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--out", default=None, help="JSON file for the rows")
  a = p.parse_args(argv)
  info = bs.environment()
  print(json.dumps(info), flush=True)
  out = dict(versions=info, rows=[])
  for dtype in [jnp.dtype(d) for d in a.dtypes.split(",")]:
    x = bs.inputs(jax.random.PRNGKey(0), a.batch, a.length, a.dim, 16, dtype)
    args = prepare(*(x[k] for k in bs.KEYS), None)
    ref = np.asarray(jax.jit(bs.scan_fn("reference"))(*(x[k] for k in bs.KEYS)), np.float32)
    triton = _cfg(fwd_backend="triton")
    runs = [("xla", jax.jit(bs.scan_fn("xla")), tuple(x[k] for k in bs.KEYS)),
            ("triton (gpu_scan)", jax.jit(lambda a: gpu_scan.forward(triton, a, False)[0]),
             (args,))]
    for ch in map(int, a.chunks.split(",")):
      for cc in map(int, a.concurrent.split(",")):
        cfg = _cfg(mosaic_chunk=ch, mosaic_concurrent=cc)
        runs.append((f"mosaic chunk={ch} conc={cc}",
                     jax.jit(lambda a, cfg=cfg: mgpu_scan.forward(cfg, a)), (args,)))
    for name, f, fargs in runs:
      try:
        ms = bs.timeit(f, *fargs)
        err = bs.rel(f(*fargs), ref)
      except Exception as e:  # a variant that does not compile is reported, not fatal
        print(f"{dtype.name:9s} {name:26s} failed: {type(e).__name__}: {str(e)[:300]}")
        ms = err = float("nan")
      out["rows"].append(dict(dtype=dtype.name, impl=name, ms=ms, rel_err=err))
      print(f"{dtype.name:9s} {name:26s} {ms:.4f} ms  rel err {err:.1e}", flush=True)
  if a.out:
    with open(a.out, "w") as fh:
      json.dump(out, fh, indent=1)


if __name__ == "__main__":
  main()
