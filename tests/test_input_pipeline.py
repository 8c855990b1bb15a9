"""Input pipeline: deterministic order, per-host slices, masked eval padding, sources, errors,
crops against the previous array implementation, grain worker processes."""
import io
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from configs import digits
from toppax import input_pipeline as ip
from toppax.data import transforms

CIFAR_TEST_ZIP = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10",
                              "cifar10-test.zip")


def test_train_order_is_a_pure_function_of_seed_and_step():
  plan = ip.TrainPlan(num_examples=103, global_batch=10)
  assert plan.steps_per_epoch == 10            # remainder of 3 dropped: static shapes
  a = [ip.train_indices(plan, seed=7, step=s)[1] for s in range(25)]
  b = [ip.train_indices(plan, seed=7, step=s)[1] for s in range(25)]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  # One epoch visits distinct examples; the next epoch is another permutation.
  epoch0 = np.concatenate(a[:10])
  assert len(set(epoch0.tolist())) == 100
  assert not np.array_equal(np.concatenate(a[10:20]), epoch0)
  assert ip.train_indices(plan, 7, 12)[0] == 1
  other_seed = ip.train_indices(plan, seed=8, step=0)[1]
  assert not np.array_equal(other_seed, a[0])


def test_hosts_read_disjoint_slices_of_the_global_batch():
  n, gb, hosts = 200, 16, 4
  full = ip.train_indices(ip.TrainPlan(n, gb), 0, 5)[1]
  parts = [ip.train_indices(ip.TrainPlan(n, gb, p, hosts), 0, 5)[1] for p in range(hosts)]
  assert all(len(p) == gb // hosts for p in parts)
  np.testing.assert_array_equal(np.concatenate(parts), full)
  with pytest.raises(ValueError, match="not divisible"):
    ip.TrainPlan(n, 18, 0, 4)


def test_eval_plan_counts_every_example_exactly_once():
  n, gb, hosts = 103, 16, 4
  seen = []
  for p in range(hosts):
    steps, idx, mask = ip.eval_plan(n, gb, p, hosts)
    assert steps == 7 and idx.shape == (7, 4)
    seen += idx[mask].tolist()
    assert (idx[~mask] == -1).all()
  assert sorted(seen) == list(range(n))


def test_digits_source_and_masked_eval_batches():
  train, test = ip.DigitsSource("train"), ip.DigitsSource("test")
  assert (len(train), len(test)) == (1438, 359)
  image, label = train.read(0)
  assert image.shape == (8, 8, 3) and image.dtype == np.uint8 and image.max() > 200
  assert set(np.unique(train.labels)) == set(range(10))
  c = digits.get_config()
  c.data.workers = 0          # this process (the worker-process path is tested below)
  batches = list(ip.eval_batches(test, c))
  assert [b["image"].shape for b in batches] == [(128, 16, 16, 3)] * 3
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert mask.sum() == 359 and mask[:359].all()
  np.testing.assert_array_equal(labels[:359], test.labels)


def test_train_batches_resume_at_any_step():
  c = digits.get_config()
  c.data.workers = 0
  src = ip.DigitsSource("train")
  plan = ip.TrainPlan(len(src), c.batch_size)
  full = list(ip.train_batches(src, plan, c, 0, 5))
  resumed = list(ip.train_batches(src, plan, c, 3, 5))
  assert full[0]["image"].shape == (64, 16, 16, 3) and full[0]["label"].dtype == np.int32
  for a, b in zip(full[3:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(full[0]["image"], full[1]["image"])


def test_crops():
  img = np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)
  rng = np.random.default_rng(0)
  out = ip.random_resized_crop(img, 24, rng)
  assert out.shape == (24, 24, 3)
  again = ip.random_resized_crop(img, 24, np.random.default_rng(0))
  np.testing.assert_array_equal(out, again)
  centre = ip.center_crop(img, 32, crop_fraction=1.0)
  assert centre.shape == (32, 32, 3)


@pytest.mark.skipif(not os.path.exists(CIFAR_TEST_ZIP), reason="shared CIFAR-10 zip not present")
def test_folder_source_on_real_cifar10(tmp_path):
  # Three classes of the real CIFAR-10 test set (class index = sorted folder name).
  with zipfile.ZipFile(CIFAR_TEST_ZIP) as z:
    names = [n for n in z.namelist() if n.endswith(".jpg") and
             n.split("/")[1] in ("airplane", "cat", "truck")][:3000]
    z.extractall(tmp_path, members=names)
  src = ip.FolderSource(str(tmp_path / "test"))
  assert src.classes == ["airplane", "cat", "truck"]
  assert len(src) == 3000 and np.bincount(src.labels).tolist() == [1000, 1000, 1000]
  image, label = src.read(len(src) - 1)
  assert image.shape == (32, 32, 3) and label == 2


def test_missing_datasets_say_how_to_prepare_them(tmp_path):
  with pytest.raises(ip.DatasetNotFoundError, match="class-per-folder"):
    ip.FolderSource(str(tmp_path / "nope"))
  (tmp_path / "empty" / "a").mkdir(parents=True)
  with pytest.raises(ip.DatasetNotFoundError, match="no images"):
    ip.FolderSource(str(tmp_path / "empty"))
  with pytest.raises(ip.DatasetNotFoundError, match=r"toppax\[data\]|tfds build"):
    ip.TfdsSource("imagenet2012", "train", str(tmp_path))
  c = digits.get_config()
  c.data.num_classes = 7
  with pytest.raises(ValueError, match="10 classes"):
    ip.make_source(c.data, "train")


def test_non_positive_batch_sizes_name_the_config_field():
  with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 0: set "
                                       r"config.batch_size"):
    ip.TrainPlan(num_examples=100, global_batch=0)
  with pytest.raises(ValueError, match=r"set config.eval_batch_size"):
    ip.eval_plan(10, 0)


# --- crops: the previous implementation (crop the decoded array, then PIL bicubic) -------------


def _reference_rrc(image, size, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  h, w = image.shape[:2]
  for _ in range(10):
    target = h * w * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
      break
  else:
    ch, cw = min(h, int(round(w * 4 / 3))), min(w, int(round(h * 4 / 3)))
    top, left = (h - ch) // 2, (w - cw) // 2
  crop = image[top:top + ch, left:left + cw]
  if crop.shape[:2] == (size, size):
    return crop, (top, left, ch, cw)
  out = np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))
  return out, (top, left, ch, cw)


def _reference_centre(image, size, crop_fraction):
  h, w = image.shape[:2]
  short = int(round(size / crop_fraction))
  scale = short / min(h, w)
  rh, rw = max(short, int(round(h * scale))), max(short, int(round(w * scale)))
  if (rh, rw) != (h, w):
    image = np.asarray(Image.fromarray(image).resize((rw, rh), Image.BICUBIC))
  top, left = (rh - size) // 2, (rw - size) // 2
  return image[top:top + size, left:left + size]


def _photo(w, h):
  from sklearn.datasets import load_sample_images
  return np.asarray(Image.fromarray(load_sample_images().images[0]).resize((w, h)))


def test_crops_match_the_previous_implementation_on_fixed_seeds():
  photo = _photo(500, 375)
  areas = []
  for seed in range(200):
    ref, box = _reference_rrc(photo, 64, np.random.default_rng(seed))
    assert transforms.sample_crop(375, 500, np.random.default_rng(seed)) == box
    np.testing.assert_array_equal(
        transforms.random_resized_crop(photo, 64, np.random.default_rng(seed)), ref)
    areas.append(box[2] * box[3] / (375 * 500))
    assert 0.74 < box[3] / box[2] < 1.35                   # aspect ratio within [3/4, 4/3]
  # Area fractions drawn in [0.08, 1] (large ones with extreme aspects are redrawn).
  assert 0.08 * 0.97 <= min(areas) < 0.15 and 0.9 < max(areas) <= 1.0
  for shape, frac in [((375, 500), 0.875), ((300, 200), 0.875), ((256, 256), 0.875),
                      ((427, 640), 1.0)]:
    im = _photo(shape[1], shape[0])
    diff = np.abs(transforms.center_crop(im, 224, frac).astype(int)
                  - _reference_centre(im, 224, frac))
    assert diff.max() <= 2 and diff.mean() < 0.2


def test_jpeg_crops_decode_at_the_scale_they_need():
  buf = io.BytesIO()
  Image.fromarray(_photo(1600, 1200)).save(buf, "JPEG", quality=90)
  data = buf.getvalue()
  im = Image.open(io.BytesIO(data))
  assert transforms._draft(im, 400, 300) == 4 and im.size == (400, 300)
  full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  diffs = []
  for seed in range(20):
    ref, _ = _reference_rrc(full, 224, np.random.default_rng(seed))
    new = transforms.random_resized_crop(Image.open(io.BytesIO(data)), 224,
                                         np.random.default_rng(seed))
    diffs.append(np.abs(new.astype(int) - ref).mean())
  # DCT-domain reduction then bicubic vs full decode then bicubic: a few grey levels apart.
  assert np.mean(diffs) < 2.5, diffs
  centre = transforms.center_crop(Image.open(io.BytesIO(data)), 224)
  assert np.abs(centre.astype(int) - _reference_centre(full, 224, 0.875)).mean() < 4


def test_worker_processes_give_the_same_batches_and_resume(tmp_path):
  # A zip source (its archive handle reopens in each worker), 2 processes vs this process.
  path = tmp_path / "tiny.zip"
  rng = np.random.default_rng(0)
  with zipfile.ZipFile(path, "w") as z:
    for i in range(24):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
      z.writestr(f"top/c{i % 3}/{i:03d}.jpg", buf.getvalue())
  c = digits.get_config()
  c.unlock()
  c.batch_size, c.aug.flip = 8, True
  src = ip.FolderSource(str(path))
  plan = ip.TrainPlan(len(src), c.batch_size)
  c.data.workers = 0
  here = list(ip.train_batches(src, plan, c, 0, 6))
  c.data.workers = 2
  with ip.train_batches(src, plan, c, 2, 6) as batches:
    there = list(batches)
    assert batches.count == 4 and batches.total_wait_s >= batches.last_wait_s >= 0
  assert len(there) == 4 and there[0]["image"].shape == (8, 16, 16, 3)
  for a, b in zip(here[2:], there):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
