"""toppax.tools.kernel_sass: static SASS counts of the Triton scan kernels on a CPU machine
(the triton wheel compiles and disassembles them; no GPU)."""
import pytest

from toppax.tools import kernel_sass


def test_counts_both_kernels_and_their_loops():
  pytest.importorskip("triton")
  # N = 4 keeps the compiles short; the main loop walks one checkpoint interval.
  rows = {(r["tuning"].get("ckpt_every", 4), r["kernel"]): r
          for t in ({}, {"ckpt_every": 2})
          for r in kernel_sass.analyse(t, "ViM-T", batch=2, states=4)}
  assert {k for _, k in rows} == {"selective_scan_fwd", "selective_scan_bwd_maxnreg168"}
  for (every, _), r in rows.items():
    assert 0 < r["registers"] <= 255 and r["loop"] > 0 and r["steps_per_loop"] == every
    assert r["per_step"] == pytest.approx(r["loop"] / every, abs=0.1)
  backward = rows[4, "selective_scan_bwd_maxnreg168"]
  assert backward["registers"] <= 168                  # the default backward register cap
  # Two reduce-scatters per step (dB, dC) of 4 values over 32 lanes, 6 shuffles each (2 + 1
  # halving, then 1 at each of the 3 levels left), and B_t, C_t handed out by shfl.idx.
  assert backward["opcodes"]["SHFL"] > 2 * 6 * 4
  assert "SHFL" not in rows[4, "selective_scan_fwd"]["opcodes"]   # the forward crosses no lanes


@pytest.mark.parametrize("argv,message", [
    (["--tuning", "{ckpt_every: 2}"], "not JSON"),
    (["--tuning", "[1]"], "JSON object"),
    (["--tuning", '{"ckpt_evry": 2}'], "unknown key"),
    (["--tuning", '{"bwd_maxnreg": 300}'], "bwd_maxnreg"),
    (["--states", "0"], "positive")])
def test_bad_arguments_are_refused(argv, message, capsys):
  with pytest.raises(SystemExit):
    kernel_sass.main(argv)
  assert message in capsys.readouterr().err
