"""ToP for dense prediction: pruning inside the segmentation backbones with token restoration.

At every tap the kept tokens go back to their grid positions and each pruned position holds
the feature it had when it was pruned; keep-all pruning is the dense model bit for bit; shapes
stay static (one compile per input shape)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from toppax import segmentation
from toppax.pruning import PruneConfig

VIM = dict(img_size=64, depth=6, embed_dim=32, d_state=4, channels=16, aux_channels=8,
           out_indices=(1, 2, 4, 5), num_classes=5)
PLAIN = dict(img_size=64, num_layers=6, embed_dims=32, d_state=4, channels=16, aux_channels=8,
             out_indices=(1, 2, 4, 5), num_classes=5, layers_with_dwconv=(0,))


def _model(name, kw, pruning=None):
  m = segmentation.create(name, pruning=pruning, seed=3, **kw)
  m.eval()
  return m


def _with_params_of(src, dst):
  nnx.update(dst, nnx.state(src, nnx.Param))
  nnx.update(dst, nnx.state(src, nnx.BatchStat))
  return dst


def _images(n=2, size=64, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((n, size, size, 3)), jnp.float32)


@pytest.mark.parametrize("name,kw", [("upernet_vim_t", VIM), ("upernet_plainmamba_l1", PLAIN)])
def test_keep_all_pruning_is_the_dense_model_bit_for_bit(name, kw):
  dense = _model(name, kw)
  for alignment in (True, False):
    pruned = _with_params_of(dense, _model(name, kw, PruneConfig(layers=(2, 4), keep_ratio=1.0,
                                                                 alignment=alignment)))
    x = _images()
    a, ia = dense(x, return_info=True)
    b, ib = pruned(x, return_info=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for fa, fb in zip(ia["features"], ib["features"]):
      np.testing.assert_array_equal(np.asarray(fa), np.asarray(fb))


@pytest.mark.parametrize("name,kw,dims", [("upernet_vim_t", VIM, "embed_dim"),
                                          ("upernet_plainmamba_l1", PLAIN, "embed_dims")])
def test_pruned_positions_keep_the_feature_they_had_when_pruned(name, kw, dims):
  """Backbone maps tapped right at the pruning step and two blocks later: kept positions move
  on, pruned positions still hold the value of the first map."""
  model = _model(name, kw, PruneConfig(layers=(3,), keep_ratio=0.5))
  backbone = model.backbone
  maps, info = backbone.forward_features(_images(), taps=(2, 4))
  (positions,) = info["positions"]
  before, after = np.asarray(maps[0]), np.asarray(maps[1])
  b, h, w, c = before.shape
  before, after = before.reshape(b, h * w, c), after.reshape(b, h * w, c)
  assert positions.shape == (b, (h * w) // 2)            # no cls token: ceil(64 * 0.5)
  for i in range(b):
    kept = np.zeros(h * w, bool)
    kept[np.asarray(positions[i])] = True
    np.testing.assert_array_equal(after[i][~kept], before[i][~kept])
    assert not np.allclose(after[i][kept], before[i][kept])
  # The unpruned backbone gives the same map at the pruning step (nothing pruned yet).
  dense = _with_params_of(model, _model(name, kw))
  dense_maps, _ = dense.backbone.forward_features(_images(), taps=(2,))
  np.testing.assert_allclose(np.asarray(dense_maps[0]).reshape(b, h * w, c), before, rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize("variant", ["top", "removal", "evit"])
def test_vim_segmentation_prunes_without_a_cls_token(variant):
  pruning = PruneConfig(layers=(2, 4), keep_ratio=0.7, alignment=variant == "top",
                        fused_token=variant == "evit")
  model = _model("upernet_vim_t", VIM, pruning)
  logits, info = model(_images(), return_info=True)
  assert logits.shape == (2, 64, 64, 5) and np.isfinite(np.asarray(logits)).all()
  tokens = [p.shape[1] for p in info["positions"]]
  # ceil(16 * 0.7) = 12, then ceil(12 * 0.7) = 9; EViT adds its fused token after each step,
  # and the second step sees it as one more prunable token: 12 + 1, ceil(13 * 0.7) + 1.
  assert tokens == ([13, 11] if variant == "evit" else [12, 9])
  for p in info["positions"]:
    p = np.asarray(p)
    img = p[p >= 0].reshape(2, -1)
    assert (np.diff(img, axis=1) > 0).all()            # grid positions, in raster order
  assert [f.shape[1:3] for f in info["features"]] == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_one_compile_per_shape():
  model = _model("upernet_vim_t", VIM, PruneConfig(layers=(2,), keep_ratio=0.5))
  graphdef, state = nnx.split(model)
  traces = []

  @jax.jit
  def forward(state, x):
    traces.append(1)
    return nnx.merge(graphdef, state)(x)

  for seed in range(3):
    jax.block_until_ready(forward(state, _images(seed=seed)))
  assert len(traces) == 1
