"""The train-step profile's summary of a trace: kernels by category, busy and idle time."""
from toppax.tools import profile_step


def _trace(events):
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
  return {"traceEvents": meta + events}


def test_categories_busy_and_idle():
  events = [
      {"ph": "X", "pid": 1, "name": "selective_scan_bwd_maxnreg168", "ts": 0, "dur": 400},
      {"ph": "X", "pid": 1, "name": "sm90_xmma_gemm_bf16bf16", "ts": 400, "dur": 200},
      {"ph": "X", "pid": 1, "name": "loop_add_fusion", "ts": 500, "dur": 200},   # overlaps
      {"ph": "X", "pid": 1, "name": "copy_transpose", "ts": 900, "dur": 100},
      {"ph": "X", "pid": 2, "name": "host work", "ts": 0, "dur": 5000},         # not the device
  ]
  kernels = profile_step.device_kernels(_trace(events))
  assert len(kernels) == 4
  s = profile_step.summarize(kernels, steps=2, wall_s=0.002)
  ms = s["kernel_ms_per_step"]
  assert ms["selective scan"] == 0.2 and ms["matmul / conv"] == 0.1
  assert ms["copies / transposes"] == 0.05 and ms["elementwise / reductions (fusions)"] == 0.1
  # Busy: [0, 700] and [900, 1000] = 800 us over 2 steps; wall 1 ms per step.
  assert s["busy_ms_per_step"] == 0.4 and abs(s["idle_ms_per_step"] - 0.6) < 1e-9
