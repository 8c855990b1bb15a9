"""Pallas kernels for the selective scan (DESIGN §3), registered with ``toppax.ssm.ops``.

``"pallas_gpu"``: Triton-lowered Pallas training kernels (``gpu_scan``) and, on sm_90+ GPUs, the
Mosaic GPU inference forward (``mgpu_scan``); ``"pallas_tpu"``: Mosaic TPU kernels
(``tpu_scan``). Both run anywhere with ``interpret=True``; on their own backend a kernel
that fails to lower or compile falls back to ``"xla"`` with a warning (``common.make_impl``).
Importing this module only registers loaders: Pallas itself is imported on first use.
"""
from toppax.ssm import ops


def _gpu():
  from toppax.pallas_kernels import common, gpu_scan, mgpu_scan
  # Tuning keys of both GPU kernels, and fwd_backend ("mosaic" or "triton" inference forward).
  keys = {*gpu_scan.DEFAULT_TUNING, *mgpu_scan.DEFAULT_TUNING, "fwd_backend"}
  return common.make_impl("gpu", ("gpu", "cuda"), gpu_scan.DEFAULT_TUNING, keys)


def _tpu():
  from toppax.pallas_kernels import common, tpu_scan
  return common.make_impl("tpu", ("tpu",), tpu_scan.DEFAULT_TUNING, set(tpu_scan.DEFAULT_TUNING))


ops.register("pallas_gpu", _gpu, platforms=("gpu", "cuda"))
ops.register("pallas_tpu", _tpu, platforms=("tpu",))
