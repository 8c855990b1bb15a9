"""Segmentation data: ADE20K layout (folder and zip), user folders, TFDS's missing-data error,
mmseg's train/eval transforms, the eval plan, generated scenes."""
import io
import os
import zipfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from toppax.data import loader, seg_sources, seg_synthetic, segmentation as seg

CIFAR_TEST_ZIP = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10",
                              "cifar10-test.zip")
PALETTE = np.random.default_rng(0).integers(0, 256, (256, 3)).astype(np.uint8)


def _pair(rng, h, w):
  """A label map of vertical bands (raw ADE values 0..4) and an image coloured by label."""
  label = np.repeat((np.arange(w) * 5 // w)[None, :], h, axis=0).astype(np.uint8)
  label[: h // 4] = rng.integers(0, 5)
  return PALETTE[label], label


def _write(files, name, array, fmt):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, fmt)
  files[name] = buf.getvalue()


def _ade_files():
  rng, files = np.random.default_rng(1), {}
  for sub, shapes in (("training", [(40, 60), (50, 30), (64, 64)]), ("validation", [(30, 45)])):
    for i, (h, w) in enumerate(shapes):
      image, label = _pair(rng, h, w)
      _write(files, f"ADEChallengeData2016/images/{sub}/ADE_{i}.jpg", image, "JPEG")
      _write(files, f"ADEChallengeData2016/annotations/{sub}/ADE_{i}.png", label, "PNG")
  return files


def test_ade20k_folder_and_zip_reduce_the_zero_label(tmp_path):
  files = _ade_files()
  with zipfile.ZipFile(tmp_path / "ADEChallengeData2016.zip", "w") as z:
    for name, data in files.items():
      z.writestr(name, data)
      (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
      (tmp_path / name).write_bytes(data)
  for root in (str(tmp_path), str(tmp_path / "ADEChallengeData2016"),
               str(tmp_path / "ADEChallengeData2016.zip")):
    train = seg_sources.ADE20KSource(root, "train")
    assert len(train) == 3 and train.num_classes == 150 and train.classes[0] == "wall"
    image, label = train.load(0)
    raw = np.asarray(Image.open(io.BytesIO(files["ADEChallengeData2016/annotations/training/"
                                                  "ADE_0.png"])))
    np.testing.assert_array_equal(label, np.where(raw == 0, 255, raw - 1))
    assert image.size == (60, 40) and train.size(1) == (50, 30)
    assert len(seg_sources.ADE20KSource(root, "validation")) == 1
  with pytest.raises(seg_sources.DatasetNotFoundError, match="ADEChallengeData2016"):
    seg_sources.ADE20KSource(str(tmp_path / "missing"), "train")
  with pytest.raises(seg_sources.DatasetNotFoundError, match="no ADE20K training pairs"):
    seg_sources.ADE20KSource(str(tmp_path / "ADEChallengeData2016" / "images"), "train")


def test_tfds_copy_of_ade20k_says_how_to_prepare_it(tmp_path):
  with pytest.raises(seg_sources.DatasetNotFoundError, match=r"toppax\[data\]|tfds build "
                                                             r"scene_parse150"):
    seg_sources.TfdsSegSource("scene_parse150", "train", str(tmp_path))


def test_user_folder_with_class_list(tmp_path):
  rng = np.random.default_rng(2)
  (tmp_path / "images").mkdir()
  (tmp_path / "labels").mkdir()
  (tmp_path / "classes.txt").write_text("sky\nroad\ncar\n")
  for i in range(3):
    image, label = _pair(rng, 20, 30)
    Image.fromarray(image).save(tmp_path / "images" / f"{i}.png")
    Image.fromarray(label).save(tmp_path / "labels" / f"{i}.png")
  Image.fromarray(image).save(tmp_path / "images" / "unlabelled.png")
  src = seg_sources.SegFolderSource(str(tmp_path))
  assert len(src) == 3 and src.classes == ("sky", "road", "car")
  image, label = src.load(2)
  assert label.max() == 255 and set(np.unique(label)) <= {0, 1, 2, 255}   # 3, 4 -> ignored
  reduced = seg_sources.SegFolderSource(str(tmp_path), reduce_zero=True)
  assert reduced.classes == ("road", "car")
  assert set(np.unique(reduced.load(2)[1])) == {0, 1, 255}      # 0 -> 255, 1 -> 0, 2 -> 1
  with pytest.raises(seg_sources.DatasetNotFoundError, match="classes.txt"):
    seg_sources.SegFolderSource(str(tmp_path / "images"))


def test_rescale_follows_mmcv_keep_ratio_rule():
  assert seg.rescale_size(512, 683, (2048, 512)) == (512, 683)
  assert seg.rescale_size(1000, 3000, (2048, 512)) == (512, 1536)
  assert seg.rescale_size(300, 4000, (2048, 512)) == (154, 2048)   # long side binds
  assert seg.rescale_size(512, 683, (1024, 256)) == (256, 342)


def test_train_transform_keeps_labels_aligned_and_pads_with_ignore():
  rng = np.random.default_rng(3)
  image, label = _pair(rng, 96, 128)
  label = seg_sources.reduce_zero_label(label)
  aug = seg.SegAugment(scale=(256, 64), ratio_range=(0.5, 2.0), crop_size=(64, 64),
                       photometric=False)
  padded = 0
  for seed in range(30):
    img, lab = seg.train_example(Image.fromarray(image), label, np.random.default_rng(seed), aug)
    assert img.shape == (64, 64, 3) and lab.shape == (64, 64) and lab.dtype == np.int32
    assert set(np.unique(lab)) <= set(np.unique(label)) | {255}        # nearest: no new values
    counted = lab != 255
    # The image is the palette of the raw label: away from band borders they agree.
    close = np.abs(img[counted].astype(int) - PALETTE[lab[counted] + 1]).max(-1) < 12
    assert close.mean() > 0.85
    padded += int((img[~counted] == 0).all(-1).sum() > 0)
  assert padded > 0                                  # small rescales padded with 0 / 255
  same = [seg.train_example(Image.fromarray(image), label, np.random.default_rng(5), aug)
          for _ in range(2)]
  np.testing.assert_array_equal(same[0][0], same[1][0])


def test_cat_max_ratio_redraws_single_class_crops():
  label = np.zeros((64, 256), np.uint8)
  label[:, 200:] = 1                                 # class 1: a 56-px band on the right
  image = PALETTE[label]
  def dominant(ratio):
    aug = seg.SegAugment(scale=(256, 64), ratio_range=(1.0, 1.0), crop_size=(32, 32),
                         cat_max_ratio=ratio, flip_prob=0.0, photometric=False)
    out = []
    for seed in range(40):
      _, lab = seg.train_example(image, label, np.random.default_rng(seed), aug)
      out.append(np.bincount(lab.ravel(), minlength=2)[:2].max() / lab.size)
    return np.array(out)
  assert (dominant(1.0) == 1.0).mean() > 0.7         # most plain crops hold one class
  assert (dominant(0.75) < 0.75).mean() > (dominant(1.0) < 0.75).mean() + 0.2


def test_photometric_distortion_changes_only_colours():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  outs = [seg._photometric(img, np.random.default_rng(s)) for s in range(20)]
  assert all(o.dtype == np.uint8 and o.shape == img.shape for o in outs)
  assert sum(not np.array_equal(o, img) for o in outs) >= 15


def _config(**seg_fields):
  return ml_collections.ConfigDict({
      "seed": 0, "eval_batch_size": 4,
      "data": {"source": "seg_digits", "workers": 0, "prefetch": 2, "scene_size": 64,
               "train_examples": 64, "eval_examples": 10},
      "seg": {"scale": (256, 64), "crop_size": (48, 48), **seg_fields}})


def test_seg_batches_are_a_pure_function_of_seed_and_step():
  c = _config()
  src = seg_sources.make_seg_source(c.data, "train")
  plan = loader.TrainPlan(len(src), 8)
  full = list(seg.seg_train_batches(src, plan, c, 0, 4))
  resumed = list(seg.seg_train_batches(src, plan, c, 2, 4))
  assert full[0]["image"].shape == (8, 48, 48, 3) and full[0]["label"].dtype == np.int32
  for a, b in zip(full[2:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert set(np.unique(full[0]["label"])) <= set(range(11)) | {255}


def test_eval_plan_counts_every_example_once_in_few_shapes():
  sizes = [(512, 683), (683, 512), (512, 683), (375, 500), (1000, 3000), (512, 700)]
  seen = []
  for p in range(2):
    plan = seg.seg_eval_plan(sizes, (2048, 512), 4, p, 2, bucket=256)
    for b in plan:
      seen += [int(i) for i in b.indices if i >= 0]
      for i in b.indices[b.indices >= 0]:
        rh, rw = seg.rescale_size(*sizes[i], (2048, 512))
        assert rh <= b.canvas[0] and rw <= b.canvas[1]
        assert sizes[i][0] <= b.label_canvas[0] and sizes[i][1] <= b.label_canvas[1]
  assert sorted(seen) == list(range(len(sizes)))
  shapes = {(b.canvas, b.label_canvas) for b in seg.seg_eval_plan(sizes, (2048, 512), 4)}
  assert ((512, 768), (512, 768)) in shapes and len(shapes) <= 5
  with pytest.raises(ValueError, match="eval_canvas"):
    seg.seg_eval_plan(sizes, (2048, 512), 4, canvas=(512, 1024))


def test_eval_batches_hold_rescaled_images_and_original_labels():
  c = _config()
  src = seg_sources.make_seg_source(c.data, "eval")
  batches = list(seg.seg_eval_batches(src, c))
  assert [b["image"].shape for b in batches] == [(4, 64, 64, 3)] * 3
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 10 and (np.concatenate([b["label_size"] for b in batches])[:10] == 64).all()
  np.testing.assert_array_equal(batches[0]["label"][1], src.load(1)[1])
  assert (batches[-1]["label"][mask[8:] == 0] == 255).all()


def test_digit_scenes_are_deterministic_with_exact_labels():
  src = seg_synthetic.SegDigitsSource("train", size=48, num=20)
  a, b = src.load(7), src.load(7)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  labels = np.concatenate([src.load(i)[1].ravel() for i in range(20)])
  assert set(np.unique(labels)) <= set(range(11)) and (labels == 10).mean() > 0.5
  image, label = src.load(3)
  # Digit pixels are bright ink over a dark background.
  assert image[label < 10].max(-1).mean() > image[label == 10].max(-1).mean() + 60


@pytest.mark.skipif(not os.path.exists(CIFAR_TEST_ZIP), reason="shared CIFAR-10 zip not present")
def test_cifar_scenes_paste_photos_with_their_class():
  src = seg_synthetic.CifarScenesSource(CIFAR_TEST_ZIP, "validation", size=64, num=8)
  assert src.num_classes == 11 and len(src) == 8
  image, label = src.load(0)
  again = src.load(0)
  np.testing.assert_array_equal(image, again[0])
  assert image.shape == (64, 64, 3) and label.shape == (64, 64)
  assert len(np.unique(label)) >= 2 and (label <= 10).all()
  # Labels are whole rectangles: each class region's bounding box is filled by pastes.
  for cls in np.unique(label[label < 10]):
    ys, xs = np.nonzero(label == cls)
    assert len(ys) >= (64 // 5) ** 2 // 4
