"""PlainMamba: each official quirk, the zig-zag orders, ToP on the grid (keep-all == dense,
restricted orders, static shapes), image-size checks. Parity with the official code is in
test_plainmamba_parity.py."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from toppax import factory
from toppax.models import create
from toppax.models import plainmamba as pm
from toppax.pruning import PruneConfig

# 5x7 token grid (odd, non-square), pos embed stored at 5x5 and resized at run time.
SMALL = dict(img_size=80, embed_dims=16, num_layers=3, num_convs_patch_embed=1,
             layers_with_dwconv=(0,), d_state=4, conv_size=5, num_classes=5)
HW = (80, 112)


def _images(seed=0, batch=2, hw=HW):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, *hw, 3)), jnp.float32)


def _perturb(model, seed=0):
  """Every parameter and BN statistic away from its init (direction_Bs, D, biases matter here)."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, (nnx.Param, nnx.BatchStat))

  def fill(path, v):
    name = str(path[-1])
    if name == "var":
      return jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype)
    if name == "A_log":
      return v + jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype)
    scale = 1.0 / math.sqrt(v.shape[0]) if v.ndim == 2 else 0.3
    return v + jnp.asarray(scale * rng.standard_normal(v.shape), v.dtype)

  nnx.update(model, jax.tree_util.tree_map_with_path(fill, state))
  return model


# ------------------------------------------------------------------------------------------------
# Zig-zag orders


def test_scan_orders_of_a_3x4_grid():
  orders, inverse, codes = pm.scan_orders(3, 4)
  S, R, L, U, D = range(5)  # start, right, left, up, down
  np.testing.assert_array_equal(orders, [
      [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11],     # rows, snake, from the top-left
      [11, 10, 9, 8, 4, 5, 6, 7, 3, 2, 1, 0],     # its reverse (H odd: from the bottom-right)
      [0, 4, 8, 9, 5, 1, 2, 6, 10, 11, 7, 3],     # columns, snake, from the top-left
      [3, 7, 11, 10, 6, 2, 1, 5, 9, 8, 4, 0]])    # its reverse (W even: from the top-right)
  np.testing.assert_array_equal(codes, [
      [S, R, R, R, D, L, L, L, D, R, R, R],
      [S, L, L, L, U, R, R, R, U, L, L, L],
      [S, D, D, R, U, U, R, D, D, R, U, U],
      [S, D, D, L, U, U, L, D, D, L, U, U]])
  for j in range(4):
    np.testing.assert_array_equal(orders[j][inverse[j]], np.arange(12))


@pytest.mark.parametrize("h,w", [(1, 1), (1, 5), (4, 1), (2, 2), (5, 7), (6, 4), (14, 14)])
def test_scan_orders_are_continuous_and_codes_name_the_moves(h, w):
  orders, inverse, codes = pm.scan_orders(h, w)
  step = {pm.RIGHT: (0, 1), pm.LEFT: (0, -1), pm.UP: (-1, 0), pm.DOWN: (1, 0)}
  for j in range(4):
    assert sorted(orders[j]) == list(range(h * w))
    assert codes[j][0] == pm.START
    rc = [divmod(int(t), w) for t in orders[j]]
    for k in range(1, h * w):
      assert (rc[k][0] - rc[k - 1][0], rc[k][1] - rc[k - 1][1]) == step[int(codes[j][k])]
  np.testing.assert_array_equal(orders[1], orders[0][::-1])
  np.testing.assert_array_equal(orders[3], orders[2][::-1])


# ------------------------------------------------------------------------------------------------
# The mixer against a float64 loop reference of the official forward


def _softplus(x):
  return np.logaddexp(x, 0.0)


def _silu(x):
  return x / (1 + np.exp(-x))


def _reference_mixer(mixer, x, hw, positions=None, alignment=False, *, permute_all=False,
                     bias_once=False, single_d=False):
  """Official PlainMamba2D.forward in plain numpy float64, generalised to kept tokens by the
  ToP rules. The flags undo one quirk each (to show the test would see it)."""
  g = lambda v: np.asarray(v[...], np.float64)
  h, w = hw
  x = np.asarray(x, np.float64)
  batch, k, _ = x.shape
  positions = np.broadcast_to(np.arange(h * w), (batch, h * w)) if positions is None \
      else np.asarray(positions)
  xz = x @ g(mixer.in_proj.kernel) + g(mixer.in_proj.bias)
  xi, z = np.split(xz, 2, axis=-1)
  e = xi.shape[-1]
  # Depthwise conv over the zero-filled grid, read back at the kept tokens.
  kern, cs = g(mixer.conv2d.kernel)[:, :, 0, :], mixer.conv2d.kernel.shape[0]
  p = cs // 2
  xc = np.zeros_like(xi)
  for b in range(batch):
    grid = np.zeros((h + 2 * p, w + 2 * p, e))
    for i, t in enumerate(positions[b]):
      grid[p + t // w, p + t % w] = xi[b, i]
    for i, t in enumerate(positions[b]):
      r, c = divmod(int(t), w)
      xc[b, i] = (grid[r:r + cs, c:c + cs] * kern).sum((0, 1)) + g(mixer.conv2d.bias)
  xc = _silu(xc)
  n, rank = mixer.d_state, mixer.dt_rank
  dbl = xc @ g(mixer.x_proj.kernel)
  dt, bm, cm = dbl[..., :rank], dbl[..., rank:rank + n], dbl[..., rank + n:]
  dt = dt @ g(mixer.dt_proj.kernel) + (0.0 if bias_once else g(mixer.dt_proj.bias))
  a = -np.exp(g(mixer.A_log))
  d_skip, dir_b, dt_bias = g(mixer.D), g(mixer.direction_Bs), g(mixer.dt_proj.bias)
  orders, _, codes = pm.scan_orders(h, w)
  y = np.zeros_like(xi)
  for b in range(batch):
    kept = {int(t): i for i, t in enumerate(positions[b])}
    for j in range(4):
      steps = [s for s, t in enumerate(orders[j]) if int(t) in kept]  # full-grid steps kept
      idx = [kept[int(orders[j][s])] for s in steps]                  # kept index per step
      code = [pm.START] + [int(codes[j][s]) for s in steps[1:]]
      state, prev_delta = np.zeros((e, n)), None
      for q, s in enumerate(steps):
        src = idx[q] if permute_all else q  # official: delta, B, C indexed in raster order
        delta = _softplus(dt[b, src] + dt_bias)
        gap = s - (steps[q - 1] if q else -1) - 1 if alignment else 0
        # The state is still zero before the first kept step, so its gap decays nothing.
        decay = delta + gap * (delta if prev_delta is None else prev_delta)
        u = xc[b, idx[q]]
        bq = bm[b, src] + dir_b[code[q]]
        state = np.exp(decay[:, None] * a) * state + (delta * u)[:, None] * bq[None, :]
        y[b, idx[q]] += state @ cm[b, src] + (0.0 if single_d else d_skip * u)
        prev_delta = delta
  if single_d:
    y = y + d_skip * xc
  y = y * _silu(z)
  return y @ g(mixer.out_proj.kernel) + g(mixer.out_proj.bias), y


@pytest.fixture(scope="module")
def mixer():
  cfg = pm.config_for("plainmamba_l1", **{**SMALL, "d_state": 3})
  return _perturb(pm.PlainMamba2D(cfg, rngs=nnx.Rngs(0)), seed=1)


def test_mixer_matches_the_official_forward_and_each_quirk_matters(mixer):
  hw = (3, 4)
  x = np.random.default_rng(2).standard_normal((2, 12, SMALL["embed_dims"])).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    out, y = nnx.jit(lambda m, x: m(x, hw))(mixer, jnp.asarray(x))
  want, want_y = _reference_mixer(mixer, x, hw)
  np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(y), want_y, atol=2e-5, rtol=1e-5)
  # Only u is permuted into scan order; the dt bias is applied twice; each direction adds its
  # own D skip. Undoing any one of them moves the output far beyond the tolerance.
  for quirk in ("permute_all", "bias_once", "single_d"):
    other, _ = _reference_mixer(mixer, x, hw, **{quirk: True})
    assert np.abs(other - want).max() > 1e-2, quirk


@pytest.mark.parametrize("alignment", [False, True])
def test_pruned_mixer_restricts_each_zigzag_to_the_kept_tokens(mixer, alignment):
  hw = (3, 4)
  positions = np.array([[0, 2, 3, 5, 6, 9, 11], [1, 4, 5, 7, 8, 10, 11]], np.int32)
  x = np.random.default_rng(3).standard_normal((2, 7, SMALL["embed_dims"])).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    out, _ = nnx.jit(lambda m, x, p: m(x, hw, p, alignment=alignment))(
        mixer, jnp.asarray(x), jnp.asarray(positions))
  want, _ = _reference_mixer(mixer, x, hw, positions, alignment)
  np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-5)
  if alignment:  # the gaps change the result: the reference without them must not match
    plain, _ = _reference_mixer(mixer, x, hw, positions, False)
    assert np.abs(plain - want).max() > 1e-3


# ------------------------------------------------------------------------------------------------
# Other quirks: norms, GELU, stem padding, the unresidualised dw block


def test_layer_norm_eps_per_layer_and_final():
  model = nnx.eval_shape(lambda: create("plainmamba_l1"))
  assert all(layer.norm.epsilon == 1e-5 for layer in model.layers)
  assert model.ln1.epsilon == 1e-6
  # Tiny-variance tokens make eps visible: the final norm must use 1e-6, not 1e-5.
  ln = pm._layer_norm(4, 1e-6, rngs=nnx.Rngs(0))
  x = np.array([[1e-3, -1e-3, 2e-3, -2e-3]], np.float32)
  want = (x - x.mean()) / np.sqrt(x.var() + 1e-6)
  np.testing.assert_allclose(np.asarray(ln(jnp.asarray(x))), want, rtol=1e-4)
  assert np.abs(want - (x - x.mean()) / np.sqrt(x.var() + 1e-5)).max() > 0.1


def test_stem_is_7x7_stride_2_with_padding_3_not_same():
  cfg = pm.config_for("plainmamba_l1", **SMALL)
  embed = _perturb(pm.ConvPatchEmbed(cfg, rngs=nnx.Rngs(0)))
  x = np.random.default_rng(0).standard_normal((1, 16, 16, 3)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(nnx.jit(lambda e, x: e.stem_conv(x))(embed, jnp.asarray(x)))
  k = np.asarray(embed.stem_conv.kernel[...], np.float64)  # (7, 7, 3, 64)

  def conv(pad_lo):
    xp = np.pad(x[0].astype(np.float64), ((pad_lo, 6), (pad_lo, 6), (0, 0)))
    return np.stack([np.stack([np.einsum("hwc,hwco->o", xp[2 * i:2 * i + 7, 2 * j:2 * j + 7], k)
                               for j in range(8)]) for i in range(8)])[None]

  np.testing.assert_allclose(got, conv(3), atol=1e-4)
  assert np.abs(conv(2) - got).max() > 1e-2  # SAME would pad (2, 3) here


def test_dw_block_is_exact_gelu_with_no_residual():
  cfg = pm.config_for("plainmamba_l1", **SMALL)
  layer = _perturb(pm.PlainMambaLayer(cfg, drop_path=0.0, with_dwconv=True, gap_delta="prev",
                                      rngs=nnx.Rngs(0)))
  hw = (3, 4)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 12, 16)), jnp.float32)

  @nnx.jit
  def parts(layer, x):
    got, _ = layer(x, hw)
    mixed = x + layer.mamba(layer.norm(x), hw)[0]
    return got, mixed, layer.dw_bn(layer.dw_conv(mixed.reshape(2, 3, 4, 16))).reshape(2, 12, 16)

  with jax.default_matmul_precision("highest"):
    got, mixed, pre = parts(layer, x)
  erf_gelu = 0.5 * pre * (1 + jax.scipy.special.erf(pre / np.sqrt(2)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(erf_gelu), atol=1e-6)
  assert np.abs(np.asarray(jax.nn.gelu(pre, approximate=True) - got)).max() > 1e-5
  assert np.abs(np.asarray(erf_gelu + mixed - got)).max() > 1e-1  # no residual around it


def test_position_embedding_resize_is_torch_bicubic():
  torch = pytest.importorskip("torch")
  pe = np.random.default_rng(0).standard_normal((1, 25, 6)).astype(np.float32)
  got = np.asarray(pm.resize_pos_embed(jnp.asarray(pe), (5, 5), (7, 3)))
  t = torch.nn.functional.interpolate(torch.from_numpy(pe).reshape(1, 5, 5, 6).permute(0, 3, 1, 2),
                                      size=(7, 3), mode="bicubic", align_corners=False)
  np.testing.assert_allclose(got, t.flatten(2).transpose(1, 2).numpy(), atol=1e-5)
  assert pm.resize_pos_embed(pe, (5, 5), (5, 5)) is pe


@pytest.mark.parametrize("name,want", [
    ("plainmamba_l1", 7_551_656),
    pytest.param("plainmamba_l2", 26_145_832, marks=pytest.mark.slow),
    pytest.param("plainmamba_l3", 50_956_456, marks=pytest.mark.slow)])
def test_parameter_counts_equal_the_official_models(name, want):
  # Counted from the official modules (named_parameters of ImageClassifier, 1000 classes).
  model = nnx.eval_shape(lambda: create(name))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == want


# ------------------------------------------------------------------------------------------------
# Whole model: sizes, ToP


def test_sizes_not_divisible_by_the_patch_are_padded_as_the_official_patch_embed():
  """The official patch embedding pads the stem output at the bottom and right ("corner") to a
  multiple of the projection's stride: 81x80 gives a 6x5 grid, 80x8 a 5x1 grid."""
  from toppax.models.plainmamba import grid_for
  model = create("plainmamba_l1", **SMALL)
  assert grid_for(model.cfg, (81, 80)) == (6, 5) and grid_for(model.cfg, (80, 8)) == (5, 1)
  assert grid_for(model.cfg, (96, 112)) == (6, 7)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 81, 80, 3)), jnp.float32)
  tokens = model.patch_embed(x)
  assert tokens.shape[1] == 30
  # The padded row of the stem output holds zeros: the last token row equals the projection of
  # the stem rows that exist, zeros below them.
  stem = jax.nn.relu(model.patch_embed.stem_bn(model.patch_embed.stem_conv(x)))
  for conv, bn in zip(model.patch_embed.convs, model.patch_embed.bns):
    stem = jax.nn.relu(bn(conv(stem)))
  q = model.patch_embed.projection.kernel_size[0]
  padded = jnp.pad(stem, ((0, 0), (0, (-stem.shape[1]) % q), (0, (-stem.shape[2]) % q), (0, 0)))
  np.testing.assert_allclose(np.asarray(model.patch_embed.projection(padded).reshape(1, 30, -1)),
                             np.asarray(tokens), rtol=1e-6, atol=1e-6)
  assert model(x).shape == (1, SMALL.get("num_classes", 1000))


def test_bad_image_sizes_raise_clear_errors():
  model = nnx.eval_shape(lambda: create("plainmamba_l1", **SMALL))
  with pytest.raises(ValueError, match="NHWC"):
    model(jnp.zeros((1, 3, 80, 80)))
  with pytest.raises(TypeError, match="unknown PlainMamba override"):
    create("plainmamba_l1", embed_dim=16)
  with pytest.raises(ValueError, match="release"):
    create("plainmamba_l1", pruning=PruneConfig(layers=(1,), importance="release"), **SMALL)
  with pytest.raises(ValueError, match="beyond the model depth"):
    create("plainmamba_l1", pruning=PruneConfig(layers=(4,)), **SMALL)


def _forward(graphdef, traces):
  def f(state, x):
    traces.append(x.shape)
    return nnx.merge(graphdef, state)(x, return_info=True)
  return jax.jit(f)


@pytest.fixture(scope="module")
def dense():
  return _perturb(create("plainmamba_l1", **SMALL), seed=4)


def test_keep_all_pruning_equals_dense_exactly(dense):
  x = _images()
  want = np.asarray(nnx.jit(lambda m, x: m(x))(dense, x))
  for alignment in (True, False):
    cfg = PruneConfig(layers=(1, 2), keep_ratio=1.0, alignment=alignment)
    pruned = create("plainmamba_l1", pruning=cfg, **SMALL)
    nnx.update(pruned, nnx.state(dense))
    got, info = nnx.jit(lambda m, x: m(x, return_info=True))(pruned, x)
    np.testing.assert_array_equal(np.asarray(got), want)
    for pos in info["positions"]:
      np.testing.assert_array_equal(np.asarray(pos), np.broadcast_to(np.arange(35), (2, 35)))


def test_pruned_forward_static_shapes_positions_and_one_compile_per_shape(dense):
  cfg = PruneConfig(layers=(1, 2), keep_ratio=(0.6, 0.5))
  model = create("plainmamba_l1", pruning=cfg, **SMALL)
  nnx.update(model, nnx.state(dense))
  graphdef, state = nnx.split(model)
  traces = []
  f = _forward(graphdef, traces)
  logits, info = f(state, _images(1))
  logits2, _ = f(state, _images(2))
  assert len(traces) == 1 and f._cache_size() == 1
  f(state, _images(3, batch=3))
  assert len(traces) == 2 and f._cache_size() == 2
  counts = [math.ceil(35 * 0.6), math.ceil(math.ceil(35 * 0.6) * 0.5)]  # 21, 11
  assert [tuple(p.shape) for p in info["positions"]] == [(2, c) for c in counts]
  assert [tuple(s.shape) for s in info["scores"]] == [(2, 35), (2, counts[0])]
  prev = None
  for pos, scores in zip(info["positions"], info["scores"]):
    pos, scores = np.asarray(pos), np.asarray(scores)
    assert (np.diff(pos, axis=1) > 0).all() and pos.min() >= 0 and pos.max() < 35
    if prev is not None:
      assert all(set(p) <= set(q) for p, q in zip(pos, prev))
    else:  # the first selection keeps the highest-scoring tokens
      for b in range(2):
        kept = np.sort(scores[b][pos[b]])
        dropped = np.delete(scores[b], pos[b])
        assert kept.min() >= dropped.max()
    prev = pos
  dense_logits = np.asarray(nnx.jit(lambda m, x: m(x))(dense, _images(1)))
  assert np.isfinite(np.asarray(logits)).all()
  assert np.abs(np.asarray(logits) - dense_logits).max() > 1e-4
  assert np.abs(np.asarray(logits) - np.asarray(logits2)).max() > 1e-4


@pytest.mark.parametrize("variant", ["l1", "l2", "l3"])
def test_configs_build_the_model_and_the_top_schedule(variant):
  import importlib
  from toppax.tools.flops import PLAINMAMBA_TOP_SCHEDULES
  module = importlib.import_module(f"configs.plainmamba_{variant}")
  name = f"plainmamba_{variant}"
  dense, top = module.get_config(), module.get_config("top")
  assert not dense.pruning.enabled and top.pruning.enabled and top.pruning.alignment
  assert tuple(dense.pruning.layers) == tuple(top.pruning.layers)  # for bench/compare variants
  cfg = factory.prune_config(top)
  assert (cfg.layers, cfg.ratios) == tuple(tuple(x) for x in PLAINMAMBA_TOP_SCHEDULES[name])
  assert cfg.alignment and not module.get_config("removal").pruning.alignment
  overrides = {k: v for k, v in top.model.items() if k != "name" and v is not None}
  model = nnx.eval_shape(lambda: create(top.model.name, pruning=cfg, **overrides))
  assert model.cfg.num_layers == {"l1": 24, "l2": 24, "l3": 36}[variant]
  with pytest.raises(ValueError, match="unknown config argument"):
    module.get_config("tpo")
