"""Selective-scan benchmark: reference (lax.scan), xla (associative_scan) and Pallas kernels at the
ViM-T/S/B scan shapes (batch 128, L 197, D = 2 * dim, N 16), forward and forward+backward, fp32
and bf16, against a device-to-device copy bandwidth measured in the same run.

  python -m toppax.tools.bench_scan --out /tmp/bench   # writes bench_scan.json / bench_scan.md

Timing: one warm-up call compiles; then 7 repeats of n back-to-back calls closed by
block_until_ready, median of the per-call times. n is chosen so that a repeat lasts at least
250 ms (at most 2000 calls): a repeat carries a fixed cost of its own (the first call's dispatch
and the closing synchronisation), which long repeats make negligible per call.
"x floor" is time over the HBM floor: the fewest bytes the op must move (each input read once,
each output written once, no saved states) at the measured copy rate.
Accuracy: relative L2 error against the float64 "reference" run on the same device, forward and
every gradient, at a smaller batch.
Breakdown (--breakdown): device time per call of each kernel of the timed implementation, from a
jax.profiler trace (on a backend without device events, XLA's host thunks), so that where the
time goes comes from this script too.
Sweep (--sweep, pallas_gpu): times FWD_VARIANTS, then BWD_VARIANTS over the fastest forward, at
ViM-S fp32, and runs the table with the fastest of each.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from toppax import timing
from toppax.pallas_kernels.tuning import GpuTuning
from toppax.ssm import ops

SHAPES = {"ViM-T": 384, "ViM-S": 768, "ViM-B": 1536}
KEYS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
LOW_PRECISION = ("u", "delta", "B", "C", "z")   # what a bf16 model feeds the scan in bf16


def _enable_x64(on):
  fn = getattr(jax, "enable_x64", None)
  if fn is None:
    from jax.experimental import enable_x64 as fn
  return fn(on)


def inputs(key, batch, length, dim, n, dtype):
  ks = jax.random.split(key, 8)
  nrm = lambda k, s: jax.random.normal(k, s, jnp.float32)
  x = dict(u=nrm(ks[0], (batch, length, dim)), delta=0.5 * nrm(ks[1], (batch, length, dim)) - 1.0,
           A=-jnp.exp(0.5 * nrm(ks[2], (dim, n))), B=nrm(ks[3], (batch, length, n)),
           C=nrm(ks[4], (batch, length, n)), D=nrm(ks[5], (dim,)),
           z=nrm(ks[6], (batch, length, dim)), delta_bias=0.5 * nrm(ks[7], (dim,)) - 1.0)
  return {k: (v.astype(dtype) if k in LOW_PRECISION else v) for k, v in x.items()}


def scan_fn(impl, **kw):
  fn = ops.get_implementation(impl)

  def f(u, delta, A, B, C, D, z, delta_bias):
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, reverse=False, gaps=None,
              gap_delta="prev", interpret=False, **kw)
  return f


def fwd_bwd(f):
  def g(args, ct):
    y, vjp = jax.vjp(f, *args)
    return y, vjp(ct)
  return g


def timeit(f, *args, min_rep_s=0.25, reps=7, max_calls=2000):
  out = f(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(5):                    # per-call time, with the repeat's fixed cost shared
    out = f(*args)
  jax.block_until_ready(out)
  once = (time.perf_counter() - t0) / 5
  n = max(1, min(max_calls, int(min_rep_s / max(once, 1e-6))))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(n):
      out = f(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / n)
  return statistics.median(times) * 1e3


def copy_bandwidth(mib=1024):
  """Device-to-device streaming rate (bytes read + written per second) of a `mib` MiB fp32
  array (1 GiB by default: far beyond any cache)."""
  x = jnp.arange(mib * 2**18, dtype=jnp.float32)
  f = jax.jit(lambda a: a + 1.0)
  ms = timeit(f, x)
  return 2 * x.nbytes / (ms * 1e-3)


def floor_bytes(batch, length, dim, n, dtype, mode):
  """Each tensor read or written once: fwd reads u, delta, z, B, C and writes y; the backward
  reads them again with dy and writes du, ddelta, dz, dB, dC."""
  it = jnp.dtype(dtype).itemsize
  seq, st = batch * length * dim * it, batch * length * n * it
  fwd = 4 * seq + 2 * st
  return fwd if mode == "fwd" else fwd + 7 * seq + 4 * st


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def accuracy(impl, dtype, dim, batch=8, length=197, n=16, seed=1, **kw):
  """Relative errors of the forward and every gradient against float64 lax.scan."""
  x = inputs(jax.random.PRNGKey(seed), batch, length, dim, n, dtype)
  ct = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, length, dim), jnp.float32)
  args = tuple(x[k] for k in KEYS)
  y, g = jax.jit(fwd_bwd(scan_fn(impl, **kw)))(args, ct.astype(dtype))
  with _enable_x64(True):
    a64 = tuple(jnp.asarray(np.asarray(a, np.float32), jnp.float64) for a in args)
    ref = fwd_bwd(scan_fn("reference"))
    y64, g64 = jax.jit(ref)(a64, jnp.asarray(np.asarray(ct.astype(dtype), np.float32),
                                             jnp.float64))
    errs = {"y": rel(y, y64)}
    errs.update({"d" + k: rel(a, b) for k, a, b in zip(KEYS, g, g64)})
  finite = bool(np.all(np.isfinite(np.asarray(y, np.float32)))) and all(
      bool(np.all(np.isfinite(np.asarray(a, np.float32)))) for a in g)
  return errs, finite


def kernel_breakdown(f, *args, calls=20):
  """Per-call device time of each kernel f launches: [(name, us per call, launches per call)],
  longest first, and where the events came from. Read from a jax.profiler trace of `calls`
  calls after a warm-up: on a GPU the kernels on the device's stream lines; where the trace has
  no device plane (CPU), the XLA thunks that the host client's threads ran."""
  jax.block_until_ready(f(*args))
  with tempfile.TemporaryDirectory(prefix="bench_scan_trace_") as logdir:
    with jax.profiler.trace(logdir):
      for _ in range(calls):
        out = f(*args)
      jax.block_until_ready(out)
    paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
      raise RuntimeError(f"jax.profiler wrote no trace under {logdir}")
    profile = jax.profiler.ProfileData.from_file(max(paths, key=os.path.getmtime))
  planes = list(profile.planes)                  # .planes is a one-pass iterator
  events, source = [], None
  for plane in planes:
    if plane.name.startswith("/device:"):
      lines = list(plane.lines)
      streams = [ln for ln in lines if ln.name.startswith("Stream")]
      ops = [ln for ln in lines if ln.name == "XLA Ops"]
      for line in streams or ops:      # kernels as launched; else the HLO ops on the device
        events += [(e.name, e.duration_ns) for e in line.events]
        source = "device streams" if streams else "device XLA ops"
  if not events:
    for plane in planes:
      if plane.name.startswith("/host:"):
        for line in plane.lines:
          if line.name.startswith("tf_XLA") and "Eigen" not in line.name:
            events += [(e.name, e.duration_ns) for e in line.events  # not the wrappers
                       if not e.name.startswith(("ThreadpoolListener", "ThunkExecutor",
                                                 "end: "))]
            source = "host XLA thunks"
  total, count = collections.defaultdict(float), collections.Counter()
  for name, ns in events:
    total[name] += ns
    count[name] += 1
  rows = sorted(((k, total[k] / calls / 1e3, count[k] / calls) for k in total),
                key=lambda r: -r[1])
  return rows, source


def environment():
  """The library versions (``toppax.timing.versions``) and the device of a run."""
  return dict(timing.versions(), device=jax.devices()[0].device_kind,
              backend=jax.default_backend())


def sweep(dtype, dim, variants, batch=128, length=197, n=16, mode="fwd"):
  x = inputs(jax.random.PRNGKey(0), batch, length, dim, n, dtype)
  args = tuple(x[k] for k in KEYS)
  ct = jnp.ones((batch, length, dim), dtype)
  rows = []
  for tun in variants:
    try:
      f = scan_fn("pallas_gpu", tuning=tun, check_lowering=False)
      ms = (timeit(jax.jit(f), *args) if mode == "fwd" else
            timeit(jax.jit(fwd_bwd(f)), args, ct))
    except Exception as e:  # a variant that does not compile is reported, not fatal
      ms = float("nan")
      print(f"  variant {tun} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    print(f"  sweep {mode} {jnp.dtype(dtype).name} {tun}: {ms:.4f} ms", flush=True)
    rows.append(dict(tuning=tun, ms=ms))
  return rows


# The default and its nearest alternatives; the other values and options tried measured slower
# (docs/benchmarks.md) and are not kept.
FWD_VARIANTS = [dict(block_d=64, num_warps=1, fwd_chunk=4, rows_ahead=r, bc_ahead=1)
                for r in (2, 4)]
BWD_VARIANTS = [dict(ckpt_every=k, bwd_chunk=c, bwd_maxnreg=r, bwd_num_warps=1)
                for k, c, r in [(4, 2, 168), (4, 2, 160), (2, 2, 168), (4, 4, None)]]


NATIVE = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}   # the Pallas kernel each backend runs


def _check_args(parser, a):
  """Refuses what would give a wrong table: a Pallas kernel on a backend where it would fall
  back to xla (its rows would carry xla's times under the kernel's name), unknown names."""
  backend = jax.default_backend()
  if a.impl not in ops.implementations():
    parser.error(f"--impl {a.impl!r}: unknown; choose from {sorted(ops.implementations())}")
  if a.impl.startswith("pallas") and NATIVE.get(backend) != a.impl:
    parser.error(f"--impl {a.impl} does not run on {backend} (it would fall back to xla and be "
                 f"timed under its name); run on its hardware or pass --impl xla")
  for flag, names in (("--shapes", a.shapes), ("--slow-shapes", a.slow_shapes)):
    bad = [s for s in names.split(",") if s and s not in SHAPES]
    if bad or (flag == "--shapes" and not names):
      parser.error(f"{flag}: unknown shape(s) {bad}; choose from {', '.join(SHAPES)}")
  for name in a.dtypes.split(","):
    if name not in ("float32", "bfloat16"):
      parser.error(f"--dtypes: {name!r} is not one of float32, bfloat16")
  if a.batch < 1 or a.length < 1 or a.copy_mib < 1:
    parser.error("--batch, --length and --copy-mib must be positive")
  if a.tunings:
    try:
      a.tunings = json.loads(a.tunings)
    except json.JSONDecodeError as e:
      parser.error(f"--tunings is not JSON ({e})")
    if not isinstance(a.tunings, dict) or not all(isinstance(v, dict) for v in a.tunings.values()):
      parser.error("--tunings must be a JSON object of {label: {tuning field: value}}")
    if a.impl != "pallas_gpu":
      parser.error("--tunings applies to --impl pallas_gpu")
    for label, t in a.tunings.items():
      try:
        GpuTuning.of(t, "pallas_gpu")
      except (TypeError, ValueError) as e:
        parser.error(f"--tunings {label}: {e}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=".", help="folder for bench_scan.json and bench_scan.md")
  p.add_argument("--impl", default=NATIVE.get(jax.default_backend(), "xla"),
                 help="implementation to time next to xla and reference (default: this "
                      "backend's Pallas kernel)")
  p.add_argument("--shapes", default=",".join(SHAPES))
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--length", type=int, default=197)
  p.add_argument("--sweep", action="store_true", help="time tuning variants first, use the best")
  p.add_argument("--tunings", default="",
                 help="JSON object {label: tuning fields}: time the Pallas implementation once "
                      "per entry, side by side (rows named impl[label]), e.g. "
                      "'{\"triton\": {}, \"pallas_triton\": {\"kernels\": \"pallas_triton\"}}'")
  p.add_argument("--slow-shapes", default=",".join(SHAPES),
                 help="shapes at which to time the reference (lax.scan) forward+backward")
  p.add_argument("--breakdown", action="store_true",
                 help="also record each kernel's device time per call (jax.profiler trace)")
  p.add_argument("--copy-mib", type=int, default=1024,
                 help="size of the array whose device-to-device copy sets the HBM floor")
  p.add_argument("--profile-once", action="store_true",
                 help="run the kernels once at the first shape and dtype (for ncu), then exit")
  a = p.parse_args(argv)
  _check_args(p, a)
  n = 16
  if a.profile_once:
    dim = SHAPES[a.shapes.split(",")[0]]
    dtype = jnp.dtype(a.dtypes.split(",")[0])
    x = inputs(jax.random.PRNGKey(0), a.batch, a.length, dim, n, dtype)
    args = tuple(x[k] for k in KEYS)
    f = scan_fn(a.impl, **({"check_lowering": False} if a.impl.startswith("pallas") else {}))
    jax.block_until_ready(jax.jit(f)(*args))
    jax.block_until_ready(jax.jit(fwd_bwd(f))(args, jnp.ones(x["u"].shape, dtype)))
    return
  info = environment()
  print(json.dumps(info), flush=True)
  bw = copy_bandwidth(a.copy_mib)
  print(f"device-to-device copy: {bw / 1e9:.0f} GB/s", flush=True)
  result = dict(versions=info, copy_GBps=bw / 1e9, batch=a.batch, length=a.length, n=n,
                impl=a.impl, rows=[], accuracy={}, accuracy_batch=min(8, a.batch), sweep={},
                breakdown={})

  tuning = None
  if a.sweep and a.impl == "pallas_gpu":
    fw = sweep(jnp.float32, SHAPES["ViM-S"], FWD_VARIANTS)
    best_f = min((r for r in fw if r["ms"] == r["ms"]), key=lambda r: r["ms"])["tuning"]
    bw_rows = sweep(jnp.float32, SHAPES["ViM-S"], [{**best_f, **v} for v in BWD_VARIANTS],
                    mode="fwd+bwd")
    best_b = min((r for r in bw_rows if r["ms"] == r["ms"]), key=lambda r: r["ms"])["tuning"]
    tuning = dataclasses.asdict(GpuTuning(**{**best_f, **best_b}))
    result["sweep"] = dict(fwd=fw, fwd_bwd=bw_rows, chosen=tuning)
    print("chosen tuning:", tuning, flush=True)
  # (row name, implementation, its keyword arguments) of the timed kernel: once, or once per
  # labelled tuning (on top of the sweep's choice). xla and reference are timed beside it.
  labelled = a.tunings.items() if a.tunings else [(None, None)]
  variants = [(a.impl if label is None else f"{a.impl}[{label}]", a.impl,
               {} if tuning is None and t is None else dict(tuning={**(tuning or {}), **(t or {})}))
              for label, t in labelled]
  if a.impl in ("xla", "reference"):
    variants = []
  for dname in a.dtypes.split(","):
    dtype = jnp.dtype(dname)
    for name, impl, kw_ in [("xla", "xla", {})] + variants:
      errs, finite = accuracy(impl, dtype, SHAPES["ViM-S"], batch=result["accuracy_batch"],
                              length=a.length, **kw_)
      result["accuracy"][f"{name}/{dname}"] = dict(errors=errs, finite=finite)
      print(f"accuracy {name} {dname} (ViM-S shape, batch {result['accuracy_batch']}, "
            "vs float64 lax.scan): "
            f"max rel {max(errs.values()):.2e} finite={finite} "
            + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)

  for shape in a.shapes.split(","):
    dim = SHAPES[shape]
    for dname in a.dtypes.split(","):
      dtype = jnp.dtype(dname)
      x = inputs(jax.random.PRNGKey(0), a.batch, a.length, dim, n, dtype)
      args = tuple(x[k] for k in KEYS)
      ct = jax.random.normal(jax.random.PRNGKey(3), (a.batch, a.length, dim), dtype)
      for mode in ("fwd", "fwd+bwd"):
        base = None
        nbytes = floor_bytes(a.batch, a.length, dim, n, dtype, mode)
        floor_ms = nbytes / bw * 1e3
        for name, impl, kw_ in [("xla", "xla", {}), ("reference", "reference", {})] + variants:
          if impl == "reference" and mode == "fwd+bwd" and shape not in a.slow_shapes.split(","):
            continue
          f = scan_fn(impl, **kw_)
          try:
            ms = (timeit(jax.jit(f), *args) if mode == "fwd" else
                  timeit(jax.jit(fwd_bwd(f)), args, ct))
          except Exception as e:
            print(f"{shape} {dname} {mode} {name} failed: {type(e).__name__}: {e}", flush=True)
            continue
          if impl == "xla":
            base = ms
          row = dict(shape=shape, D=dim, dtype=dname, mode=mode, impl=name, ms=ms,
                     GBps=nbytes / (ms * 1e-3) / 1e9, x_floor=ms / floor_ms,
                     speedup_vs_assoc=(base / ms) if base else None, floor_ms=floor_ms)
          result["rows"].append(row)
          write(a.out, result)   # after every row, so a run cut short keeps what it measured
          print(f"{shape:6s} {dname:8s} {mode:7s} {name:10s} {ms:8.3f} ms  "
                f"{row['GBps']:7.0f} GB/s  {row['x_floor']:6.2f}x floor  "
                f"{(base / ms) if base else float('nan'):6.1f}x vs assoc", flush=True)
        if a.breakdown:
          for name, impl, kw_ in variants or [(a.impl, a.impl, {})]:
            fn = scan_fn(impl, **kw_)
            try:
              rows, source = (kernel_breakdown(jax.jit(fn), *args) if mode == "fwd" else
                              kernel_breakdown(jax.jit(fwd_bwd(fn)), args, ct))
            except Exception as e:
              print(f"{shape} {dname} {mode} {name} breakdown failed: {type(e).__name__}: {e}",
                    flush=True)
              continue
            key = f"{shape}/{dname}/{mode}" + ("" if name == a.impl else f"/{name}")
            result["breakdown"][key] = dict(source=source, impl=name, kernels=[
                dict(name=k, us_per_call=us, launches_per_call=c) for k, us, c in rows])
            write(a.out, result)
            print(f"  {name} {mode} kernels ({source}): " + ", ".join(
                f"{k} {us:.1f} us" for k, us, _ in rows[:6]), flush=True)

  print(write(a.out, result))


def write(out, result):
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "bench_scan.json"), "w") as fh:
    json.dump(result, fh, indent=1, default=str)
  md = markdown(result)
  with open(os.path.join(out, "bench_scan.md"), "w") as fh:
    fh.write(md)
  return md


def markdown(r):
  v = r["versions"]
  lines = [f"Device: {v['device']} ({v['backend']}), jax {v['jax']}, jaxlib {v['jaxlib']}"
           + (f", triton {v['triton']}" if "triton" in v else "")
           + f"; copy bandwidth {r['copy_GBps']:.0f} GB/s; batch {r['batch']}, L {r['length']}, "
           f"N {r['n']}.", "",
           "| shape | dtype | pass | impl | ms | GB/s | x HBM floor | x vs associative_scan |",
           "|---|---|---|---|---:|---:|---:|---:|"]
  for w in r["rows"]:
    sp = "" if w["speedup_vs_assoc"] is None else f"{w['speedup_vs_assoc']:.1f}"
    lines.append(f"| {w['shape']} (D={w['D']}) | {w['dtype']} | {w['mode']} | {w['impl']} | "
                 f"{w['ms']:.3f} | {w['GBps']:.0f} | {w['x_floor']:.2f} | {sp} |")
  lines += ["", f"Accuracy (ViM-S shape, batch {r.get('accuracy_batch', 8)}, relative L2 error "
            "vs float64 lax.scan):", "",
            "| impl/dtype | y | " + " | ".join("d" + k for k in KEYS) + " |",
            "|---|" + "---:|" * (len(KEYS) + 1)]
  for name, acc in r["accuracy"].items():
    e = acc["errors"]
    lines.append(f"| {name} | " + " | ".join(f"{e[k]:.1e}" for k in ["y"] + ["d" + k for k in KEYS])
                 + " |")
  for key, b in r.get("breakdown", {}).items():
    total = sum(k["us_per_call"] for k in b["kernels"])
    lines += ["", f"Kernels of {r['impl']}, {key} ({b['source']}; {total:.1f} us per call in all):",
              "", "| kernel | us per call | share | launches per call |", "|---|---:|---:|---:|"]
    shown, rest = b["kernels"][:12], b["kernels"][12:]
    for k in shown:
      lines.append(f"| `{k['name'][:80]}` | {k['us_per_call']:.1f} | "
                   f"{k['us_per_call'] / max(total, 1e-9):.1%} | {k['launches_per_call']:.3g} |")
    if rest:
      us = sum(k["us_per_call"] for k in rest)
      lines.append(f"| {len(rest)} others | {us:.1f} | {us / max(total, 1e-9):.1%} | "
                   f"{sum(k['launches_per_call'] for k in rest):.3g} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
