"""Random-access classification sources: ``len(source)``, ``source.num_classes`` and
``source.load(index) -> (image, label)``, where the image is a lazily opened PIL image (encoded
files: the transforms read the header first and decode only the scale the crop needs) or a
uint8 HxWx3 array (in-memory data). ``source.read(index)`` returns the decoded array.

Sources are picklable and cheap to pickle: grain's worker processes receive a copy, and file
handles (zip archives, TFDS readers) are reopened in each process on first use.
"""
from __future__ import annotations

import io
import os
import re
import threading
import zipfile

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
EVAL_SPLITS = ("test", "validation", "val", "eval")


class DatasetNotFoundError(FileNotFoundError):
  """A configured dataset is missing; the message says how to prepare it."""


def to_rgb_array(image) -> np.ndarray:
  """A PIL image or an array -> uint8 HxWx3."""
  if isinstance(image, Image.Image):
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
  image = np.asarray(image)
  if image.ndim == 2 or image.shape[-1] == 1:
    image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1)
  return image


class _ReadMixin:
  def read(self, index):
    image, label = self.load(index)
    return to_rgb_array(image), label


class DigitsSource(_ReadMixin):
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
    elif split in EVAL_SPLITS:
      sel = order[n_train:]
    else:
      raise ValueError(f"digits has splits 'train' and 'test', got {split!r}")
    self.images = np.repeat(images[sel][..., None], 3, axis=-1)
    self.labels = d.target[sel].astype(np.int32)

  def __len__(self):
    return len(self.labels)

  def load(self, index):
    return self.images[index], int(self.labels[index])


def zip_path(root: str):
  """``a/b.zip`` -> ("a/b.zip", ""); ``a/b.zip/x/y`` -> ("a/b.zip", "x/y"); else None."""
  if not root:
    return None
  m = re.match(r"^(.*?\.zip)(?:/(.*))?$", root, flags=re.IGNORECASE)
  return (m.group(1), m.group(2) or "") if m else None


class Files:
  """Image files in a folder or a .zip, read by name; reopens the archive in each process.

  Zip members are read through one handle per process behind a lock (decoding happens after
  the lock is released).
  """

  def __init__(self, root: str):
    self.root = root
    self.archive = zip_path(root)[0] if zip_path(root) else None
    self._zip, self._pid, self._lock = None, None, threading.Lock()

  def __getstate__(self):
    return {"root": self.root, "archive": self.archive}

  def __setstate__(self, state):
    self.__init__(state["root"])

  def names(self):
    """Every member name of the archive (``archive`` sources only)."""
    return self._handle().namelist()

  def _handle(self):
    if self._zip is None or self._pid != os.getpid():
      self._zip, self._pid = zipfile.ZipFile(self.archive), os.getpid()
    return self._zip

  def raw(self, name: str):
    """A binary file object of ``name``."""
    if self.archive is None:
      return open(name, "rb")
    with self._lock:
      return io.BytesIO(self._handle().read(name))

  def open(self, name: str) -> Image.Image:
    """A lazily decoded PIL image (only the header is read)."""
    if self.archive is None:
      return Image.open(name)
    with self._lock:
      data = self._handle().read(name)
    return Image.open(io.BytesIO(data))


class FolderSource(_ReadMixin):
  """``root/<class>/<image>``: labels are indices into the sorted class-folder names.

  ``root`` may also be a ``.zip`` of such a tree (e.g. ../shared/data/cifar10/cifar10-test.zip,
  whose single top-level folder ``test/`` is the root; ``archive.zip/inner/dir`` names a folder
  inside the archive). File names are kept in one bytes array (cheap to send to workers).
  """

  def __init__(self, root: str):
    self._files = Files(root)
    if self._files.archive:
      files, labels = self._scan_zip(root)
    else:
      files, labels = self._scan_dir(root)
    if not files:
      raise DatasetNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under "
                                 f"{root}/<class>/: expected a class-per-folder tree")
    self._names = np.array([f.encode() for f in files])
    self.labels = np.asarray(labels, np.int32)
    self.num_classes = len(self.classes)

  def _scan_dir(self, root):
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
    return files, labels

  def _scan_zip(self, root):
    archive, inner = zip_path(root)
    names = _zip_images(archive, "Point config.data.train_dir / eval_dir at a class-per-folder "
                        "tree or a .zip of one (for CIFAR-10: copy cifar10-train20k.zip and "
                        "cifar10-test.zip from ../shared/data/cifar10/ and pass "
                        "configs/cifar10.py:data=DIR)")
    if not inner:
      # The archive's single top-level folder is the root when there is one (train/, test/).
      tops = {n.split("/", 1)[0] for n in names if "/" in n}
      deep = all(n.count("/") >= 2 for n in names)
      inner = next(iter(tops)) if len(tops) == 1 and deep else ""
    prefix = inner.strip("/") + "/" if inner.strip("/") else ""
    tree = {}
    for n in names:
      if n.startswith(prefix):
        parts = n[len(prefix):].split("/")
        if len(parts) == 2:
          tree.setdefault(parts[0], []).append(n)
    self.classes = sorted(tree)
    files, labels = [], []
    for label, cls in enumerate(self.classes):
      members = sorted(tree[cls])
      files += members
      labels += [label] * len(members)
    return files, labels

  @property
  def files(self) -> list[str]:
    return [f.decode() for f in self._names]

  def __len__(self):
    return len(self._names)

  def load(self, index):
    return self._files.open(self._names[index].decode()), int(self.labels[index])


def _zip_images(archive: str, fix: str) -> list[str]:
  """The image members of ``archive``, or DatasetNotFoundError with ``fix`` appended."""
  if not os.path.isfile(archive):
    raise DatasetNotFoundError(f"zip archive {archive!r} does not exist. {fix}")
  try:
    with zipfile.ZipFile(archive) as z:
      return [n for n in z.namelist()
              if not n.endswith("/") and n.lower().endswith(IMAGE_EXTENSIONS)]
  except (zipfile.BadZipFile, OSError) as e:
    raise DatasetNotFoundError(f"{archive} is not a readable zip archive ({e}); re-copy it "
                               "(../shared/data/cifar10/SHA256SUMS checks the CIFAR-10 zips)")


class CachedSource(_ReadMixin):
  """Every image of ``source`` decoded once into memory (small datasets such as CIFAR-10:
  20k 32x32 images are 61 MB), so that steps cost no decoding; ``config.data.cache``.
  Decoding runs on ``workers`` grain reader threads."""

  def __init__(self, source, workers: int = 8):
    from toppax.data.loader import import_grain
    grain = import_grain()
    ds = grain.MapDataset.range(len(source)).map(source.read)
    items = list(ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, workers),
                                                      prefetch_buffer_size=64)))
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

  def load(self, index):
    return self.images[index], int(self.labels[index])


def tfds_not_prepared(name, split, data_dir, error, hint=None):
  where = data_dir or "~/tensorflow_datasets"
  hint = hint or f"run `tfds build {name} --data_dir={where} --file_format=array_record`"
  return DatasetNotFoundError(
      f"tfds dataset {name!r} split {split!r} is not prepared in {where} "
      f"({type(error).__name__}: {error}). To prepare it, {hint}.")


def open_tfds(name: str, split: str, data_dir: str | None, *, skip_decoding=(), hint=None):
  """``(tfds.data_source, builder info)`` of a prepared array_record dataset; the features in
  ``skip_decoding`` come back as encoded bytes (decoded by PIL in the transforms)."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DatasetNotFoundError(
        f"config.data.source='tfds' needs tensorflow-datasets: pip install 'toppax[data]' "
        f"(or use source='folder' / 'digits'); {e}") from e
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    decoders = {k: tfds.decode.SkipDecoding() for k in skip_decoding} or None
    ds = tfds.data_source(name, split=split, data_dir=data_dir, decoders=decoders, download=False,
                          builder_kwargs=dict(file_format="array_record"))
  except Exception as e:  # tfds raises several types for "not prepared"
    raise tfds_not_prepared(name, split, data_dir, e, hint) from e
  return ds, builder.info


class TfdsSource:
  """A tensorflow-datasets dataset through ``tfds.data_source`` (random access, array_record).

  Images come back encoded and are decoded by PIL at the scale the crop needs; the reader is
  reopened in each worker process.
  """

  def __init__(self, name: str, split: str, data_dir: str | None):
    self.name, self.split, self.data_dir = name, split, data_dir
    ds, info = self._open()
    self.num_classes = info.features["label"].num_classes
    self._len = len(ds)

  def _open(self):
    hint = None
    if self.name.startswith("imagenet"):
      where = self.data_dir or "~/tensorflow_datasets"
      hint = (f"for imagenet2012: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
              f"{where}/downloads/manual/ (from image-net.org), then run `tfds build "
              f"imagenet2012 --data_dir={where} --file_format=array_record`; any "
              "class-per-folder copy works too: config.data.source='folder'")
    ds, info = open_tfds(self.name, self.split, self.data_dir, skip_decoding=("image",),
                         hint=hint)
    self._ds, self._pid = ds, os.getpid()
    return ds, info

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_ds", "_pid")}

  def __len__(self):
    return self._len

  def load(self, index):
    if getattr(self, "_ds", None) is None or self._pid != os.getpid():
      self._open()
    ex = self._ds[int(index)]
    return open_encoded(ex["image"]), int(ex["label"])

  read = _ReadMixin.read


def open_encoded(value):
  """A lazily decoded PIL image of encoded bytes (TFDS with SkipDecoding), or the array that a
  TFDS version without SkipDecoding support decoded already."""
  if isinstance(value, (bytes, np.bytes_)):
    return Image.open(io.BytesIO(value))
  return to_rgb_array(value) if np.ndim(value) == 3 else np.asarray(value)


_DECODED: dict = {}


def make_source(data_config, split: str):
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
      _DECODED[key] = CachedSource(source, max(1, data_config.workers))
    source = _DECODED[key]
  if source.num_classes != data_config.num_classes:
    raise ValueError(f"the {split} data has {source.num_classes} classes but "
                     f"config.data.num_classes={data_config.num_classes}")
  return source
