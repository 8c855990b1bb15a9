"""Pallas kernels for the selective scan; ``toppax.ssm`` registers and dispatches to them.

- ``gpu_scan``: ``"pallas_gpu"``: prepares a call and launches the Triton kernels
  (``triton_kernels``, written with ``triton_src``, called through jax-triton by
  ``triton_scan``), the Mosaic GPU inference forward (``mgpu_scan``), or the same kernels as
  Triton-lowered Pallas (``pallas_triton_scan``, ``gpu_kernels``, with inline PTX from ``ptx``
  and the register cap of ``register_cap``).
- ``tpu_scan``: ``"pallas_tpu"``, Mosaic TPU kernels.
- ``tuning``: the knobs a user may set (``GpuTuning``, ``TpuTuning``).
- ``scan_call``: the ``custom_vjp`` over a forward and backward launcher, and the check that
  the kernels build for a call.
- ``common``: maths and typing helpers shared with ``toppax.ssm``.

Nothing here imports ``toppax.ssm``, and importing this package loads no kernel: each kernel
module imports Pallas (or Triton) when ``toppax.ssm`` first asks for it. docs/kernels.md describes the
kernels.
"""
