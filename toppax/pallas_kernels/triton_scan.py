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

jax-triton keeps the kernels it builds in its process only. Where JAX's persistent compilation
cache is on (``jax_compilation_cache_dir``, a local folder), ``install_kernel_cache`` keeps them
on disk too, in its ``toppax_triton/`` subfolder, keyed by a SHA-256 of the kernel's Triton IR,
its compile options, the compute capability and the triton and jax-triton versions: a process
that loads its programs from the persistent cache (lowering still builds their kernels) or
shares the folder with others running the same kernels then reads the PTX instead of building
it again. An unreadable entry is built again and rewritten.

The interpreter path (CPU tests) hands the arrays to Triton's interpreter through
``jax.pure_callback``; the interpreter works on torch tensors, so it needs torch.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import os
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

from toppax.pallas_kernels.common import vary, varying_axes
from toppax.pallas_kernels.triton_kernels import KERNEL_NAMES, jit_kernel, python_kernel

log = logging.getLogger(__name__)

_cap_installed = None                   # None: not tried yet; then True / False
_cache_warned: set = set()              # kernel-cache folders already warned about
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


def install_kernel_cache(directory: str) -> bool:
  """Keeps the kernels jax-triton builds in ``directory`` (see the module docstring), by
  wrapping its ``compile_ttir_inplace``; True where it is in place. Where jax-triton keeps its
  compile step elsewhere, a warning is logged and kernels are built as before."""
  try:
    from jax_triton import triton_lib
    import triton
    import jax_triton
    build = triton_lib.compile_ttir_inplace
    result_type = triton_lib.CompilationResult
    fields = [f.name for f in dataclasses.fields(result_type)]
    if getattr(build, "toppax_cache", None) == directory:
      return True
    os.makedirs(directory, exist_ok=True)
  except (ImportError, AttributeError, TypeError, OSError) as e:
    if directory not in _cache_warned:
      _cache_warned.add(directory)
      log.warning("selective_scan: cannot keep jax-triton's kernels in %s (%s); they are built "
                  "in each process", directory, e)
    return False
  build = getattr(build, "toppax_builds", build)
  versions = (triton.__version__, getattr(jax_triton, "__version__", "?"))

  def cached(ttir, backend, options, compute_capability, platform):
    key = hashlib.sha256(json.dumps([str(ttir), repr(options), str(compute_capability),
                                     str(platform), versions]).encode()).hexdigest()
    path = os.path.join(directory, key + ".json")
    try:
      with open(path) as f:
        return result_type(**json.load(f))
    except (OSError, ValueError, TypeError):        # absent or unreadable: build it
      pass
    result = build(ttir, backend, options, compute_capability, platform)
    tmp = None
    try:                                            # written whole or not at all
      fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
      with os.fdopen(fd, "w") as f:
        json.dump({k: getattr(result, k) for k in fields}, f)
      os.replace(tmp, path)
    except (OSError, TypeError, ValueError) as e:
      log.warning("selective_scan: cannot write the Triton kernel cache in %s (%s)", directory, e)
      if tmp is not None and os.path.exists(tmp):
        os.remove(tmp)
    return result

  cached.toppax_builds, cached.toppax_cache = build, directory
  triton_lib.compile_ttir_inplace = cached
  return True


def _kernel_cache_dir() -> str | None:
  """``toppax_triton/`` in JAX's persistent compilation cache folder where that is on and local."""
  directory = jax.config.jax_compilation_cache_dir
  if not directory or "://" in directory:
    return None
  return os.path.join(directory, "toppax_triton")


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
    cache = _kernel_cache_dir()
    if cache is not None:
      install_kernel_cache(cache)
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
