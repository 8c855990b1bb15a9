"""Reads PyTorch ``.pth`` checkpoints without torch, and without running code from the file.

A ``torch.save`` file is a zip archive: ``<name>/data.pkl`` pickles the object, each tensor as a
call to ``torch._utils._rebuild_tensor_v2`` on a storage that lives in ``<name>/data/<key>`` as
raw little-endian bytes. ``torch.load`` executes that pickle; a malicious file can make it run
anything. This reader runs a restricted unpickler instead: it rebuilds tensors (as numpy arrays)
and plain containers, and refuses every other global the pickle names, so reading a file can
never execute code from it. Official Vim, PlainMamba and mmseg checkpoints hold nothing else
(mmseg's ``meta`` is strings, numbers, lists and dicts; DeiT-style ``args`` namespaces become
plain ``argparse.Namespace`` objects filled with their pickled fields).
"""
from __future__ import annotations

import argparse
import codecs
import collections
import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np

from toppax.errors import ConversionError

# torch's storage classes -> numpy dtypes (torch pickles a tensor's storage under these names).
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}


class _StorageType:
  """Stands for a torch storage class in the pickle: only its dtype is used."""

  def __init__(self, name):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A storage of the archive: ``numel`` elements of ``dtype`` in ``data/<key>``."""

  def __init__(self, archive, dtype, key):
    self.archive, self.dtype, self.key = archive, dtype, key

  def array(self):
    return self.archive.storage(self.key, self.dtype)


def _rebuild_tensor(storage, offset, size, stride, *rest):
  """``torch._utils._rebuild_tensor_v2`` as a numpy array (a copy, C-ordered)."""
  if not isinstance(storage, _Storage):
    raise ConversionError("malformed checkpoint: a tensor refers to no storage of the archive")
  flat = storage.array()
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if not size:
    return flat[int(offset)].copy()
  needed = int(offset) + sum((n - 1) * s for n, s in zip(size, stride)) + 1
  if min(size) > 0 and (needed > flat.size or min(stride) < 0):
    raise ConversionError(f"malformed checkpoint: a tensor of shape {size} reads past its "
                          f"storage ({flat.size} elements)")
  item = flat.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(flat[int(offset):], shape=size,
                                         strides=tuple(s * item for s in stride),
                                         writeable=False)
  return np.ascontiguousarray(view)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *rest):
  return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *rest):
  return data


def _numpy_scalar(dtype, data=None):
  return np.frombuffer(data, dtype=dtype)[0] if data is not None else np.zeros((), dtype)[()]


# (module, name) -> what the restricted unpickler returns for it. Nothing else is accepted.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("argparse", "Namespace"): argparse.Namespace,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): np.dtype,
    # Protocol 2 pickles bytes as _codecs.encode(text, "latin1") (numpy scalars' data).
    ("_codecs", "encode"): lambda text, encoding="utf-8": codecs.encode(text, encoding),
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, archive):
    super().__init__(file)
    self.archive = archive

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise ConversionError(
        f"refusing to load {self.archive.path}: its pickle names {module}.{name}, which is "
        "neither a tensor nor a plain container. Reading it would run code from the file. If you "
        "trust the file, convert it with torch yourself (torch.load(..., weights_only=False)) "
        "and pass the state dict (or np.savez it to a .npz)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
      raise ConversionError(f"malformed checkpoint {self.archive.path}: unknown persistent id "
                            f"{pid!r:.80}")
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise ConversionError(f"malformed checkpoint {self.archive.path}: storage {key} has no "
                            "known element type")
    return _Storage(self.archive, storage_type.dtype, key)


class _Archive:

  def __init__(self, path):
    self.path = path
    self.zip = zipfile.ZipFile(path)
    names = self.zip.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
      raise ConversionError(f"{path} is a zip archive but not a PyTorch checkpoint (no single "
                            "data.pkl in it)")
    self.prefix = pkl[0][:-len("data.pkl")]
    order = self._read_text("byteorder", "little")
    if order != "little":
      raise ConversionError(f"{path} was written on a {order}-endian machine: not supported")
    self._cache = {}

  def _read_text(self, name, default):
    try:
      return self.zip.read(self.prefix + name).decode().strip()
    except KeyError:
      return default

  def storage(self, key, dtype):
    if key not in self._cache:
      try:
        raw = self.zip.read(f"{self.prefix}data/{key}")
      except KeyError:
        raise ConversionError(f"malformed checkpoint {self.path}: storage data/{key} is "
                              "missing") from None
      if len(raw) % dtype.itemsize:
        raise ConversionError(f"malformed checkpoint {self.path}: storage data/{key} has "
                              f"{len(raw)} bytes, not a whole number of {dtype} elements")
      self._cache[key] = np.frombuffer(raw, dtype=dtype)
    return self._cache[key]

  def load(self):
    with self.zip.open(self.prefix + "data.pkl") as f:
      return _Unpickler(io.BytesIO(f.read()), self).load()


def load(path: str | os.PathLike):
  """The object ``torch.save`` wrote to ``path``, tensors as numpy arrays (bf16 as
  ``ml_dtypes.bfloat16``). Raises ConversionError for a damaged file, the pre-1.6 (non-zip)
  format, or a pickle that names anything but tensors and plain containers."""
  path = os.fspath(path)
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      head = f.read(8)
    why = ("it is in PyTorch's legacy pre-1.6 format: re-save it with a current torch, "
           "torch.save(torch.load(path), path)" if head[:1] == b"\x80" else
           "it is not a PyTorch zip archive (truncated or damaged)")
    raise ConversionError(f"could not read checkpoint {path!r}: {why}; download the official "
                          ".pth again, or pass a .npz state dict")
  try:
    archive = _Archive(path)
    return archive.load()
  except ConversionError:
    raise
  except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, ValueError, KeyError,
          IndexError, TypeError, AttributeError, OSError) as e:
    raise ConversionError(f"could not read checkpoint {path!r} ({type(e).__name__}: {e}): it is "
                          "truncated or damaged; download the official .pth again (or pass a "
                          ".npz state dict)") from None
