"""Parity with the official ToP release (ZLKong/ToP-ViM), run on CPU: PruneConfig.release().

The goldens hold the release's logits and, per pruning stage, the original token index of every
kept token in sequence order (cls re-inserted in the middle). They were made one image at a time:
the release masks the cls score for batch element 0 only, so batch size 1 is the reference.
How they were made, and the algorithm: docs/release_vs_paper.md.
"""
import os

import jax
import numpy as np
import pytest

from tests.golden_utils import load_golden
from toppax.convert import from_torch
from toppax.pruning import PruneConfig

GOLDENS = os.path.join(os.path.dirname(__file__), "goldens")
CASES = [
    pytest.param("top_release_reduced.npz", id="reduced"),
    pytest.param("top_release_vim_t_224.npz", id="vim_t_224", marks=pytest.mark.slow),
]
OVERRIDES = ("img_size", "patch_size", "depth", "embed_dim", "num_classes")
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module", params=CASES)
def case(request):
  sd, g = load_golden(os.path.join(GOLDENS, request.param))
  overrides = {k: int(g[k]) for k in OVERRIDES}
  model = from_torch("vim_t", sd, pruning=PruneConfig.release(), **overrides)
  return model, g


def _stages(g):
  return sorted(int(k[len("positions_stage"):]) for k in g if k.startswith("positions_stage"))


def _run(model, images):
  with jax.default_matmul_precision("highest"):
    logits, info = model(images, return_info=True)
  return np.asarray(logits), [np.asarray(p) for p in info["positions"]]


def test_golden_layout(case):
  _, g = case
  stages = _stages(g)
  assert stages == [0, 1, 2]  # the release prunes after blocks 5, 10, 15
  n = g["images"].shape[0]
  cls = ((int(g["img_size"]) // int(g["patch_size"])) ** 2 + 1) // 2
  assert int(g["cls_position"]) == cls
  for s in stages:
    pos = g[f"positions_stage{s}"]
    k = pos.shape[1]
    assert pos.shape[0] == n and k % 2 == 1
    assert (pos[:, (k - 1) // 2] == cls).all()  # cls sits in the middle after every stage
    for row in pos:
      assert len(set(row.tolist())) == k  # batch size 1: no duplicated cls
  n_full = (int(g["img_size"]) // int(g["patch_size"])) ** 2 + 1
  assert PruneConfig.release().token_counts(n_full) == [g[f"positions_stage{s}"].shape[1]
                                                        for s in stages]


def test_release_per_image(case):
  """Batch of one, image by image: exactly the official setting."""
  model, g = case
  for b in range(g["images"].shape[0]):
    logits, positions = _run(model, g["images"][b:b + 1])
    assert len(positions) == len(_stages(g))
    for s, pos in enumerate(positions):
      np.testing.assert_array_equal(pos, g[f"positions_stage{s}"][b:b + 1],
                                    err_msg=f"image {b}, stage {s}: kept positions differ")
    np.testing.assert_allclose(logits, g["logits"][b:b + 1], rtol=0, atol=LOGITS_ATOL,
                               err_msg=f"image {b}: logits differ")


def test_release_batched_equals_per_image(case):
  """A batch gives every image its batch-of-one result: toppax masks the cls score for every
  batch element (the release only for element 0, so its batched results differ for the others)."""
  model, g = case
  logits, positions = _run(model, g["images"])
  for s, pos in enumerate(positions):
    np.testing.assert_array_equal(pos, g[f"positions_stage{s}"], err_msg=f"stage {s}")
  np.testing.assert_allclose(logits, g["logits"], rtol=0, atol=LOGITS_ATOL)
