"""Static instruction counts of the GPU scan kernels, without a GPU.

  python -m toppax.tools.kernel_sass                      # ViM-S, fp32, the default GpuTuning
  python -m toppax.tools.kernel_sass --tuning '{"ckpt_every": 2}' --sweep --out /tmp/sass
  python -m toppax.tools.kernel_sass --kernels triton,pallas_triton   # both kernel sets

Compiles the training forward and the backward of ``pallas_gpu`` for an sm_90 target with the
``triton`` package and disassembles them with the ``cuobjdump`` that the triton wheel ships.
The Triton kernels (``--kernels triton``, the default) are compiled from their source as
jax-triton compiles them (FP fusion on, one stage, the register cap as Triton's ``maxnreg``);
the Pallas-Triton kernels (``pallas_triton``) from the Triton IR that Pallas hands to XLA, taken
from a CUDA export of the forward+backward (as the CPU tests do), with FP fusion off as XLA
compiles them. It prints, per kernel: registers, stack bytes (register spills), the SASS
instructions of the kernel and of its main loop (the largest backward branch), those per scan
step (the loop walks ``ckpt_every`` steps), spill instructions (LDL/STL) and the most frequent
opcodes, and for the Triton kernels the seconds ``triton.compile`` takes on this host (an empty
Triton cache each time): a model compiles one such pair per scan shape and direction, so pruning
(one shape per segment) multiplies it. ``--sweep`` does this for ``bench_scan.BWD_VARIANTS``.

Use it to compare variants with each other before a GPU is at hand, and to check that a change
to the kernels' code leaves their SASS as it was. It does not predict time: occupancy, latency
and the spills' memory traffic are not modelled, and variants with fewer instructions have
measured no faster (docs/benchmarks.md); timings come only from ``bench_scan`` on a GPU. XLA
compiles the Pallas-Triton kernels with its own Triton build and with floating-point contraction
off (their FFMAs come from explicit ``fma.rn``, ``ptx.FastMath.fma``). Needs ``pip install
triton`` (CPU wheels carry the compiler and ptxas; no GPU or CUDA toolkit).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
from jax import export
import jax.numpy as jnp

from toppax.pallas_kernels import gpu_scan, register_cap, scan_call, triton_kernels
from toppax.pallas_kernels.tuning import GpuTuning
from toppax.ssm import ops

SHAPES = {"ViM-T": 384, "ViM-S": 768, "ViM-B": 1536}
_TRITON_CALLS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")


def _triton():
  try:
    import triton
    from triton.backends.compiler import GPUTarget
  except ImportError as e:
    raise SystemExit(f"kernel_sass needs the triton package ({e}); pip install triton "
                     "(its CPU wheel carries the compiler and ptxas)") from e
  bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
  return triton, GPUTarget, bin_dir


@contextlib.contextmanager
def _captured_triton_ir():
  """Collects {kernel name: Triton IR text} of the Pallas kernels lowered inside the block."""
  from jax._src.pallas.triton import lowering
  register_cap.install()               # the cap wrapper first, so it stays underneath
  original = lowering.lower_jaxpr_to_triton_module
  modules = {}

  def capture(jaxpr, *args, **kwargs):
    result = original(jaxpr, *args, **kwargs)
    modules[getattr(jaxpr.debug_info, "func_name", "kernel")] = str(result.module)
    return result

  lowering.lower_jaxpr_to_triton_module = capture
  try:
    yield modules
  finally:
    lowering.lower_jaxpr_to_triton_module = original


def gpu_target():
  """On a machine without a GPU, jax 0.11's Triton lowering needs an abstract GPU device to
  know what it compiles for (jax 0.10 assumed one): an H100 here (also used by the tests)."""
  abstract_device = getattr(jax.sharding, "AbstractDevice", None)
  if abstract_device is None or jax.default_backend() == "gpu":
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(
      (1,), ("x",), abstract_device=abstract_device(device_kind="NVIDIA H100", num_cores=132,
                                                   platform="gpu")))


def triton_ir(tuning, dim=768, batch=128, length=197, n=16, dtype=jnp.float32, with_z=True):
  """Triton IR of the Pallas-Triton training forward and backward at one scan shape (ViM's
  options)."""
  tuning = dataclasses.replace(GpuTuning.of(tuning, "pallas_gpu"), kernels="pallas_triton")
  fn = ops.get_implementation("pallas_gpu")

  def grad(u, delta, A, B, C, D, z, bias):
    def loss(*a):
      return jnp.sum(fn(*a, delta_softplus=True, reverse=False, gaps=None, gap_delta=None,
                        interpret=False, check_lowering=False, tuning=tuning).astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=tuple(range(8)))(u, delta, A, B, C, D, z, bias)

  S = jax.ShapeDtypeStruct
  seq = S((batch, length, dim), dtype)
  args = [seq, seq, S((dim, n), jnp.float32), S((batch, length, n), dtype),
          S((batch, length, n), dtype), S((dim,), jnp.float32), seq if with_z else None,
          S((dim,), jnp.float32)]
  disabled = [export.DisabledSafetyCheck.custom_call(t) for t in _TRITON_CALLS]
  with _captured_triton_ir() as modules, gpu_target():
    export.export(jax.jit(grad), platforms=["cuda"], disabled_checks=disabled)(*args)
  return dict(modules)


def _loop(sass):
  """The instructions of the largest loop (a backward branch's body) of a SASS listing."""
  ins = [(int(m.group(1), 16), m.group(2).strip())
         for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
  best = []
  for addr, text in ins:
    m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
    if m and int(m.group(1), 16) <= addr:
      body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
      best = body if len(body) > len(best) else best
  return ins, best


def _opcode(text):
  return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def compile_pallas_ir(ir, num_warps, arch=90):
  """A Pallas kernel's Triton IR compiled for sm_<arch> (``triton.compile``'s kernel)."""
  triton, GPUTarget, _ = _triton()
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "kernel.ttir")
    with open(path, "w") as f:
      f.write(ir)
    # FP fusion off, as XLA compiles these kernels: with it off, this compile of the backward
    # has the SASS instruction count that Nsight Compute lists for XLA's build on an H100.
    return triton.compile(path, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=1,
                                       enable_fp_fusion=False))


def compile_triton_kernel(st, dtype, num_warps, arch=90):
  """A Triton kernel (``triton_kernels.Static``) compiled for sm_<arch> with jax-triton's
  options: 16-byte aligned pointers, one stage, FP fusion on, ``maxnreg`` the kernel's cap."""
  triton, GPUTarget, _ = _triton()
  from triton.compiler import ASTSource
  fn = triton_kernels.jit_kernel(st)
  seq = {"bfloat16": "*bf16", "float32": "*fp32"}[jnp.dtype(dtype).name]
  signature = {}
  for name in fn.arg_names:
    if name in ("u", "delta", "z", "B", "C", "dy"):
      signature[name] = seq
    elif name in ("y", "du", "ddelta", "dz"):
      signature[name] = seq if st.groups == 1 else "*fp32"
    else:
      signature[name] = "*fp32"
  attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(signature))}
  options = dict(num_warps=num_warps, num_stages=1, enable_fp_fusion=True)
  if st.maxnreg is not None:
    options["maxnreg"] = st.maxnreg
  return triton.compile(ASTSource(fn, signature, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                        options=options)


def count(name, kernel, steps_per_iteration, workdir=None):
  """Registers, spills and instruction counts of one compiled kernel (``compile_*``)."""
  _, _, bin_dir = _triton()
  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    cubin = os.path.join(tmp, f"{name}.cubin")
    with open(cubin, "wb") as f:
      f.write(kernel.asm["cubin"])
    dump = lambda *a: subprocess.run([os.path.join(bin_dir, "cuobjdump"), *a, cubin],
                                     capture_output=True, text=True, check=True).stdout
    usage, sass = dump("--dump-resource-usage"), dump("-sass")
  regs, stack = (int(x) for x in re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
  ins, loop = _loop(sass)
  ops_ = collections.Counter(_opcode(t) for t in loop)
  return dict(kernel=name, registers=regs, stack_bytes=stack, instructions=len(ins),
              loop=len(loop), steps_per_loop=steps_per_iteration,
              per_step=round(len(loop) / steps_per_iteration, 1),
              spill_ops=ops_["LDL"] + ops_["STL"], opcodes=dict(ops_.most_common(16)))


def triton_statics(tuning, dim=768, batch=128, length=197, n=16, dtype=jnp.float32):
  """The Triton kernels' static configurations (training forward, backward) at one scan shape
  with ViM's options (D, z, delta_bias, softplus, no gaps)."""
  S = jax.ShapeDtypeStruct
  seq = S((batch, length, dim), dtype)
  args = scan_call.ScanArgs(seq, seq, S((dim, n), jnp.float32), S((batch, length, n), dtype),
                            S((batch, length, n), dtype), S((dim,), jnp.float32), seq,
                            S((dim,), jnp.float32), None)
  cfg = scan_call.ScanConfig(delta_softplus=True, reverse=False, gap_delta=None, has_z=True,
                             interpret=False, tuning=tuning)
  return [gpu_scan.forward_static(cfg, args, True), gpu_scan.backward_static(cfg, args)]


@contextlib.contextmanager
def _fresh_triton_cache():
  """An empty Triton cache for the block, so that a compilation is timed, not a cache hit."""
  old = os.environ.get("TRITON_CACHE_DIR")
  with tempfile.TemporaryDirectory() as tmp:
    os.environ["TRITON_CACHE_DIR"] = tmp
    try:
      yield
    finally:
      if old is None:
        os.environ.pop("TRITON_CACHE_DIR", None)
      else:
        os.environ["TRITON_CACHE_DIR"] = old


def analyse(tuning=None, shape="ViM-S", batch=128, dtype="float32", arch=90, states=16,
            kernels="triton", length=197):
  """``count`` of both kernels at one ViM scan shape (and, for the Triton kernels, the
  seconds ``triton.compile`` takes for each on this host: ``compile_s``); ``tuning``: a dict
  of GpuTuning fields; ``kernels``: "triton" or "pallas_triton"."""
  full = GpuTuning.of(dict(tuning or {}, kernels=kernels), "pallas_gpu")
  dim = SHAPES[shape]
  rows = []
  if kernels == "triton":
    for st in triton_statics(full, dim=dim, batch=batch, length=length, n=states,
                             dtype=jnp.dtype(dtype)):
      warps = st.warps if st.kind == "bwd" else full.num_warps
      with _fresh_triton_cache():
        t = time.perf_counter()
        kernel = compile_triton_kernel(st, dtype, warps, arch)
        seconds = time.perf_counter() - t
      rows.append(dict(count(triton_kernels.KERNEL_NAMES[st.kind], kernel, full.ckpt_every),
                       compile_s=round(seconds, 2), tuning=tuning or {}, kernels=kernels))
    return rows
  modules = triton_ir(full, dim=dim, batch=batch, length=length, n=states,
                      dtype=jnp.dtype(dtype))
  for name, ir in sorted(modules.items()):
    warps = full.bwd_num_warps if "bwd" in name else full.num_warps
    rows.append(dict(count(name, compile_pallas_ir(ir, warps, arch), full.ckpt_every),
                     tuning=tuning or {}, kernels=kernels))
  return rows


def markdown(rows):
  out = ["| kernels | tuning | kernel | registers | stack B | instructions | loop | per step "
         "| spill ops | compile s | top opcodes in the loop |",
         "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
  for r in rows:
    ops_ = ", ".join(f"{k} {v}" for k, v in list(r["opcodes"].items())[:8])
    took = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
    out.append(f"| {r.get('kernels', 'pallas_triton')} | `{json.dumps(r['tuning'], sort_keys=True)}` "
               f"| {r['kernel']} | {r['registers']} "
               f"| {r['stack_bytes']} | {r['instructions']} | {r['loop']} | {r['per_step']} "
               f"| {r['spill_ops']} | {took} | {ops_} |")
  return "\n".join(out) + "\n"


def _commit():
  """The git commit of the checkout this module runs from, or None outside one."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip() or None
  except (OSError, subprocess.CalledProcessError):
    return None


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tuning", default="{}", help="JSON object of GpuTuning fields")
  p.add_argument("--sweep", action="store_true", help="also every bench_scan.BWD_VARIANTS entry")
  p.add_argument("--shape", default="ViM-S", choices=sorted(SHAPES))
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--length", type=int, default=197, help="L, the scan's sequence length")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--states", type=int, default=16, help="N, the SSM state size (ViM: 16)")
  p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
  p.add_argument("--kernels", default="triton",
                 help="comma-separated kernel sets: triton (jax-triton), pallas_triton")
  p.add_argument("--out", help="folder for kernel_sass.json and kernel_sass.md")
  a = p.parse_args(argv)
  try:
    tuning = json.loads(a.tuning)
  except json.JSONDecodeError as e:
    p.error(f"--tuning is not JSON ({e}); e.g. --tuning '{{\"ckpt_every\": 2}}'")
  if not isinstance(tuning, dict):
    p.error("--tuning must be a JSON object of GpuTuning fields")
  try:
    GpuTuning.of(tuning, "pallas_gpu")
  except ValueError as e:
    p.error(f"--tuning: {e}")
  if a.states < 1 or a.batch < 1 or a.length < 1:
    p.error("--states, --batch and --length must be positive")
  kernel_sets = a.kernels.split(",")
  bad = [k for k in kernel_sets if k not in ("triton", "pallas_triton")]
  if bad or not kernel_sets:
    p.error(f"--kernels: unknown {bad}; choose from triton, pallas_triton")
  _triton()
  variants = [tuning]
  if a.sweep:
    from toppax.tools.bench_scan import BWD_VARIANTS
    variants += [dict(tuning, **v) for v in BWD_VARIANTS]
  rows = []
  runs = [(k, v) for k in kernel_sets for v in variants]
  for i, (k, v) in enumerate(runs):
    print(f"[{i + 1}/{len(runs)}] {k} {json.dumps(v, sort_keys=True)}", flush=True)
    for r in analyse(v, a.shape, a.batch, a.dtype, a.arch, a.states, kernels=k,
                     length=a.length):
      rows.append(r)
      took = f", compiled in {r['compile_s']:.1f} s" if "compile_s" in r else ""
      print(f"    {r['kernel']}: {r['registers']} registers, {r['stack_bytes']} B stack, "
            f"{r['per_step']} instructions per step ({r['loop']} per loop of "
            f"{r['steps_per_loop']} steps), {r['spill_ops']} spill ops{took}", flush=True)
  table = markdown(rows)
  print(table)
  if a.out:
    run = dict(date=datetime.date.today().isoformat(), commit=_commit(), jax=jax.__version__,
               triton=_triton()[0].__version__,
               command="python -m toppax.tools.kernel_sass " + " ".join(
                   sys.argv[1:] if argv is None else argv))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "kernel_sass.json"), "w") as f:
      json.dump(dict(shape=a.shape, batch=a.batch, length=a.length, states=a.states,
                     dtype=a.dtype, arch=a.arch,
                     **run, rows=rows), f, indent=1)
    with open(os.path.join(a.out, "kernel_sass.md"), "w") as f:
      f.write(f"# Static SASS counts ({a.shape}, batch {a.batch}, L {a.length}, {a.dtype}, "
              f"sm_{a.arch})\n\n"
              f"{run['date']}, commit `{run['commit']}`, jax {run['jax']}, triton "
              f"{run['triton']}: `{run['command']}`\n\n" + table)
    print(f"wrote {a.out}/kernel_sass.json and kernel_sass.md")


if __name__ == "__main__":
  main()
