"""Kept-token drawing against known positions (ViM cls offset, fused tokens, PlainMamba raster)."""
import os

import numpy as np
import pytest

from toppax.tools import visualize


def _image(h, w, seed=0):
  # Values 0..100 never equal the grey (128), so "is grey" and "is unchanged" cannot both hold.
  return np.random.default_rng(seed).integers(0, 101, (h, w, 3), dtype=np.uint8)


def _patch(img, p, grid, size):
  r, c = divmod(p, grid[1])
  return img[r * size:(r + 1) * size, c * size:(c + 1) * size]


def test_vim_positions_skip_the_cls_token_and_shift_patches_after_it():
  # 4x4 grid: 16 patches, cls token at 16 // 2 = 8, 17 tokens. Token 9 is patch 8, token 16 is
  # patch 15; the cls token (8) and a fused token (-1) cover no patch.
  grid, cls_index, size = (4, 4), 8, 2
  positions = np.array([1, 7, 8, 9, 16, -1])
  kept = {1, 7, 8, 15}
  np.testing.assert_array_equal(
      visualize.patch_indices(positions, 16, cls_index=cls_index), [1, 7, 8, 15])
  img = _image(8, 8)
  (out,) = visualize.greyed_images(img, [positions[None]], grid, cls_index=cls_index)
  assert out.dtype == np.uint8 and out.shape == img.shape
  for p in range(16):
    if p in kept:
      np.testing.assert_array_equal(_patch(out, p, grid, size), _patch(img, p, grid, size))
    else:
      assert (_patch(out, p, grid, size) == 128).all(), f"patch {p} should be grey"
  # Patch 8 (row 2, column 0) is token 9: kept. Patch 9 (token 10) is pruned. Reading the
  # positions without the cls offset would get both wrong.
  np.testing.assert_array_equal(out[4:6, 0:2], img[4:6, 0:2])
  assert (out[4:6, 2:4] == 128).all()


def test_plainmamba_positions_are_raster_patch_indices():
  grid, size = (3, 4), 3
  positions = np.array([[0, 5, 11], [2, 3, 4]])  # two examples
  img = _image(9, 12, seed=1)
  outs = visualize.greyed_images(img, [positions], grid, cls_index=None, index=1)
  mask = visualize.kept_mask(positions[1], grid)
  np.testing.assert_array_equal(mask.reshape(-1).nonzero()[0], [2, 3, 4])
  for p in range(12):
    got, orig = _patch(outs[0], p, grid, size), _patch(img, p, grid, size)
    if p in (2, 3, 4):
      np.testing.assert_array_equal(got, orig)
    else:
      assert (got == 128).all()
  # Token 11 is the last patch without a cls token; with one (cls_index=6) it is patch 10.
  np.testing.assert_array_equal(visualize.patch_indices([11], 12), [11])
  np.testing.assert_array_equal(visualize.patch_indices([11], 12, cls_index=6), [10])


def test_float_blend_and_display_image_larger_than_the_input():
  # A 2x2 grid drawn on an 8x6 float image: patch (r, c) covers rows 4r..4r+3, cols 3c..3c+2.
  img = np.linspace(0.0, 1.0, 8 * 6, dtype=np.float32).reshape(8, 6)
  out = visualize.grey_out(img, np.array([[True, False], [False, True]]), grey=0.5, alpha=0.5)
  np.testing.assert_array_equal(out[:4, :3], img[:4, :3])
  np.testing.assert_array_equal(out[4:, 3:], img[4:, 3:])
  np.testing.assert_allclose(out[:4, 3:], 0.5 * img[:4, 3:] + 0.25, rtol=1e-6)
  np.testing.assert_allclose(out[4:, :3], 0.5 * img[4:, :3] + 0.25, rtol=1e-6)


def test_out_of_range_positions_raise():
  with pytest.raises(ValueError, match="outside a sequence of 17 tokens"):
    visualize.patch_indices([17], 16, cls_index=8)
  with pytest.raises(ValueError, match="outside a sequence of 16 tokens"):
    visualize.patch_indices([16], 16)


def test_model_stages_grey_exactly_the_pruned_patches(tmp_path):
  import jax.numpy as jnp

  from toppax import models
  from toppax.pruning import PruneConfig
  # 16x16 input, patch 4: 16 patches + cls = 17 tokens; keep 0.5 twice: 17 -> 9 -> 5 tokens.
  model = models.create("vim_t", pruning=PruneConfig(layers=(1, 2), keep_ratio=0.5),
                        img_size=16, patch_size=4, depth=2, embed_dim=16, num_classes=3,
                        scan_implementation="reference")
  lay = visualize.layout(model)
  assert lay == {"grid": (4, 4), "cls_index": 8, "layers": (1, 2)}
  images = np.stack([_image(16, 16, seed=s) for s in range(2)])
  fig, logits, info = visualize.show_kept_tokens(
      model, jnp.asarray(images, jnp.float32) / 255.0, images, path=str(tmp_path / "kept.png"))
  assert logits.shape == (2, 3) and [p.shape for p in info["positions"]] == [(2, 9), (2, 5)]
  for b in range(2):
    outs = visualize.greyed_images(images[b], info["positions"], lay["grid"],
                                   cls_index=lay["cls_index"], index=b)
    prev = np.ones(16, bool)
    for stage, out in enumerate(outs):
      pos = np.asarray(info["positions"][stage][b])
      assert 8 in pos  # the cls token is never pruned
      patches = [t if t < 8 else t - 1 for t in pos if t != 8]
      for p in range(16):
        same = np.array_equal(_patch(out, p, (4, 4), 4), _patch(images[b], p, (4, 4), 4))
        grey = (_patch(out, p, (4, 4), 4) == 128).all()
        assert (same, grey) == ((True, False) if p in patches else (False, True)), (b, stage, p)
      kept = np.zeros(16, bool)
      kept[patches] = True
      assert not (kept & ~prev).any()  # a later stage keeps a subset of the earlier one
      prev = kept
  with open(tmp_path / "kept.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # Two rows (examples) by three columns (input + two stages).
  assert np.asarray(fig.axes).size == 6 and fig.axes[1].get_title() == "after block 1: 8 kept"


def test_plainmamba_layout_follows_the_input_size():
  from flax import nnx

  from toppax import models
  from toppax.pruning import PruneConfig
  # Abstract (no parameters are initialised): the layout reads only the config.
  model = nnx.eval_shape(lambda: models.create(
      "plainmamba_l1", pruning=PruneConfig(layers=(1,), keep_ratio=0.5), img_size=16,
      patch_size=4, embed_dims=16, num_layers=1, layers_with_dwconv=(), num_classes=3))
  assert visualize.layout(model) == {"grid": (4, 4), "cls_index": None, "layers": (1,)}
  assert visualize.layout(model, image_hw=(24, 32))["grid"] == (6, 8)


def test_flops_vs_keep_ratio_matches_the_counter_and_plots(tmp_path):
  from toppax.pruning import PruneConfig
  from toppax.tools import flops
  ratios = [0.5, 0.7, 0.8, 1.0]
  out = visualize.flops_vs_keep_ratio("vim_s", ratios, (5, 10, 15))
  assert out["ToP"][2] == pytest.approx(
      flops.model_gflops("vim_s", pruning=PruneConfig.paper("vim_s")))
  assert out["ToP"][2] == pytest.approx(3.60, abs=0.01)      # the paper's ViM-S ToP number
  assert out["removal"][2] == pytest.approx(3.57, abs=0.01)
  assert out["dense"] == pytest.approx(5.08, abs=0.01)
  assert np.all(np.diff(out["ToP"]) > 0) and np.all(np.array(out["removal"]) <= out["ToP"])
  assert out["ToP"][-1] == pytest.approx(out["dense"])       # r = 1 prunes nothing
  path = tmp_path / "flops.png"
  fig = visualize.plot_vs_keep_ratio(ratios, {k: out[k] for k in ("ToP", "removal")},
                                     ylabel="GFLOPs", dense=out["dense"], path=str(path))
  assert os.path.getsize(path) > 1000
  line = fig.axes[0].get_lines()[0]
  np.testing.assert_allclose(line.get_ydata(), out["ToP"])
  with pytest.raises(ValueError, match="has 2 values for 4 ratios"):
    visualize.plot_vs_keep_ratio(ratios, {"x": [1, 2]}, ylabel="y")
