"""Conversion details: position-embedding resampling, checkpoint files, clear errors."""
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from tests.golden_utils import load_golden
from toppax.convert import ConversionError, from_torch, load_state_dict
from toppax.convert.common import torch_bicubic_resize
from toppax.convert.vim import resample_pos_embed

GOLDEN = pathlib.Path(__file__).parent / "goldens" / "vim_reduced_64p16d4.npz"
OVERRIDES = ("img_size", "patch_size", "depth", "embed_dim", "num_classes")


def _golden():
  sd, arrays = load_golden(GOLDEN)
  return sd, arrays, {k: int(arrays[k]) for k in OVERRIDES}


def test_bicubic_matches_torch_interpolate():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).standard_normal((7, 7, 5)).astype(np.float32)
  for size in (4, 7, 12):
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None],
                                           size=(size, size), mode="bicubic",
                                           align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(torch_bicubic_resize(x, size, size), want, rtol=1e-5, atol=1e-5)


def test_bicubic_identity_and_constant():
  x = np.random.default_rng(1).standard_normal((6, 6, 3))
  np.testing.assert_allclose(torch_bicubic_resize(x, 6, 6), x, atol=1e-12)
  np.testing.assert_allclose(torch_bicubic_resize(np.ones((5, 5, 2)), 9, 9), 1.0, atol=1e-12)


def test_resample_moves_the_middle_cls_row():
  dim = 4
  grid = np.random.default_rng(2).standard_normal((1, 16, dim))
  cls = np.full((1, 1, dim), 7.0)
  pe = np.concatenate([grid[:, :8], cls, grid[:, 8:]], 1)  # 4x4 patches, cls at 16 // 2 = 8
  out = resample_pos_embed(pe, (6, 6))
  assert out.shape == (1, 37, dim)
  np.testing.assert_array_equal(out[0, 18], cls[0, 0])  # new middle index 36 // 2
  patches = np.concatenate([out[:, :18], out[:, 19:]], 1)
  np.testing.assert_allclose(patches[0], torch_bicubic_resize(grid[0].reshape(4, 4, dim), 6, 6)
                             .reshape(36, dim))
  np.testing.assert_allclose(resample_pos_embed(pe, (4, 4)), pe)


def test_different_img_size_resamples_pos_embed():
  sd, arrays, overrides = _golden()
  model = from_torch("vim_t", sd, **{**overrides, "img_size": 96})
  assert model.pos_embed[...].shape == (1, 37, overrides["embed_dim"])
  assert model.cfg.cls_index == 18
  np.testing.assert_allclose(np.asarray(model.pos_embed[...])[0, 18], sd["pos_embed"][0, 8])
  logits = model(jnp.asarray(np.random.default_rng(0).standard_normal((1, 96, 96, 3)),
                             jnp.float32))
  assert logits.shape == (1, overrides["num_classes"]) and np.isfinite(np.asarray(logits)).all()


def test_pth_checkpoint_round_trip_and_corrupt_file(tmp_path):
  torch = pytest.importorskip("torch")
  sd, arrays, overrides = _golden()
  path = tmp_path / "ckpt.pth"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "epoch": 3}, path)
  model = from_torch("vim_t", str(path), **overrides)
  ref = from_torch("vim_t", sd, **overrides)
  x = jnp.asarray(arrays["images"])
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(ref(x)))
  bad = tmp_path / "bad.pth"
  bad.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(ConversionError, match="could not read checkpoint"):
    load_state_dict(str(bad))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_state_dict(str(tmp_path / "missing.pth"))


def test_unknown_model_and_override_errors():
  sd, _, overrides = _golden()
  with pytest.raises(ValueError, match="unknown model 'vim_xl'.*vim_t"):
    from_torch("vim_xl", sd, **overrides)
  with pytest.raises(TypeError, match="unknown ViM override"):
    from_torch("vim_t", sd, **overrides, heads=3)


def test_wrong_image_size_names_the_expected_size():
  sd, _, overrides = _golden()
  model = from_torch("vim_t", sd, **overrides)
  with pytest.raises(ValueError, match=r"\(batch, 64, 64, 3\)"):
    model(jnp.zeros((1, 32, 32, 3)))


def test_convert_mode_writes_params_that_init_from_reads(tmp_path):
  """--mode=convert: official state dict -> <workdir>/params; init_from=<workdir> gives the
  same model (same logits) without torch; converting twice into one workdir refuses."""
  from flax import nnx

  from configs import vim_t
  from toppax import factory, sharding
  from toppax.tools import convert_checkpoint
  sd, arrays, overrides = _golden()
  npz = tmp_path / "official.npz"
  np.savez(npz, **sd)
  c = vim_t.get_config("runlocal")
  c.unlock()
  for k in ("img_size", "patch_size", "depth", "embed_dim"):
    c.model[k] = overrides[k]
  c.data.num_classes = overrides["num_classes"]
  c.init_from = str(npz)
  workdir = tmp_path / "converted"
  convert_checkpoint.run(c, str(workdir))
  assert (workdir / "params").is_dir() and (workdir / "params_meta.json").is_file()
  with pytest.raises(Exception, match="exists already"):
    convert_checkpoint.run(c, str(workdir))

  c.init_from = str(workdir)
  defs = factory.model_defs(c)
  mesh = sharding.make_mesh(1)
  params, rngs = factory.load_init_params(c, defs, sharding.replicated(mesh))
  x = jnp.asarray(np.random.default_rng(0).standard_normal(
      (2, overrides["img_size"], overrides["img_size"], 3)), jnp.float32)
  ours = nnx.merge(defs.eval, params, rngs)(x)
  ref = from_torch("vim_t", sd, **{k: overrides[k] for k in OVERRIDES})
  ref.eval()
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref(x)), atol=1e-5, rtol=1e-5)
  c.init_from = str(workdir)
  with pytest.raises(ValueError, match="toppax parameters already"):
    convert_checkpoint.run(c, str(tmp_path / "again"))
