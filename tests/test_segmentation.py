"""toppax.segmentation (UperNet on ViM / PlainMamba) vs the official models: mmsegmentation 0.29.1
EncoderDecoder with the official Vim / PlainMamba segmentation backbones, run on CPU
(tests/README.md). Each golden holds the official features (the maps entering the decode head),
decode logits, aux logits and full-resolution logits; errors are bounded by 1e-4 of each
array's scale (max |official|)."""
from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.golden_utils import assert_close_to_official, load_seg_golden, subsample
from toppax import segmentation
from toppax.convert.common import ConversionError, torch_bicubic_resize
from toppax.convert.segmentation import from_classification, from_torch
from toppax.pruning import PruneConfig

GOLDENS = pathlib.Path(__file__).parent / "goldens"


def _golden(name):
  sd, arrays, kw = load_seg_golden(GOLDENS / f"{name}.npz")
  kw = dict(kw)
  return sd, arrays, kw.pop("name"), kw


@functools.lru_cache(maxsize=None)
def _converted(name):
  sd, arrays, model_name, kw = _golden(name)
  return from_torch(model_name, sd, **kw), arrays


def _check_outputs(model, images, arrays):
  with jax.default_matmul_precision("highest"):
    logits, info = model(jnp.asarray(images), return_info=True)
  assert set(info) >= {"features", "decode", "aux"} and len(info["features"]) == 4
  for i in range(4):
    assert_close_to_official(subsample(np.asarray(info["features"][i]), arrays, f"feature{i}"),
           arrays[f"feature{i}"], f"feature {i}")
  assert_close_to_official(subsample(np.asarray(info["decode"]), arrays, "decode"), arrays["decode"], "decode")
  assert_close_to_official(subsample(np.asarray(info["aux"]), arrays, "aux"), arrays["aux"], "aux")
  assert logits.shape[:3] == images.shape[:3]
  assert_close_to_official(subsample(np.asarray(logits), arrays, "logits"), arrays["logits"], "logits")


def _has_vim_rope():
  from toppax.models import vim
  return {"rope", "divide_out"} <= {f.name for f in dataclasses.fields(vim.ViMConfig)}


@pytest.mark.parametrize("name", ["seg_vim_reduced", "seg_plainmamba_reduced", "seg_vim_s_reduced"])
def test_reduced_models_match_official(name):
  if name == "seg_vim_s_reduced" and not _has_vim_rope():
    pytest.skip("upernet_vim_s needs RoPE and if_divide_out=False in the ViM backbone")
  model, arrays = _converted(name)
  _check_outputs(model, arrays["images"], arrays)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["seg_vim_t_512", "seg_plainmamba_l1_256x320"])
def test_full_size_models_match_official(name):
  sd, arrays, model_name, kw = _golden(name)
  model = from_torch(model_name, sd, **kw)
  _check_outputs(model, arrays["images"], arrays)


def test_slide_inference_matches_official():
  """mmseg slide_inference: 64x64 windows every 40 px over an 80x112 image (2 x 3 windows, the
  last row and column shifted back to the border), averaged, resized to the original size."""
  model, arrays = _converted("seg_vim_slide")
  images = jnp.asarray(arrays["images"])
  assert segmentation.inference.slide_windows(80, 112, (64, 64), (40, 40)) == [
      (0, 64, 0, 64), (0, 64, 40, 104), (0, 64, 48, 112),
      (16, 80, 0, 64), (16, 80, 40, 104), (16, 80, 48, 112)]
  with jax.default_matmul_precision("highest"):
    slide = segmentation.slide_inference(model, images, stride=40)
    rescaled = segmentation.slide_inference(model, images, stride=40, crop_batch=2,
                                            out_size=arrays["slide_logits"].shape[1:3])
  assert_close_to_official(slide, arrays["slide_logits_norescale"], "slide logits")
  assert_close_to_official(rescaled, arrays["slide_logits"], "slide logits resized to the original size")


def test_whole_inference_resizes_to_the_original_size():
  model, arrays = _converted("seg_plainmamba_reduced")
  with jax.default_matmul_precision("highest"):
    got = segmentation.whole_inference(model, jnp.asarray(arrays["images"]),
                                       out_size=arrays["whole_logits"].shape[1:3])
  assert_close_to_official(got, arrays["whole_logits"], "whole-inference logits at the original size")


def test_official_defaults():
  vim_t = segmentation.config_for("upernet_vim_t")
  assert (vim_t.img_size, vim_t.out_indices, vim_t.channels, vim_t.aux_channels,
          vim_t.aux_in_index, vim_t.pool_scales, vim_t.dropout_ratio, vim_t.num_classes) == (
              512, (5, 11, 17, 23), 192, 256, 2, (1, 2, 3, 6), 0.1, 150)
  vim_s = segmentation.config_for("upernet_vim_s")
  assert (vim_s.channels, dict(vim_s.backbone)) == (384, {"rope": True, "divide_out": False})
  for n, taps, drop in (("l1", (5, 11, 17, 23), 0.1), ("l2", (5, 11, 17, 23), 0.2),
                        ("l3", (8, 17, 26, 35), 0.3)):
    c = segmentation.config_for(f"upernet_plainmamba_{n}")
    assert (c.img_size, c.out_indices, c.channels, c.aux_channels, c.aux_in_index) == (
        224, taps, 512, 256, 3)
    assert dict(c.backbone) == {"drop_path_rate": drop}
  assert segmentation.names() == sorted(
      ["upernet_vim_t", "upernet_vim_s", "upernet_plainmamba_l1", "upernet_plainmamba_l2",
       "upernet_plainmamba_l3"])
  with pytest.raises(ValueError, match="four distinct block indices"):
    segmentation.config_for("upernet_vim_t", out_indices=(5, 5, 17, 23))
  with pytest.raises(ValueError, match="unknown segmentation model"):
    segmentation.config_for("upernet_vim_b")


def test_conversion_names_every_bad_key_at_once_and_accepts_wrappers():
  sd, arrays, model_name, kw = _golden("seg_vim_reduced")
  bad = dict(sd)
  missing = "decode_head.fpn_bottleneck.bn.running_var"
  misshaped = "backbone.fpn2.0.weight"
  extra = "auxiliary_head.conv_seg.extra"
  del bad[missing]
  bad[misshaped] = np.zeros((3, 3, 2, 2), np.float32)
  bad[extra] = np.zeros(3, np.float32)
  with pytest.raises(ConversionError) as info:
    from_torch(model_name, {"state_dict": bad, "meta": {"iter": 60000}}, **kw)
  for key in (missing, misshaped, extra):
    assert key in str(info.value)
  # num_batches_tracked is optional; the mmseg checkpoint wrapper is unwrapped.
  plain = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  model = from_torch(model_name, {"state_dict": plain, "meta": {}}, **kw)
  assert model.decode_head.bottleneck.bn.use_running_average  # eval mode
  classification = {"head.weight": np.zeros((3, 32), np.float32), "cls_token": np.zeros(3)}
  with pytest.raises(ConversionError, match="from_classification"):
    from_torch(model_name, classification, **kw)


def test_conversion_resamples_position_embeddings_to_the_model_grid():
  """A ViM checkpoint's (1, 16, D) table on a 6 x 6 model (img_size 96): bicubic as torch."""
  sd, _, model_name, kw = _golden("seg_vim_reduced")
  model = from_torch(model_name, sd, **dict(kw, img_size=96))
  pe = sd["backbone.pos_embed"]
  want = torch_bicubic_resize(pe[0].reshape(4, 4, -1), 6, 6).reshape(1, 36, -1)
  np.testing.assert_allclose(np.asarray(model.backbone.pos_embed[...]), want, atol=1e-6)
  # PlainMamba keeps its table at img_size's grid; a list override is accepted.
  sd, _, model_name, kw = _golden("seg_plainmamba_reduced")
  model = from_torch(model_name, sd, **dict(kw, layers_with_dwconv=[0]))
  np.testing.assert_array_equal(np.asarray(model.backbone.pos_embed[...]),
                                sd["backbone.pos_embed"])


def _vim_classification_state_dict(sd, grid):
  """A ViM classification state dict holding the golden's backbone: cls row inserted at M // 2."""
  out = {k[len("backbone."):]: v for k, v in sd.items()
         if k.startswith("backbone.") and not k.startswith("backbone.fpn")}
  pe = out["pos_embed"]
  c = pe.shape[1] // 2
  out["pos_embed"] = np.concatenate([pe[:, :c], np.full_like(pe[:, :1], 1e3), pe[:, c:]], 1)
  out["cls_token"] = np.zeros((1, 1, pe.shape[-1]), np.float32)
  out["head.weight"] = np.zeros((1000, pe.shape[-1]), np.float32)
  out["head.bias"] = np.zeros((1000,), np.float32)
  return out


def _backbone_params(model):
  return nnx.to_pure_dict(nnx.state(model.backbone, nnx.Param))


def test_from_classification_checkpoint():
  """The official segmentation training starts from the classification weights: classifier
  dropped, ViM's cls token and its position-embedding row dropped, the rest resampled."""
  for name in ("seg_vim_reduced", "seg_plainmamba_reduced"):
    sd, _, model_name, kw = _golden(name)
    want = _backbone_params(from_torch(model_name, sd, **kw))
    if "vim" in name:
      cls_sd = _vim_classification_state_dict(sd, (4, 4))
    else:
      cls_sd = {k: v for k, v in sd.items()
                if k.startswith("backbone.") and "norm_layer" not in k}
      cls_sd.update({"head.fc.weight": np.zeros((1000, 32), np.float32),
                     "head.fc.bias": np.zeros((1000,), np.float32),
                     "ema_backbone_ln1_weight": np.zeros(32, np.float32)})
    model = from_classification(model_name, cls_sd, seed=3, **kw)
    got = _backbone_params(model)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 got, want)
  # A 2x2 classification grid is resampled to the 4x4 segmentation grid, without the cls row.
  sd, _, model_name, kw = _golden("seg_vim_reduced")
  cls_sd = _vim_classification_state_dict(sd, (4, 4))
  pe = cls_sd["pos_embed"]
  cls_sd["pos_embed"] = np.concatenate([pe[:, :2], pe[:, 8:9], pe[:, 2:4]], 1)  # 4 + cls row
  model = from_classification(model_name, cls_sd, **kw)
  assert model.backbone.pos_embed[...].shape == (1, 16, 32)
  assert float(jnp.abs(model.backbone.pos_embed[...]).max()) < 10  # the 1e3 cls row is gone


def test_train_and_eval_modes():
  model = segmentation.create("upernet_plainmamba_l1", num_classes=3, img_size=32, embed_dims=16,
                              num_layers=4, out_indices=(0, 1, 2, 3), channels=8,
                              aux_channels=4)
  bn = model.decode_head.bottleneck.bn
  assert bn.use_running_average and model.decode_head.cls_seg.dropout.deterministic
  model.train()
  assert not bn.use_running_average and not model.auxiliary_head.cls_seg.dropout.deterministic
  before = np.asarray(bn.var[...]).copy()
  images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  model(images)
  assert not np.allclose(np.asarray(bn.var[...]), before)  # running statistics updated
  model.eval()
  assert bn.use_running_average


def test_vim_takes_its_img_size_and_points_to_slide_inference():
  model, _ = _converted("seg_vim_reduced")
  with pytest.raises(ValueError, match="slide_inference"):
    model(jnp.zeros((1, 96, 96, 3)))
  with pytest.raises(ValueError, match="channels-first"):
    model(jnp.zeros((1, 3, 64, 64)))


def test_pruned_model_reports_positions():
  sd, arrays, model_name, kw = _golden("seg_vim_reduced")
  model = from_torch(model_name, sd, pruning=PruneConfig(layers=(2,), keep_ratio=0.5), **kw)
  logits, info = model(jnp.asarray(arrays["images"]), return_info=True)
  assert logits.shape == arrays["logits"].shape
  assert len(info["positions"]) == 1 and info["positions"][0].shape == (2, 8)
  assert [f.shape for f in info["features"]] == [arrays[f"feature{i}"].shape for i in range(4)]
