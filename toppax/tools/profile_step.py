"""Where the time of one train step goes: a ``jax.profiler`` trace of a few steps, its device
kernels summed by category.

  python -m toppax.tools.profile_step --config=configs/vim_s.py --out=/tmp/profile \\
    --config.model.dtype=bfloat16 --batch=128 --steps=5

The categories come from the kernel names in the trace (Perfetto JSON that ``jax.profiler``
writes next to its TensorBoard files): the selective-scan kernels (Pallas/Triton/Mosaic calls
named ``selective_scan*``), matrix multiplies and convolutions (cuBLAS/cuDNN/CUTLASS kernels,
``gemm``, ``xmma``, ``conv``), copies and transposes, collectives (NCCL), and the rest (XLA's
fused elementwise and reduction kernels: augmentation, norms, the optimizer, EMA). "idle" is
the wall time of the steps minus the busy time of the device stream. Writes ``profile.json``
and ``profile.md`` to ``--out`` and prints the table.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import time

CATEGORIES = (
    ("selective scan", re.compile(r"selective_scan|scan_fwd|scan_bwd", re.I)),
    ("matmul / conv", re.compile(r"gemm|xmma|cutlass|cublas|cudnn|conv|wgmma|sm90_|dot", re.I)),
    ("copies / transposes", re.compile(r"copy|transpose|memcpy|memset|concatenate", re.I)),
    ("collectives", re.compile(r"nccl|all_reduce|allreduce|all-reduce", re.I)),
)


def category(name: str) -> str:
  for label, pattern in CATEGORIES:
    if pattern.search(name):
      return label
  return "elementwise / reductions (fusions)"


def device_kernels(trace: dict) -> list[tuple[str, float, float]]:
  """(name, start us, duration us) of the device's kernel events in a Perfetto/Chrome trace:
  the complete events ("X") on the processes whose name says GPU/device."""
  gpu_pids = set()
  for ev in trace.get("traceEvents", []):
    if ev.get("ph") == "M" and ev.get("name") == "process_name":
      label = str(ev.get("args", {}).get("name", ""))
      if re.search(r"/device:GPU|GPU:|/device:TPU|TPU:", label):
        gpu_pids.add(ev.get("pid"))
  out = []
  for ev in trace.get("traceEvents", []):
    if ev.get("ph") == "X" and ev.get("pid") in gpu_pids and "dur" in ev:
      out.append((str(ev.get("name", "")), float(ev["ts"]), float(ev["dur"])))
  return out


def summarize(kernels, steps: int, wall_s: float) -> dict:
  """Per-step milliseconds by category, the busy time of the kernels' union, and idle time."""
  by = collections.Counter()
  for name, _, dur in kernels:
    by[category(name)] += dur
  spans = sorted((ts, ts + dur) for _, ts, dur in kernels)
  busy, end = 0.0, None
  for a, b in spans:
    if end is None or a > end:
      busy += b - a
      end = b
    elif b > end:
      busy += b - end
      end = b
  per_step = {k: v / 1e3 / steps for k, v in by.items()}
  wall_ms = 1e3 * wall_s / steps
  return {"wall_ms_per_step": wall_ms, "kernel_ms_per_step": per_step,
          "busy_ms_per_step": busy / 1e3 / steps,
          "idle_ms_per_step": max(wall_ms - busy / 1e3 / steps, 0.0),
          "kernels_per_step": len(kernels) / steps}


def format_table(result: dict) -> str:
  s = result["summary"]
  wall = s["wall_ms_per_step"]
  lines = [f"{result['model']} train step, batch {result['batch']}, {result['dtype']}, "
           f"{result['device']}: {wall:.1f} ms per step ({result['img_per_s']:.0f} img/s), "
           f"peak {result['peak_gib']:.1f} GiB" if result.get("peak_gib") is not None else
           f"{result['model']} train step, batch {result['batch']}: {wall:.1f} ms per step",
           "", "| part | ms per step | share of the step |", "| --- | ---: | ---: |"]
  for k, v in sorted(s["kernel_ms_per_step"].items(), key=lambda kv: -kv[1]):
    lines.append(f"| {k} | {v:.2f} | {100 * v / wall:.1f}% |")
  lines.append(f"| idle (no kernel running) | {s['idle_ms_per_step']:.2f} | "
               f"{100 * s['idle_ms_per_step'] / wall:.1f}% |")
  lines.append(f"\n{s['kernels_per_step']:.0f} kernels per step; commit {result['commit']}; "
               + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
  return "\n".join(lines)


def run(config, out: str, batch: int, steps: int) -> dict:
  import jax

  from toppax import factory, optim, sharding, train
  from toppax.timing import versions
  from toppax.tools import bench
  c = config
  mesh = sharding.make_mesh(1)
  c.batch_size = batch
  schedule = optim.lr_schedule(c, 100, 1000)
  tx = optim.make_optimizer(c, schedule)
  defs = factory.model_defs(c)
  state = factory.init_state(c, defs, tx, mesh)
  step = train.make_train_step(c, defs, tx, schedule, mesh, bench._loss_of(c))
  batch_arrays = sharding.to_global(bench._synthetic_batch(c, batch), mesh)
  for _ in range(3):                                 # compile and warm up
    state, m = step(state, batch_arrays)
  jax.block_until_ready((state, m))
  times = []
  for _ in range(10):
    t = time.perf_counter()
    state, m = step(state, batch_arrays)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t)
  os.makedirs(out, exist_ok=True)
  trace_dir = os.path.join(out, "trace")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    t = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, batch_arrays)
    jax.block_until_ready((state, m))
    wall = time.perf_counter() - t
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"jax.profiler wrote no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    trace = json.load(f)
  summary = summarize(device_kernels(trace), steps, wall)
  peak = bench.peak_memory_bytes()
  result = {"model": c.model.name, "batch": batch, "dtype": c.model.dtype,
            "device": jax.devices()[0].device_kind, "img_per_s": batch / statistics.median(times),
            "median_step_ms": 1e3 * statistics.median(times),
            "peak_gib": None if peak is None else peak / 2**30, "summary": summary,
            "commit": bench.commit(), "versions": versions()}
  with open(os.path.join(out, "profile.json"), "w") as f:
    json.dump(result, f, indent=2)
  table = format_table(result)
  with open(os.path.join(out, "profile.md"), "w") as f:
    f.write(table + "\n")
  print(table, flush=True)
  return result


def main(argv):
  from absl import flags
  from ml_collections import config_flags
  flags.FLAGS.unparse_flags()
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  flags.DEFINE_string("out", "/tmp/toppax_profile", "Where the trace and tables go.")
  flags.DEFINE_integer("batch", 128, "Batch size of the step.")
  flags.DEFINE_integer("steps", 5, "Traced steps.")
  flags.FLAGS(argv)
  run(flags.FLAGS.config, flags.FLAGS.out, flags.FLAGS.batch, flags.FLAGS.steps)


if __name__ == "__main__":
  main(sys.argv)
