"""``--mode=bench``: inference and train-step throughput and peak device memory of dense and
pruned models (classification and segmentation).

For every variant (``config.bench.variants``: dense, top, removal, evit), dtype and batch size:
inference img/s of the jitted forward on one device, and train-step img/s of the full data-
parallel step (toppax.train: augmentation, forward, backward, AdamW, EMA; segmentation: its loss
with the auxiliary head) on the mesh of the first k devices for each k in
``config.bench.devices`` (0 = all local devices; the per-device batch is fixed, so k devices
process k times the batch). Each measurement runs in a process of its own, so that its peak
device memory (``memory_stats()["peak_bytes_in_use"]``, where the backend reports it) is its
own. Warm-up (compilation) is excluded, every timing ends in ``block_until_ready``, the figure is
the median over ``repeats``; the first call's time is kept, split into tracing, lowering and
XLA compilation (``toppax.timing.compile_stages``; nested compilations, such as the scan
kernels' build check inside the model's trace, count in each stage they run in). Results go to
``<workdir>/bench.json`` and ``bench.md`` with the device, versions and commit.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from toppax import augment, evaluate, factory, optim, sharding, train
from toppax.timing import compile_stages, time_call, versions


def commit() -> str:
  """The code's commit: ``$TOPPAX_COMMIT`` when set (a copy without .git), else git's HEAD."""
  if os.environ.get("TOPPAX_COMMIT"):
    return os.environ["TOPPAX_COMMIT"]
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10,
                          check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def peak_memory_bytes() -> int | None:
  """The first local device's peak allocation so far, or None where the backend keeps none."""
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return int(peak) if peak is not None else None


def _variant_config(config, dtype):
  c = copy.deepcopy(config)
  c.model.dtype = dtype
  return c


def _synthetic_batch(config, n, seed=0):
  rng = np.random.default_rng(seed)
  size = config.model.img_size
  batch = {"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)}
  if factory.is_segmentation(config):
    batch["label"] = rng.integers(0, config.data.num_classes, (n, size, size)).astype(np.int32)
  else:
    batch["label"] = rng.integers(0, config.data.num_classes, (n,), dtype=np.int32)
  return batch


def bench_inference(config, variant, batch_size, repeats, warmup):
  """(img/s of the jitted forward on one device, seconds of its first call, the first call's
  compilation stages: ``toppax.timing.compile_stages``)."""
  pruning = factory.prune_config(config, variant)
  model = factory.create_model(config, pruning=pruning)
  model.eval()
  graphdef, params, rngs = nnx.split(model, nnx.Param, ...)
  images = jnp.asarray(augment.normalize(
      jnp.asarray(_synthetic_batch(config, batch_size)["image"]), config.data.mean,
      config.data.std))
  f = jax.jit(lambda p, r, x: nnx.merge(graphdef, p, r)(x))
  p, r = nnx.to_pure_dict(params), nnx.to_pure_dict(rngs)
  t0 = time.perf_counter()
  with compile_stages() as stages:
    jax.block_until_ready(f(p, r, images))
  first = time.perf_counter() - t0
  t = time_call(f, p, r, images, repeats=repeats, warmup=max(warmup - 1, 0))
  return batch_size / t, first, stages


def _loss_of(config):
  if factory.is_segmentation(config):
    from toppax.segmentation.train import SegmentationTask
    task = SegmentationTask.__new__(SegmentationTask)   # its loss needs the config only
    task.config = config
    return task.loss
  return None


def bench_train_step(config, variant, per_device_batch, num_devices, repeats, warmup):
  """(train-step img/s on ``num_devices``, seconds of the first step incl. compilation, its
  compilation stages)."""
  c = copy.deepcopy(config)
  p = factory.prune_config(c, variant)
  c.pruning.enabled = p is not None
  if p is not None:
    c.pruning.alignment, c.pruning.fused_token = p.alignment, p.fused_token
  mesh = sharding.make_mesh(num_devices)
  n = mesh.devices.size
  c.batch_size = per_device_batch * n
  schedule = optim.lr_schedule(c, 100, 1000)
  tx = optim.make_optimizer(c, schedule)
  defs = factory.model_defs(c)
  state = factory.init_state(c, defs, tx, mesh)
  step = train.make_train_step(c, defs, tx, schedule, mesh, _loss_of(c))
  batch = sharding.to_global(_synthetic_batch(c, c.batch_size), mesh)
  t0 = time.perf_counter()
  with compile_stages() as stages:
    state, m = step(state, batch)
    jax.block_until_ready(state)
  first = time.perf_counter() - t0
  for _ in range(warmup - 1):
    state, m = step(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t)
  return c.batch_size / statistics.median(times), first, stages


def measure(config, job: dict) -> dict:
  """One row's measurement, in this process: ``job`` is ``{"kind": "infer"|"train", "variant",
  "dtype", "batch", "devices"}``."""
  c = _variant_config(config, job["dtype"])
  b = config.bench
  if job["kind"] == "infer":
    ips, first, stages = bench_inference(c, job["variant"], job["batch"], b.repeats, b.warmup)
  else:
    ips, first, stages = bench_train_step(c, job["variant"], job["batch"], job["devices"],
                                          b.repeats, b.warmup)
  return {"img_per_s": ips, "first_call_s": first, "peak_bytes": peak_memory_bytes(),
          "first_call_stages": stages}


def _run_job(config, job: dict) -> dict:
  """``measure`` in a fresh Python process (its own peak memory); the error text on failure."""
  with tempfile.TemporaryDirectory() as tmp:
    cfg_path, out_path = os.path.join(tmp, "config.json"), os.path.join(tmp, "out.json")
    with open(cfg_path, "w") as f:
      f.write(config.to_json_best_effort())
    cmd = [sys.executable, "-m", "toppax.tools.bench", cfg_path, json.dumps(job), out_path]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, TOPPAX_COMMIT=commit()))
    if proc.returncode != 0 or not os.path.exists(out_path):
      return {"error": (proc.stderr or proc.stdout)[-2000:]}
    with open(out_path) as f:
      return json.load(f)


def run(config, workdir: str | None = None) -> dict:
  b = config.bench
  if not (b.infer or b.train):
    raise ValueError("config.bench.infer and config.bench.train are both False: nothing to time")
  devices = jax.devices()
  result = {"model": config.model.name, "img_size": config.model.img_size,
            "backend": jax.default_backend(), "device": devices[0].device_kind,
            "local_devices": jax.local_device_count(), "versions": versions(),
            "commit": commit(), "repeats": b.repeats, "warmup": b.warmup, "rows": []}
  for dtype in b.dtypes:
    c = _variant_config(config, dtype)
    for variant in b.variants:
      for bs in b.batch_sizes:
        gflops, _ = evaluate.model_gflops(c, factory.prune_config(c, variant))
        row = {"variant": variant, "dtype": dtype, "batch_per_device": bs, "gflops": gflops}
        m = (_run_job(config, {"kind": "infer", "variant": variant, "dtype": dtype,
                               "batch": bs, "devices": 1}) if b.infer else None)
        if m is not None and "error" in m:
          row["infer_error"] = m["error"]
        elif m is not None:
          row.update(infer_img_per_s=m["img_per_s"], infer_ms_per_batch=1e3 * bs / m["img_per_s"],
                     infer_first_call_s=m["first_call_s"], infer_peak_bytes=m["peak_bytes"],
                     infer_first_call_stages=m["first_call_stages"])
        if b.train:
          for k in dict.fromkeys(k or len(devices) for k in b.devices):
            m = _run_job(config, {"kind": "train", "variant": variant, "dtype": dtype,
                                  "batch": bs, "devices": k})
            if "error" in m:
              row[f"train_error_{k}dev"] = m["error"]
              continue
            row[f"train_img_per_s_{k}dev"] = m["img_per_s"]
            row[f"train_first_step_s_{k}dev"] = m["first_call_s"]
            row[f"train_first_step_stages_{k}dev"] = m["first_call_stages"]
            row[f"train_peak_bytes_{k}dev"] = m["peak_bytes"]
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        _write(result, workdir)   # after every row: an interrupted run keeps what it measured
  print(format_markdown(result), flush=True)
  return result


def _write(result, workdir):
  if workdir and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "bench.json"), "w") as f:
      json.dump(result, f, indent=2)
    with open(os.path.join(workdir, "bench.md"), "w") as f:
      f.write(format_markdown(result) + "\n")


def _gib(v) -> str:
  return "" if v is None else f"{v / 2**30:.1f}"


def _first_call(seconds, stages) -> str:
  if seconds is None:
    return ""
  if not stages:
    return f"{seconds:.1f}"
  return f"{seconds:.1f} ({stages['lower_s']:.1f} + {stages['compile_s']:.1f})"


def format_markdown(result) -> str:
  rows = result["rows"]
  train_cols = sorted({k for r in rows for k in r if k.startswith("train_img_per_s_")},
                      key=lambda k: int(k.rsplit("_", 1)[1][:-3]))
  dense = {(r["dtype"], r["batch_per_device"]): r for r in rows if r["variant"] == "dense"}
  head = ["variant", "dtype", "batch/device", "GFLOPs", "inference img/s", "ms/batch",
          "speed-up (FLOPs ratio)", "peak GiB", "first call s"]
  for k in train_cols:
    n = k.rsplit("_", 1)[1][:-3]
    head += [f"train img/s ({n} dev)", f"train peak GiB ({n} dev)"]
  lines = [f"{result['model']} @ {result['img_size']}px on {result['local_devices']} x "
           f"{result['device']} ({result['backend']}), commit {result.get('commit', '?')}; "
           + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
           "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for r in rows:
    d = dense.get((r["dtype"], r["batch_per_device"]))
    ratio = (f"{r['infer_img_per_s'] / d['infer_img_per_s']:.2f}x ({d['gflops'] / r['gflops']:.2f}x)"
             if d is not None and r is not d and "infer_img_per_s" in r
             and "infer_img_per_s" in d else "")
    cells = [r["variant"], r["dtype"], str(r["batch_per_device"]),
             f"{r['gflops']:.3f}" if "gflops" in r else "",
             (f"{r['infer_img_per_s']:.1f}" if "infer_img_per_s" in r
              else "error" if "infer_error" in r else ""),
             f"{r['infer_ms_per_batch']:.2f}" if "infer_ms_per_batch" in r else "", ratio,
             _gib(r.get("infer_peak_bytes")),
             _first_call(r.get("infer_first_call_s"), r.get("infer_first_call_stages"))]
    for k in train_cols:
      n = k.rsplit("_", 1)[1]
      cells += [f"{r[k]:.1f}" if k in r else ("error" if f"train_error_{n}" in r else ""),
                _gib(r.get(f"train_peak_bytes_{n}"))]
    lines.append("| " + " | ".join(cells) + " |")
  lines.append(f"median of {result['repeats']} timed calls after {result['warmup']} warm-up "
               "calls, block_until_ready; one process per measurement (peak GiB: that "
               "process's peak device memory); train = full data-parallel step; first call s = "
               "the first jitted call (tracing + compilation + one run), in brackets its seconds of "
               "lowering (kernel compiles included) + XLA compilation (tracing, where the scan "
               "kernels' build check runs, is in bench.json); GFLOPs: toppax.tools.flops.")
  return "\n".join(lines)


def _child(config_path: str, job_json: str, out_path: str) -> None:
  from ml_collections import ConfigDict
  with open(config_path) as f:
    config = ConfigDict(json.load(f))
  result = measure(config, json.loads(job_json))
  with open(out_path, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":      # one measurement, run by ``_run_job`` in a process of its own
  _child(*sys.argv[1:4])
