"""Segmentation metrics against a hand count (mmseg's definitions)."""
import json
import math

import jax
import numpy as np
import pytest

from toppax.segmentation import metrics


def test_areas_and_metrics_match_a_hand_count(tmp_path):
  # 3 classes, ignore 255. Image 1 (2x4) and image 2 (1x4), counted together.
  label1 = np.array([[0, 0, 1, 255],
                     [1, 1, 2, 2]])
  pred1 = np.array([[0, 1, 1, 2],       # the 255 pixel's prediction (2) must not count
                    [1, 0, 2, 0]])
  label2 = np.array([[0, 255, 0, 0]])
  pred2 = np.array([[0, 0, 0, 7]])      # 7 is out of range: counts for no class
  step = jax.jit(metrics.intersect_and_union, static_argnums=(2, 3))
  acc = metrics.Accumulator(3)
  acc.add(step(pred1, label1, 3, 255))
  acc.add(step(pred2, label2, 3, 255))
  # Hand count over the 10 labelled pixels:
  #   class 0: label at (1,0,0),(1,0,1),(2,0,0),(2,0,2),(2,0,3) = 5; pred among labelled pixels
  #            (1,0,0),(1,1,1),(1,1,3),(2,0,0),(2,0,2) = 5; intersect (1,0,0),(2,0,0),(2,0,2) = 3
  #   class 1: label (1,0,2),(1,1,0),(1,1,1) = 3; pred (1,0,1),(1,0,2),(1,1,0) = 3; inter 2
  #   class 2: label (1,1,2),(1,1,3) = 2; pred (1,1,2) = 1; inter 1
  np.testing.assert_array_equal(acc.areas, [[3, 2, 1], [7, 4, 2], [5, 3, 1], [5, 3, 2]])
  s = acc.summary(["a", "b", "c"])
  assert s["aAcc"] == pytest.approx(6 / 10)
  np.testing.assert_allclose(s["IoU"], [3 / 7, 2 / 4, 1 / 2])
  np.testing.assert_allclose(s["Acc"], [3 / 5, 2 / 3, 1 / 2])
  assert s["mIoU"] == pytest.approx((3 / 7 + 1 / 2 + 1 / 2) / 3)
  assert s["mAcc"] == pytest.approx((3 / 5 + 2 / 3 + 1 / 2) / 3)
  table = metrics.format_table(s)
  assert "| b     |  50.00 |  66.67 |" in table and "|  60.00 |  47.62 |  58.89 |" in table
  out = json.load(open(metrics.write_json(s, str(tmp_path / "m.json"), step=3)))
  assert out["step"] == 3 and out["areas"]["union"] == [7, 4, 2]


def test_absent_classes_are_left_out_of_the_means():
  # Class 2 appears in neither labels nor predictions: IoU and Acc NaN, means over 0 and 1.
  areas = metrics.intersect_and_union(np.array([0, 1, 1]), np.array([0, 1, 0]), 3)
  s = metrics.summarize(areas)
  assert math.isnan(s["IoU"][2]) and math.isnan(s["Acc"][2])
  assert s["mIoU"] == pytest.approx((1 / 2 + 1 / 2) / 2)
  assert s["mAcc"] == pytest.approx((1 / 2 + 1) / 2)
  assert "nan" in metrics.format_table(s)
