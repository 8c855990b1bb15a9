"""toppax.tools.kernel_sass: static SASS counts of the GPU scan kernels (the Triton kernels and
the Pallas-Triton ones) on a CPU machine (the triton wheel compiles and disassembles them; no
GPU)."""
import pytest

from toppax.tools import kernel_sass


@pytest.mark.parametrize("kernels,fwd,bwd", [
    ("triton", "selective_scan_triton_fwd", "selective_scan_triton_bwd"),
    ("pallas_triton", "selective_scan_fwd", "selective_scan_bwd_maxnreg168")])
def test_counts_both_kernels_and_their_loops(kernels, fwd, bwd):
  pytest.importorskip("triton")
  # N = 4 keeps the compiles short; the main loop walks one checkpoint interval.
  rows = {(r["tuning"].get("ckpt_every", 4), r["kernel"]): r
          for t in ({}, {"ckpt_every": 2})
          for r in kernel_sass.analyse(t, "ViM-T", batch=2, states=4, kernels=kernels)}
  assert {k for _, k in rows} == {fwd, bwd}
  for (every, _), r in rows.items():
    assert 0 < r["registers"] <= 255 and r["loop"] > 0 and r["steps_per_loop"] == every
    assert r["per_step"] == pytest.approx(r["loop"] / every, abs=0.1)
    assert r["kernels"] == kernels
    # The Triton kernels are compiled from an empty cache, so their compile time is real.
    assert (r["compile_s"] > 0) if kernels == "triton" else ("compile_s" not in r)
  backward = rows[4, bwd]
  assert backward["registers"] <= 168                  # the default backward register cap
  # Two reduce-scatters per step (dB, dC) of 4 values over 32 lanes, 6 shuffles each (2 + 1
  # halving, then 1 at each of the 3 levels left), and B_t, C_t handed out by shfl.idx.
  assert backward["opcodes"]["SHFL"] > 2 * 6 * 4
  assert "SHFL" not in rows[4, fwd]["opcodes"]         # the forward crosses no lanes


@pytest.mark.parametrize("argv,message", [
    (["--tuning", "{ckpt_every: 2}"], "not JSON"),
    (["--tuning", "[1]"], "JSON object"),
    (["--tuning", '{"ckpt_evry": 2}'], "unknown key"),
    (["--tuning", '{"bwd_maxnreg": 300}'], "bwd_maxnreg"),
    (["--states", "0"], "positive"),
    (["--length", "0"], "positive"),
    (["--kernels", "mosaic"], "--kernels")])
def test_bad_arguments_are_refused(argv, message, capsys):
  with pytest.raises(SystemExit):
    kernel_sass.main(argv)
  assert message in capsys.readouterr().err
