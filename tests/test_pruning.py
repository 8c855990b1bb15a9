"""ToP pruning on ViM: static shapes, selection invariants, alignment, baselines, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import scan_utils
from toppax.models import create
from toppax.pruning import PruneConfig, alignment_gaps, kept_count
from toppax.pruning import ops as prune_ops
from toppax.ssm import selective_scan

SMALL = dict(img_size=64, patch_size=16, depth=6, embed_dim=32, num_classes=7)  # 17 tokens


def _images(seed=0, batch=3, size=64):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, size, size, 3)),
                     jnp.float32)


def _copy_params(src, dst):
  nnx.update(dst, nnx.state(src, nnx.Param))
  return dst


def test_kept_counts_follow_the_paper():
  assert PruneConfig().token_counts(197) == [157, 125, 101]
  assert PruneConfig.paper("vim_t").token_counts(197) == [157]
  assert kept_count(197, 1.0) == 197
  assert kept_count(17, 0.5) == 9
  assert kept_count(196, 0.5, has_cls=False) == 98
  for n in range(2, 60):
    for r in (0.1, 0.33, 0.5, 0.8, 0.99):
      k = kept_count(n, r)
      assert k % 2 == 1 and 1 <= k <= n + (n % 2 == 0)


@pytest.mark.parametrize("kw", [dict(), dict(alignment=False), dict(fused_token=True),
                                dict(importance="l2", keep_ratio=(0.6, 0.9), layers=(2, 4))])
def test_positions_are_sorted_unique_and_keep_cls(kw):
  cfg = PruneConfig(**{"layers": (1, 3, 5), "keep_ratio": 0.7, **kw})
  model = create("vim_t", pruning=cfg, **SMALL)
  logits, info = model(_images(), return_info=True)
  assert logits.shape == (3, 7) and np.isfinite(np.asarray(logits)).all()
  counts = cfg.token_counts(17)
  assert [p.shape for p in info["positions"]] == [(3, k) for k in counts]
  assert len(info["scores"]) == len(cfg.layers)
  cls = 8
  prev = None
  for pos in info["positions"]:
    pos = np.asarray(pos)
    img = [row[row >= 0] for row in pos]
    for row, full in zip(img, pos):
      assert cls in row
      assert np.all(np.diff(row) > 0)  # sorted, unique: spatial order kept
      assert np.all(full[len(row):] == prune_ops.FUSED)  # fused tokens only at the end
    if prev is not None:
      for row, prow in zip(img, prev):
        assert set(row) <= set(prow)  # later stages keep a subset
    prev = img


def test_keep_all_equals_dense_exactly():
  dense = create("vim_t", **SMALL)
  for align in (True, False):
    pruned = _copy_params(dense, create("vim_t", pruning=PruneConfig(layers=(2, 4), keep_ratio=1.0,
                                                                     alignment=align), **SMALL))
    x = _images(1)
    np.testing.assert_array_equal(np.asarray(dense(x)), np.asarray(pruned(x)))


def test_top_k_keeps_the_highest_scores():
  scores = jnp.asarray([[5., 1., 9., 0., 3., 7., 2.], [0., 8., 1., 9., 2., 3., 4.]])
  idx = prune_ops.select_keep_position(scores, jnp.asarray([3, 3]), 3)
  np.testing.assert_array_equal(np.asarray(idx), [[2, 3, 5], [1, 3, 6]])
  mid = prune_ops.select_middle(scores, jnp.asarray([3, 3]), 5)
  np.testing.assert_array_equal(np.asarray(mid), [[0, 2, 3, 4, 5], [1, 4, 3, 5, 6]])


def test_cls_is_never_pruned_even_with_the_lowest_score():
  scores = -jnp.abs(jnp.asarray(np.random.default_rng(0).standard_normal((4, 11)))) - 1
  scores = scores.at[:, 5].set(-100.0)
  for sel in (lambda: prune_ops.select_keep_position(scores, jnp.full((4,), 5), 3),
              lambda: prune_ops.select_middle(scores, jnp.full((4,), 5), 3)):
    assert np.all(np.any(np.asarray(sel()) == 5, axis=1))


def test_importance_scores():
  y_f = jnp.asarray([[[1., -2.], [-1., -1.], [3., 1.]]])
  y_b = jnp.asarray([[[1., 0.], [1., -1.], [-1., 1.]]])
  y = (np.asarray(y_f) + np.asarray(y_b)) / 2
  np.testing.assert_allclose(prune_ops.importance(y_f, y_b, "clip"), [np.maximum(y, 0).sum(-1)[0]])
  np.testing.assert_allclose(prune_ops.importance(y_f, y_b, "l1"), [np.abs(y).sum(-1)[0]])
  np.testing.assert_allclose(prune_ops.importance(y_f, y_b, "raw"), [y.sum(-1)[0]])
  np.testing.assert_allclose(prune_ops.importance(y_f, y_b, "l2"),
                             [np.sqrt((y * y).sum(-1))[0]], rtol=1e-6)
  # The release reads the backward branch's channel sum in flipped order.
  np.testing.assert_allclose(prune_ops.importance(y_f, y_b, "release"), [[0., 0., 1.]])


def test_alignment_gaps_from_positions():
  pos = jnp.asarray([[0, 3, 4, 8], [2, 5, 6, -1]])
  gf, gb = alignment_gaps(pos, 10)
  np.testing.assert_array_equal(gf, [[0, 2, 0, 3], [2, 2, 0, 0]])
  np.testing.assert_array_equal(gb, [[2, 0, 3, 1], [2, 0, 3, 0]])


@pytest.mark.parametrize("gap_delta", ["prev", "bias"])
def test_aligned_mixer_equals_full_length_masked_oracle(gap_delta):
  """The kept tokens' scan outputs equal those of a full-length scan in which the pruned
  positions carry no input (u = 0) and decay with Δ̃ — DESIGN §3's oracle — in both directions."""
  full = scan_utils.random_inputs(3, 2, 17, 8, 4)
  pos, _, _ = scan_utils.random_keep(4, 2, 17, 9)
  gaps_f, gaps_b = alignment_gaps(jnp.asarray(pos), 17)
  compact = {k: (np.take_along_axis(v, pos[..., None], axis=1) if v.ndim == 3 and k != "A" else v)
             for k, v in full.items()}
  args = {k: jnp.asarray(v) for k, v in compact.items()}
  for reverse, gaps in ((False, gaps_f), (True, gaps_b)):
    y = selective_scan(**args, reverse=reverse, gaps=gaps, gap_delta=gap_delta)
    oracle = scan_utils.masked_oracle(full, pos, reverse=reverse, gap_delta=gap_delta)
    np.testing.assert_allclose(np.asarray(y), oracle, rtol=2e-5, atol=2e-5)


def test_alignment_changes_the_pruned_forward():
  """Same weights, same first selection; the blocks after it see different scan states."""
  base = create("vim_t", **SMALL)
  for layer in base.layers:  # long memory (small steps, slow decay), so that gaps matter
    layer.mixer.dt_proj.bias[...] = jnp.full_like(layer.mixer.dt_proj.bias[...], -2.0)
  x = _images(2)
  infos = {}
  for align in (True, False):
    m = _copy_params(base, create("vim_t", pruning=PruneConfig(layers=(2, 4), keep_ratio=0.5,
                                                               alignment=align), **SMALL))
    _, infos[align] = m(x, return_info=True)
  np.testing.assert_array_equal(infos[True]["scores"][0], infos[False]["scores"][0])
  a, b = (np.asarray(infos[k]["scores"][1]) for k in (True, False))
  assert np.abs(a - b).max() > 1e-4 * np.abs(b).max()  # far above float noise (~1e-7)


def test_evit_fused_token_is_the_weighted_mean_of_pruned_tokens():
  hidden = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
  scores = jnp.asarray([[0., 1., 2., 3., 4.], [4., 3., 2., 1., 0.]])
  idx = jnp.asarray([[0, 4], [0, 1]])
  fused = np.asarray(prune_ops.fused_token(hidden, scores, idx))
  for b, pruned in enumerate(([1, 2, 3], [2, 3, 4])):
    w = np.exp(np.asarray(scores)[b, pruned]); w /= w.sum()
    np.testing.assert_allclose(fused[b, 0], (w[:, None] * np.asarray(hidden)[b, pruned]).sum(0),
                               rtol=1e-6)


def test_pruned_forward_compiles_once_per_shape():
  model = create("vim_t", pruning=PruneConfig(layers=(1, 3), keep_ratio=0.6), **SMALL)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, x):
    return nnx.merge(graphdef, state)(x, return_info=True)

  for seed in range(3):
    jax.block_until_ready(forward(state, _images(seed)))
  assert forward._cache_size() == 1
  forward(state, _images(0, batch=5))
  assert forward._cache_size() == 2


def test_release_mode_masks_cls_for_every_batch_element():
  model = create("vim_t", pruning=PruneConfig.release(), **{**SMALL, "depth": 15})
  _, info = model(_images(3, batch=4), return_info=True)
  for pos in info["positions"]:
    pos = np.asarray(pos)
    assert np.all(pos[:, pos.shape[1] // 2] == 8)  # cls re-inserted in the middle, every sample


def test_bad_pruning_configs_raise_clear_errors():
  with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
    PruneConfig(keep_ratio=0.0)
  with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
    PruneConfig(keep_ratio=1.5)
  with pytest.raises(ValueError, match="one per layer"):
    PruneConfig(layers=(1, 2), keep_ratio=(0.5,))
  with pytest.raises(ValueError, match="beyond the model depth 6"):
    create("vim_t", pruning=PruneConfig(layers=(5, 10)), **SMALL)
  with pytest.raises(ValueError, match="K=0 < 1"):
    kept_count(10, 1e-12, has_cls=False)
  with pytest.raises(ValueError, match="importance"):
    PruneConfig(importance="attention")
  with pytest.raises(ValueError, match="alignment needs cls_mode='keep_position'"):
    PruneConfig(cls_mode="middle", alignment=True)


@pytest.mark.parametrize("pruning", [None, PruneConfig(layers=(2, 4), keep_ratio=0.6)])
def test_unrolled_blocks_equal_the_scan_over_blocks(pruning):
  # scan_layers=False (every block its own ops, e.g. for speed) must be the same function as the
  # default lax.scan over blocks between pruning points.
  scanned = create("vim_t", pruning=pruning, seed=4, **SMALL)
  unrolled = _copy_params(scanned, create("vim_t", pruning=pruning, seed=5, scan_layers=False,
                                          **SMALL))
  assert not unrolled.cfg.scan_layers
  scanned.eval()
  unrolled.eval()
  x = _images(3)
  np.testing.assert_allclose(np.asarray(unrolled(x)), np.asarray(scanned(x)), rtol=1e-5,
                             atol=1e-5)
