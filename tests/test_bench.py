"""``--mode=bench`` end to end on CPU at a tiny size: one process per measurement, the JSON and
the markdown table it writes, and train-only rows (``config.bench.infer=False``)."""
import json

import pytest

from configs import digits
from toppax.tools import bench


def _config(**bench_fields):
  c = digits.get_config("runlocal")
  c.bench.batch_sizes, c.bench.dtypes, c.bench.variants = (4,), ("float32",), ("dense", "top")
  c.bench.repeats, c.bench.warmup = 2, 1
  for k, v in bench_fields.items():
    c.bench[k] = v
  return c


def test_bench_inference_rows_table_and_files(tmp_path):
  result = bench.run(_config(train=False), str(tmp_path))
  rows = result["rows"]
  assert [r["variant"] for r in rows] == ["dense", "top"]
  for r in rows:
    assert r["infer_img_per_s"] > 0 and r["gflops"] > 0, r
    assert not any(k.startswith("train") for k in r)
  assert rows[1]["gflops"] < rows[0]["gflops"]
  saved = json.loads((tmp_path / "bench.json").read_text())
  assert saved["rows"] == rows and saved["commit"]
  md = (tmp_path / "bench.md").read_text()
  assert "| dense | float32 | 4 |" in md and "train img/s" not in md
  assert "x (" in md.splitlines()[4]   # the ToP row's speed-up beside its FLOPs ratio


def test_bench_train_only_rows(tmp_path):
  result = bench.run(_config(infer=False, variants=("dense",)), str(tmp_path))
  (row,) = result["rows"]
  assert not any(k.startswith("infer") for k in row) and row["train_img_per_s_1dev"] > 0
  md = bench.format_markdown(result)
  line = [l for l in md.splitlines() if l.startswith("| dense")][0]
  assert "train img/s (1 dev)" in md and "error" not in line


def test_bench_refuses_nothing_to_time():
  with pytest.raises(ValueError, match="nothing to time"):
    bench.run(_config(infer=False, train=False))
