"""Entry point: ``python -m toppax.main --config=configs/digits.py [--workdir=DIR] [--mode=...]``.

Intentionally kept short (flax examples/imagenet/main.py): flags, multi-host set-up and logging
here; the work happens in importable functions (toppax.train, toppax.evaluate, toppax.tools).
"""
from __future__ import annotations

import hashlib
import logging as std_logging
import os
import re
import sys
import tempfile

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

MODES = ("train", "eval", "bench", "flops", "convert", "study", "doctor")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/vim_s.py:top,res=224.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and results; resumed when it holds "
                    "checkpoints. Default: <tmp>/toppax/<config name and args>[-o<hash of the "
                    "--config.* overrides>].")
flags.DEFINE_enum("mode", "train", MODES, "What to run.")
flags.mark_flags_as_required(["config"])


def default_workdir(config_arg: str, overrides=None) -> str:
  """``configs/vim_s.py:top,res=384`` -> ``<tmp>/toppax/vim_s-top-res384``; with ``--config.*``
  overrides (a flat ``{name: value}``) ``-o<hash>`` is appended, so that a changed setting never
  resumes the workdir of another."""
  path, _, arg = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  parts = [re.sub(r"[^A-Za-z0-9.]+", "", a) for a in arg.split(",")]
  name = "-".join([name] + [p for p in parts if p])
  if overrides:
    key = repr(sorted((k, repr(v)) for k, v in overrides.items()))
    name += "-o" + hashlib.sha256(key.encode()).hexdigest()[:8]
  return os.path.join(tempfile.gettempdir(), "toppax", name)


def config_spec(filename: str, raw: str) -> str:
  """``path[:args]`` as given to --config. ``filename``: get_config_filename (``path`` in older
  ml_collections, ``path:args`` in newer); ``raw``: the flag's value as given."""
  if ":" in filename:
    return filename
  _, sep, arg = raw.partition(":")
  return filename + sep + arg if sep else filename


def main(argv):
  """Runs ``--mode`` on ``--config``; a user error ends as one ``error: ...`` line, status 2."""
  try:
    _main(argv)
  except Exception as e:  # noqa: BLE001 -- sorted into user errors and bugs just below
    if not is_user_error(e):
      raise
    report_error(e)


def is_user_error(e: BaseException) -> bool:
  """A ``toppax.errors.UserError``, or a ValueError / TypeError / FileNotFoundError raised by
  toppax's or a config file's own checks (its innermost frame is in that code). An exception
  raised inside jax, flax or numpy is a bug to report and keeps its traceback."""
  from toppax.errors import UserError
  if isinstance(e, UserError):
    return True
  if not isinstance(e, (ValueError, TypeError, FileNotFoundError, NotADirectoryError)):
    return False
  tb = e.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  where = os.path.abspath(tb.tb_frame.f_code.co_filename) if tb is not None else ""
  ours = [os.path.dirname(os.path.abspath(__file__))]
  if FLAGS.is_parsed() and FLAGS["config"].present:
    ours.append(os.path.dirname(os.path.abspath(_raw_config().split(":", 1)[0])))
  return any(where.startswith(d + os.sep) for d in ours)


def report_error(e: BaseException):
  message = str(e).strip() or type(e).__name__
  sys.stderr.write(f"error: {message}\n")
  sys.exit(2)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if not isinstance(config, ml_collections.ConfigDict):   # ml_collections defers load errors
    raise app.UsageError(f"could not load the config file of --config={_raw_config()}")
  # jax probes every backend it knows and logs each one this machine lacks ("Unable to
  # initialize backend 'tpu'") at INFO on every run: noise, not news.
  std_logging.getLogger("jax._src.xla_bridge").addFilter(
      lambda r: not r.getMessage().startswith("Unable to initialize backend"))
  # Imports after flag parsing, so that --help stays fast and XLA flags set by the caller apply.
  import jax

  from toppax import sharding
  sharding.maybe_initialize_distributed(config)
  workdir = FLAGS.workdir
  if not workdir:
    overrides = config_flags.get_override_values(FLAGS["config"])
    workdir = default_workdir(
        config_spec(config_flags.get_config_filename(FLAGS["config"]), _raw_config()), overrides)
    logging.info("default workdir %s (config %s, --config.* overrides %s; --workdir sets "
                 "another)", workdir, _raw_config(), overrides or "{}")
  logging.info("mode=%s workdir=%s", FLAGS.mode, workdir)
  print(f"workdir: {workdir}", flush=True)
  logging.info("JAX process %d/%d, local devices: %s", jax.process_index(), jax.process_count(),
               jax.local_devices())

  segmentation = config.model.name.startswith("upernet_")
  if FLAGS.mode == "train" and segmentation:
    from toppax.segmentation import train as seg_train
    seg_train.train_and_evaluate(config, workdir)
  elif FLAGS.mode == "train":
    from toppax import train
    train.train_and_evaluate(config, workdir)
  elif FLAGS.mode == "eval" and segmentation:
    from toppax.segmentation import train as seg_train
    seg_train.run_eval(config, workdir)
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
    from toppax.tools import convert_checkpoint
    convert_checkpoint.run(config, workdir)
  elif FLAGS.mode == "study":
    if "study" not in config:
      raise app.UsageError("--mode=study needs a config with a `study` section, e.g. "
                           "configs/cifar10.py")
    from toppax import study
    study.run(config, workdir)
  elif FLAGS.mode == "doctor":
    from toppax.tools import doctor
    doctor.run(config)


def _raw_config() -> str:
  return FLAGS["config"].serialize().split("=", 1)[-1]


def _config_flag_value(argv):
  """The last ``--config=VALUE`` / ``--config VALUE`` in argv (None when absent)."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    m = re.match(r"^--?config(=(.*))?$", arg)
    if m:
      value = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


def _fail(message: str):
  sys.stderr.write(f"error: {message}\n")
  sys.exit(2)


def _flag_error_message(error: BaseException) -> str:
  """The message of a flag-parsing error as one line. A ``--config.*`` field that does not exist
  comes from ml_collections as a KeyError (wrapped in an AttributeError) whose text is the
  quoted field name and a "Did you mean" line."""
  e = error
  while isinstance(e, (KeyError, AttributeError)) and e.args and isinstance(e.args[0],
                                                                             BaseException):
    e = e.args[0]
  for cause in (e, e.__cause__, e.__context__):
    if isinstance(cause, (KeyError, AttributeError)) and cause.args and isinstance(
        cause.args[0], str):
      name, _, hint = cause.args[0].partition("\n")
      return f"unknown config field {name}" + (f": {hint.strip()}" if hint.strip() else "")
  text = str(error)
  if "Traceback (most recent call last)" in text:
    # get_config() raised: ml_collections embeds the whole traceback; its last line is the error.
    flag = text.split(":", 1)[0]
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    return f"{flag}: {last.split(': ', 1)[-1]}"
  return " ".join(text.split())


def _parse(argv):
  try:
    return FLAGS(argv)
  except (flags.Error, KeyError, AttributeError) as e:
    _fail(f"{_flag_error_message(e)} (--helpshort lists the flags)")


def prepare_config_file(path: str):
  """Checks that the config file exists and puts the directory holding its package (the parent
  of ``configs/``) first on sys.path, so that its ``from configs import common`` works from any
  working directory."""
  if not os.path.isfile(path):
    _fail(f"--config: no config file {path!r} (cwd {os.getcwd()}); give a path relative to the "
          "working directory or an absolute one, e.g. --config=configs/digits.py")
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in [os.path.abspath(p or ".") for p in sys.path]:
    sys.path.insert(0, root)


def parse_flags(argv):
  """absl ``flags_parser``: one ``error: ...`` line (status 2) for a missing or unloadable config
  file, a bad config argument or an unknown ``--config.*`` field."""
  try:
    value = _config_flag_value(FLAGS.read_flags_from_files(argv, force_gnu=False))
  except flags.Error:
    value = None                      # reported by the parsing below
  if value is None:
    return _parse(argv)
  path = value.split(":", 1)[0]
  prepare_config_file(path)
  try:
    return _parse(argv)
  except (ImportError, SyntaxError, OSError) as e:
    _fail(f"--config: cannot load {path!r}: {type(e).__name__}: {e}")
  except (ValueError, TypeError, KeyError) as e:   # get_config(arg) rejected its arguments
    _fail(f"--config={value}: {_flag_error_message(e)}")


def run_main():
  """Console script ``toppax`` (pyproject [project.scripts])."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run_main()
