"""Shared machinery for converting official PyTorch state dicts: loading, a strict key table that
reports every missing, unused and mis-shaped key at once, and parameter assignment."""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from toppax.convert import pth

from toppax.errors import ConversionError  # re-exported as toppax.convert.ConversionError

log = logging.getLogger(__name__)


def _to_numpy(v) -> np.ndarray:
  if isinstance(v, np.ndarray):
    return v
  if hasattr(v, "detach"):  # torch.Tensor, without importing torch
    return v.detach().cpu().float().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
  return np.asarray(v)


def load_state_dict(source) -> dict[str, np.ndarray]:
  """A mapping of official key -> array (numpy or torch), or a path to a .pth/.pt/.npz file.

  For .pth files the released checkpoints keep the weights under "model"; a DDP "module."
  prefix is stripped.
  """
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if not os.path.exists(path):
      raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
      from toppax.checkpointing import is_toppax_dir, not_a_toppax_dir
      if is_toppax_dir(path):
        raise ConversionError(f"{path} holds toppax parameters, not an official state dict: "
                              "use it as config.init_from directly (no conversion needed)")
      raise not_a_toppax_dir(path)
    if path.endswith(".npz"):
      try:
        with np.load(path) as z:
          sd = {k: z[k] for k in z.files}
      except Exception as e:
        from toppax.checkpointing import brief_error
        raise ConversionError(f"could not read state dict {path!r} ({brief_error(e)}): "
                              "it is truncated or not a numpy .npz; write it again with "
                              "np.savez(path, **state_dict) or pass the official .pth file"
                              ) from e
    else:
      obj = pth.load(path)   # torch-free, and refuses pickles that would run code
      sd = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else obj
  elif isinstance(source, Mapping):
    sd = dict(source)
    for wrapper in ("model", "state_dict"):  # Vim/DeiT and mmcls checkpoint layouts
      if wrapper in sd and isinstance(sd[wrapper], Mapping):
        sd = dict(sd[wrapper])
        break
  else:
    raise TypeError(f"state_dict must be a mapping or a checkpoint path, got {type(source).__name__}")
  if not isinstance(sd, Mapping):
    raise ConversionError(f"checkpoint holds a {type(sd).__name__}, not a state dict")
  out = {}
  for k, v in sd.items():
    out[k[len("module."):] if k.startswith("module.") else k] = v
  return out


def get_by_path(obj, path: str):
  for part in path.split("."):
    obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
  return obj


class KeyTable:
  """Consumes official keys into model parameters, collecting every problem before raising."""

  def __init__(self, state_dict: Mapping[str, Any], *, ignore: Callable[[str], bool] | None = None):
    self.sd = dict(state_dict)
    self.used: set[str] = set()
    self.missing: list[str] = []
    self.misshaped: list[str] = []
    self.ignored = sorted(k for k in self.sd if ignore is not None and ignore(k))

  def get(self, key: str) -> np.ndarray | None:
    if key not in self.sd:
      self.missing.append(key)
      return None
    if key in self.used:
      raise AssertionError(f"conversion table uses {key!r} twice")
    self.used.add(key)
    return _to_numpy(self.sd[key])

  def assign(self, model, path: str, key: str, transform: Callable = lambda x: x,
             expected: tuple[int, ...] | None = None):
    """``model.<path> = transform(sd[key])`` if the shape fits, else record the mismatch."""
    value = self.get(key)
    if value is None:
      return
    param = get_by_path(model, path)
    target = tuple(param[...].shape)
    original = tuple(value.shape)
    if expected is not None and original != tuple(expected):
      self.misshaped.append(f"{key}: checkpoint {original}, model expects {tuple(expected)}")
      return
    value = np.asarray(transform(value))
    if tuple(value.shape) != target:
      self.misshaped.append(f"{key}: checkpoint {original}, model expects "
                            f"{_torch_shape_hint(target, original)}")
      return
    param[...] = jnp.asarray(value, param[...].dtype)

  def mark_misshaped(self, key: str, message: str):
    self.used.add(key)
    self.misshaped.append(f"{key}: {message}")

  def finish(self, model_desc: str):
    if self.ignored:
      log.info("ignored %d checkpoint keys (%s...)", len(self.ignored), ", ".join(self.ignored[:3]))
    unused = sorted(set(self.sd) - self.used - set(self.ignored))
    if self.missing or unused or self.misshaped:
      lines = [f"state dict does not match {model_desc}:"]
      if self.missing:
        lines.append(f"  missing keys ({len(self.missing)}): " + ", ".join(self.missing))
      if unused:
        lines.append(f"  unused keys ({len(unused)}): " + ", ".join(unused))
      if self.misshaped:
        lines.append(f"  mis-shaped keys ({len(self.misshaped)}): " + "; ".join(self.misshaped))
      lines.append("  (check the model name and overrides such as depth, embed_dim, patch_size, "
                   "num_classes against the checkpoint)")
      raise ConversionError("\n".join(lines))


def _torch_shape_hint(target, original):
  # Show the expected shape in the checkpoint's (torch) layout when it is a plain transpose.
  if len(target) == 2 and len(original) == 2:
    return tuple(reversed(target))
  return target


def torch_bicubic_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`` on (H, W, C), in
  float64 numpy: separable cubic convolution with a = -0.75 and border-clamped taps."""

  def matrix(n_in, n_out):
    a = -0.75
    scale = n_in / n_out
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
      src = (i + 0.5) * scale - 0.5
      f = int(np.floor(src))
      t = src - f
      for j, d in enumerate((-1, 0, 1, 2)):
        s = abs(t - d)
        w = ((a + 2) * s - (a + 3)) * s * s + 1 if s <= 1 else (((s - 5) * s + 8) * s - 4) * a
        m[i, min(max(f + d, 0), n_in - 1)] += w
    return m

  h, w, _ = x.shape
  x = np.asarray(x, np.float64)
  return np.einsum("oh,hwc,pw->opc", matrix(h, out_h), x, matrix(w, out_w))
