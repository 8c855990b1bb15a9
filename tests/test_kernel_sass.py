"""toppax.tools.kernel_sass: static SASS counts of the Triton scan kernels on a CPU machine
(the triton wheel compiles and disassembles them; no GPU)."""
import pytest

from toppax.tools import kernel_sass


def test_counts_both_kernels_and_sees_the_tile_loads():
  pytest.importorskip("triton")
  # N = 4 keeps the compiles short. bc_load "tile" reads B and C rows as vectors, so the
  # backward's only shuffles are its two reduce-scatters per step.
  rows = {(r["tuning"].get("bc_load", "shuffle"), r["kernel"]): r
          for t in ({}, {"bc_load": "tile"})
          for r in kernel_sass.analyse(t, "ViM-T", batch=2, states=4)}
  assert {k for _, k in rows} == {"selective_scan_fwd", "selective_scan_bwd_maxnreg168"}
  for r in rows.values():
    assert 0 < r["registers"] <= 255 and r["loop"] > 0 and r["steps_per_loop"] == 4
    assert r["per_step"] == pytest.approx(r["loop"] / 4, abs=0.1)
  shuffle = rows["shuffle", "selective_scan_bwd_maxnreg168"]
  tile = rows["tile", "selective_scan_bwd_maxnreg168"]
  # a reduce-scatter of 4 values over 32 lanes: 2 + 1 shuffles halving, 1 at each of the 3
  # levels left; two per step (dB, dC), 4 steps per loop
  assert tile["opcodes"]["SHFL"] == 2 * 6 * 4
  assert shuffle["opcodes"]["SHFL"] > tile["opcodes"]["SHFL"]
  assert shuffle["registers"] <= 168                 # the default backward register cap
  assert "FSEL" in tile["opcodes"] and "LDG" in tile["opcodes"]


@pytest.mark.parametrize("argv,message", [
    (["--tuning", "{bc_load: tile}"], "not JSON"),
    (["--tuning", "[1]"], "JSON object"),
    (["--tuning", '{"bc_loads": "tile"}'], "unknown keys"),
    (["--states", "0"], "positive")])
def test_bad_arguments_are_refused(argv, message, capsys):
  with pytest.raises(SystemExit):
    kernel_sass.main(argv)
  assert message in capsys.readouterr().err
