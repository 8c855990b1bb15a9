"""toppax PlainMamba vs the official ChenhongyiYang/PlainMamba classifier (goldens made on CPU,
see tests/README.md, "PlainMamba goldens").

Each tests/goldens/plainmamba_*.npz holds the official key -> shape map, the parameter seed
(values from ``tests.golden_utils.perturbed_state_dict``), NHWC images, the official float32
logits and the toppax overrides that rebuild the model (``variant`` plus official names).
"""
from __future__ import annotations

import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.golden_utils import load_golden
from toppax.convert import ConversionError, from_torch
from toppax.models.plainmamba import resize_pos_embed

GOLDENS = sorted((pathlib.Path(__file__).parent / "goldens").glob("plainmamba_*.npz"))
OVERRIDES = ("img_size", "patch_size", "embed_dims", "num_layers", "num_convs_patch_embed",
             "layers_with_dwconv", "d_state", "expand", "conv_size", "num_classes")
HEAVY = ("plainmamba_l1_224",)
# One jitted forward for every model of the same structure and input shape (compiles are slow).
_forward = nnx.jit(lambda model, images: model(images))


def _build(path):
  sd, arrays = load_golden(path)
  overrides = {}
  for k in OVERRIDES:
    if k in arrays:
      v = arrays[k]
      overrides[k] = tuple(int(i) for i in v) if v.ndim else int(v)
  return str(arrays["variant"]), sd, arrays, overrides


def test_goldens_present():
  stems = {p.stem for p in GOLDENS}
  assert "plainmamba_l1_224" in stems and len(stems) >= 3
  # At least one golden has an odd, non-square token grid that needs the position embedding
  # resized from its img_size grid.
  grids = []
  for p in GOLDENS:
    _, _, arrays, ov = _build(p)
    h, w = arrays["images"].shape[1:3]
    grids.append((h // ov.get("patch_size", 16), w // ov.get("patch_size", 16), ov["img_size"]))
  assert any(gh % 2 and gw % 2 and gh != gw for gh, gw, _ in grids), grids


@pytest.mark.parametrize(
    "path", [pytest.param(p, marks=pytest.mark.slow) if p.stem in HEAVY else p for p in GOLDENS],
    ids=[p.stem for p in GOLDENS])
def test_logits_match_official(path):
  variant, sd, arrays, overrides = _build(path)
  model = from_torch(variant, sd, **overrides)
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(_forward(model, jnp.asarray(arrays["images"])))
  want = arrays["logits"]
  assert logits.shape == want.shape
  err = np.abs(logits - want)
  assert err.max() < 1e-5, (
      f"{path.stem}: max |logits - official| = {err.max():.3e} at "
      f"{np.unravel_index(err.argmax(), err.shape)} (official |logits| max {np.abs(want).max():.3f})")


def _small():
  return _build(next(p for p in GOLDENS if p.stem == "plainmamba_small_odd"))


def test_conversion_reports_missing_extra_and_misshaped_keys_together():
  variant, sd, _, overrides = _small()
  missing = "backbone.layers.2.mamba.direction_Bs"
  extra = "backbone.layers.0.mamba.not_a_parameter"
  misshaped = "backbone.layers.1.mamba.in_proj.weight"
  bn_stat = "backbone.patch_embed.convs.4.running_var"
  del sd[missing], sd[bn_stat]
  sd[extra] = np.zeros((3,), np.float32)
  sd[misshaped] = np.zeros(sd[misshaped].shape[:-1] + (sd[misshaped].shape[-1] + 1,), np.float32)
  with pytest.raises(ConversionError) as info:
    from_torch(variant, sd, **overrides)
  message = str(info.value)
  for key in (missing, extra, misshaped, bn_stat):
    assert key in message, f"{key!r} not named in the conversion error:\n{message}"


def test_conversion_with_wrong_architecture_names_the_layers():
  variant, sd, _, overrides = _small()
  with pytest.raises(ConversionError) as info:
    from_torch(variant, sd, **{**overrides, "num_layers": 2, "layers_with_dwconv": ()})
  message = str(info.value)
  assert "backbone.layers.2.norm.weight" in message and "backbone.layers.1.dw.0.weight" in message


def test_ema_keys_are_ignored_with_a_log_line(caplog):
  variant, sd, arrays, overrides = _small()
  ref = from_torch(variant, dict(sd), **overrides)
  # The released checkpoints hold the EMA buffers beside the weights (ema_<name with _>).
  sd.update({"ema_" + k.replace(".", "_"): v + 1.0 for k, v in sd.items()
             if not k.endswith("num_batches_tracked")})
  with caplog.at_level(logging.INFO):
    model = from_torch(variant, sd, **overrides)
  assert any("ema_" in r.getMessage() for r in caplog.records)
  weights = lambda m: jax.tree.leaves(nnx.state(m, (nnx.Param, nnx.BatchStat)))
  for a, b in zip(weights(model), weights(ref), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pos_embed_from_a_square_checkpoint_is_resized_on_conversion():
  variant, sd, arrays, overrides = _small()
  # Same weights, model created at img_size 112 (7x7 grid) instead of 80 (5x5 grid): conversion
  # resizes the 5x5 table bicubically, as the official forward does for a 7x7 input.
  model = from_torch(variant, sd, **{**overrides, "img_size": 112})
  want = resize_pos_embed(sd["backbone.pos_embed"], (5, 5), (7, 7))
  assert want.shape == (1, 49, overrides["embed_dims"])
  np.testing.assert_allclose(np.asarray(model.pos_embed[...]), want, atol=1e-6)
  with pytest.raises(ConversionError, match="backbone.pos_embed"):
    from_torch(variant, {**sd, "backbone.pos_embed": sd["backbone.pos_embed"][:, :24]},
               **overrides)
