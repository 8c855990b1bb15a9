"""Entry point: ``python -m toppax.main --config=configs/digits.py [--workdir=DIR] [--mode=...]``.

Intentionally kept short (flax examples/imagenet/main.py): flags, multi-host set-up and logging
here; the work happens in importable functions (toppax.train, toppax.evaluate, toppax.tools).
"""
from __future__ import annotations

import os
import re
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "eval", "bench", "flops", "convert", "study", "doctor")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/vim_s.py:top,res=224.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and results; resumed when it holds "
                    "checkpoints. Default: <tmp>/toppax/<config name and args>.")
flags.DEFINE_enum("mode", "train", MODES, "What to run.")
flags.mark_flags_as_required(["config"])


def default_workdir(config_arg: str) -> str:
  """``configs/vim_s.py:top,res=384`` -> ``<tmp>/toppax/vim_s-top-res384``."""
  path, _, arg = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  parts = [re.sub(r"[^A-Za-z0-9.]+", "", a) for a in arg.split(",")]
  name = "-".join([name] + [p for p in parts if p])
  return os.path.join(tempfile.gettempdir(), "toppax", name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  # Imports after flag parsing, so that --help stays fast and XLA flags set by the caller apply.
  import jax

  from toppax import sharding
  sharding.maybe_initialize_distributed(config)
  workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS["config"])
                                             + _config_arg())
  logging.info("mode=%s workdir=%s", FLAGS.mode, workdir)
  print(f"workdir: {workdir}", flush=True)
  logging.info("JAX process %d/%d, local devices: %s", jax.process_index(), jax.process_count(),
               jax.local_devices())

  if FLAGS.mode == "train":
    from toppax import train
    train.train_and_evaluate(config, workdir)
  elif FLAGS.mode == "eval":
    from toppax import evaluate
    evaluate.run_eval(config, workdir)
  elif FLAGS.mode == "bench":
    from toppax.tools import bench
    bench.run(config, workdir)
  elif FLAGS.mode == "flops":
    from toppax.tools import flops
    flops.run(config)
  elif FLAGS.mode == "convert":
    from toppax import convert
    convert.run(config, workdir)
  elif FLAGS.mode == "study":
    if "study" not in config:
      raise app.UsageError("--mode=study needs a config with a `study` section, e.g. "
                           "configs/cifar10.py")
    from toppax import study
    study.run(config, workdir)
  elif FLAGS.mode == "doctor":
    from toppax.tools import doctor
    doctor.run(config)


def _config_arg() -> str:
  # get_config_filename drops the ":arg" part; recover it from the raw flag value.
  raw = FLAGS["config"].serialize().split("=", 1)[-1]
  _, sep, arg = raw.partition(":")
  return sep + arg if sep else ""


def run_main():
  """Console script ``toppax`` (pyproject [project.scripts])."""
  app.run(main)


if __name__ == "__main__":
  run_main()
