"""--mode=study end to end on a tiny CIFAR-shaped zip; zip sources, cached decode, on-device
crops, eval subsets, init_from a toppax workdir, --mode=convert."""
import io
import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import cifar10
from toppax import augment, checkpointing, factory, input_pipeline as ip, study

CLASSES = [f"c{i}" for i in range(10)]


def _zip(path, top, per_class, seed):
  """A class-per-folder zip of 32x32 PNGs whose class is visible (a bright row per class)."""
  rng = np.random.default_rng(seed)
  with zipfile.ZipFile(path, "w") as z:
    for label, cls in enumerate(CLASSES):
      for i in range(per_class):
        im = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
        im[3 * label:3 * label + 3] = 255
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        z.writestr(f"{top}/{cls}/{i:04d}.png", buf.getvalue())
  return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("cifar_like")
  _zip(d / "cifar10-train20k.zip", "train", 8, 0)
  _zip(d / "cifar10-test.zip", "test", 4, 1)
  return str(d)


def test_zip_folder_source_reads_the_archive_as_a_class_tree(data_dir):
  s = ip.FolderSource(os.path.join(data_dir, "cifar10-test.zip"))
  assert s.classes == CLASSES and len(s) == 40 and s.num_classes == 10
  image, label = s.read(13)
  assert image.shape == (32, 32, 3) and label == 3
  assert image[9:12].min() == 255            # the bright rows of class 3
  inner = ip.FolderSource(os.path.join(data_dir, "cifar10-test.zip") + "/test")
  assert inner.files == s.files
  with pytest.raises(ip.DatasetNotFoundError, match="does not exist"):
    ip.FolderSource(os.path.join(data_dir, "missing.zip"))
  bad = os.path.join(data_dir, "bad.zip")
  with open(bad, "wb") as f:
    f.write(b"not a zip")
  with pytest.raises(ip.DatasetNotFoundError, match="not a readable zip"):
    ip.FolderSource(bad)


def test_cached_source_and_vectorised_batches_match_the_per_image_path(data_dir):
  c = cifar10.get_config(f"runlocal,data={data_dir}")
  src = ip.FolderSource(c.data.eval_dir)
  cached = ip.CachedSource(src, workers=2)
  assert cached.images.shape == (40, 32, 32, 3)
  c.unlock()
  c.eval_batch_size = 16
  fast = list(ip.eval_batches(cached, c))
  slow = list(ip.eval_batches(src, c))
  assert len(fast) == len(slow) == 3
  for a, b in zip(fast, slow):
    np.testing.assert_array_equal(a["mask"], b["mask"])
    m = a["mask"] > 0
    np.testing.assert_array_equal(a["image"][m], b["image"][m])
    np.testing.assert_array_equal(a["label"][m], b["label"][m])


def test_an_eval_subset_is_a_fixed_sample_across_classes(data_dir):
  c = cifar10.get_config(f"runlocal,data={data_dir}")
  src = ip.CachedSource(ip.FolderSource(c.data.eval_dir), workers=1)
  labels = [b["label"][b["mask"] > 0] for b in ip.eval_batches(src, c, num_examples=20)]
  labels = np.concatenate(labels)
  assert len(labels) == 20 and len(set(labels.tolist())) >= 5   # not the first 20 (5 classes)
  again = np.concatenate([b["label"][b["mask"] > 0] for b in ip.eval_batches(src, c, 20)])
  np.testing.assert_array_equal(labels, again)


def test_on_device_pad_crop_flip_keeps_pixels_and_shifts_at_most_pad():
  x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  y = augment.pad_crop_flip(jax.random.key(0), x, pad=2, flip=False)
  assert y.shape == x.shape
  # Each output is a window of the reflect-padded image: its centre 4x4 block is in x.
  for i in range(2):
    block = np.asarray(y[i, 2:6, 2:6, 0])
    found = any(np.array_equal(block, np.asarray(x[i, r:r + 4, c:c + 4, 0]))
                for r in range(5) for c in range(5))
    assert found
  flipped = augment.pad_crop_flip(jax.random.key(1), x, pad=0, flip=True)
  for i in range(2):
    assert (np.array_equal(flipped[i], x[i]) or np.array_equal(flipped[i], x[i, :, ::-1]))


def test_on_device_crops_need_cached_equal_size_images(data_dir):
  c = cifar10.get_config(f"runlocal,data={data_dir}")
  src = ip.FolderSource(c.data.train_dir)   # not cached
  plan = ip.TrainPlan(len(src), c.batch_size)
  with pytest.raises(ValueError, match="data.cache=True"):
    next(iter(ip.train_batches(src, plan, c, 0, 1)))


def test_study_runs_resumes_and_reports(data_dir, tmp_path, monkeypatch):
  c = cifar10.get_config(f"runlocal,data={data_dir}")
  c.unlock()
  c.study.methods = ("top",)
  c.study.importances = ("clip",)
  c.study.finetune_steps = 2
  c.total_steps = 4
  c.checkpoint_every = 2
  c.data.eval_examples = 0
  out = study.run(c, str(tmp_path))
  rows = {r["key"]: r for r in out["rows"]}
  assert set(rows) == {"seed0/dense/r1/-", "seed0/top/r0.5/clip", "seed0/dense+ft/r1/-"}
  top, dense = rows["seed0/top/r0.5/clip"], rows["seed0/dense/r1/-"]
  assert top["tokens"] == "65 -> 33 -> 17 -> 9" and top["gflops"] < dense["gflops"]
  for r in out["rows"]:
    for k in ("zero_shot_top1", "finetuned_top1"):
      assert r[k] is None or 0.0 <= r[k] <= 1.0
  assert top["zero_shot_top1"] is not None and top["finetuned_top1"] is not None
  for name in ("study.md", "study.png", "study.json", "study-seed0.json"):
    assert os.path.getsize(tmp_path / name) > 0
  assert "ToP (alignment)" in (tmp_path / "study.md").read_text()
  # The dense model was exported as parameters the fine-tunes start from.
  assert os.path.isdir(tmp_path / "seed0" / "dense" / "params")
  # A rerun trains nothing and reports the same rows.
  before = os.path.getmtime(tmp_path / "study-seed0.json")
  again = study.run(c, str(tmp_path))
  assert os.path.getmtime(tmp_path / "study-seed0.json") == before
  assert {r["key"] for r in again["rows"]} == set(rows)
  # An entry stopped after its zero-shot evaluation (its fine-tune checkpointed): the rerun
  # takes the kept zero-shot result and resumes the fine-tune, evaluating nothing zero-shot.
  path = tmp_path / "study-seed0.json"
  data = json.loads(path.read_text())
  key = "seed0/top/r0.5/clip"
  data["rows"] = [r for r in data["rows"] if r["key"] != key]
  data["zero_shot"] = {key: 0.125}
  path.write_text(json.dumps(data))
  zero_shot_runs = []
  evaluate = study._Task.evaluate
  monkeypatch.setattr(study._Task, "evaluate",
                      lambda *a: zero_shot_runs.append(1) or evaluate(*a))
  resumed = {r["key"]: r for r in study.run(c, str(tmp_path))["rows"]}
  assert zero_shot_runs == []
  assert resumed[key]["zero_shot_top1"] == 0.125
  assert resumed[key]["finetuned_top1"] == top["finetuned_top1"]   # the same checkpoint
  assert "zero_shot" not in json.loads(path.read_text())             # no longer pending


def test_study_rejects_bad_settings(data_dir, tmp_path):
  c = cifar10.get_config(f"runlocal,data={data_dir}")
  c.unlock()
  c.study.keep_ratios = (1.5,)
  with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
    study.run(c, str(tmp_path))
  c.study.keep_ratios = (0.5,)
  c.study.methods = ("random",)
  with pytest.raises(ValueError, match="unknown"):
    study.run(c, str(tmp_path))


def test_load_params_checks_shapes_and_reads_exported_params(tmp_path):
  c = cifar10.get_config("runlocal")
  defs = factory.model_defs(c)
  params = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), defs.params)
  checkpointing.save_params(str(tmp_path / "w"), params, {}, {"note": "test"})
  got, what = checkpointing.load_params(str(tmp_path / "w"), defs.params)
  assert "converted parameters" in what
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  c.unlock()
  c.model.embed_dim = 48
  with pytest.raises(checkpointing.CheckpointError, match="do not fit"):
    checkpointing.load_params(str(tmp_path / "w"), factory.model_defs(c).params)
  with pytest.raises(checkpointing.CheckpointError, match="exists already"):
    checkpointing.save_params(str(tmp_path / "w"), params, {}, {})


def test_study_parts_split_the_entries():
  assert study._part("") == (0, 1)
  assert study._part("1/3") == (1, 3)
  entries = list("abcdefg")
  assert study._share(entries, 0, 3) == []            # part 0 trains the dense models
  assert study._share(entries, 1, 3) == list("aceg")
  assert study._share(entries, 2, 3) == list("bdf")
  assert study._share(entries, 1, 2) == entries
  assert sorted(sum((study._share(entries, i, 8) for i in range(8)), [])) == entries
  for bad in ("3/3", "x", "1/0"):
    with pytest.raises(ValueError, match="config.study.part"):
      study._part(bad)


def test_compile_ahead_lets_the_fine_tune_load_its_programs(data_dir, tmp_path, caplog):
  """A study part compiles its fine-tune's train and eval steps from shapes while the dense
  model trains; the fine-tune then loads its train step from the persistent compilation cache
  and compiles neither step again."""
  import logging
  from jax.experimental.compilation_cache import compilation_cache
  from toppax import sharding
  c = cifar10.get_config(f"runlocal,data={data_dir}")
  c.unlock()
  c.total_steps, c.data.eval_examples, c.compare = 2, 8, ()
  c.study.finetune_steps = 2
  mesh = sharding.make_mesh()
  task = study._Task(c)
  dense_dir = str(tmp_path / "dense")    # an exported dense model, as part 0 leaves it
  params = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), factory.model_defs(c).params)
  checkpointing.save_params(dense_dir, params,
                            factory.fresh_rngs(c, sharding.replicated(mesh)), {"note": "test"})
  ft = study._finetune(study._pruned(c, "top", 0.5, "clip"), dense_dir)

  old_min = jax.config.jax_persistent_cache_min_compile_time_secs
  try:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    study._persistent_compilation_cache(str(tmp_path))
    assert task.compile_ahead(ft, mesh) > 0
    assert os.listdir(tmp_path / "compilation_cache")
    with caplog.at_level(logging.DEBUG, logger="jax._src.compiler"):
      caplog.clear()
      task.train(ft, str(tmp_path / "ft"))
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min)
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()
  log = caplog.text
  assert "cache hit for 'jit_train_step'" in log
  assert "MISS for 'jit_train_step'" not in log and "MISS for 'jit_step'" not in log


def test_entry_parts_yield_the_cpu_in_every_thread():
  # A subprocess: a process cannot raise its priority back once lowered.
  code = """
import os, threading
from toppax import study
stop = threading.Event()
before = threading.Thread(target=stop.wait); before.start()
print(study._yield_cpu())
after = threading.Thread(target=stop.wait); after.start()
tids = [int(t) for t in os.listdir('/proc/self/task')]
print(sorted({os.getpriority(os.PRIO_PROCESS, t) for t in tids}))
stop.set()
"""
  if not os.path.isdir("/proc/self/task"):
    pytest.skip("needs Linux's /proc")
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.split("\n")[:2] == ["19", "[19]"], out.stdout + out.stderr
