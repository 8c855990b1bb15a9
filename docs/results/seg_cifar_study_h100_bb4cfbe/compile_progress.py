"""Compiles one study entry's fine-tune (train step, then evaluation step) ahead, alone, and
prints every 10 s how many scan kernels this process has built: jax-triton's compiled kernels,
Mosaic GPU forward compile checks, scan build checks. Then, per program, its wall time and
trace / lower / compile seconds.

  python docs/results/seg_cifar_study_h100_bb4cfbe/compile_progress.py DATA_DIR top:0.5 [dense:1.0 ...]
"""
import json
import sys
import threading
import time

from configs import seg_cifar
from toppax import sharding, study, timing, train


def counts():
  from jax_triton import triton_lib
  from toppax.pallas_kernels import mgpu_scan, scan_call
  return {"triton_kernels": len(triton_lib._COMPILED_KERNEL_CACHE),
          "mosaic_checks": len(mgpu_scan._compiled), "build_checks": len(scan_call._verdicts)}


def main(data, entries):
  t0 = time.time()

  def watch():
    while True:
      time.sleep(10)
      n = counts()
      print(f"{time.time() - t0:.0f} s: triton {n['triton_kernels']} mosaic {n['mosaic_checks']} "
            f"checks {n['build_checks']}", flush=True)
  threading.Thread(target=watch, daemon=True).start()
  c = seg_cifar.get_config(f"data={data}")
  mesh = sharding.make_mesh()
  task = study._Task(c)
  for method, ratio in (e.split(":") for e in entries):
    ft = study._finetune(study._pruned(c, method, float(ratio), "clip"), "/none")
    fit_task = task._seg.SegmentationTask(ft)
    for name, fn in (("train", lambda: train.compile_ahead(ft, fit_task, mesh)),
                     ("eval", lambda: task.compile_eval_ahead(ft, mesh, fit_task.eval_source))):
      t = time.perf_counter()
      with timing.compile_stages() as st:
        fn()
      print(method, ratio, name, json.dumps({"wall_s": round(time.perf_counter() - t, 1), **st,
                                             **counts()}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
