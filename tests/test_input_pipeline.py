"""Input pipeline: deterministic order, per-host slices, masked eval padding, sources, errors."""
import os
import zipfile

import numpy as np
import pytest

from configs import digits
from toppax import input_pipeline as ip

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
  batches = list(ip.eval_batches(test, c))
  assert [b["image"].shape for b in batches] == [(128, 16, 16, 3)] * 3
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert mask.sum() == 359 and mask[:359].all()
  np.testing.assert_array_equal(labels[:359], test.labels)


def test_train_batches_resume_at_any_step():
  c = digits.get_config()
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
