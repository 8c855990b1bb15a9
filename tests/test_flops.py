"""Analytic FLOPs counter: the paper's numbers, token counts, validation, table output."""
import math
from types import SimpleNamespace

import pytest

from toppax.tools import flops
from toppax.tools.flops import (MODEL_NAMES, PLAINMAMBA_TOP_SCHEDULES, block_table, format_table,
                                kept_tokens, model_gflops)


def prune(layers, keep_ratio=0.8, alignment=False, fused_token=False):
  # Duck-typed stand-in for toppax.pruning.PruneConfig: the counter must not need the import.
  return SimpleNamespace(layers=layers, keep_ratio=keep_ratio, alignment=alignment,
                         fused_token=fused_token)


# The ToP paper's table values are printed to two decimals, so "reproduce" means "rounds to".
@pytest.mark.parametrize("name,target", [("vim_t", 1.45), ("vim_s", 5.08)])
def test_vim_dense_matches_paper(name, target):
  assert abs(model_gflops(name) - target) < 0.005


@pytest.mark.parametrize("name,layers,alignment,target", [
  ("vim_s", (5, 10, 15), False, 3.57),
  ("vim_s", (5, 10, 15), True, 3.60),
  ("vim_t", (10,), False, 1.28),
  ("vim_t", (10,), True, 1.29),
])
def test_vim_pruned_matches_paper(name, layers, alignment, target):
  assert abs(model_gflops(name, pruning=prune(layers, 0.8, alignment)) - target) < 0.005


@pytest.mark.parametrize("name,layers,alignment,ratio", [
  ("vim_s", (5, 10, 15), False, 0.703),
  ("vim_s", (5, 10, 15), True, 0.709),
  ("vim_t", (10,), False, 0.883),
  ("vim_t", (10,), True, 0.890),
])
def test_vim_pruned_to_dense_ratio(name, layers, alignment, ratio):
  got = model_gflops(name, pruning=prune(layers, 0.8, alignment)) / model_gflops(name)
  # The paper's ratios come from values rounded to 0.01 G: +-0.002 is that rounding.
  assert abs(got - ratio) < 0.002


def test_vim_b_is_the_same_convention():
  # No paper value to pin; it must sit between the conventions' scaling of T and S (~3.7x S).
  assert 18.5 < model_gflops("vim_b") < 19.2


def test_vim_second_branch_costs_more():
  for name in ("vim_t", "vim_s", "vim_b"):
    assert model_gflops(name, ssm_branches=2) > model_gflops(name) + 0.3


@pytest.mark.parametrize("name,target", [
  ("plainmamba_l1", 3.0), ("plainmamba_l2", 8.1), ("plainmamba_l3", 14.4)])
def test_plainmamba_dense_matches_paper(name, target):
  assert round(model_gflops(name), 1) == target


def test_vim_s_token_counts():
  rows = block_table("vim_s", pruning=prune((5, 10, 15)))
  tokens = [r["tokens"] for r in rows if r["kind"] == "block"]
  assert tokens == [197] * 5 + [157] * 5 + [125] * 5 + [101] * 9


def test_kept_tokens_rule():
  assert kept_tokens(197, 0.8) == 157
  assert kept_tokens(157, 0.8) == 125
  assert kept_tokens(125, 0.8) == 101  # ceil(99.2) = 100 is even -> 101
  assert kept_tokens(196, 0.8, has_cls=False) == 157
  assert kept_tokens(101, 0.7) == 71  # 100 * 0.7 is 70.000...01 in floats: still 70 -> 71
  assert kept_tokens(197, 1.0) == 197
  assert kept_tokens(197, 0.8, fused_token=True) == 158


def test_kept_tokens_agrees_with_pruning_module():
  pruning = pytest.importorskip("toppax.pruning")
  for n in range(1, 260):
    for r in (0.05, 0.1, 0.3, 0.5, 0.65, 0.7, 0.8, 0.9, 1.0):
      for has_cls in (True, False):
        for fused in (False, True):
          assert kept_tokens(n, r, has_cls=has_cls, fused_token=fused) == pruning.kept_count(
              n, r, has_cls=has_cls, fused_token=fused), (n, r, has_cls, fused)


def test_prune_config_object():
  pruning = pytest.importorskip("toppax.pruning")
  cfg = pruning.PruneConfig(layers=(5, 10, 15), keep_ratio=0.8, alignment=True)
  assert abs(model_gflops("vim_s", pruning=cfg) - 3.60) < 0.005
  cfg = pruning.PruneConfig(layers=(10,), keep_ratio=(0.8,), alignment=False)
  assert abs(model_gflops("vim_t", pruning=cfg) - 1.28) < 0.005


def test_keep_ratio_one_and_no_layers_are_dense():
  dense = model_gflops("vim_s")
  assert model_gflops("vim_s", pruning=prune((5, 10, 15), 1.0)) == pytest.approx(dense)
  assert model_gflops("vim_s", pruning=prune(())) == pytest.approx(dense)
  assert model_gflops("plainmamba_l2", pruning=prune((4,), 1.0)) == pytest.approx(
      model_gflops("plainmamba_l2"))


def test_alignment_costs_decay_over_pruned_positions():
  # Two state-sized FLOPs per pruned position per scan: 2 * E * N * (197 - L) in each block.
  plain = model_gflops("vim_t", pruning=prune((10,)))
  aligned = model_gflops("vim_t", pruning=prune((10,), alignment=True))
  assert aligned - plain == pytest.approx(14 * 2 * 384 * 16 * (197 - 157) / 1e9)


def test_per_layer_ratios_and_mapping_pruning():
  a = model_gflops("vim_s", pruning=prune((5, 10), (0.8, 0.5)))
  b = model_gflops("vim_s", pruning={"layers": (5, 10), "keep_ratio": [0.8, 0.5]})
  assert a == pytest.approx(b)
  tokens = [r["tokens"] for r in block_table("vim_s", pruning=prune((5, 10), (0.8, 0.5)))
            if r["kind"] == "block"]
  assert tokens[5] == 157 and tokens[10] == 79  # ceil(156 * 0.5) = 78 -> odd 79


def test_fused_token_adds_one_token():
  rows = block_table("vim_s", pruning=prune((5, 10, 15), fused_token=True))
  tokens = sorted({r["tokens"] for r in rows if r["kind"] == "block"}, reverse=True)
  # The fused token is prunable at the next stage, then a new one is appended:
  # 197 -> 157 + 1; ceil(157 * .8) = 126 -> 127 + 1; ceil(127 * .8) = 102 -> 103 + 1.
  assert tokens == [197, 158, 128, 104]
  assert model_gflops("vim_s", pruning=prune((5, 10, 15), fused_token=True)) > model_gflops(
      "vim_s", pruning=prune((5, 10, 15)))


def test_block_table_sums_to_total():
  for name in MODEL_NAMES:
    rows = block_table(name, pruning=prune((4, 8), 0.7, alignment=True))
    assert sum(r["gflops"] for r in rows) == pytest.approx(
        model_gflops(name, pruning=prune((4, 8), 0.7, alignment=True)))
    assert rows[-1]["kind"] == "head"
    for r in rows:
      if r["kind"] == "block":
        assert r["gflops"] == pytest.approx(
            r["linear_gflops"] + r["scan_gflops"] + r["align_gflops"])


@pytest.mark.parametrize("name", sorted(PLAINMAMBA_TOP_SCHEDULES))
def test_plainmamba_top_schedules_remove_41_6_percent(name):
  # ToP: alignment on, and its decay over pruned positions counted (as in the ViM table).
  layers, ratios = PLAINMAMBA_TOP_SCHEDULES[name]
  pruned = model_gflops(name, pruning=prune(layers, ratios, alignment=True))
  assert abs((1 - pruned / model_gflops(name)) - 0.416) < 0.01


def test_plainmamba_l3_schedule_gives_8_4():
  layers, ratios = PLAINMAMBA_TOP_SCHEDULES["plainmamba_l3"]
  assert round(model_gflops("plainmamba_l3", pruning=prune(layers, ratios, alignment=True)), 1) == 8.4


def test_plainmamba_tokens_no_cls():
  rows = block_table("plainmamba_l3", pruning=prune((8, 14, 20), 0.65))
  tokens = sorted({r["tokens"] for r in rows if r["kind"] == "block"}, reverse=True)
  assert tokens == [196, 128, 84, 55]  # ceil(196 * .65), ceil(128 * .65), ceil(84 * .65)


def test_plainmamba_dwconv_runs_on_full_grid():
  p = prune((8,), 0.5)
  full = model_gflops("plainmamba_l2", pruning=p)
  kept_only = model_gflops("plainmamba_l2", pruning=p, conv_full_grid=False)
  e = 2 * 384
  assert full - kept_only == pytest.approx(16 * e * 49 * (196 - 98) / 1e9)


def test_img_size_scales_tokens():
  rows = block_table("vim_s", img_size=384)
  assert rows[1]["tokens"] == 24 * 24 + 1
  assert model_gflops("plainmamba_l1", img_size=(224, 224)) == pytest.approx(
      model_gflops("plainmamba_l1"))


@pytest.mark.parametrize("kwargs,match", [
  (dict(pruning=prune((5,), 0.0)), "keep_ratio"),
  (dict(pruning=prune((5,), 1.5)), "keep_ratio"),
  (dict(pruning=prune((5,), -0.2)), "keep_ratio"),
  (dict(pruning=prune((25,))), "beyond the model depth"),
  (dict(pruning=prune((0,))), ">= 1"),
  (dict(pruning=prune((10, 5))), "increasing"),
  (dict(pruning=prune((5, 10), (0.8,))), "one per layer"),
  (dict(embedding_dim=3), "unknown override"),
])
def test_validation_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    model_gflops("vim_s", **kwargs)


def test_unknown_model_lists_names():
  with pytest.raises(ValueError) as err:
    model_gflops("vim_xl")
  for name in MODEL_NAMES:
    assert name in str(err.value)


def test_k_below_one_raises():
  with pytest.raises(ValueError, match="K="):
    kept_tokens(0, 0.5, has_cls=False)
  with pytest.raises(ValueError, match="K="):
    kept_tokens(0, 0.5)


def test_format_table_and_run(capsys):
  ml_collections = pytest.importorskip("ml_collections")
  text = format_table("vim_s", pruning=prune((5, 10, 15), alignment=True))
  assert "3.60" in text and "block 24" in text and "| head |" in text and "0.709" in text
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({"name": "vim_t"})
  config.pruning = ml_collections.ConfigDict(
      {"layers": (10,), "keep_ratio": 0.8, "alignment": True, "fused_token": False})
  out = flops.run(config)
  printed = capsys.readouterr().out
  assert "1.29" in printed and out.strip() == printed.strip()
  dense_cfg = ml_collections.ConfigDict({"model": {"name": "plainmamba_l3", "img_size": 224}})
  assert "14.43" in flops.run(dense_cfg)


def test_scan_constant_is_gu_estimate():
  assert flops.SCAN_FLOPS_PER_STATE == 9 and flops.GAP_FLOPS_PER_STATE == 2
  assert math.isclose(model_gflops("vim_s"), 5.0782, abs_tol=1e-4)


@pytest.mark.parametrize("name,img_size", [("vim_s", 0), ("vim_s", 8), ("plainmamba_l1", 0)])
def test_image_without_patch_tokens_is_refused(name, img_size):
  # --config.model.img_size=0 used to become 224, and 8 px at patch 16 gave a table of 0 tokens.
  with pytest.raises(ValueError, match="no patch tokens"):
    model_gflops(name, img_size)
  config = SimpleNamespace(model={"name": name, "img_size": img_size})
  with pytest.raises(ValueError, match="no patch tokens"):
    flops.run(config)


def test_command_line(capsys):
  flops.main(["vim_s", "--paper"])
  assert "3.60 GFLOPs" in capsys.readouterr().out
  flops.main(["plainmamba_l3", "--paper"])
  assert "8.42 GFLOPs" in capsys.readouterr().out
  flops.main(["vim_s", "--layers", "5,10,15", "--keep", "0.8", "--no-alignment"])
  assert "3.57 GFLOPs" in capsys.readouterr().out
  for argv in (["vim_xx"], ["vim_s", "--layers", "5", "--keep", "1.5"], ["vim_t", "--layers", "30"]):
    with pytest.raises(SystemExit):
      flops.main(argv)


# --- segmentation models ------------------------------------------------------------------------


def test_segmentation_flops_count_backbone_neck_and_heads_by_hand():
  """A small ViM UperNet at 64 px (grid 4x4, maps 16/8/4/2), counted by hand: the backbone as a
  cls-free classification backbone, fpn1 two 2x2 transposed convs (+ BN), fpn2 one, UPerHead's
  convs (+ BN), the classifier; the aux head apart (training only)."""
  kw = dict(depth=4, embed_dim=8, channels=4, aux_channels=3, out_indices=(0, 1, 2, 3),
            pool_scales=(1, 2), num_classes=5)
  rows = flops.block_table("upernet_vim_t", 64, **kw)
  d, c, k = 8, 4, 5
  backbone = sum(r["gflops"] for r in flops.backbone_rows("vim_t", 64, depth=4, embed_dim=8))
  neck = (16 * d * d * 4 + 64 * d + 64 * d * d * 4) + 16 * d * d * 4
  ppm = 1 * d * c + c + 4 * d * c + 4 * c
  bottleneck = 4 * 9 * (d + 2 * c) * c + 4 * c
  lateral = sum(hw * (d * c + c) for hw in (256, 64, 16))
  fpn = sum(hw * (9 * c * c + c) for hw in (256, 64, 16))
  fuse = 256 * (9 * 4 * c * c + c)
  cls = 256 * c * k
  want = backbone + (neck + ppm + bottleneck + lateral + fpn + fuse + cls) / 1e9
  assert flops.model_gflops("upernet_vim_t", 64, **kw) == pytest.approx(want, rel=1e-12)
  aux = [r for r in rows if r.get("train_only")]
  assert len(aux) == 1 and aux[0]["gflops"] == pytest.approx((16 * (9 * d * 3 + 3) + 16 * 3 * k)
                                                             / 1e9)
  assert flops.model_gflops("upernet_vim_t", 64, aux=True, **kw) == pytest.approx(
      want + aux[0]["gflops"])


def test_segmentation_flops_pruned_and_keep_all():
  from toppax.pruning import PruneConfig
  top = PruneConfig(layers=(5, 10, 15), keep_ratio=0.8)
  for name in ("upernet_vim_t", "upernet_plainmamba_l1"):
    dense = flops.model_gflops(name, 512)
    keep_all = PruneConfig(layers=(5,), keep_ratio=1.0, alignment=False)
    assert flops.model_gflops(name, 512, keep_all) == dense
    pruned = flops.model_gflops(name, 512, top)
    removal = flops.model_gflops(name, 512, PruneConfig(layers=(5, 10, 15), keep_ratio=0.8,
                                                        alignment=False))
    assert removal < pruned < dense
  table = flops.format_table("upernet_vim_t", 512, top)
  assert "| block 6 | 820 |" in table and "decode: fpn bottleneck + cls" in table
  assert "fewer FLOPs" in table and "training only" in table
  with pytest.raises(ValueError, match="square"):
    flops.model_gflops("upernet_vim_t", (512, 640))
