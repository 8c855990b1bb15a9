"""``--mode=doctor``: versions, backend, devices and the selective-scan implementations."""
from __future__ import annotations

import importlib
import platform
import sys


def _version(mod: str) -> str:
  try:
    m = importlib.import_module(mod)
    return getattr(m, "__version__", "installed")
  except Exception as e:  # optional packages are reported, never fatal
    return f"not installed ({type(e).__name__})"


def report() -> str:
  import jax

  from toppax import __version__
  from toppax.ssm import available_implementations, default_implementation

  lines = [f"toppax {__version__}", f"python {sys.version.split()[0]} ({platform.platform()})"]
  for mod in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "ml_collections", "chex",
              "numpy", "triton", "jax_triton", "tensorflow_datasets", "grain", "torch"):
    lines.append(f"  {mod:20s} {_version(mod)}")
  lines.append(f"backend: {jax.default_backend()}")
  lines.append(f"processes: {jax.process_count()} (this is {jax.process_index()})")
  for d in jax.devices():
    kind = getattr(d, "device_kind", "?")
    lines.append(f"  device {d.id}: {d.platform} {kind}")
  lines.append(f"selective_scan implementations (default here: {default_implementation()}):")
  for name, status in available_implementations().items():
    lines.append(f"  {name:12s} {status}")
  return "\n".join(lines)


def run(config=None) -> str:
  del config
  text = report()
  print(text, flush=True)
  return text


if __name__ == "__main__":      # python -m toppax.tools.doctor: the same report as --mode=doctor
  run()
