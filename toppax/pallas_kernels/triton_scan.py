"""Runs the Triton scan kernels (``triton_kernels``) from JAX: through jax-triton on a GPU, and
through Triton's interpreter on the host with ``interpret=True``.

jax-triton compiles a kernel with the ``triton`` package when XLA lowers the call (custom call
``triton_kernel_call``, which jaxlib's CUDA plugin runs: ``jax._src.lib.gpu_triton``). Its
``triton_call`` takes no register option, and the backward runs fastest under a cap of 168
registers (12 one-warp programs per SM instead of 8). Triton's CUDA backend reads the cap from
its options (``maxnreg``, which it turns into PTX ``.maxnreg``), so ``install_register_cap``
registers, once, a lowering of jax-triton's primitive that wraps jax-triton's own: for a kernel
whose ``toppax_maxnreg`` is set, the backend it compiles with adds ``maxnreg`` to the options it
parses. Every other kernel lowers exactly as before. Where jax-triton or Triton keep these
elsewhere, a warning is logged and the kernels compile without a cap (same results, ptxas'
register count).

The interpreter path (CPU tests) hands the arrays to Triton's interpreter through
``jax.pure_callback``; the interpreter works on torch tensors, so it needs torch.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np

from toppax.pallas_kernels.common import vary, varying_axes
from toppax.pallas_kernels.triton_kernels import KERNEL_NAMES, jit_kernel, python_kernel

log = logging.getLogger(__name__)

_cap_installed = None                   # None: not tried yet; then True / False
# Triton's interpreter keeps the program id in module state and rewrites kernels' ASTs: one run
# at a time (devices of a shard_map call their callbacks from several threads).
_interpreter_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _load():
  """(jax_triton module, None) or (None, why it cannot run here)."""
  try:
    import jax_triton
  except ImportError as e:              # not installed, or this jaxlib has no GPU Triton runtime
    return None, f"jax-triton is not usable here ({e})"
  return jax_triton, None


def unavailable() -> str | None:
  """None if jax-triton can launch the kernels here, else why not."""
  return _load()[1]


def interpreter_unavailable() -> str | None:
  """None if Triton's interpreter can run the kernels here (it needs triton and torch)."""
  try:
    import torch  # noqa: F401
    import triton  # noqa: F401
  except ImportError as e:
    return f"Triton's interpreter is not usable here ({e})"
  return None


def cap_installed():
  """Whether the register-cap lowering is in place (None before the first capped kernel)."""
  return _cap_installed


def install_register_cap():
  """Registers (once) the wrapper of jax-triton's CUDA lowering that applies a kernel's
  ``toppax_maxnreg``; logs a warning and leaves kernels uncapped where it cannot."""
  global _cap_installed
  if _cap_installed is not None:
    return _cap_installed
  try:
    from jax.interpreters import mlir
    from jax_triton import triton_lib
    import triton.backends.nvidia.compiler as nvidia
    lower = triton_lib.triton_kernel_call_lowering
    backend = triton_lib.get_cuda_backend
    if next(iter(inspect.signature(lower).parameters)) != "backend_init_func":
      raise AttributeError("triton_kernel_call_lowering does not take a backend first")
    if "maxnreg" not in {f.name for f in dataclasses.fields(nvidia.CUDAOptions)}:
      raise AttributeError("CUDAOptions has no maxnreg")
  except (ImportError, AttributeError, StopIteration) as e:
    log.warning("selective_scan: cannot cap the Triton kernels' registers with this jax-triton "
                "(%s); they compile without a register cap", e)
    _cap_installed = False
    return False

  def capped_backend(cap, *args):
    b = backend(*args)
    parse = b.parse_options
    b.parse_options = lambda opts: parse({**opts, "maxnreg": cap})
    return b

  def lowering(ctx, *args, fn, **params):
    cap = getattr(fn, "toppax_maxnreg", None)
    init = backend if cap is None else functools.partial(capped_backend, cap)
    return lower(init, ctx, *args, fn=fn, **params)

  mlir.register_lowering(triton_lib.triton_kernel_call_p, lowering, platform="cuda")
  _cap_installed = True
  return True


def call(st, inputs, out_shapes, num_warps):
  """The outputs (ShapeDtypeStructs ``out_shapes``) of the kernel ``st`` over ``inputs`` on the
  grid (state groups, blocks of D, batch)."""
  grid = (st.groups, -(-st.dim // st.block_d), st.batch)
  if st.interpret:
    outs = _interpret(st, grid, inputs, out_shapes)
  else:
    jt, why = _load()
    if jt is None:
      raise RuntimeError(f"the Triton scan kernels need jax-triton on a GPU: {why}; "
                         "pip install 'jax-triton>=0.3.1' (toppax[gpu])")
    if st.maxnreg is not None:
      install_register_cap()
    # jax-triton has no batching rule: under jax.vmap the calls run one after another.
    @jax.custom_batching.sequential_vmap
    def launch(*xs):
      return tuple(jt.triton_call(*xs, kernel=jit_kernel(st), out_shape=list(out_shapes),
                                  grid=grid, num_warps=num_warps, num_stages=1,
                                  name=KERNEL_NAMES[st.kind], enable_fp_fusion=True))
    outs = launch(*inputs)
  # jax-triton's outputs carry no varying mesh axes; inside a checked shard_map they vary as
  # the inputs do (scan_call.varying_like made every input vary alike).
  axes = varying_axes(*inputs)
  return [vary(o, axes) for o in outs] if axes else list(outs)


def _interpret(st, grid, inputs, out_shapes):
  import torch
  from triton.runtime.interpreter import InterpretedFunction

  def to_torch(a):
    a = np.ascontiguousarray(a)
    if a.dtype == jnp.bfloat16:          # torch cannot read numpy's bfloat16: share its bits
      return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())

  def to_numpy(t, dtype):
    if dtype == jnp.bfloat16:
      return t.view(torch.int16).numpy().view(jnp.bfloat16)
    return t.numpy()

  def host(*arrays):
    kernel = InterpretedFunction(python_kernel(st))
    ins = [to_torch(a) for a in arrays]
    # NaN everywhere first, so that an element the kernel does not write shows in the tests.
    outs = [to_torch(np.full(s.shape, np.nan, s.dtype)) for s in out_shapes]
    with _interpreter_lock:
      kernel[grid](*ins, *outs)
    return tuple(to_numpy(o, s.dtype) for o, s in zip(outs, out_shapes))

  structs = tuple(jax.ShapeDtypeStruct(s.shape, s.dtype) for s in out_shapes)
  return jax.pure_callback(host, structs, *inputs, vmap_method="sequential")
