"""Bad checkpoints fail with one clear error that names the path and the fix."""
import gc
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toppax import checkpointing
from toppax.checkpointing import CheckpointError
from toppax.convert import ConversionError, from_torch, load_state_dict

MODEL = {"name": "vim_t", "img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 8}


def _state(n=5):
  # w compresses to more than OCDBT inlines in its index, so it gets its own data file.
  return {"step": jnp.asarray(1, jnp.int32), "ema": {},
          "params": {"pos_embed": jnp.ones((1, n, 8)),
                     "w": jnp.arange(40000.0).reshape(200, 200)}}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _workdir(tmp_path, steps=(1,)):
  """A training-like workdir: checkpoints/<step> with the model config in the meta."""
  workdir = tmp_path / "run"
  ck = checkpointing.Checkpointer(str(workdir / "checkpoints"), every=1)
  for s in steps:
    ck.save(s, _state(), {"step": s, "model": MODEL})
  ck.close()
  (workdir / "config.json").write_text(json.dumps({"model": MODEL, "data": {"num_classes": 10}}))
  return workdir


def _corrupt(directory, match):
  for root, _, files in os.walk(directory):
    for f in files:
      if match(root, f):
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"x" * 50)


def test_config_mismatch_names_fields_not_move_away(tmp_path):
  workdir = _workdir(tmp_path)
  ck = checkpointing.Checkpointer(str(workdir / "checkpoints"))
  target = _abstract(_state(n=17))
  with pytest.raises(CheckpointError) as e:
    ck.restore(target, config={"model": {**MODEL, "img_size": 32}, "data": {"num_classes": 10}})
  msg = str(e.value)
  assert "params/pos_embed: checkpoint (1, 5, 8) vs config (1, 17, 8)" in msg
  assert "model.img_size: checkpoint 16, config 32" in msg
  assert "model.depth" not in msg and "Move" not in msg and "config.json" in msg
  with pytest.raises(CheckpointError, match=r"img_size=16") as e:  # no current config given
    ck.restore(target)
  assert "Move" not in str(e.value)
  ck.close()
  # Unreadable, not mismatched: the move-away advice stays.
  _corrupt(workdir / "checkpoints" / "1", lambda r, f: True)
  ck = checkpointing.Checkpointer(str(workdir / "checkpoints"))
  with pytest.raises(CheckpointError, match=r"corrupt.*Move .*checkpoints/1 away"):
    ck.restore(_abstract(_state()))
  ck.close()


def test_init_from_workdir_mismatch_names_fields(tmp_path):
  workdir = _workdir(tmp_path)
  with pytest.raises(CheckpointError, match=r"do not fit(.|\n)*model.img_size: checkpoint 16, "
                                            r"config 32"):
    checkpointing.load_params(str(workdir), _abstract(_state(n=17)["params"]),
                              config={"model": {**MODEL, "img_size": 32}})


def test_init_from_corrupt_training_workdir(tmp_path):
  workdir = _workdir(tmp_path, steps=(1, 2))
  _corrupt(workdir / "checkpoints" / "2" / "state", lambda r, f: "ocdbt.process_0" in r
           and r.endswith("d"))
  target = _abstract(_state()["params"])
  with pytest.raises(CheckpointError) as e:
    checkpointing.load_params(str(workdir), target)
  msg = str(e.value)
  assert f"{workdir}/checkpoints/2 could not be restored (corrupt" in msg
  assert "point config.init_from at a good checkpoint" in msg
  assert "move" in msg and "start from step 1" in msg
  assert "TensorStore details" not in msg and len(msg) < 1000


def _converted(tmp_path):
  out = tmp_path / "conv"
  params = {"pos_embed": jnp.ones((1, 5, 8)), "head": {"kernel": jnp.ones((300, 200))}}
  checkpointing.save_params(str(out), params, {}, {"source": "/w/official.pth", "model": MODEL})
  return out, _abstract(params)


def test_init_from_corrupt_convert_output_is_one_quiet_error(tmp_path, monkeypatch):
  out, target = _converted(tmp_path)
  assert checkpointing.load_params(str(out), target)[1].startswith("converted parameters")
  printed = []  # what Python would print as "Exception ignored in ..." (sys.unraisablehook)
  monkeypatch.setattr(sys, "unraisablehook", printed.append)
  _corrupt(out / "params", lambda r, f: "array_metadatas" in r)
  for _ in range(5):  # orbax's leftover reads fail (and used to print) only some of the time
    with pytest.raises(CheckpointError) as e:
      checkpointing.load_params(str(out), target)
    msg = str(e.value)
    del e  # its traceback holds the leftover coroutines: they are finalised (and fail) now
    gc.collect()
  assert f"{out}/params could not be read (corrupt" in msg
  assert "re-run --mode=convert --config.init_from=/w/official.pth" in msg
  assert "good checkpoint" in msg
  assert not printed, [f"{u.exc_value!r} in {u.object!r}" for u in printed]
  sys.unraisablehook(types.SimpleNamespace(exc_value=ValueError("other"), object=None))
  assert len(printed) == 1  # anything else still goes to the previous hook


def test_init_from_empty_convert_output(tmp_path):
  (tmp_path / "conv" / "params").mkdir(parents=True)
  with pytest.raises(CheckpointError, match=r"params could not be read.*--mode=convert"):
    checkpointing.load_params(str(tmp_path / "conv"), {})


def test_init_from_a_directory_that_is_not_toppax(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  want = r"not a toppax checkpoint directory: expected .*for official weights pass the .pth file"
  with pytest.raises(CheckpointError, match=want):
    load_state_dict(str(empty))
  with pytest.raises(CheckpointError, match=want):  # factory.load_init_params's path, no torch
    from_torch("vim_t", str(empty))
  with pytest.raises(CheckpointError, match=want):
    checkpointing.load_params(str(empty), {})
  (empty / "vim_t.pth").write_bytes(b"")
  with pytest.raises(CheckpointError, match=r"holds vim_t.pth: pass the file itself"):
    load_state_dict(str(empty))


def test_truncated_npz_names_the_file_and_fix(tmp_path):
  path = tmp_path / "official.npz"
  np.savez(path, w=np.ones((64, 64), np.float32))
  trunc = tmp_path / "trunc.npz"
  trunc.write_bytes(path.read_bytes()[:100])
  with pytest.raises(ConversionError, match=r"could not read state dict '.*trunc.npz' "
                                            r"\(BadZipFile.*write it again with np.savez"):
    load_state_dict(str(trunc))
  assert set(load_state_dict(str(path))) == {"w"}


def test_unreadable_pth_is_wrapped(tmp_path):
  """A truncated .pth (no zip central directory) is a ConversionError that says what to do;
  reading it needs no torch."""
  bad = tmp_path / "vim_t.pth"
  bad.write_bytes(b"PK\x03\x04 truncated")
  with pytest.raises(ConversionError, match=r"could not read checkpoint '.*vim_t.pth': it is "
                                            r"not a PyTorch zip archive.*download the "
                                            r"official .pth again"):
    load_state_dict(str(bad))
