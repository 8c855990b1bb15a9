"""Deterministic, official-format parameter sets for parity tests.

The golden files under ``tests/goldens/`` store only inputs, key names, shapes and the
official model's outputs. The parameters themselves are regenerated here from a seed, so
the goldens stay small and every parameter is perturbed away from its default init
(a parity test at default init would not notice e.g. a missing D skip or a swapped norm).

The same recipe is used on the PyTorch side when the goldens are made (see tests/README.md),
so it must stay byte-for-byte stable: changing it invalidates every golden.
"""
from __future__ import annotations

import math
import zlib

import numpy as np


def _rng(seed: int, key: str) -> np.random.Generator:
  # Per-key stream: the value of a key does not depend on the order or set of other keys.
  return np.random.default_rng([int(seed), zlib.crc32(key.encode())])


def perturbed_value(key: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
  """A float32 (int64 for counters) array for official parameter/buffer ``key``."""
  shape = tuple(int(s) for s in shape)
  rng = _rng(seed, key)
  leaf = key.rsplit(".", 1)[-1]
  normal = lambda scale: (scale * rng.standard_normal(shape)).astype(np.float32)
  if leaf == "num_batches_tracked":
    return np.zeros(shape, np.int64)
  if leaf in ("A_log", "A_b_log") or leaf.startswith("A_log") or leaf.startswith("A_b_log"):
    n = shape[-1]
    base = np.log(np.arange(1, n + 1, dtype=np.float64))
    return (np.broadcast_to(base, shape) + 0.3 * rng.standard_normal(shape)).astype(np.float32)
  if leaf in ("D", "D_b") or leaf.startswith("Ds"):
    return (1.0 + 0.5 * rng.standard_normal(shape)).astype(np.float32)
  if leaf == "bias" and ("dt_proj" in key):
    dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), shape))
    return (dt + np.log(-np.expm1(-dt))).astype(np.float32)  # inverse softplus
  if leaf == "running_var":
    return rng.uniform(0.5, 1.5, shape).astype(np.float32)
  if leaf == "running_mean":
    return normal(0.1)
  if leaf == "weight" and ("norm" in key or "bn" in key or len(shape) == 1):
    return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
  if leaf in ("pos_embed", "cls_token") or "pos_embed" in key or "cls_token" in key:
    return normal(0.1)
  if len(shape) >= 2:
    fan_in = int(np.prod(shape[1:]))
    return normal(1.0 / math.sqrt(fan_in))
  return normal(0.1)


def perturbed_state_dict(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
  """Official-format state dict: ``{key: array}`` for every key of ``shapes``."""
  return {k: perturbed_value(k, s, seed) for k, s in shapes.items()}


def load_golden(path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Returns (state_dict, arrays) from a golden .npz written by the procedure in tests/README.md.

  The npz holds ``param_keys`` (str array), ``param_shapes_flat`` / ``param_ndims`` and ``seed``;
  everything else (images, logits, positions, ...) is returned in ``arrays``.
  """
  data = dict(np.load(path, allow_pickle=False))
  keys = [str(k) for k in data.pop("param_keys")]
  ndims = data.pop("param_ndims")
  flat = list(data.pop("param_shapes_flat"))
  shapes, i = {}, 0
  for k, nd in zip(keys, ndims):
    shapes[k] = tuple(int(x) for x in flat[i:i + nd])
    i += nd
  seed = int(data.pop("seed"))
  return perturbed_state_dict(shapes, seed), data


def shapes_to_arrays(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """Inverse of the unpacking in ``load_golden``: arrays to store in the npz."""
  keys = list(shapes)
  return {
      "param_keys": np.array(keys),
      "param_ndims": np.array([len(shapes[k]) for k in keys], np.int64),
      "param_shapes_flat": np.array([d for k in keys for d in shapes[k]], np.int64),
  }


def golden_images(seed: int, shape) -> np.ndarray:
  """NHWC float32 images of the segmentation goldens: regenerated from the seed (the large
  goldens do not store them; the small ones store them as a check of this recipe)."""
  return np.random.default_rng([int(seed), 11]).standard_normal(tuple(int(s) for s in shape)) \
      .astype(np.float32)


def load_seg_golden(path):
  """Returns (state_dict, arrays, create_kwargs) from a segmentation golden (tests/README.md).

  Besides ``load_golden``'s layout, the npz holds ``const:<key>`` for official buffers that are
  fixed by the architecture (ViM's RoPE tables, stored at their official value instead of being
  perturbed), ``toppax:<name>`` for the toppax model name and its ``create`` keyword arguments,
  ``image_shape`` (images are regenerated with ``golden_images`` when not stored), and
  ``<array>_rows`` / ``<array>_cols`` when an NHWC array is stored at a subset of its pixels.
  """
  sd, arrays = load_golden(path)
  for k in [k for k in arrays if k.startswith("const:")]:
    sd[k[len("const:"):]] = arrays.pop(k)
  kwargs = {}
  for k in [k for k in arrays if k.startswith("toppax:")]:
    v = arrays.pop(k)
    kwargs[k[len("toppax:"):]] = v.item() if v.ndim == 0 else tuple(v.tolist())
  with np.load(path) as data:
    seed = int(data["seed"])
  images = golden_images(seed, arrays["image_shape"])
  if "images" in arrays:
    assert np.array_equal(arrays["images"], images), "golden images do not follow golden_images"
  arrays["images"] = images
  return sd, arrays, kwargs


def subsample(full: np.ndarray, arrays: dict, name: str) -> np.ndarray:
  """``full`` (B, H, W, C) taken at the pixels where golden array ``name`` was stored."""
  if name + "_rows" in arrays:
    full = full[:, arrays[name + "_rows"]][:, :, arrays[name + "_cols"]]
  return full


def assert_close_to_official(got, want, what: str, rel: float = 1e-4) -> float:
  """Asserts ``got`` matches the official ``want`` in shape and to ``rel`` x ``want``'s largest
  magnitude; returns the max absolute error."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, f"{what}: shape {got.shape} != official {want.shape}"
  scale = max(float(np.abs(want).max()), 1e-6)
  err = float(np.abs(got - want).max())
  assert err <= rel * scale, f"{what}: max |error| {err:.3e} > {rel:g} x official scale {scale:.3f}"
  return err
