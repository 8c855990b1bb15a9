"""grain pipelines for classification: a deterministic sampler, per-process slices, worker
processes, prefetch.

Every batch is a pure function of ``(seed, step)``: the example order of an epoch is a
permutation seeded by ``(seed, epoch)`` and every random crop/flip by ``(seed, epoch, index)``.
So the data-iterator position in a checkpoint is just the step, and a resumed run sees exactly
the batches an uninterrupted one would (tests/test_checkpoint_resume.py), whatever the number
of worker processes.

The pipeline is a ``grain.MapDataset`` over this process's example slots ``step * local_batch
+ j``: slot -> example index (the sampler below) -> decode and crop -> ``batch``; grain's
``mp_prefetch`` hands whole batches to ``config.data.workers`` processes (batch k to worker
k mod workers, returned in order through shared memory). grain starts workers with the
``spawn`` method, never ``fork``, so a process with an initialised JAX (and its threads) is not
copied; each worker also pins its own JAX to the CPU before touching data, so that no worker
can claim accelerator memory.

The sampler is the one piece grain does not provide in this form: grain's ``ShardByJaxProcess``
and ``shuffle`` split the *dataset* across processes, so a global batch would depend on the
number of processes. Here a global batch is a fixed set of examples and each process takes its
contiguous slice of it (``jax.process_index()``); training drops the last partial batch of an
epoch, evaluation pads it with ``mask = 0`` so that every example counts exactly once.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time

import numpy as np

from toppax.data import transforms


def import_grain():
  """``grain``, with absl flags marked parsed when no absl app parsed them (grain reads its
  flags in every process)."""
  try:
    import grain
  except ImportError as e:
    raise ImportError("toppax's input pipeline runs on grain: pip install grain "
                      f"(it is in toppax[data]); {e}") from e
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return grain


def _worker_init(index: int, count: int):
  """Runs first in every worker process: its JAX (imported by grain) stays on the CPU."""
  del index, count
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:
    sys.modules["jax"].config.update("jax_platforms", "cpu")


class Batches:
  """An iterator of host batches with the consumer's wait per batch.

  ``last_wait_s`` is how long the latest ``next`` blocked (0 when a batch was ready),
  ``total_wait_s`` the sum so far: the input-pipeline stall a train step saw. ``close()`` (also
  on exhaustion, ``with``, and garbage collection) stops the worker processes.
  """

  def __init__(self, iterator, closer=None):
    self._it, self._closer = iterator, closer
    self.last_wait_s, self.total_wait_s, self.count = 0.0, 0.0, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._it is None:
      raise StopIteration
    t = time.perf_counter()
    try:
      batch = next(self._it)
    except StopIteration:
      self.close()
      raise
    self.last_wait_s = time.perf_counter() - t
    self.total_wait_s += self.last_wait_s
    self.count += 1
    # Plain ndarrays (views that keep grain's shared-memory buffers alive).
    return {k: np.asarray(v) for k, v in batch.items()}

  def close(self):
    it, self._it = self._it, None
    if it is not None and self._closer is not None:
      self._closer()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown
      pass


def run(ds, workers: int, prefetch: int) -> Batches:
  """Iterates a ``grain.MapDataset`` of batches: in this process with a reader thread
  ``prefetch`` batches ahead (``workers == 0``), else in ``workers`` processes, each
  ``prefetch`` batches ahead."""
  grain = import_grain()
  workers = max(0, min(int(workers), len(ds)))
  prefetch = max(1, int(prefetch))
  if workers == 0:
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)))
  else:
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch),
        worker_init_fn=_worker_init)
    it = iter(it_ds)
  return Batches(it, getattr(it, "close", None))


# --- the sampler ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainPlan:
  """Static facts of a training run: batch sizes, steps per epoch and this host's slice."""
  num_examples: int
  global_batch: int
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if self.global_batch < 1:
      raise ValueError(f"batch_size must be a positive integer, got {self.global_batch!r}: set "
                       "config.batch_size")
    if self.global_batch % self.process_count:
      raise ValueError(f"batch_size {self.global_batch} is not divisible by the "
                       f"{self.process_count} processes")
    if self.steps_per_epoch < 1:
      raise ValueError(f"batch_size {self.global_batch} is larger than the "
                       f"{self.num_examples} training examples")

  @property
  def local_batch(self) -> int:
    return self.global_batch // self.process_count

  @property
  def steps_per_epoch(self) -> int:
    return self.num_examples // self.global_batch   # drop remainder: static shapes


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  perm.flags.writeable = False   # shared by every caller (cached)
  return perm


def train_indices(plan: TrainPlan, seed: int, step: int) -> tuple[int, np.ndarray]:
  """(epoch, this host's example indices) of global step ``step``: a pure function."""
  epoch, i = divmod(step, plan.steps_per_epoch)
  perm = epoch_permutation(seed, epoch, plan.num_examples)
  lo = i * plan.global_batch + plan.process_index * plan.local_batch
  return epoch, perm[lo:lo + plan.local_batch]


def eval_plan(num_examples: int, global_batch: int, process_index=0, process_count=1):
  """(number of eval steps, this host's index array of shape (steps, local_batch), mask).

  Every host runs the same number of steps; padded slots (index -1) get ``mask = 0``.
  """
  if global_batch < 1:
    raise ValueError(f"eval_batch_size must be a positive integer, got {global_batch!r}: set "
                     "config.eval_batch_size")
  if global_batch % process_count:
    raise ValueError(f"eval_batch_size {global_batch} is not divisible by the "
                     f"{process_count} processes")
  local = global_batch // process_count
  steps = -(-num_examples // global_batch)
  idx = np.full(steps * global_batch, -1, np.int64)
  idx[:num_examples] = np.arange(num_examples)
  idx = idx.reshape(steps, process_count, local)[:, process_index]
  return steps, idx, (idx >= 0)


# --- per-example work (picklable: it travels to the worker processes) -----------------------------


class TrainExample:
  """Slot ``step * local_batch + j`` -> {"image": uint8 (size, size, 3), "label": int32}."""

  def __init__(self, source, plan: TrainPlan, seed: int, size: int, scale, flip: bool):
    self.source, self.plan, self.seed, self.size = source, plan, seed, size
    self.scale, self.flip = tuple(scale), bool(flip)

  def __call__(self, slot) -> dict:
    step, j = divmod(int(slot), self.plan.local_batch)
    epoch, idx = train_indices(self.plan, self.seed, step)
    index = int(idx[j])
    image, label = self.source.load(index)
    rng = np.random.default_rng([self.seed, epoch, index, 1])
    image = transforms.preprocess_train(image, self.size, rng, self.scale, self.flip)
    return {"image": image, "label": np.int32(label)}


class StoredTrainBatch:
  """Step -> a vectorised gather of images stored at the model's size (cropped on device)."""

  def __init__(self, images, labels, plan: TrainPlan, seed: int):
    self.images, self.labels, self.plan, self.seed = images, labels, plan, seed

  def __call__(self, step) -> dict:
    idx = train_indices(self.plan, self.seed, int(step))[1]
    return {"image": self.images[idx], "label": self.labels[idx].astype(np.int32)}


class EvalExample:
  """Slot -> the centre crop of example ``indices[slot]``, or zeros with mask 0 for -1."""

  def __init__(self, source, indices, size: int, crop_fraction: float):
    self.source, self.indices = source, np.asarray(indices)
    self.size, self.crop_fraction = size, crop_fraction

  def __call__(self, slot) -> dict:
    index = int(self.indices[int(slot)])
    if index < 0:
      return {"image": np.zeros((self.size, self.size, 3), np.uint8), "label": np.int32(0),
              "mask": np.float32(0)}
    image, label = self.source.load(index)
    return {"image": transforms.center_crop(image, self.size, self.crop_fraction),
            "label": np.int32(label), "mask": np.float32(1)}


class StoredEvalBatch:
  def __init__(self, images, labels, indices):
    self.images, self.labels, self.indices = images, labels, indices

  def __call__(self, step) -> dict:
    idx = self.indices[int(step)]
    sel = np.maximum(idx, 0)
    return {"image": self.images[sel], "label": self.labels[sel].astype(np.int32),
            "mask": (idx >= 0).astype(np.float32)}


def stored_array(source, size):
  """The source's in-memory (N, size, size, 3) uint8 array when it has one (CachedSource,
  DigitsSource at its own size), else None."""
  images = getattr(source, "images", None)
  if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1:] == (size, size, 3):
    return images
  return None


# --- the pipelines --------------------------------------------------------------------------------


def train_batches(source, plan: TrainPlan, config, start_step: int, stop_step: int) -> Batches:
  """Host-local batches ``{"image": uint8 (b, H, W, 3), "label": int32 (b,)}`` for steps
  ``start_step .. stop_step - 1``; resuming at ``start_step`` reproduces the same batches.

  ``config.data.workers`` worker processes decode (0: this process, on a reader thread),
  ``config.data.prefetch`` batches ahead each. With ``config.aug.on_device`` the images stored
  at the model's size are gathered per step in this process and cropped on the accelerator.
  """
  grain = import_grain()
  size, seed = config.model.img_size, config.seed
  stored = stored_array(source, size)
  if bool(config.aug.get("on_device", False)):
    if stored is None:
      raise ValueError(
          f"config.aug.on_device=True crops on the accelerator and needs every image stored "
          f"at {size}x{size}: set config.data.cache=True on a dataset of {size}px images (e.g. "
          "CIFAR-10 at img_size 32), or use host-side cropping (aug.on_device=False)")
    ds = grain.MapDataset.range(start_step, stop_step).map(
        StoredTrainBatch(stored, source.labels, plan, seed))
    return run(ds, 0, config.data.prefetch)
  local = plan.local_batch
  example = TrainExample(source, plan, seed, size, config.aug.crop_scale, config.aug.flip)
  ds = grain.MapDataset.range(start_step * local, stop_step * local).map(example)
  return run(ds.batch(local, drop_remainder=True), config.data.workers, config.data.prefetch)


def eval_batches(source, config, num_examples: int | None = None,
                 batch_size: int | None = None) -> Batches:
  """Host-local eval batches with ``mask`` (float32, 0 for padding), static shapes."""
  import jax
  grain = import_grain()
  size = config.model.img_size
  n = len(source) if not num_examples else min(num_examples, len(source))
  batch_size = batch_size or config.eval_batch_size
  steps, idx, _ = eval_plan(n, batch_size, jax.process_index(), jax.process_count())
  if n < len(source):
    # A subset (config.data.eval_examples): a fixed random sample, not the first n, because
    # folder trees are sorted by class. The same for every run, seed and host.
    subset = np.sort(np.random.default_rng(12345).permutation(len(source))[:n])
    idx = np.where(idx >= 0, subset[np.maximum(idx, 0)], -1)
  stored = stored_array(source, size) if config.aug.eval_crop == 1.0 else None
  if stored is not None:
    # Images already at the model's size and no centre crop: a vectorised gather.
    ds = grain.MapDataset.range(steps).map(StoredEvalBatch(stored, source.labels, idx))
    return run(ds, 0, config.data.prefetch)
  ds = grain.MapDataset.range(idx.size).map(
      EvalExample(source, idx.reshape(-1), size, config.aug.eval_crop))
  return run(ds.batch(idx.shape[1], drop_remainder=True), config.data.workers,
             config.data.prefetch)
