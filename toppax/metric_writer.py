"""Training metrics: TensorBoard events and ``metrics.jsonl``, written by process 0 only, and
trimmed on resume so that every step is logged once."""
from __future__ import annotations

import json
import logging
import os

import jax


class MetricWriter:
  """TensorBoard events (tensorboardX: no TensorFlow needed) and ``metrics.jsonl``; process 0
  writes, the others drop everything (big_vision's BigVisionMetricWriter)."""

  def __init__(self, workdir: str, start_step: int = 0, rerun_eval: bool = False):
    """Continues a run at ``start_step`` (its checkpoint): rows of later steps, written by a run
    killed after that checkpoint, are dropped (they are trained again), so each step is logged
    once. ``rerun_eval``: the eval rows at ``start_step`` go too (evaluated again)."""
    self.active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      _truncate_metrics(path, start_step, rerun_eval)
      self._jsonl = open(path, "a")
      try:
        from tensorboardX import SummaryWriter
        # purge_step hides the killed run's events from the step after the checkpoint on.
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                 purge_step=start_step + 1)
      except ImportError:
        logging.warning("tensorboardX not installed: metrics go to metrics.jsonl only")

  def write(self, step: int, metrics: dict):
    if not self.active:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _truncate_metrics(path: str, start_step: int, rerun_eval: bool = False) -> None:
  """Drops rows of steps after ``start_step`` (and, with ``rerun_eval``, eval rows at it) from
  ``path``, atomically; a torn last line (killed mid-write) goes too."""
  if not os.path.exists(path):
    return
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
        step = int(row["step"])
      except (ValueError, KeyError, TypeError):
        dropped += 1
        continue
      is_eval = all(k.startswith("eval") for k in row if k != "step")
      if step > start_step or (rerun_eval and step == start_step and is_eval):
        dropped += 1
        continue
      kept.append(line if line.endswith("\n") else line + "\n")
  if not dropped:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)
  logging.info("metrics.jsonl: dropped %d row(s) after step %d (re-run from its checkpoint)",
               dropped, start_step)
