"""Checkpoints: SIGKILL mid-run + resume == uninterrupted (bitwise, CPU); corrupt and incompatible
checkpoints fail loudly; typed PRNG keys round-trip."""
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from toppax import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 48
# A 1-block ViM on digits; no RandAugment (it only lengthens compilation); drop-path on, so the
# model's RNG stream must be restored too.
FLAGS = ["--config=configs/digits.py:runlocal", f"--config.total_steps={TOTAL}",
         "--config.checkpoint_every=4", "--config.keep_checkpoints=3", "--config.compare=()",
         "--config.model.depth=1", "--config.model.embed_dim=32", "--config.model.d_state=4",
         "--config.model.drop_path_rate=0.2", "--config.aug.randaug_layers=0",
         "--config.aug.mixup=0.4", "--config.log_every=8", "--config.data.eval_examples=32",
         "--config.eval_batch_size=32", "--config.data.workers=0"]


def _launch(workdir):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "toppax.main", f"--workdir={workdir}", *FLAGS],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _logged_steps(workdir):
  import json
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return sorted((r["step"], tuple(sorted(r))) for r in rows)


def _load(workdir, step):
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "meta"))
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                   meta=ocp.args.JsonRestore()))
  return out["state"], out["meta"]


def test_sigkill_and_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  ref = _launch(straight)
  proc = _launch(killed)
  deadline = time.time() + 300
  while not any(s >= 12 for s in _steps(killed)):
    assert proc.poll() is None, "training ended before it could be killed:\n" + proc.stdout.read()
    assert time.time() < deadline
    time.sleep(0.02)
  assert proc.poll() is None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(_steps(killed))
  assert 12 <= killed_at < TOTAL
  resumed = _launch(killed)
  out_resumed, _ = resumed.communicate(timeout=300)
  out_ref, _ = ref.communicate(timeout=300)
  assert resumed.returncode == 0, out_resumed[-3000:]
  assert ref.returncode == 0, out_ref[-3000:]
  assert f"resumed from step {killed_at}" in out_resumed
  # The killed run's rows after its checkpoint were dropped: every step is logged once.
  assert _logged_steps(killed) == _logged_steps(straight)
  a, meta_a = _load(straight, TOTAL)
  b, meta_b = _load(killed, TOTAL)
  assert meta_a["data_position"] == meta_b["data_position"] == TOTAL
  leaves_a = jax.tree_util.tree_flatten_with_path(a)[0]
  leaves_b = jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 100
  for (path, x), y in zip(leaves_a, leaves_b):
    assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
  # Training moved the parameters (an all-zero update would also be "equal").
  init_like = _load(straight, max(s for s in _steps(straight) if s < TOTAL))[0]
  assert not np.array_equal(np.asarray(init_like["params"]["head"]["kernel"]),
                            np.asarray(a["params"]["head"]["kernel"]))

  # A corrupt latest checkpoint stops the next run with a clear error, never a fresh start.
  state_dir = os.path.join(killed, "checkpoints", str(TOTAL), "state")
  for root, _, files in os.walk(state_dir):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"\x00garbage")
  again = _launch(killed)
  out, _ = again.communicate(timeout=300)
  assert again.returncode != 0
  assert again.returncode == 2 and "Traceback" not in out
  assert "error: checkpoint" in out and f"checkpoints/{TOTAL}" in out
  assert "step 1/" not in out


def _tree(key=0, dim=4):
  return {"step": jnp.asarray(3, jnp.int32), "params": {"w": jnp.arange(dim * 2.0).reshape(dim, 2)},
          "rngs": {"key": jax.random.key(key)}}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_roundtrip_keeps_typed_keys_and_meta(tmp_path):
  c = checkpointing.Checkpointer(str(tmp_path), every=1)
  tree = _tree(key=5)
  assert c.save(3, tree, {"step": 3, "data_position": 3})
  assert not c.save(3, tree, {"step": 3}, force=True)   # already there: no error, no rewrite
  c.close()
  # A fresh manager (as after a restart) reads it back.
  state, meta = checkpointing.Checkpointer(str(tmp_path)).restore(_abstract(tree))
  assert meta["data_position"] == 3
  np.testing.assert_array_equal(state["params"]["w"], tree["params"]["w"])
  assert jax.dtypes.issubdtype(state["rngs"]["key"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(state["rngs"]["key"]),
                                jax.random.key_data(tree["rngs"]["key"]))


def test_incompatible_and_corrupt_checkpoints_raise(tmp_path):
  c = checkpointing.Checkpointer(str(tmp_path / "a"), every=1)
  c.save(1, _tree(), {"step": 1})
  c.close()
  c = checkpointing.Checkpointer(str(tmp_path / "a"), every=1)
  with pytest.raises(checkpointing.CheckpointError, match=r"params/w: checkpoint \(4, 2\) vs "
                                                          r"config \(8, 2\)"):
    c.restore(_abstract(_tree(dim=8)))
  extra = {**_tree(), "ema": {"w": jnp.zeros((4, 2))}}
  with pytest.raises(checkpointing.CheckpointError, match="ema/w: in the model, not in checkpoint"):
    c.restore(_abstract(extra))
  c.close()
  for root, _, files in os.walk(tmp_path / "a" / "1"):
    for f in files:
      (open(os.path.join(root, f), "wb")).write(b"not a checkpoint")
  c2 = checkpointing.Checkpointer(str(tmp_path / "a"), every=1)
  with pytest.raises(checkpointing.CheckpointError, match="corrupt|could not be restored"):
    c2.restore(_abstract(_tree()))


def test_resume_checks_before_writing_and_logs_each_step_once(tmp_path, caplog):
  import json
  import logging
  from configs import digits
  from toppax import train
  c = digits.get_config("runlocal")
  c.model.depth, c.model.embed_dim, c.model.d_state = 1, 16, 4
  c.pruning.layers, c.compare = (1,), ()
  c.aug.randaug_layers, c.ema_decay = 0, 0.0
  c.total_steps, c.checkpoint_every, c.log_every = 2, 2, 2
  c.data.eval_examples, c.eval_batch_size = 16, 16
  steps_per_epoch = 1438 // c.batch_size                # digits: 1,438 training images
  c.eval_every_epochs = (2 + 0.5) / steps_per_epoch     # evaluate every 2 steps
  workdir = str(tmp_path)
  train.train_and_evaluate(c, workdir)
  stored = open(os.path.join(workdir, "config.json")).read()
  metrics = os.path.join(workdir, "metrics.jsonl")
  # A run killed after checkpoint 2, before its eval at step 2 was logged, having logged step 3:
  rows = [json.loads(l) for l in open(metrics)]
  with open(metrics, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows if not (r["step"] == 2 and "eval/top1" in r))
    f.write(json.dumps({"step": 3, "train/loss": 9.0}) + "\n")

  refused = c.copy_and_resolve_references()
  refused.batch_size = 32
  with pytest.raises(checkpointing.CheckpointError, match="seed=0, batch_size=64"):
    train.train_and_evaluate(refused, workdir)
  assert open(os.path.join(workdir, "config.json")).read() == stored

  c.total_steps, c.lr = 4, 1e-3           # total_steps may change on resume; lr is flagged
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(c, workdir)
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("differs from its stored config.json in: lr." in m for m in warned), warned
  assert json.load(open(os.path.join(workdir, "config.json")))["lr"] == 1e-3
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    result = train.train_and_evaluate(c, workdir)       # finished: evaluation only
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("training is already complete" in m and "step 4 of 4" in m for m in warned), warned
  assert not any("differs" in m for m in warned)
  assert result["step"] == 4 and "eval/top1" in result
  rows = [json.loads(l) for l in open(metrics)]
  keys = [(r["step"], tuple(sorted(r))) for r in rows]
  assert len(keys) == len(set(keys)), keys             # each step (and kind of row) once
  assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
  assert [r["step"] for r in rows if "eval/top1" in r] == [2, 4]   # step 2's eval redone
