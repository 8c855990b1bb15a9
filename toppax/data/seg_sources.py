"""Random-access segmentation sources: ``len(source)``, ``source.classes`` (names, label i is
``classes[i]``), ``source.num_classes``, ``source.size(index) -> (h, w)`` (cheap: a header
read) and ``source.load(index) -> (image, label)`` with the image a lazily opened PIL image or a
uint8 HxWx3 array and the label a uint8 HxW map of class indices, ``IGNORE_INDEX`` (255) where
nothing is counted.

- ``ADE20KSource``: ADEChallengeData2016 (folder or .zip), 150 classes; label 0 ("other") is
  ignored and the rest shift down by one, as mmseg's ``reduce_zero_label``.
- ``SegFolderSource``: a user's own ``images/`` + ``labels/`` (PNG, same stem) + ``classes.txt``.
- ``TfdsSegSource``: ``scene_parse150`` (TFDS's ADE20K / MIT Scene Parsing copy) through
  ``tfds.data_source``, with the same label reduction.
- ``SegDigitsSource`` and ``CifarScenesSource`` (toppax.data.seg_synthetic): generated scenes
  with exact labels.
"""
from __future__ import annotations

import io
import os
import zipfile

import numpy as np
from PIL import Image

from toppax.data.sources import (IMAGE_EXTENSIONS, DatasetNotFoundError, Files, open_encoded,
                                 open_tfds, zip_path)

IGNORE_INDEX = 255
TRAIN_SPLITS = ("train", "training")
EVAL_SPLITS = ("validation", "val", "test", "eval")

# The 150 classes of the ADE20K scene-parsing benchmark (objectInfo150), in label order 1..150
# (after reduce_zero_label: 0..149).
ADE20K_CLASSES = tuple("""wall|building|sky|floor|tree|ceiling|road|bed|windowpane|grass|cabinet|
sidewalk|person|earth|door|table|mountain|plant|curtain|chair|car|water|painting|sofa|shelf|house|
sea|mirror|rug|field|armchair|seat|fence|desk|rock|wardrobe|lamp|bathtub|railing|cushion|base|box|
column|signboard|chest of drawers|counter|sand|sink|skyscraper|fireplace|refrigerator|grandstand|
path|stairs|runway|case|pool table|pillow|screen door|stairway|river|bridge|bookcase|blind|
coffee table|toilet|flower|book|hill|bench|countertop|stove|palm|kitchen island|computer|
swivel chair|boat|bar|arcade machine|hovel|bus|towel|light|truck|tower|chandelier|awning|
streetlight|booth|television receiver|airplane|dirt track|apparel|pole|land|bannister|escalator|
ottoman|bottle|buffet|poster|stage|van|ship|fountain|conveyer belt|canopy|washer|plaything|
swimming pool|stool|barrel|basket|waterfall|tent|bag|minibike|cradle|oven|ball|food|step|tank|
trade name|microwave|pot|animal|bicycle|lake|dishwasher|screen|blanket|sculpture|hood|sconce|vase|
traffic light|tray|ashcan|fan|pier|crt screen|plate|monitor|bulletin board|shower|radiator|glass|
clock|flag""".replace("\n", "").split("|"))


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
  """mmseg's ``reduce_zero_label``: 0 -> ignore (255), k -> k - 1, 255 stays ignored."""
  out = np.asarray(label, np.uint8) - np.uint8(1)        # uint8 wraps 0 to 255
  out[out == 254] = IGNORE_INDEX
  return out


def _label_array(im: Image.Image) -> np.ndarray:
  """A label PNG as uint8 class indices (a palette PNG's indices, a grey PNG's values, the
  first channel of an RGB one)."""
  if im.mode in ("P", "L"):
    return np.asarray(im)
  if im.mode in ("I", "I;16", "I;16B"):
    return np.asarray(im).astype(np.int64).clip(0, 255).astype(np.uint8)
  return np.asarray(im.convert("RGB"))[..., 0]


def normalize_split(split: str) -> str:
  if split in TRAIN_SPLITS:
    return "train"
  if split in EVAL_SPLITS:
    return "validation"
  raise ValueError(f"segmentation splits are 'train' and 'validation', got {split!r}")


class PairSource:
  """Image + label files paired by stem, in a folder or a .zip (shared by the file sources)."""

  def __init__(self, files: Files, images: list[str], labels: list[str], classes, reduce_zero):
    self._files = files
    self._images = np.array([n.encode() for n in images])
    self._labels = np.array([n.encode() for n in labels])
    self.classes = tuple(classes)
    self.num_classes = len(self.classes)
    self.reduce_zero = reduce_zero

  def __len__(self):
    return len(self._images)

  def size(self, index) -> tuple[int, int]:
    w, h = self._files.open(self._images[index].decode()).size
    return h, w

  def load(self, index):
    image = self._files.open(self._images[index].decode())
    label = _label_array(self._files.open(self._labels[index].decode()))
    if self.reduce_zero:
      label = reduce_zero_label(label)
    label = np.where(label < self.num_classes, label, IGNORE_INDEX).astype(np.uint8)
    if label.shape != (image.size[1], image.size[0]):
      raise ValueError(f"label map {self._labels[index].decode()} is {label.shape[::-1]} "
                       f"(w, h) but its image is {image.size}: they must match")
    return image, label


def _listing(root: str, fix: str) -> tuple[Files, list[str], str]:
  """(file reader, every file name under root, prefix that names root in them)."""
  z = zip_path(root)
  if z:
    archive, inner = z
    if not os.path.isfile(archive):
      raise DatasetNotFoundError(f"zip archive {archive!r} does not exist. {fix}")
    try:
      with zipfile.ZipFile(archive) as f:
        names = [n for n in f.namelist() if not n.endswith("/")]
    except (zipfile.BadZipFile, OSError) as e:
      raise DatasetNotFoundError(f"{archive} is not a readable zip archive ({e}). {fix}")
    prefix = inner.strip("/") + "/" if inner.strip("/") else ""
    return Files(root), names, prefix
  if not root or not os.path.isdir(root):
    raise DatasetNotFoundError(f"segmentation folder {root!r} does not exist. {fix}")
  names = []
  for d, _, fs in os.walk(root):
    names += [os.path.join(d, f) for f in fs]
  return Files(root), names, root.rstrip("/") + "/"


def _pairs(names, prefix, image_dir, label_dir):
  """Sorted (image, label) names with equal stems under prefix+image_dir / prefix+label_dir."""
  def stems(d, exts):
    p = prefix + d.strip("/") + "/"
    return {os.path.splitext(n[len(p):])[0]: n for n in names
            if n.startswith(p) and "/" not in n[len(p):] and n.lower().endswith(exts)}
  images, labels = stems(image_dir, IMAGE_EXTENSIONS), stems(label_dir, (".png",))
  both = sorted(set(images) & set(labels))
  return [images[s] for s in both], [labels[s] for s in both], len(images), len(labels)


ADE_FIX = ("Point config.data.train_dir / eval_dir at ADEChallengeData2016 (the folder or "
           "ADEChallengeData2016.zip from the MIT Scene Parsing benchmark, holding "
           "images/{training,validation}/*.jpg and annotations/{training,validation}/*.png), or "
           "use the TFDS copy: config.data.source='tfds', name='scene_parse150'")


class ADE20KSource(PairSource):
  """ADE20K in its official layout, ``ADEChallengeData2016/images/{training,validation}/*.jpg``
  and ``annotations/{training,validation}/*.png``: a folder or a .zip, given as the
  ADEChallengeData2016 folder, its parent, or the archive (``archive.zip/inner`` names a folder
  inside it). 150 classes; label 0 ("other") is ignored (``reduce_zero_label``)."""

  def __init__(self, root: str, split: str):
    sub = "training" if normalize_split(split) == "train" else "validation"
    files, names, prefix = _listing(root, ADE_FIX)
    for p in (prefix, prefix + "ADEChallengeData2016/"):
      images, labels, n_img, n_lab = _pairs(names, p, f"images/{sub}", f"annotations/{sub}")
      if images:
        break
    if not images:
      raise DatasetNotFoundError(
          f"no ADE20K {sub} pairs under {root} (found {n_img} images in images/{sub}, {n_lab} "
          f"label PNGs in annotations/{sub}). {ADE_FIX}")
    super().__init__(files, images, labels, ADE20K_CLASSES, reduce_zero=True)


class SegFolderSource(PairSource):
  """A user's own data: ``root/images/[split/]NAME.{jpg,png,...}``, ``root/labels/[split/]NAME.png``
  (class index per pixel, 255 ignored; values >= the number of classes are ignored too) and
  ``root/classes.txt`` (one class name per line, line i names label i). With
  ``reduce_zero_label`` label 0 is ignored and the rest shift down (ADE20K-style labels)."""

  def __init__(self, root: str, split: str | None = None, reduce_zero: bool = False):
    fix = ("Point config.data.train_dir / eval_dir at a folder (or .zip) with images/, labels/ "
           "(PNG class maps named as the images) and classes.txt")
    files, names, prefix = _listing(root, fix)
    classes_file = prefix + "classes.txt"
    if classes_file not in names:
      raise DatasetNotFoundError(f"{root} has no classes.txt (one class name per line). {fix}")
    with files.raw(classes_file) as f:
      classes = [l.strip() for l in io.TextIOWrapper(f, "utf-8") if l.strip()]
    images = []
    for sub in ([split, normalize_split(split)] if split else []) + [""]:
      images, labels, n_img, n_lab = _pairs(names, prefix, f"images/{sub}", f"labels/{sub}")
      if images:
        break
    if not images:
      raise DatasetNotFoundError(f"no image + label pairs under {root}/images and "
                                 f"{root}/labels (found {n_img} images, {n_lab} PNGs). {fix}")
    super().__init__(files, images, labels, classes[1:] if reduce_zero else classes,
                     reduce_zero=reduce_zero)


class TfdsSegSource:
  """TFDS's ``scene_parse150`` (ADE20K's MIT Scene Parsing images; split 'train' 20,210 and
  'test', the 2,000 validation images) through ``tfds.data_source``. Its annotation images hold
  the class index 0..150 per pixel; label 0 is ignored as in ADE20KSource."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    self.name, self.data_dir = name, data_dir
    self.split = ("train" if normalize_split(split) == "train" else "test") if split in (
        TRAIN_SPLITS + EVAL_SPLITS) else split
    ds = self._open()
    self._len = len(ds)
    self.classes = ADE20K_CLASSES
    self.num_classes = len(self.classes)

  def _open(self):
    where = self.data_dir or "~/tensorflow_datasets"
    hint = (f"run `tfds build {self.name} --data_dir={where} --file_format=array_record` (it "
            "downloads the MIT Scene Parsing archive), or use the ADEChallengeData2016 folder or "
            "zip: config.data.source='ade20k'")
    ds, _ = open_tfds(self.name, self.split, self.data_dir,
                      skip_decoding=("image", "annotation"), hint=hint)
    self._ds, self._pid = ds, os.getpid()
    return ds

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_ds", "_pid")}

  def __len__(self):
    return self._len

  def _example(self, index):
    if getattr(self, "_ds", None) is None or self._pid != os.getpid():
      self._open()
    return self._ds[int(index)]

  def size(self, index):
    image = open_encoded(self._example(index)["image"])
    return (image.size[1], image.size[0]) if isinstance(image, Image.Image) else image.shape[:2]

  def load(self, index):
    ex = self._example(index)
    label = open_encoded(ex["annotation"])
    label = _label_array(label) if isinstance(label, Image.Image) else np.asarray(label)
    if label.ndim == 3:
      label = label[..., 0]
    return open_encoded(ex["image"]), reduce_zero_label(label)


def make_seg_source(data_config, split: str):
  """The train (``split='train'``) or eval segmentation source named in ``config.data``:
  ``source`` is 'ade20k' (train_dir / eval_dir: ADEChallengeData2016 folder or zip),
  'seg_folder' (train_dir / eval_dir, ``reduce_zero_label``), 'tfds' (``name``, default
  scene_parse150), 'seg_digits' (``scene_size``, ``train_examples`` / ``eval_examples``) or
  'cifar_scenes' (train_dir / eval_dir: the CIFAR-10 zips, ``scene_size``)."""
  from toppax.data import seg_synthetic
  train = split in TRAIN_SPLITS
  src = data_config.source
  root = data_config.get("train_dir", "") if train else data_config.get("eval_dir", "")
  size = data_config.get("scene_size", None)
  count = data_config.get("train_examples" if train else "eval_examples", None) or None
  if src == "ade20k":
    source = ADE20KSource(root, "train" if train else "validation")
  elif src == "seg_folder":
    source = SegFolderSource(root, "train" if train else "validation",
                             reduce_zero=bool(data_config.get("reduce_zero_label", False)))
  elif src == "tfds":
    source = TfdsSegSource(data_config.get("name", None) or "scene_parse150",
                           data_config.train_split if train else data_config.eval_split,
                           data_config.get("data_dir", None))
  elif src == "seg_digits":
    source = seg_synthetic.SegDigitsSource(
        "train" if train else "validation", size=size or 64, num=count,
        digit_size=tuple(data_config.get("digit_size", None) or (0.25, 0.5)),
        max_digits=int(data_config.get("max_digits", None) or 3),
        label_mode=data_config.get("label_mode", None) or "ink")
  elif src == "cifar_scenes":
    source = seg_synthetic.CifarScenesSource(root, "train" if train else "validation",
                                             size=size or 128, num=count)
  else:
    raise ValueError("config.data.source must be 'ade20k', 'seg_folder', 'tfds', 'seg_digits' "
                     f"or 'cifar_scenes' for segmentation, got {src!r}")
  want = data_config.get("num_classes", None)
  if want and source.num_classes != want:
    raise ValueError(f"the {split} data has {source.num_classes} classes but "
                     f"config.data.num_classes={want}")
  return source
