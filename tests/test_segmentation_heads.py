"""Segmentation neck, tap norms and heads vs mmsegmentation 0.29.1 / the official backbones'
necks, fed with the official intermediate maps of the goldens (tests/README.md). Independent of
the backbones: the official maps before the neck (``tap*``) and the maps that enter the decode
head (``feature*``) are stored in the reduced goldens."""
from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.golden_utils import assert_close_to_official, load_seg_golden
from toppax.convert.common import KeyTable, get_by_path
from toppax.convert.segmentation import convert_heads, convert_neck, official_rope_tables
from toppax.segmentation import layers
from toppax.segmentation.heads import FCNHead, UPerHead
from toppax.segmentation.neck import ViMNeck

GOLDENS = pathlib.Path(__file__).parent / "goldens"
REDUCED = ["seg_vim_reduced", "seg_vim_s_reduced", "seg_plainmamba_reduced"]
TRAINED = ["seg_vim_reduced", "seg_plainmamba_reduced"]


class Heads(nnx.Module):
  """The two heads as the official EncoderDecoder holds them."""

  def __init__(self, dim, channels, aux_channels, num_classes, aux_index):
    rngs = nnx.Rngs(0)
    self.aux_index = aux_index
    self.decode_head = UPerHead((dim,) * 4, channels, num_classes, rngs=rngs)
    self.auxiliary_head = FCNHead(dim, aux_channels, num_classes, rngs=rngs)

  @nnx.jit  # one compile instead of op-by-op dispatch
  def __call__(self, feats):
    return self.decode_head(feats), self.auxiliary_head(feats[self.aux_index])


def _heads(name):
  sd, arrays, kw = load_seg_golden(GOLDENS / f"{name}.npz")
  dim = arrays["feature0"].shape[-1]
  aux_index = 3 if "plainmamba" in name else 2
  heads = Heads(dim, kw["channels"], kw["aux_channels"], kw["num_classes"], aux_index)
  table = KeyTable({k: v for k, v in sd.items() if k.startswith(("decode_head.", "auxiliary_head."))},
                   ignore=lambda k: k.endswith("num_batches_tracked"))
  convert_heads(heads, table)
  table.finish(name)  # strict: every head key of the official model is used
  feats = [jnp.asarray(arrays[f"feature{i}"]) for i in range(4)]
  return heads, arrays, feats


@pytest.mark.parametrize("name", REDUCED)
def test_heads_match_official_on_official_features(name):
  heads, arrays, feats = _heads(name)
  with jax.default_matmul_precision("highest"):
    decode, aux = heads(feats)
    logits = layers.resize(decode, arrays["images"].shape[1:3])
  assert_close_to_official(decode, arrays["decode"], "decode logits")
  assert_close_to_official(aux, arrays["aux"], "aux logits")
  assert_close_to_official(logits, arrays["logits"], "full-resolution logits")


@pytest.mark.parametrize("name", TRAINED)
def test_heads_train_mode_batch_statistics_and_running_update(name):
  """Training mode: BN normalises with batch statistics and updates the running ones as torch
  (momentum 0.1, unbiased variance); dropout is switched off on both sides for the comparison."""
  heads, arrays, feats = _heads(name)
  heads.train()
  for head in (heads.decode_head, heads.auxiliary_head):
    head.cls_seg.dropout.deterministic = True
  with jax.default_matmul_precision("highest"):
    decode, aux = heads(feats)
  assert_close_to_official(decode, arrays["train_decode"], "train-mode decode logits")
  assert_close_to_official(aux, arrays["train_aux"], "train-mode aux logits")
  flat, offset = arrays["train_stats_flat"], 0
  for key, size in zip(arrays["train_stat_keys"], arrays["train_stat_sizes"]):
    want = flat[offset:offset + size]
    offset += size
    # Official name -> ours: psp_modules.i.1 is the ConvModule after the pooling.
    path = re.sub(r"psp_modules\.(\d+)\.1\.", r"psp_modules.\1.conv.", str(key))
    path = path.replace("running_mean", "mean").replace("running_var", "var")
    assert_close_to_official(get_by_path(heads, path)[...], want, str(key), rel=1e-5)


@pytest.mark.parametrize("name", ["seg_vim_reduced", "seg_vim_s_reduced"])
def test_vim_neck_matches_official(name):
  sd, arrays, kw = load_seg_golden(GOLDENS / f"{name}.npz")
  dim = arrays["tap0"].shape[-1]
  neck = ViMNeck(dim, 16, rngs=nnx.Rngs(0))
  run = nnx.jit(lambda neck, maps: neck(maps))
  table = KeyTable({k: v for k, v in sd.items() if k.startswith(("backbone.fpn",))},
                   ignore=lambda k: k.endswith("num_batches_tracked"))
  convert_neck(neck, table)
  table.finish(name)
  with jax.default_matmul_precision("highest"):
    out = run(neck, [jnp.asarray(arrays[f"tap{i}"]) for i in range(4)])
  for i in range(4):
    assert_close_to_official(out[i], arrays[f"feature{i}"], f"fpn{i + 1}")


def test_plainmamba_tap_norms_match_official():
  sd, arrays, kw = load_seg_golden(GOLDENS / "seg_plainmamba_reduced.npz")
  for j, i in enumerate(kw["out_indices"]):
    prefix = "backbone.ln1" if i == kw["num_layers"] - 1 else f"backbone.norm_layer{i}"
    w, b = sd[f"{prefix}.weight"], sd[f"{prefix}.bias"]
    norm = nnx.LayerNorm(w.shape[0], epsilon=1e-6, use_fast_variance=False, rngs=nnx.Rngs(0))
    norm.scale[...], norm.bias[...] = jnp.asarray(w), jnp.asarray(b)
    assert_close_to_official(norm(jnp.asarray(arrays[f"tap{j}"])), arrays[f"feature{j}"], f"{prefix} on tap {i}")


def test_resize_matches_official_whole_inference_rescale():
  """mmseg's whole_inference resizes the input-size logits to the original image size (here one
  side shrinks, the other grows): bilinear, align_corners=False, no antialiasing."""
  _, arrays, _ = load_seg_golden(GOLDENS / "seg_plainmamba_reduced.npz")
  got = layers.resize(jnp.asarray(arrays["logits"]), arrays["whole_logits"].shape[1:3])
  assert_close_to_official(got, arrays["whole_logits"], "resized logits")


@pytest.mark.parametrize("n_in,n_out", [(2, 3), (3, 2), (5, 6), (7, 3), (16, 6), (4, 4), (1, 1)])
def test_adaptive_pool_bins_match_torch_definition(n_in, n_out):
  x = np.random.default_rng(0).standard_normal((1, n_in, n_in, 2)).astype(np.float32)
  got = np.asarray(layers.adaptive_avg_pool(jnp.asarray(x), n_out))
  for i in range(n_out):
    for j in range(n_out):
      r0, r1 = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
      c0, c1 = (j * n_in) // n_out, -((-(j + 1) * n_in) // n_out)
      np.testing.assert_allclose(got[0, i, j], x[0, r0:r1, c0:c1].mean((0, 1)), rtol=1e-6,
                                 atol=1e-6)


def test_batchnorm_training_needs_more_than_one_value():
  bn = layers.BatchNorm(3, rngs=nnx.Rngs(0))
  bn.train()
  with pytest.raises(ValueError, match="more than one value per channel"):
    bn(jnp.ones((1, 1, 1, 3)))


def test_official_rope_tables_match_the_checkpoint_buffers():
  """ViM-S's rope.freqs_cos / freqs_sin (VisionRotaryEmbeddingFast, stored in its checkpoints)
  against the formula the conversion checks them with."""
  sd, _, kw = load_seg_golden(GOLDENS / "seg_vim_s_reduced.npz")
  cos, sin = official_rope_tables(kw["embed_dim"], kw["img_size"] // 16)
  assert_close_to_official(cos, sd["backbone.rope.freqs_cos"], "freqs_cos", rel=1e-6)
  assert_close_to_official(sin, sd["backbone.rope.freqs_sin"], "freqs_sin", rel=1e-6)


SYNC_BN_SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P
from toppax.segmentation.layers import BatchNorm

x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3, 5, 6)) * 2 + 1, jnp.float32)

def step(axis_name, x):
  bn = BatchNorm(6, axis_name=axis_name, rngs=nnx.Rngs(0))
  bn.train()
  graphdef, state = nnx.split(bn)
  def f(state, x):
    m = nnx.merge(graphdef, state)
    y = m(x)
    return y, nnx.state(m)
  if axis_name is None:
    return f(state, x)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  return jax.shard_map(f, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P()),
                       check_vma=False)(state, x)

y1, s1 = step(None, x)
y2, s2 = step("data", x)
print("RESULT " + json.dumps({
    "devices": jax.device_count(),
    "y": float(jnp.abs(y1 - y2).max()),
    "mean": float(jnp.abs(s1["mean"][...] - s2["mean"][...]).max()),
    "var": float(jnp.abs(s1["var"][...] - s2["var"][...]).max()),
    "var_moved": float(jnp.abs(s1["var"][...] - 1).max())}))
"""


def test_sync_batchnorm_over_a_data_axis_equals_one_device():
  """SyncBN (bn_axis_name): statistics averaged over a shard_map data axis give the one-device
  batch statistics and running-statistics update (unbiased count over all shards)."""
  from tests.test_sharding import _result, _run_on_host_devices
  out = _result(_run_on_host_devices(SYNC_BN_SCRIPT, 2))
  assert out["devices"] == 2
  assert out["y"] < 1e-5 and out["mean"] < 1e-6 and out["var"] < 1e-6, out
  assert out["var_moved"] > 0.1  # the step did update the running variance
