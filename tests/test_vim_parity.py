"""toppax ViM vs the official hustvl/Vim model (goldens made on CPU, see tests/README.md).

Each tests/goldens/vim_*.npz holds the official key -> shape map, the parameter seed (values come
from ``tests.golden_utils.perturbed_state_dict``), NHWC images and the official float32 logits.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.golden_utils import load_golden
from toppax.convert import from_torch

GOLDENS = sorted((pathlib.Path(__file__).parent / "goldens").glob("vim_*.npz"))
OVERRIDES = ("img_size", "patch_size", "depth", "embed_dim", "num_classes")
REDUCED = [p for p in GOLDENS if p.stem.startswith("vim_reduced_")]


def _build(path):
  sd, arrays = load_golden(path)
  overrides = {k: int(arrays[k]) for k in OVERRIDES}
  # The goldens use stride == patch_size (the released models); the model's default follows.
  assert int(arrays["stride"]) == overrides["patch_size"]
  return sd, arrays, overrides


def test_goldens_present():
  assert any(p.stem == "vim_t_224" for p in GOLDENS) and len(REDUCED) >= 2


@pytest.mark.parametrize("path", GOLDENS, ids=[p.stem for p in GOLDENS])
def test_logits_match_official(path):
  sd, arrays, overrides = _build(path)
  model = from_torch("vim_t", sd, **overrides)
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(model(jnp.asarray(arrays["images"])))
  want = arrays["logits"]
  assert logits.shape == want.shape
  err = np.abs(logits - want)
  assert err.max() < 1e-4, (
      f"{path.stem}: max |logits - official| = {err.max():.3e} at {np.unravel_index(err.argmax(), err.shape)} "
      f"(official |logits| max {np.abs(want).max():.3f}); per-block official outputs are in the npz "
      "(block_hidden, block_residual, features) for the reduced configs")


def test_conversion_reports_missing_extra_and_misshaped_keys_together():
  sd, _, overrides = _build(REDUCED[0])
  missing, extra, misshaped = "head.bias", "layers.0.mixer.not_a_parameter", "layers.1.mixer.in_proj.weight"
  del sd[missing]
  sd[extra] = np.zeros((3,), np.float32)
  sd[misshaped] = np.zeros(sd[misshaped].shape[:-1] + (sd[misshaped].shape[-1] + 1,), np.float32)
  with pytest.raises(ValueError) as info:
    from_torch("vim_t", sd, **overrides)
  message = str(info.value)
  for key in (missing, extra, misshaped):
    assert key in message, f"{key!r} not named in the conversion error:\n{message}"


def test_reduced_golden_state_dict_converts_strictly():
  # The perturbed state dict is exactly the official key set: conversion must not complain.
  sd, _, overrides = _build(REDUCED[-1])
  from_torch("vim_t", sd, **overrides)
