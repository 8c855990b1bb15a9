"""Host throughput of the input pipeline (img/s) by number of worker processes.

  PYTHONPATH=. python -m toppax.tools.bench_input --workers=0,1,2 --out=input.json
  PYTHONPATH=. python -m toppax.tools.bench_input --mode=train --folder=/data/imagenet/train
  PYTHONPATH=. python -m toppax.tools.bench_input --config=configs/vim_s.py --mode=eval

Without ``--folder`` / ``--config`` it writes ImageNet-like JPEGs into a temporary directory:
``--images`` files of ``--image_size`` (default 500x375, ImageNet's most common size) cut at
random positions and scales from scikit-learn's two bundled photos, mirrored and colour-scaled,
saved as baseline 4:2:0 JPEGs at ``--quality`` 94, about 63 KB each on average (the size of
the ImageNet-like files the pipeline was first measured on). Each worker count runs the
training (RandomResizedCrop + flip) and/or evaluation (resize + centre crop) pipeline for
``--seconds`` after a warm-up of two batches per worker, and reports images per second over
the whole host (the consumer only takes batches) and the CPU time spent per image by this
process and its workers (which, unlike img/s, does not depend on other load on the machine).
A table goes to stdout, JSON to ``--out``. Scripts that start worker processes need an
``if __name__ == "__main__":`` guard (they are spawned, and re-import the main module).
"""
from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_string("config", None, "toppax config file (its data source, img_size, aug)")
flags.DEFINE_enum("mode", "both", ["train", "eval", "both"], "which pipeline to time")
flags.DEFINE_string("workers", "0,1,2", "comma-separated worker-process counts")
flags.DEFINE_string("folder", None, "class-per-folder tree or .zip to read instead")
flags.DEFINE_integer("images", 512, "generated JPEGs")
flags.DEFINE_string("image_size", "500x375", "generated JPEG width x height")
flags.DEFINE_integer("quality", 94, "generated JPEG quality")
flags.DEFINE_integer("batch", 64, "batch size")
flags.DEFINE_integer("img_size", 224, "output size (without --config)")
flags.DEFINE_float("seconds", 8.0, "timed seconds per point")
flags.DEFINE_integer("prefetch", 2, "batches ahead per worker")
flags.DEFINE_string("out", None, "JSON output path")
FLAGS = flags.FLAGS


def write_jpegs(root: str, n: int, size: tuple[int, int], quality: int, seed: int = 0) -> dict:
  """``n`` ImageNet-like JPEGs under ``root/<class>/`` (4 classes); returns their statistics."""
  import numpy as np
  from PIL import Image
  from sklearn.datasets import load_sample_images
  photos = load_sample_images().images
  rng = np.random.default_rng(seed)
  w, h = size
  nbytes = []
  for i in range(n):
    src = photos[i % len(photos)]
    sh, sw = src.shape[:2]
    ch = int(rng.integers(sh // 2, sh + 1))
    cw = min(sw, int(round(ch * w / h)))
    top, left = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    crop = src[top:top + ch, left:left + cw]
    if rng.random() < 0.5:
      crop = crop[:, ::-1]
    gain = rng.uniform(0.8, 1.2, 3)
    crop = np.clip(crop * gain, 0, 255).astype(np.uint8)
    im = Image.fromarray(crop).resize((w, h), Image.BICUBIC)
    d = os.path.join(root, f"c{i % 4}")
    os.makedirs(d, exist_ok=True)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    nbytes.append(len(buf.getvalue()))
    with open(os.path.join(d, f"{i:05d}.jpg"), "wb") as f:
      f.write(buf.getvalue())
  return {"generated": n, "width": w, "height": h, "quality": quality,
          "mean_kb": round(float(np.mean(nbytes)) / 1024, 1)}


class _Cfg(dict):
  """A dict with attribute access, standing in for a ConfigDict."""
  __setattr__ = dict.__setitem__

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None


def _config(data_root: str | None):
  from toppax import input_pipeline
  if FLAGS.config:
    import importlib.util
    path, _, arg = FLAGS.config.partition(":")
    spec = importlib.util.spec_from_file_location("bench_input_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg or None)
  else:
    # The fields the pipeline reads (no ml_collections needed on a bare machine).
    c = _Cfg(seed=0, eval_batch_size=FLAGS.batch, model=_Cfg(img_size=FLAGS.img_size),
             data=_Cfg(source="folder", train_dir="", eval_dir="", name="", num_classes=4,
                       workers=0, prefetch=FLAGS.prefetch, cache=False),
             aug=_Cfg(crop_scale=(0.08, 1.0), flip=True, on_device=False, eval_crop=0.875))
  c.unlock() if hasattr(c, "unlock") else None
  if data_root:
    c.data.source, c.data.train_dir, c.data.eval_dir = "folder", data_root, data_root
  c.data.prefetch = FLAGS.prefetch
  c.data.cache = False
  c.aug.on_device = False
  train_src = input_pipeline.make_source(c.data, "train")
  c.data.num_classes = train_src.num_classes
  eval_src = input_pipeline.make_source(c.data, "eval")
  return c, train_src, eval_src


def _time(make, batch: int, workers: int) -> dict:
  """img/s of ``make()`` (an iterator of batches) after a warm-up."""
  batches = make()
  warmup = 2 * max(workers, 1)
  try:
    for _ in range(warmup):
      next(batches)
    t0, n, cpu0 = time.perf_counter(), 0, _cpu_seconds()
    while time.perf_counter() - t0 < FLAGS.seconds:
      next(batches)
      n += 1
    dt, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
  finally:
    batches.close()
  return {"img_per_s": n * batch / dt, "batches": n, "seconds": dt,
          "cpu_ms_per_img": 1e3 * cpu / max(n * batch, 1)}


def _cpu_seconds() -> float:
  """CPU time (user + system) of this process and its live children, the workers: the cost
  per image does not depend on what else the machine runs, the img/s does."""
  import psutil
  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.Error:
      pass
  return total


def _machine() -> dict:
  import PIL
  from importlib import metadata
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=os.path.dirname(__file__)).stdout.strip()
  except OSError:
    commit = ""
  return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
          "python": platform.python_version(), "pillow": PIL.__version__,
          "grain": metadata.version("grain"), "commit": commit,
          "date": time.strftime("%Y-%m-%d %H:%M %Z"), "argv": " ".join(sys.argv)}


def main(argv):
  del argv
  from toppax import input_pipeline
  workers = [int(w) for w in FLAGS.workers.split(",")]
  modes = ["train", "eval"] if FLAGS.mode == "both" else [FLAGS.mode]
  with tempfile.TemporaryDirectory() as tmp:
    data = {"folder": FLAGS.folder} if FLAGS.folder else {"config": FLAGS.config}
    root = FLAGS.folder
    if not FLAGS.folder and not FLAGS.config:
      w, h = (int(v) for v in FLAGS.image_size.split("x"))
      data = write_jpegs(tmp, FLAGS.images, (w, h), FLAGS.quality)
      root = tmp
    config, train_src, eval_src = _config(root)
    size = config.model.img_size
    rows = []
    for mode in modes:
      for nw in workers:
        config.data.workers = nw
        if mode == "train":
          plan = input_pipeline.TrainPlan(len(train_src), min(FLAGS.batch, len(train_src)))
          make = lambda: input_pipeline.train_batches(train_src, plan, config, 0, 10 ** 7)
          batch = plan.local_batch
        else:
          # The eval set repeated, so that one pass outlasts the timing.
          config.eval_batch_size = FLAGS.batch
          many = _Repeated(eval_src, 200_000)
          make = lambda: input_pipeline.eval_batches(many, config)
          batch = FLAGS.batch
        r = {"mode": mode, "workers": nw, **_time(make, batch, nw)}
        r["img_per_s_per_worker"] = r["img_per_s"] / max(nw, 1)
        rows.append(r)
        print(f"{mode:5s} workers={nw:2d}  {r['img_per_s']:8.1f} img/s  "
              f"({r['img_per_s_per_worker']:.1f} per worker, {r['cpu_ms_per_img']:.2f} CPU "
              "ms/img)", flush=True)
  result = {"machine": _machine(), "data": data, "batch": FLAGS.batch, "img_size": size,
            "prefetch": FLAGS.prefetch, "rows": rows}
  print(format_table(result))
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=2)


class _Repeated:
  """``source`` repeated to ``n`` examples (example i is source example i mod len)."""

  def __init__(self, source, n: int):
    self.source, self.n, self.num_classes = source, n, source.num_classes

  def __len__(self):
    return self.n

  def load(self, index):
    return self.source.load(int(index) % len(self.source))


def format_table(result: dict) -> str:
  m = result["machine"]
  lines = [f"{m['cpu']}, {m['usable_cores']} cores, Python {m['python']}, Pillow "
           f"{m['pillow']}, grain {m['grain']}; batch {result['batch']}, output "
           f"{result['img_size']}px",
           "| pipeline | workers | img/s | img/s per worker | CPU ms per image |",
           "| --- | ---: | ---: | ---: | ---: |"]
  for r in result["rows"]:
    lines.append(f"| {r['mode']} | {r['workers']} | {r['img_per_s']:.0f} | "
                 f"{r['img_per_s_per_worker']:.0f} | {r['cpu_ms_per_img']:.2f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
