"""``--mode=bench`` on CPU at a tiny size: the measurements in their own processes (inference
and train step, with the first call's compilation stages), the rows, files and table it writes,
train-only rows (``config.bench.infer=False``)."""
import json

import jax
import jax.numpy as jnp
import pytest

from configs import digits
from toppax.timing import compile_stages
from toppax.tools import bench


def _config(**bench_fields):
  c = digits.get_config("runlocal")
  c.bench.batch_sizes, c.bench.dtypes, c.bench.variants = (4,), ("float32",), ("dense",)
  c.bench.repeats, c.bench.warmup = 2, 1
  for k, v in bench_fields.items():
    c.bench[k] = v
  return c


def test_bench_measures_in_subprocesses_and_writes_files(tmp_path):
  result = bench.run(_config(), str(tmp_path))
  (row,) = result["rows"]
  assert row["infer_img_per_s"] > 0 and row["train_img_per_s_1dev"] > 0 and row["gflops"] > 0
  for first, stages in ((row["infer_first_call_s"], row["infer_first_call_stages"]),
                        (row["train_first_step_s_1dev"], row["train_first_step_stages_1dev"])):
    # A fresh process compiles on its first call; the stages fit inside that call's time.
    assert stages["lower_s"] > 0 and stages["compile_s"] > 0
    assert sum(stages.values()) <= first
  saved = json.loads((tmp_path / "bench.json").read_text())
  assert saved["rows"] == result["rows"] and saved["commit"]
  md = (tmp_path / "bench.md").read_text()
  assert "| dense | float32 | 4 |" in md and "train img/s (1 dev)" in md


def _fake_job(calls):
  def run_job(config, job):
    calls.append(job)
    ips = {"dense": 100.0, "top": 150.0}[job["variant"]]
    return {"img_per_s": ips if job["kind"] == "infer" else ips / 4, "first_call_s": 3.0,
            "peak_bytes": 2**30, "first_call_stages": {"trace_s": 0.5, "lower_s": 1.0,
                                                       "compile_s": 1.5}}
  return run_job


def test_bench_rows_and_table(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(bench, "_run_job", _fake_job(calls))
  result = bench.run(_config(variants=("dense", "top")), str(tmp_path))
  assert [(j["kind"], j["variant"]) for j in calls] == [
      ("infer", "dense"), ("train", "dense"), ("infer", "top"), ("train", "top")]
  dense, top = result["rows"]
  assert top["gflops"] < dense["gflops"]
  line = [l for l in bench.format_markdown(result).splitlines() if l.startswith("| top")][0]
  assert "| 1.50x (" in line and "| 3.0 (1.0 + 1.5) |" in line and "| 37.5 | 1.0 |" in line


def test_bench_train_only_rows(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(bench, "_run_job", _fake_job(calls))
  result = bench.run(_config(infer=False), str(tmp_path))
  assert [j["kind"] for j in calls] == ["train"]
  (row,) = result["rows"]
  assert not any(k.startswith("infer") for k in row)
  md = bench.format_markdown(result)
  line = [l for l in md.splitlines() if l.startswith("| dense")][0]
  assert "train img/s (1 dev)" in md and "error" not in line and "| 25.0 |" in line


def test_bench_refuses_nothing_to_time():
  with pytest.raises(ValueError, match="nothing to time"):
    bench.run(_config(infer=False, train=False))


def test_compile_stages_sum_each_compilation_in_the_block():
  with compile_stages() as st:
    jax.block_until_ready(jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(7)))
  assert st["trace_s"] > 0 and st["lower_s"] > 0 and st["compile_s"] > 0
  with compile_stages() as again:
    f = jax.jit(jnp.cos)
    f(jnp.ones(3))
    first = dict(again)
    f(jnp.ones(3))   # cached: no new stage time
  assert again == first and first["compile_s"] > 0
