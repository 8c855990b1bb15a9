"""Timing and environment helpers shared by training, evaluation and the benchmarks."""
from __future__ import annotations

import contextlib
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


# JAX's duration events for the stages of a jit's first call (jax._src.dispatch).
COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
                  "/jax/core/compile/backend_compile_duration": "compile_s"}


@contextlib.contextmanager
def compile_stages():
  """Seconds spent inside the block tracing to a jaxpr (``trace_s``), lowering it to MLIR
  (``lower_s``: custom-call kernels such as jax-triton's are compiled here) and in XLA's
  backend compilation (``compile_s``: optimisation, autotuning, code generation), summed over
  every jit compiled in the block. Yields the dict, filled as the events arrive."""
  out = dict.fromkeys(COMPILE_EVENTS.values(), 0.0)

  def listener(event, duration, **_):
    if event in COMPILE_EVENTS:
      out[COMPILE_EVENTS[event]] += duration

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield out
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


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
