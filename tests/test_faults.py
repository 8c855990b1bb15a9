"""Faults and bad input, one test per case a new user hit: a diverged run never writes NaN, a
damaged checkpoint is caught, user errors are one line, .pth files load without torch."""
import gc
import io
import json
import os
import pickle
import subprocess
import sys
import tomllib
import warnings
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits, vim_s
from toppax import checkpointing, models, optim, train
from toppax.convert import ConversionError, load_state_dict, pth
from toppax.errors import CheckpointError, NonFiniteError
from toppax.tools import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDENS = os.path.join(ROOT, "tests", "goldens")


def _cli(*args, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("JAX_PLATFORMS", None)      # the TPU probe is what one test looks for
  return subprocess.run([sys.executable, "-m", "toppax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _error_lines(stderr):
  return [l for l in stderr.splitlines() if not l[:1] in "IWD" or l.startswith("error:")]


def _tiny(lr=2e-3):
  """digits.py:runlocal (logs every 2 steps, checkpoints every 3) with a 2-block model."""
  c = digits.get_config("runlocal")
  c.model.depth, c.model.embed_dim, c.model.d_state = 2, 32, 4
  c.aug.randaug_layers = 0
  c.compare = ()
  c.keep_checkpoints = 10
  c.lr = lr
  return c


def _saved_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def test_diverged_run_saves_nothing_non_finite_and_resumes_from_the_last_good_step(
    tmp_path, caplog):
  """--config.lr=1e9: stops at the first non-finite step, naming it and the last checkpoint that
  exists; every checkpoint on disk is finite; the same workdir with a sane lr resumes from it."""
  workdir = str(tmp_path / "run")
  with pytest.raises(NonFiniteError) as e:
    train.train_and_evaluate(_tiny(lr=1e9), workdir)
  msg = str(e.value)
  steps = _saved_steps(workdir)
  assert steps and max(steps) < int(msg.split("at step ")[1].split()[0])
  assert f"checkpoints/{max(steps)} (step {max(steps)})" in msg and "config.lr" in msg
  for s in steps:                                 # restore() rejects non-finite values
    state, _ = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).restore(
        _abstract(_tiny()), s)
  caplog.set_level("INFO")
  result = train.train_and_evaluate(_tiny(), workdir)
  assert f"resumed from step {max(steps)}" in caplog.text
  assert np.isfinite(result["eval/loss"])
  # The console prints the same loss as metrics.jsonl: the mean over the logging window.
  rows = {r["step"]: r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
          if "train/loss" in r}
  printed = [l for l in caplog.messages if l.startswith("step 6/6")]
  assert printed and f"loss {rows[6]['train/loss']:.4f}" in printed[0]


def _abstract(config):
  from toppax import factory, sharding
  mesh = sharding.make_mesh(1)
  defs = factory.model_defs(config)
  return factory.abstract_state(config, defs, optim.restore_optimizer(config), mesh)


def test_skip_nonfinite_drops_the_bad_step_and_counts_it():
  """config.skip_nonfinite: a step whose loss is not finite changes no parameter, optimizer or
  EMA value (only the step counter and the RNG streams move), and says so in its metrics."""
  import jax
  from toppax import factory, sharding
  c = _tiny()
  c.skip_nonfinite = True
  mesh = sharding.make_mesh(1)
  defs = factory.model_defs(c)
  schedule = optim.lr_schedule(c, 10, 100)
  tx = optim.make_optimizer(c, schedule)
  state = factory.init_state(c, defs, tx, mesh)

  def poisoned(key, batch, apply):   # the classification loss, NaN where the batch says so
    loss, rngs = train.classification_loss(c, key, batch, apply)
    return jnp.where(batch["poison"].any(), jnp.nan, loss), rngs

  step = train.make_train_step(c, defs, tx, schedule, mesh, poisoned)
  rng = np.random.default_rng(0)
  batch = lambda poison: {"image": rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
                          "label": rng.integers(0, 10, (16,), dtype=np.int32),
                          "poison": np.full((16,), poison)}
  state, m1 = step(state, batch(False))
  before = jax.device_get((state["params"], state["opt_state"], state["ema"]))
  state, m2 = step(state, batch(True))
  after = jax.device_get((state["params"], state["opt_state"], state["ema"]))
  assert bool(m1["finite"]) and not bool(m2["finite"]) and float(m2["skipped"]) == 1.0
  assert int(state["step"]) == 2
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(x, y)
  state, m3 = step(state, batch(False))
  assert bool(m3["finite"]) and float(m3["skipped"]) == 0.0
  assert not np.array_equal(jax.device_get(state["params"]["head"]["kernel"]),
                            before[0]["head"]["kernel"])


def _state(seed=0):
  rng = np.random.default_rng(seed)
  return {"step": jnp.asarray(3, jnp.int32),
          "params": {"w": jnp.asarray(rng.standard_normal((256, 512)), jnp.float32),
                     "b": jnp.asarray(rng.standard_normal((512,)), jnp.float32)}}


def _abstract_of(state):
  import jax
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _data_files(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state"))
           for f in fs if os.sep + "d" + os.sep in os.path.join(r, f)]
  return sorted(files, key=os.path.getsize)


def test_a_non_finite_state_is_never_written(tmp_path):
  ck = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), every=1)
  bad = _state()
  bad["params"]["b"] = bad["params"]["b"].at[3].set(jnp.nan)
  with pytest.raises(NonFiniteError, match="params/b"):
    ck.save(1, bad, {"step": 1}, force=True)
  assert ck.latest_step() is None
  ck.close()


def test_flipped_bytes_are_caught_and_fallback_resumes_from_the_step_before(tmp_path):
  """400 bytes flipped inside a data file (same size): CheckpointError naming the checkpoint,
  never the damaged values; resume_fallback moves it aside and restores the one before."""
  d = str(tmp_path / "checkpoints")
  ck = checkpointing.Checkpointer(d, every=1, keep=5)
  for step in (1, 2):
    ck.save(step, _state(step), {"step": step})
  ck.close()
  target = _data_files(os.path.join(d, "2"))[-1]
  data = bytearray(open(target, "rb").read())
  start = len(data) // 10
  for i in range(start, start + 400):
    data[i] ^= 0xFF
  open(target, "wb").write(bytes(data))
  ck = checkpointing.Checkpointer(d, every=1, keep=5)
  with pytest.raises(CheckpointError, match=r"checkpoints/2 (is damaged|could not be restored)"
                                            r".*resume_fallback"):
    ck.restore(_abstract_of(_state()))
  state, meta = ck.restore_latest(_abstract_of(_state()), fallback=True)
  assert meta["step"] == 1 and os.path.isdir(os.path.join(d, "damaged-2"))
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]),
                                np.asarray(_state(1)["params"]["w"]))
  ck.close()


def test_checksums_catch_values_that_read_without_error(tmp_path):
  """The damage a reader cannot see (values changed, file still well-formed) is what the
  checksums are for: a stored checksum that disagrees is a CheckpointError."""
  d = str(tmp_path / "checkpoints")
  ck = checkpointing.Checkpointer(d, every=1)
  ck.save(1, _state(), {"step": 1})
  ck.close()
  meta_file = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(d, "1", "meta"))
               for f in fs if not f.startswith("_")][0]
  meta = json.load(open(meta_file))
  meta["checksums"]["params/w"] = "00000000"
  json.dump(meta, open(meta_file, "w"))
  ck = checkpointing.Checkpointer(d, every=1)
  with pytest.raises(CheckpointError, match=r"is damaged: 1 array\(s\) differ .*params/w"):
    ck.restore(_abstract_of(_state()))
  ck.close()


def test_truncated_checkpoint_is_one_clear_error_without_async_noise(tmp_path, capfd):
  d = str(tmp_path / "checkpoints")
  ck = checkpointing.Checkpointer(d, every=1)
  ck.save(1, _state(), {"step": 1})
  ck.close()
  target = _data_files(os.path.join(d, "1"))[-1]
  data = open(target, "rb").read()
  open(target, "wb").write(data[:len(data) // 2])
  ck = checkpointing.Checkpointer(d, every=1)
  with pytest.raises(CheckpointError, match="could not be restored"):
    ck.restore(_abstract_of(_state()))
  ck.close()
  gc.collect()
  printed = capfd.readouterr()
  noise = printed.out + printed.err
  assert "Traceback" not in noise and "never retrieved" not in noise, noise[-2000:]


def test_user_errors_are_one_line_with_status_2(tmp_path):
  for args, expect in [
      (["--config.model.name=vim_xl"], "unknown model 'vim_xl'; available models:"),
      (["--config.lrr=1"], 'unknown config field \'lrr\': Did you mean "lr"'),
      (["--config.model.img_size=18"], "img_size 18 is not a multiple of patch_size 4"),
  ]:
    r = _cli("--config=configs/digits.py:runlocal", f"--workdir={tmp_path}", *args)
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and expect in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "\\n" not in errors[0]


def test_image_size_must_be_whole_patches_everywhere():
  with pytest.raises(ValueError, match="img_size 18 is not a multiple of patch_size 4"):
    models.create("vim_t", img_size=18, patch_size=4, depth=1, embed_dim=16)
  with pytest.raises(ValueError, match="img_size 225 is not a multiple of vim_s's patch_size 16"):
    flops.model_gflops("vim_s", img_size=225)
  # PlainMamba pads such sizes as its official patch embedding does (100 -> stem 50 -> 7x7).
  assert flops.block_table("plainmamba_l1", 100)[2]["tokens"] == 49
  with pytest.raises(ValueError, match="patch_size 8 plus a multiple of the stride 4"):
    models.create("vim_t", img_size=30, patch_size=8, stride=4, depth=1, embed_dim=16)
  models.create("vim_t", img_size=32, patch_size=8, stride=4, depth=1, embed_dim=16)
  r = _cli("--config=configs/vim_s.py", "--mode=flops", "--config.model.img_size=225")
  assert r.returncode == 2 and "error: img_size 225" in r.stderr


def test_no_tpu_probe_noise_and_no_optax_warning():
  r = _cli("--config=configs/digits.py:runlocal", "--mode=doctor")
  assert r.returncode == 0 and "Unable to initialize backend" not in r.stderr, r.stderr[-2000:]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for c in (digits.get_config(), vim_s.get_config("top")):
      for steps_per_epoch, total in ((1, 1), (10, 5), (100, 1000)):
        optim.lr_schedule(c, steps_per_epoch, total)(0)
      optim.restore_optimizer(c)


# --- .pth checkpoints without torch -------------------------------------------------------------


def test_pth_reader_rebuilds_tensors_without_torch():
  """tests/goldens/tiny_state_dict.pth was written by torch.save (tests/README.md): every dtype,
  a transposed and a sliced view of one storage, a 0-d and an empty tensor, and the usual
  non-tensor entries of a training checkpoint."""
  obj = pth.load(os.path.join(GOLDENS, "tiny_state_dict.pth"))
  expected = np.load(os.path.join(GOLDENS, "tiny_state_dict_expected.npz"))
  sd = obj["model"]
  assert set(sd) == set(expected.files)
  for k in expected.files:
    got = np.asarray(sd[k]).astype(expected[k].dtype)
    assert got.shape == expected[k].shape and np.array_equal(got, expected[k]), k
  assert str(sd["bf16"].dtype) == "bfloat16" and sd["bn.num_batches_tracked"].dtype == np.int64
  assert obj["epoch"] == 3 and obj["args"].model == "vim_t" and obj["meta"]["CLASSES"] == ("a", "b")
  assert set(load_state_dict(os.path.join(GOLDENS, "tiny_state_dict.pth"))) == set(expected.files)


class _Evil:
  def __reduce__(self):
    return (os.system, ("touch PWNED",))


def test_pth_reader_refuses_a_pickle_that_would_run_code(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = tmp_path / "evil.pth"
  buf = io.BytesIO()
  pickle.dump({"model": {"w": _Evil()}}, buf, protocol=2)
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", buf.getvalue())
    z.writestr("archive/version", "3\n")
  with pytest.raises(ConversionError, match=r"refusing to load .*(posix|os)\.system"):
    load_state_dict(str(path))
  assert not (tmp_path / "PWNED").exists()


def test_pth_made_by_torch_converts_like_the_state_dict(tmp_path):
  torch = pytest.importorskip("torch")
  from tests.golden_utils import load_golden
  from toppax.convert import from_torch
  sd, arrays = load_golden(os.path.join(GOLDENS, "vim_reduced_64p16d4.npz"))
  path = tmp_path / "vim.pth"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
  kw = dict(img_size=64, patch_size=16, depth=4, embed_dim=64, num_classes=10)
  a = from_torch("vim_t", str(path), **kw)
  b = from_torch("vim_t", sd, **kw)
  x = jnp.asarray(arrays["images"])
  np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))


def test_no_extra_pulls_torch():
  """Reading official checkpoints needs no torch: no dependency group but the GPU one installs
  it (a plain `torch` requirement resolves to a CUDA build of several GB)."""
  project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
  groups = {"base": project["dependencies"], **project["optional-dependencies"]}
  for name, reqs in groups.items():
    assert not any(r.lower().startswith("torch") for r in reqs), (name, reqs)
