"""Input pipeline: random-access sources, a deterministic sampler, host-side decode and crop.

Every batch is a pure function of ``(seed, step)``: the example order of an epoch is a
permutation seeded by ``(seed, epoch)`` and every random crop/flip by ``(seed, epoch, index)``.
So the data-iterator position in a checkpoint is just the step, and a resumed run sees exactly
the batches an uninterrupted one would (tests/test_checkpoint_resume.py).

Sources need random access (``len`` and ``read(indices)``): scikit-learn's bundled digits (the
embedded default), a class-per-folder image tree (PIL), and tensorflow-datasets through
``tfds.data_source`` (array_record files: random access without a TF input graph). Decoding runs
on host threads (PIL releases the GIL); the rest of the augmentation (RandAugment-style ops,
mixup/cutmix, normalisation) runs on the accelerator inside the train step (toppax.augment).

Each host reads only its slice of every global batch (``jax.process_index()``); shapes are
static: training drops the last partial batch of an epoch, evaluation pads it with ``mask = 0``
so that every example counts exactly once.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import re
import threading
import zipfile
from typing import Iterator, Protocol

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DatasetNotFoundError(FileNotFoundError):
  """A configured dataset is missing; the message says how to prepare it."""


class Source(Protocol):
  num_classes: int

  def __len__(self) -> int: ...

  def read(self, index: int) -> tuple[np.ndarray, int]:
    """Returns (uint8 HxWx3 image, label)."""


# --- sources ------------------------------------------------------------------------------------


class DigitsSource:
  """scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes).

  A fixed split (seed 0): 80% train, 20% test. The 17 grey levels are scaled to 0..255 and
  repeated over 3 channels so that the same model and pipeline serve RGB data.
  """
  num_classes = 10

  def __init__(self, split: str):
    from sklearn.datasets import load_digits
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    n_train = int(round(0.8 * len(images)))
    if split == "train":
      sel = order[:n_train]
    elif split in ("test", "validation", "val", "eval"):
      sel = order[n_train:]
    else:
      raise ValueError(f"digits has splits 'train' and 'test', got {split!r}")
    self.images = np.repeat(images[sel][..., None], 3, axis=-1)
    self.labels = d.target[sel].astype(np.int32)

  def __len__(self):
    return len(self.labels)

  def read(self, index):
    return self.images[index], int(self.labels[index])


class FolderSource:
  """``root/<class>/<image>``: labels are indices into the sorted class-folder names.

  ``root`` may also be a ``.zip`` of such a tree (e.g. ../shared/data/cifar10/cifar10-test.zip,
  whose single top-level folder ``test/`` is the root; ``archive.zip/inner/dir`` names a folder
  inside the archive). Zip members are read through one shared handle behind a lock.
  """

  def __init__(self, root: str):
    self._zip, self._lock = None, threading.Lock()
    if _zip_path(root):
      self._open_zip(root)
      return
    if not root or not os.path.isdir(root):
      raise DatasetNotFoundError(
          f"image folder {root!r} does not exist. Point config.data.train_dir / eval_dir at a "
          "class-per-folder tree (root/<class>/*.jpg) or a .zip of one, e.g. "
          "../shared/data/cifar10/cifar10-train20k.zip (configs/cifar10.py:data=DIR takes the "
          "folder holding the CIFAR-10 zips)")
    self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    files, labels = [], []
    for label, cls in enumerate(self.classes):
      names = sorted(n for n in os.listdir(os.path.join(root, cls))
                     if n.lower().endswith(IMAGE_EXTENSIONS))
      files += [os.path.join(root, cls, n) for n in names]
      labels += [label] * len(names)
    self._finish(root, files, labels)

  def _open_zip(self, root):
    archive, inner = _zip_path(root)
    if not os.path.isfile(archive):
      raise DatasetNotFoundError(
          f"zip archive {archive!r} does not exist. Point config.data.train_dir / eval_dir at a "
          "class-per-folder tree or a .zip of one (for CIFAR-10: copy cifar10-train20k.zip and "
          "cifar10-test.zip from ../shared/data/cifar10/ and pass configs/cifar10.py:data=DIR)")
    try:
      self._zip = zipfile.ZipFile(archive)
      names = [n for n in self._zip.namelist()
               if not n.endswith("/") and n.lower().endswith(IMAGE_EXTENSIONS)]
    except (zipfile.BadZipFile, OSError) as e:
      raise DatasetNotFoundError(f"{archive} is not a readable zip archive ({e}); re-copy it "
                                 "(../shared/data/cifar10/SHA256SUMS checks the CIFAR-10 zips)")
    if not inner:
      # The archive's single top-level folder is the root when there is one (train/, test/).
      tops = {n.split("/", 1)[0] for n in names if "/" in n}
      deep = all(n.count("/") >= 2 for n in names)
      inner = next(iter(tops)) if len(tops) == 1 and deep else ""
    prefix = inner.strip("/") + "/" if inner.strip("/") else ""
    tree = {}
    for n in names:
      if not n.startswith(prefix):
        continue
      parts = n[len(prefix):].split("/")
      if len(parts) == 2:
        tree.setdefault(parts[0], []).append(n)
    self.classes = sorted(tree)
    files, labels = [], []
    for label, cls in enumerate(self.classes):
      members = sorted(tree[cls])
      files += members
      labels += [label] * len(members)
    self._finish(root, files, labels)

  def _finish(self, root, files, labels):
    if not files:
      raise DatasetNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under "
                                 f"{root}/<class>/: expected a class-per-folder tree")
    self.files, self.labels = files, np.asarray(labels, np.int32)
    self.num_classes = len(self.classes)

  def __len__(self):
    return len(self.files)

  def read(self, index):
    where = self.files[index]
    if self._zip is not None:
      with self._lock:
        where = io.BytesIO(self._zip.read(where))
    with Image.open(where) as im:
      return np.asarray(im.convert("RGB")), int(self.labels[index])


def _zip_path(root: str):
  """``a/b.zip`` -> ("a/b.zip", ""); ``a/b.zip/x/y`` -> ("a/b.zip", "x/y"); else None."""
  if not root:
    return None
  m = re.match(r"^(.*?\.zip)(?:/(.*))?$", root, flags=re.IGNORECASE)
  return (m.group(1), m.group(2) or "") if m else None


class CachedSource:
  """Every image of ``source`` decoded once into memory (small datasets such as CIFAR-10:
  20k 32x32 images are 61 MB), so that steps cost no decoding; ``config.data.cache``."""

  def __init__(self, source, workers: int = 8):
    n = len(source)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
      items = list(pool.map(source.read, range(n)))
    shapes = {im.shape for im, _ in items}
    if len(shapes) == 1:
      self.images = np.stack([im for im, _ in items])
    else:
      self.images = [im for im, _ in items]
    self.labels = np.asarray([lb for _, lb in items], np.int32)
    self.num_classes = source.num_classes
    self.classes = getattr(source, "classes", None)

  def __len__(self):
    return len(self.labels)

  def read(self, index):
    return self.images[index], int(self.labels[index])


class TfdsSource:
  """A tensorflow-datasets dataset through ``tfds.data_source`` (random access, array_record)."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    try:
      import tensorflow_datasets as tfds
    except ImportError as e:
      raise DatasetNotFoundError(
          f"config.data.source='tfds' needs tensorflow-datasets: pip install 'toppax[data]' "
          f"(or use source='folder' / 'digits'); {e}") from e
    try:
      builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
      self.ds = tfds.data_source(name, split=split, data_dir=data_dir,
                                 builder_kwargs=dict(file_format="array_record"))
    except Exception as e:  # tfds raises several types for "not prepared"
      where = data_dir or "~/tensorflow_datasets"
      hint = (f"for imagenet2012: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
              f"{where}/downloads/manual/ (from image-net.org), then run `tfds build imagenet2012 "
              f"--data_dir={where} --file_format=array_record`" if name.startswith("imagenet")
              else f"run `tfds build {name} --data_dir={where} --file_format=array_record`")
      raise DatasetNotFoundError(
          f"tfds dataset {name!r} split {split!r} is not prepared in {where} "
          f"({type(e).__name__}: {e}). To prepare it, {hint}. Any class-per-folder copy works "
          "too: config.data.source='folder'.") from e
    self.num_classes = builder.info.features["label"].num_classes

  def __len__(self):
    return len(self.ds)

  def read(self, index):
    ex = self.ds[int(index)]
    image = np.asarray(ex["image"])
    if image.ndim == 2 or image.shape[-1] == 1:
      image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1)
    return image, int(ex["label"])


_DECODED: dict = {}


def make_source(data_config, split: str) -> Source:
  """Builds the train (``split='train'``) or eval source named in ``config.data``."""
  src = data_config.source
  if src == "digits":
    source = DigitsSource("train" if split == "train" else "test")
  elif src == "folder":
    source = FolderSource(data_config.train_dir if split == "train" else data_config.eval_dir)
  elif src == "tfds":
    source = TfdsSource(data_config.name,
                        data_config.train_split if split == "train" else data_config.eval_split,
                        data_config.data_dir)
  else:
    raise ValueError(f"config.data.source must be 'digits', 'folder' or 'tfds', got {src!r}")
  if data_config.get("cache", False):
    # One decode per process and dataset: a study runs dozens of trainings on the same data.
    key = (src, data_config.train_dir if split == "train" else data_config.eval_dir,
           data_config.name, split == "train")
    if key not in _DECODED:
      _DECODED[key] = CachedSource(source, data_config.workers)
    source = _DECODED[key]
  if source.num_classes != data_config.num_classes:
    raise ValueError(f"the {split} data has {source.num_classes} classes but "
                     f"config.data.num_classes={data_config.num_classes}")
  return source


# --- host-side preprocessing ----------------------------------------------------------------------


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  if image.shape[:2] == size:
    return image
  # PIL's bicubic with antialiasing, as torchvision's transforms on PIL images (DeiT).
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC))


def random_resized_crop(image, size, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop: area fraction in ``scale``, log-uniform aspect ratio,
  10 tries, then the centre crop clamped to the allowed ratios."""
  h, w = image.shape[:2]
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw = int(round(np.sqrt(target * aspect)))
    ch = int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      return _resize(image[top:top + ch, left:left + cw], (size, size))
  in_ratio = w / h
  if in_ratio < ratio[0]:
    cw, ch = w, int(round(w / ratio[0]))
  elif in_ratio > ratio[1]:
    ch, cw = h, int(round(h * ratio[1]))
  else:
    cw, ch = w, h
  top, left = (h - ch) // 2, (w - cw) // 2
  return _resize(image[top:top + ch, left:left + cw], (size, size))


def center_crop(image, size, crop_fraction=0.875):
  """Resize the shorter side to ``size / crop_fraction`` and take the centre ``size`` square."""
  h, w = image.shape[:2]
  short = int(round(size / crop_fraction))
  if (h, w) != (short, short) or crop_fraction != 1.0:
    scale = short / min(h, w)
    image = _resize(image, (max(short, int(round(h * scale))), max(short, int(round(w * scale)))))
    h, w = image.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def preprocess_train(image, size, rng, aug_config):
  image = random_resized_crop(image, size, rng, scale=tuple(aug_config.crop_scale))
  if aug_config.flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return image


def _stored_array(source, size):
  """The source's in-memory (N, size, size, 3) uint8 array when it has one (CachedSource,
  DigitsSource at its own size), else None."""
  images = getattr(source, "images", None)
  if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1:] == (size, size, 3):
    return images
  return None


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


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def train_indices(plan: TrainPlan, seed: int, step: int) -> tuple[int, np.ndarray]:
  """(epoch, this host's example indices) of global step ``step``: a pure function."""
  epoch, i = divmod(step, plan.steps_per_epoch)
  perm = epoch_permutation(seed, epoch, plan.num_examples)
  batch = perm[i * plan.global_batch:(i + 1) * plan.global_batch]
  lo = plan.process_index * plan.local_batch
  return epoch, batch[lo:lo + plan.local_batch]


def _read_train(source, size, aug_config, seed, epoch, index):
  image, label = source.read(index)
  rng = np.random.default_rng([seed, epoch, int(index), 1])
  return preprocess_train(image, size, rng, aug_config), label


def _read_eval(source, size, crop_fraction, index):
  image, label = source.read(index)
  return center_crop(image, size, crop_fraction), label


class _Prefetcher:
  """Runs ``make(k)`` for k = start, start+1, ... on a thread pool, ``depth`` batches ahead."""

  def __init__(self, make, start, stop, depth, workers):
    self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
    self._make, self._next, self._stop, self._depth = make, start, stop, max(1, depth)
    self._pending = []

  def _fill(self):
    while len(self._pending) < self._depth and self._next < self._stop:
      self._pending.append(self._pool.submit(self._make, self._next))
      self._next += 1

  def __iter__(self):
    try:
      self._fill()
      while self._pending:
        out = self._pending.pop(0).result()
        self._fill()
        yield out
    finally:
      for f in self._pending:
        f.cancel()
      self._pool.shutdown(wait=False, cancel_futures=True)


def train_batches(source, plan: TrainPlan, config, start_step: int,
                  stop_step: int) -> Iterator[dict]:
  """Host-local batches ``{"image": uint8 (b, H, W, 3), "label": int32 (b,)}`` for steps
  ``start_step .. stop_step - 1``; resuming at ``start_step`` reproduces the same batches."""
  size, seed = config.model.img_size, config.seed
  workers = config.data.workers
  pool = concurrent.futures.ThreadPoolExecutor(max(1, workers)) if workers > 1 else None

  stored = _stored_array(source, size)
  on_device = bool(config.aug.get("on_device", False))
  if on_device and stored is None:
    raise ValueError(
        f"config.aug.on_device=True crops on the accelerator and needs every image stored at "
        f"{size}x{size}: set config.data.cache=True on a dataset of {size}px images (e.g. "
        "CIFAR-10 at img_size 32), or use host-side cropping (aug.on_device=False)")

  def make(step):
    epoch, idx = train_indices(plan, seed, step)
    if on_device:
      # Vectorised gather of the cached images; crop/flip happen in the train step.
      return {"image": stored[idx], "label": source.labels[idx]}
    fn = lambda i: _read_train(source, size, config.aug, seed, epoch, i)
    items = list(pool.map(fn, idx)) if pool is not None else [fn(i) for i in idx]
    return {"image": np.stack([im for im, _ in items]),
            "label": np.asarray([lb for _, lb in items], np.int32)}

  try:
    yield from _Prefetcher(make, start_step, stop_step, config.data.prefetch, 1)
  finally:
    if pool is not None:
      pool.shutdown(wait=False, cancel_futures=True)


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


def eval_batches(source, config, num_examples: int | None = None,
                 batch_size: int | None = None) -> Iterator[dict]:
  """Host-local eval batches with ``mask`` (float32, 0 for padding), static shapes."""
  import jax
  size = config.model.img_size
  n = len(source) if not num_examples else min(num_examples, len(source))
  batch_size = batch_size or config.eval_batch_size
  steps, idx, mask = eval_plan(n, batch_size, jax.process_index(), jax.process_count())
  if n < len(source):
    # A subset (config.data.eval_examples): a fixed random sample, not the first n, because
    # folder trees are sorted by class. The same for every run, seed and host.
    subset = np.sort(np.random.default_rng(12345).permutation(len(source))[:n])
    idx = np.where(idx >= 0, subset[np.maximum(idx, 0)], -1)
  workers = config.data.workers
  pool = concurrent.futures.ThreadPoolExecutor(max(1, workers)) if workers > 1 else None
  pad = None

  stored = _stored_array(source, size) if config.aug.eval_crop == 1.0 else None

  def make(k):
    nonlocal pad
    if stored is not None:
      # Images already at the model's size and no centre crop: a vectorised gather.
      sel = np.maximum(idx[k], 0)
      return {"image": stored[sel], "label": source.labels[sel].astype(np.int32),
              "mask": mask[k].astype(np.float32)}
    fn = lambda i: _read_eval(source, size, config.aug.eval_crop, i)
    real = [int(i) for i in idx[k] if i >= 0]
    items = list(pool.map(fn, real)) if pool is not None else [fn(i) for i in real]
    images = [im for im, _ in items]
    labels = [lb for _, lb in items]
    missing = len(idx[k]) - len(real)
    if missing:
      pad = np.zeros((size, size, 3), np.uint8)
      images += [pad] * missing
      labels += [0] * missing
    return {"image": np.stack(images), "label": np.asarray(labels, np.int32),
            "mask": mask[k].astype(np.float32)}

  try:
    yield from _Prefetcher(make, 0, steps, config.data.prefetch, 1)
  finally:
    if pool is not None:
      pool.shutdown(wait=False, cancel_futures=True)
