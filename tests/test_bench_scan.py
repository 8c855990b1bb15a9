"""toppax.tools.bench_scan end to end on CPU at a tiny size: the table, the accuracy and the
per-kernel breakdown it writes (what docs/benchmarks.md quotes from GPU runs)."""
import json

import jax
import jax.numpy as jnp
import pytest

from toppax.tools import bench_scan


def test_bench_scan_writes_table_accuracy_and_breakdown(tmp_path):
  bench_scan.main(["--impl", "xla", "--shapes", "ViM-T", "--dtypes", "float32", "--batch", "2",
                   "--length", "12", "--copy-mib", "8", "--slow-shapes", "", "--breakdown",
                   "--out", str(tmp_path)])
  r = json.loads((tmp_path / "bench_scan.json").read_text())
  assert r["copy_GBps"] > 0 and r["versions"]["backend"] == jax.default_backend()
  rows = {(w["mode"], w["impl"]): w for w in r["rows"]}
  assert set(rows) == {("fwd", "xla"), ("fwd", "reference"), ("fwd+bwd", "xla")}
  assert all(w["ms"] > 0 and w["x_floor"] > 0 for w in rows.values())
  assert rows[("fwd", "xla")]["speedup_vs_assoc"] == 1.0
  errs = r["accuracy"]["xla/float32"]["errors"]
  assert set(errs) == {"y"} | {"d" + k for k in bench_scan.KEYS}
  assert max(errs.values()) < 1e-5
  for mode in ("fwd", "fwd+bwd"):
    b = r["breakdown"][f"ViM-T/float32/{mode}"]
    assert b["source"] in ("device streams", "device XLA ops", "host XLA thunks")
    times = [k["us_per_call"] for k in b["kernels"]]
    assert times and min(times) >= 0 and sum(times) > 0
    assert times == sorted(times, reverse=True)
  md = (tmp_path / "bench_scan.md").read_text()
  assert "| ViM-T (D=384) | float32 | fwd+bwd | xla |" in md
  assert "Kernels of xla, ViM-T/float32/fwd+bwd" in md


def test_kernel_breakdown_names_the_work():
  x = jnp.linspace(0.0, 1.0, 1 << 16)
  rows, source = bench_scan.kernel_breakdown(jax.jit(lambda a: jnp.sin(a) * jnp.exp(a)), x,
                                             calls=5)
  assert source is not None and rows
  name, us, launches = rows[0]
  assert us > 0 and launches > 0 and isinstance(name, str)


def test_bench_scan_refuses_what_would_mislabel_or_crash(capsys):
  other = "pallas_tpu" if jax.default_backend() != "tpu" else "pallas_gpu"
  cases = [(["--impl", other], "fall back to xla"), (["--impl", "nope"], "unknown"),
           (["--impl", "xla", "--shapes", "ViM-X"], "unknown shape"),
           (["--impl", "xla", "--slow-shapes", "ViM-Q"], "unknown shape"),
           (["--impl", "xla", "--dtypes", "float33"], "float33"),
           (["--impl", "xla", "--batch", "0"], "positive"),
           (["--impl", "xla", "--tunings", "{triton: {}}"], "not JSON"),
           (["--impl", "xla", "--tunings", '{"triton": 1}'], "label"),
           (["--impl", "xla", "--tunings", '{"triton": {}}'], "applies to --impl pallas_gpu")]
  for argv, message in cases:
    with pytest.raises(SystemExit) as e:
      bench_scan.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err, argv
