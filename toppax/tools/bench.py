"""``--mode=bench``: inference and train-step throughput of dense and pruned models.

For every variant (``config.bench.variants``: dense, top, removal, evit), dtype and batch size:
inference img/s of the jitted forward on one device, and train-step img/s of the full data-
parallel step (toppax.train: augmentation, forward, backward, AdamW, EMA) on the mesh of the
first k devices for each k in ``config.bench.devices`` (0 = all local devices; the per-device
batch is fixed, so k devices process k times the batch). Warm-up (compilation) is excluded,
every timing ends in ``block_until_ready``, the figure is the median over ``repeats``. Results
go to ``<workdir>/bench.json`` and ``bench.md`` with the device and library versions.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from toppax import augment, evaluate, factory, optim, sharding, train
from toppax.timing import time_call, versions


def _variant_config(config, dtype):
  c = copy.deepcopy(config)
  c.model.dtype = dtype
  return c


def _synthetic_batch(config, n, seed=0):
  rng = np.random.default_rng(seed)
  size = config.model.img_size
  return {"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
          "label": rng.integers(0, config.data.num_classes, (n,), dtype=np.int32)}


def bench_inference(config, variant, batch_size, repeats, warmup) -> float:
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
  jax.block_until_ready(f(p, r, images))
  first = time.perf_counter() - t0
  t = time_call(f, p, r, images, repeats=repeats, warmup=max(warmup - 1, 0))
  return batch_size / t, first


def bench_train_step(config, variant, per_device_batch, num_devices, repeats, warmup):
  """(train-step img/s on ``num_devices``, seconds of the first step incl. compilation)."""
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
  step = train.make_train_step(c, defs, tx, schedule, mesh)
  batch = sharding.to_global(_synthetic_batch(c, c.batch_size), mesh)
  t0 = time.perf_counter()
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
  return c.batch_size / statistics.median(times), first


def run(config, workdir: str | None = None) -> dict:
  b = config.bench
  devices = jax.devices()
  result = {"model": config.model.name, "img_size": config.model.img_size,
            "backend": jax.default_backend(), "device": devices[0].device_kind,
            "local_devices": jax.local_device_count(), "versions": versions(),
            "repeats": b.repeats, "warmup": b.warmup, "rows": []}
  for dtype in b.dtypes:
    c = _variant_config(config, dtype)
    for variant in b.variants:
      for bs in b.batch_sizes:
        ips, first_s = bench_inference(c, variant, bs, b.repeats, b.warmup)
        gflops, _ = evaluate.model_gflops(c, factory.prune_config(c, variant))
        row = {"variant": variant, "dtype": dtype, "batch_per_device": bs, "gflops": gflops,
               "infer_img_per_s": ips, "infer_ms_per_batch": 1e3 * bs / ips,
               "infer_first_call_s": first_s}
        if b.train:
          for k in dict.fromkeys(k or len(devices) for k in b.devices):
            ips, first_s = bench_train_step(c, variant, bs, k, b.repeats, b.warmup)
            row[f"train_img_per_s_{k}dev"] = ips
            row[f"train_first_step_s_{k}dev"] = first_s
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


def format_markdown(result) -> str:
  rows = result["rows"]
  train_cols = sorted({k for r in rows for k in r if k.startswith("train_img_per_s_")},
                      key=lambda k: int(k.rsplit("_", 1)[1][:-3]))
  dense = {(r["dtype"], r["batch_per_device"]): r for r in rows if r["variant"] == "dense"}
  head = ["variant", "dtype", "batch/device", "GFLOPs", "inference img/s", "ms/batch",
          "speed-up (FLOPs ratio)", "first call s"] + [
      f"train img/s ({k.rsplit('_', 1)[1][:-3]} dev)" for k in train_cols]
  lines = [f"{result['model']} @ {result['img_size']}px on {result['local_devices']} x "
           f"{result['device']} ({result['backend']}); "
           + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
           "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for r in rows:
    d = dense.get((r["dtype"], r["batch_per_device"]))
    ratio = (f"{r['infer_img_per_s'] / d['infer_img_per_s']:.2f}x ({d['gflops'] / r['gflops']:.2f}x)"
             if d is not None and r is not d and "gflops" in r else "")
    cells = [r["variant"], r["dtype"], str(r["batch_per_device"]),
             f"{r['gflops']:.3f}" if "gflops" in r else "", f"{r['infer_img_per_s']:.1f}",
             f"{r['infer_ms_per_batch']:.2f}" if "infer_ms_per_batch" in r else "", ratio,
             f"{r['infer_first_call_s']:.1f}" if "infer_first_call_s" in r else ""]
    cells += [f"{r[k]:.1f}" if k in r else "" for k in train_cols]
    lines.append("| " + " | ".join(cells) + " |")
  lines.append(f"median of {result['repeats']} timed calls after {result['warmup']} warm-up "
               "calls, block_until_ready; train = full data-parallel step; first call s = the "
               "first jitted call (tracing + compilation + one run); GFLOPs: toppax.tools.flops.")
  return "\n".join(lines)
