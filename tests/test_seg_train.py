"""Segmentation training and evaluation: the loss as mmseg computes it, the recipes' optimizer
pieces, logits back to each label's size, and a short run through the shared training loop
(metrics, checkpoints, exact resume, the comparison table)."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import seg_plainmamba_l1, seg_vim_t
from toppax import optim
from toppax.segmentation import train as seg_train
from toppax.segmentation.layers import resize


def test_pixel_cross_entropy_ignores_255_and_averages_over_every_pixel():
  logits = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4, 5)), jnp.float32)
  labels = np.random.default_rng(1).integers(0, 5, (2, 3, 4)).astype(np.int32)
  labels[0, 0, :] = 255
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  want = 0.0
  for idx in np.ndindex(labels.shape):
    if labels[idx] != 255:
      want -= logp[idx + (labels[idx],)]
  want /= labels.size                       # mmseg 0.29: avg_non_ignore=False
  got = float(seg_train.pixel_cross_entropy(logits, jnp.asarray(labels)))
  assert got == pytest.approx(want, rel=1e-5)


def test_poly_schedule_with_linear_warmup_is_mmcv_s():
  c = seg_vim_t.get_config()
  f = optim.lr_schedule(c, 1, 60000)
  for t in (0, 1, 700, 1499, 1500, 30000, 59999):
    regular = (1e-4 - 0.0) * (1 - t / 60000) ** 1.0
    k = (1 - t / 1500) * (1 - 1e-6) if t < 1500 else 0.0
    assert float(f(t)) == pytest.approx(regular * (1 - k), rel=1e-5, abs=1e-10)


def _seg_params():
  from flax import nnx
  from toppax import factory
  c = seg_vim_t.get_config("runlocal")
  model = nnx.eval_shape(lambda: factory.create_model(c))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_vim_layer_decay_and_weight_decay_follow_the_official_constructor():
  params = _seg_params()
  scales = optim.layer_decay_scales(params, 0.92, 24)
  flat = {optim._name(p): v for p, v in jax.tree_util.tree_flatten_with_path(scales)[0]}
  # Official quirk: blocks are matched as "backbone.blocks.*", which Vim calls "layers".
  assert flat["backbone.pos_embed"] == pytest.approx(0.92 ** 25)
  assert flat["backbone.patch_embed.proj.kernel"] == pytest.approx(0.92 ** 25)
  assert flat["backbone.layers.0.mixer.in_proj.kernel"] == 1.0
  assert flat["decode_head.fpn_bottleneck.conv.kernel"] == 1.0
  mask = optim.weight_decay_mask(params, "upernet_vim_t")
  flat = {optim._name(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat["backbone.pos_embed"] and flat["backbone.layers.0.mixer.A_log"]
  assert not flat["backbone.layers.0.mixer.D"] and not flat["decode_head.cls_seg.conv_seg.bias"]
  assert flat["decode_head.cls_seg.conv_seg.kernel"]


def test_plainmamba_seg_no_decay_keys():
  from flax import nnx
  from toppax import factory
  c = seg_plainmamba_l1.get_config("runlocal")
  model = nnx.eval_shape(lambda: factory.create_model(c))
  mask = optim.weight_decay_mask(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                                 "upernet_plainmamba_l1")
  flat = {optim._name(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  for no in ("backbone.pos_embed", "backbone.layers.0.mamba.A_log", "backbone.layers.0.mamba.D",
             "backbone.layers.0.mamba.direction_Bs", "backbone.layers.0.norm.scale",
             "tap_norms.norm_layer0.scale"):
    assert not flat[no], no
  # Everything else decays, biases and BatchNorms (named bn) included, as mmcv's custom keys do.
  for yes in ("backbone.ln1.scale", "decode_head.bottleneck.bn.scale",
              "backbone.layers.0.mamba.in_proj.bias"):
    assert flat[yes], yes


def test_logits_reach_each_label_at_its_own_size():
  """The eval step's resize of an example's image region to its label size equals resizing
  the region alone (the canvas padding never leaks in)."""
  rng = np.random.default_rng(0)
  region = jnp.asarray(rng.standard_normal((20, 30, 4)), jnp.float32)
  canvas = jnp.pad(region, ((0, 12), (0, 2), (0, 0)), constant_values=1e3)
  for label_size in ((37, 53), (11, 13), (20, 30)):
    got = seg_train._to_label_canvas(canvas, jnp.asarray([20, 30]), jnp.asarray(label_size),
                                     (64, 64))
    want = resize(region[None], label_size)[0]
    h, w = label_size
    np.testing.assert_allclose(np.asarray(got[:h, :w]), np.asarray(want), atol=1e-4)


def _runlocal():
  c = seg_vim_t.get_config("runlocal")
  c.compare = ()
  return c


def test_training_run_logs_checkpoints_and_evaluates(tmp_path):
  result = seg_train.train_and_evaluate(_runlocal(), str(tmp_path))
  assert 0.0 <= result["eval/mIoU"] <= 1.0 and result["eval/count"] == 16
  rows = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6]
  assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
  assert any("eval/mIoU" in r for r in rows)
  assert sorted(int(d) for d in os.listdir(os.path.join(tmp_path, "checkpoints"))
                if d.isdigit())[-1] == 6
  # --mode=eval on the same workdir: the checkpoint, dense against pruned, a table on disk.
  c = _runlocal()
  c.compare = ("dense", "top")
  c.seg.pictures = 0
  rows = seg_train.run_eval(c, str(tmp_path))["compare"]
  assert [r["variant"] for r in rows] == ["dense", "top"]
  table = open(os.path.join(tmp_path, "compare.md")).read()
  assert "| dense | 16 |" in table and "| top | 16 -> 13 |" in table


@pytest.mark.slow
def test_training_run_resumes_exactly(tmp_path):
  """Stopped after 3 steps and resumed, a run ends with the parameters, optimizer state and
  BatchNorm statistics of an uninterrupted one."""
  c = _runlocal()
  whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
  seg_train.train_and_evaluate(c, whole)
  c.max_steps_per_run = 3
  assert seg_train.train_and_evaluate(c, split) == {"step": 3}
  c.max_steps_per_run = 0
  seg_train.train_and_evaluate(c, split)
  from toppax import checkpointing
  a = checkpointing.Checkpointer(os.path.join(whole, "checkpoints")).manager.restore(6)
  b = checkpointing.Checkpointer(os.path.join(split, "checkpoints")).manager.restore(6)
  for x, y in zip(jax.tree.leaves(a["state"]), jax.tree.leaves(b["state"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_comparison_table_and_pictures(tmp_path):
  c = seg_vim_t.get_config("runlocal")
  c.compare = ("dense", "top", "removal", "evit")
  c.seg.pictures = 2
  result = seg_train.train_and_evaluate(c, str(tmp_path))
  table = open(os.path.join(tmp_path, "compare.md")).read()
  assert "| dense | 16 |" in table and "| top | 16 -> 13 |" in table
  assert "| evit | 16 -> 14 |" in table
  assert [r["variant"] for r in result["compare"]] == ["dense", "top", "removal", "evit"]
  assert os.path.getsize(os.path.join(tmp_path, "segmentation.png")) > 10_000


@pytest.mark.slow
def test_segmentation_study_reports_miou(tmp_path):
  """--mode=study on a segmentation config: the dense model, ToP zero-shot and fine-tuned and the
  dense fine-tune, reported as mIoU with GFLOPs from the segmentation counter."""
  from configs import seg_cifar
  from toppax import study
  c = seg_cifar.get_config("runlocal")
  c.unlock()
  c.study.methods = ("top",)
  c.study.finetune_steps = 1
  c.total_steps = 2
  c.data.eval_examples = 8
  out = study.run(c, str(tmp_path))
  assert out["metric"] == "mIoU"
  rows = {r["key"]: r for r in out["rows"]}
  assert set(rows) == {"seed0/dense/r1/-", "seed0/top/r0.5/clip", "seed0/dense+ft/r1/-"}
  top, dense = rows["seed0/top/r0.5/clip"], rows["seed0/dense/r1/-"]
  assert top["tokens"] == "64 -> 32" and top["gflops"] < dense["gflops"]
  assert 0.0 <= top["zero_shot_mIoU"] <= 1.0 and 0.0 <= top["finetuned_mIoU"] <= 1.0
  assert "zero-shot mIoU %" in (tmp_path / "study.md").read_text()
  assert os.path.getsize(tmp_path / "study.png") > 0


def test_eval_step_is_shared_by_runs_that_differ_only_in_training_fields():
  from toppax import factory, sharding
  c = seg_vim_t.get_config("runlocal")
  c2 = seg_vim_t.get_config("runlocal")
  c2.lr, c2.total_steps, c2.init_from = 1e-5, 7, "/somewhere"
  c2.model.drop_path_rate = 0.0
  assert seg_train._eval_fields(c2) == seg_train._eval_fields(c)
  c3 = seg_vim_t.get_config("runlocal")
  c3.seg.test_mode = "whole" if c.seg.test_mode == "slide" else "slide"
  assert seg_train._eval_fields(c3) != seg_train._eval_fields(c)
  graphdef = factory.model_defs(c).eval
  mesh = sharding.make_mesh()
  assert (seg_train._eval_step(graphdef, seg_train._eval_fields(c), mesh)
          is seg_train._eval_step(graphdef, seg_train._eval_fields(c2), mesh))
