"""Timing and environment helpers shared by training, evaluation and the benchmarks."""
from __future__ import annotations

import platform
import statistics
import time

import jax


def time_call(fn, *args, repeats: int = 10, warmup: int = 2) -> float:
  """Median wall seconds of ``fn(*args)`` (results blocked on), after ``warmup`` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def format_duration(seconds: float) -> str:
  """``H:MM:SS`` (negative durations count as 0)."""
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


def versions() -> dict:
  """Library versions that a measurement depends on, for results files."""
  import flax
  import jaxlib
  import optax

  import toppax
  out = {"toppax": toppax.__version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
         "flax": flax.__version__, "optax": optax.__version__,
         "python": platform.python_version()}
  try:
    import triton
    out["triton"] = triton.__version__
  except ImportError:
    pass
  return out
