"""Training recipe pieces and an end-to-end smoke run on the embedded digits data."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits, vim_s
from toppax import augment, factory, optim, train


def test_lr_schedule_scales_with_batch_and_warms_up():
  c = vim_s.get_config()
  c.batch_size = 1024
  s = optim.lr_schedule(c, steps_per_epoch=100, total_steps=1000)
  assert optim.peak_lr(c) == pytest.approx(1e-3)            # 5e-4 at 512, linear scaling
  assert float(s(0)) == 0.0
  assert float(s(250)) == pytest.approx(0.5e-3, rel=1e-5)    # halfway through 5 warm-up epochs
  assert float(s(500)) == pytest.approx(1e-3, rel=1e-5)
  assert float(s(1000)) == pytest.approx(c.min_lr, rel=1e-5)
  top = vim_s.get_config("top")
  assert optim.peak_lr(top) == pytest.approx(5e-6)           # ToP fine-tuning at batch 512
  assert (top.weight_decay, top.model.drop_path_rate, top.num_epochs) == (1e-8, 0.0, 30)


def test_weight_decay_mask_follows_timm():
  params = {"pos_embed": jnp.zeros((1, 5, 4)), "cls_token": jnp.zeros((1, 1, 4)),
            "head": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros((3,))},
            "layers": {0: {"mixer": {"A_log": jnp.zeros((8, 2)), "D": jnp.zeros((8,))}}}}
  m = optim.weight_decay_mask(params)
  assert m == {"pos_embed": False, "cls_token": False, "head": {"kernel": True, "bias": False},
               "layers": {0: {"mixer": {"A_log": True, "D": False}}}}


def test_prune_config_from_plain_fields():
  c = vim_s.get_config("top")
  p = factory.prune_config(c)
  assert (p.layers, p.keep_ratio, p.alignment, p.fused_token) == ((5, 10, 15), 0.8, True, False)
  assert factory.prune_config(vim_s.get_config()) is None
  assert factory.prune_config(c, "removal").alignment is False
  assert factory.prune_config(vim_s.get_config("evit")).fused_token is True
  assert factory.prune_config(c, "dense") is None


def test_mixup_cutmix_targets_are_distributions():
  key = jax.random.key(0)
  images = jax.random.uniform(key, (8, 16, 16, 3))
  targets = augment.smooth_one_hot(jnp.arange(8) % 10, 10, 0.1)
  assert float(targets[0, 0]) == pytest.approx(0.91) and float(targets[0, 1]) == pytest.approx(0.01)
  for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
    x, t = augment.mix(jax.random.key(3), images, targets, mixup=mixup, cutmix=cutmix, prob=1.0,
                       switch_prob=0.5)
    np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
    lam = float(t[0, 0] - 0.01) / 0.9                    # the weight of sample 0's own label
    assert 0.0 <= lam <= 1.0
    if cutmix and not mixup:
      # Cutmix pastes pixels: each pixel comes from the image or its partner, and the kept
      # fraction is exactly lambda.
      own = np.isclose(np.asarray(x[0]), np.asarray(images[0])).all(-1)
      assert own.mean() == pytest.approx(lam, abs=1e-6)


def test_rand_augment_is_deterministic_and_in_range():
  images = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
  a = augment.rand_augment(jax.random.key(2), images, num_layers=2, magnitude=9)
  b = augment.rand_augment(jax.random.key(2), images, num_layers=2, magnitude=9)
  np.testing.assert_array_equal(a, b)
  assert a.shape == images.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  assert not np.allclose(a, images)


def test_nonfinite_guard_names_the_step():
  recs = [{"loss": 1.0, "grad_norm": 1.0, "finite": True},
          {"loss": float("nan"), "grad_norm": 1.0, "finite": False}]
  with pytest.raises(FloatingPointError, match=r"at step 12 .*no checkpoint was saved"):
    train.check_finite(recs, 10)
  train.check_finite(recs[:1], 10)
  # A skipped step (config.skip_nonfinite) is not an error.
  train.check_finite([{**recs[1], "skipped": 1.0}], 10)


def _tiny(config):
  config.model.depth, config.model.embed_dim, config.model.d_state = 2, 32, 4
  config.pruning.layers = (1, 2)
  config.aug.randaug_layers = 0     # RandAugment doubles compile time; tested on its own above
  config.data.workers = 0
  return config


def test_train_smoke_writes_metrics_checkpoints_and_the_comparison(tmp_path):
  c = _tiny(digits.get_config("runlocal"))
  c.total_steps, c.log_every, c.checkpoint_every = 12, 4, 6
  c.compare = ("dense", "top")
  workdir = str(tmp_path)
  result = train.train_and_evaluate(c, workdir)
  # Twelve steps on digits are far above chance (10%) for the raw parameters.
  assert result["eval/top1"] > 0.3 and result["eval/count"] == 100
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["depth"] == 2
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [4, 8, 12]
  assert all(math.isfinite(r["train/loss"]) and r["train/img_per_s"] > 0 for r in train_rows)
  assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
  assert any(n.startswith("events.out.tfevents") for n in
             os.listdir(os.path.join(workdir, "tensorboard")))
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                if s.isdigit()) == [6, 12]
  dense, top = result["compare"]
  assert (dense["tokens"], top["tokens"]) == ("17", "17 -> 13 -> 9")
  assert 0 < top["gflops"] < dense["gflops"]
  assert dense["top1"] == pytest.approx(result["eval_ema/top1"])   # compare uses the EMA
  table = open(os.path.join(workdir, "compare.md")).read()
  assert "| top | 17 -> 13 -> 9 |" in table


def test_plainmamba_weight_decay_exempts_its_ssm_parameters():
  import numpy as np
  params = {"layers": {"0": {"mixer": {"A_log": np.zeros((4, 2)), "direction_Bs": np.zeros((5, 2)),
                                       "in_proj": {"kernel": np.zeros((3, 4))}}}},
            "pos_embed": np.zeros((1, 4, 3))}
  m = optim.weight_decay_mask(params, model_name="plainmamba_l1")
  assert not m["layers"]["0"]["mixer"]["A_log"] and not m["layers"]["0"]["mixer"]["direction_Bs"]
  assert m["layers"]["0"]["mixer"]["in_proj"]["kernel"] and not m["pos_embed"]
  assert optim.weight_decay_mask(params)["layers"]["0"]["mixer"]["A_log"]  # Vim decays A_log


class _Mesh:
  """Stands in for a mesh of ``n`` devices (the tests run on one CPU device)."""

  def __init__(self, n):
    self.devices = np.zeros(n)


def test_bad_pruning_variants_fail_before_training(tmp_path):
  from toppax import evaluate
  c = digits.get_config("runlocal")
  c.pruning.keep_ratio = 1.5                 # pruning off, but compare=("dense", "top") uses it
  with pytest.raises(ValueError, match=r"config.compare variant 'top': keep_ratio must be in"):
    train.train_and_evaluate(c, str(tmp_path))
  assert os.listdir(tmp_path) == []          # nothing trained, no config.json written
  with pytest.raises(ValueError, match=r"config.compare variant 'top'"):
    evaluate.run_eval(c, str(tmp_path))      # before "nothing to evaluate"
  c = digits.get_config("runlocal")
  c.pruning.enabled, c.pruning.layers, c.compare = True, (2, 9), ()
  with pytest.raises(ValueError, match=r"config.pruning: pruning layers \[9\] are beyond"):
    factory.check_pruning(c)
  c.compare = ("dense", "bogus")
  c.pruning.layers = (2, 4)
  with pytest.raises(ValueError, match=r"variant 'bogus': unknown pruning variant"):
    factory.check_pruning(c)


def test_batch_sizes_are_checked_up_front_naming_the_field(tmp_path):
  c = digits.get_config("runlocal")
  c.eval_batch_size = 15
  with pytest.raises(ValueError, match=r"config.eval_batch_size=15 is not divisible by the 2 "
                                       r"devices.*multiple of 2 \(e.g. 14 or 16\)"):
    factory.check_config(c, _Mesh(2))
  factory.check_config(c, _Mesh(1))
  c.batch_size = 0
  with pytest.raises(ValueError, match=r"config.batch_size must be a positive integer, got 0"):
    factory.check_config(c, _Mesh(1))
  with pytest.raises(ValueError, match=r"config.batch_size must be a positive integer"):
    train.train_and_evaluate(c, str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_metric_writer_drops_rows_after_the_resumed_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": 2, "train/loss": 1.0}, {"step": 4, "train/loss": 0.9},
          {"step": 4, "eval/top1": 0.5}, {"step": 6, "train/loss": 0.8}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "tra')  # torn line
  w = train.MetricWriter(str(tmp_path), start_step=4)      # killed after checkpoint 4
  w.write(6, {"train/loss": 0.7})
  w.close()
  got = [json.loads(l) for l in path.read_text().splitlines()]
  assert got == rows[:3] + [{"step": 6, "train/loss": 0.7}]
  # A finished run evaluated again: its eval rows at the last step are replaced, not repeated.
  w = train.MetricWriter(str(tmp_path), start_step=6, rerun_eval=True)
  w.close()
  w = train.MetricWriter(str(tmp_path), start_step=4, rerun_eval=True)
  w.write(4, {"eval/top1": 0.5})
  w.close()
  got = [json.loads(l) for l in path.read_text().splitlines()]
  assert got == rows[:2] + [{"step": 4, "eval/top1": 0.5}]


def test_per_layer_keep_ratios_win_over_keep_ratio():
  c = vim_s.get_config("top")
  c.pruning.keep_ratios = (0.9, 0.7, 0.5)
  p = factory.prune_config(c)
  assert p.ratios == (0.9, 0.7, 0.5) and p.token_counts(197) == [177, 125, 63]
  assert factory.prune_config(c, "removal").ratios == (0.9, 0.7, 0.5)
  c.pruning.keep_ratios = (0.9, 0.7)           # two ratios for three layers: named, before training
  with pytest.raises(ValueError, match=r"config.pruning: keep_ratio has 2 values for 3"):
    factory.check_pruning(c)


def test_rematerialised_blocks_give_the_same_gradients():
  """config.model.remat recomputes the blocks in the backward (less memory): same gradients."""
  from flax import nnx
  from toppax import models
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  grads = {}
  for remat in ("none", "block", "dots"):
    m = models.create("vim_t", img_size=32, patch_size=8, depth=3, embed_dim=32, num_classes=5,
                      remat=remat, drop_path_rate=0.0)
    m.train()
    gd, p, r = nnx.split(m, nnx.Param, ...)
    p, r = nnx.to_pure_dict(p), nnx.to_pure_dict(r)
    grads[remat] = jax.jit(jax.grad(lambda p, r: jnp.sum(nnx.merge(gd, p, r)(x) ** 2)))(p, r)
  for remat in ("block", "dots"):
    for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[remat])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="remat must be one of"):
    models.create("vim_t", img_size=32, patch_size=8, depth=1, embed_dim=16, remat="all")
