"""The knobs of the Pallas scan kernels that a user may set, with their defaults.

Pass one to the registered implementation, e.g.
``toppax.ssm.ops.implementation("pallas_gpu")(..., tuning=GpuTuning(bwd_maxnreg=None))``, or a
dict of some of its fields (``tuning={"ckpt_every": 2}``); an unknown key raises, so a misspelt
one is never run as the default. The defaults are the fastest settings measured on an H100 at
the ViM scan shapes; docs/benchmarks.md has the measurements and docs/kernels.md what each knob
changes in the kernels.
"""
from __future__ import annotations

import dataclasses

STATES_PER_PROGRAM = (1, 2, 4, 8, 16, 32)


def _int(name, value, low, high=None, none_ok=False):
  if value is None and none_ok:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < low or (
      high is not None and value > high):
    bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"tuning {name} must be an int {bound}"
                     + (" or None" if none_ok else "") + f", got {value!r}")


def _states(name, value):
  if isinstance(value, bool) or value not in STATES_PER_PROGRAM:
    raise ValueError(f"tuning {name} must be a power of two from 1 to 32 (states per program; "
                     f"the backward shares them out over a warp's 32 lanes), got {value!r}")


def _register_cap(name, value):
  if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                            or not 24 <= value <= 255):
    raise ValueError(f"tuning {name} must be an int in [24, 255] (the PTX .maxnreg range) or "
                     f"None for no cap, got {value!r}")


class _Tuning:
  """Construction from None, an instance or a dict of field names, with clear errors."""

  @classmethod
  def of(cls, value, impl):
    if value is None:
      return cls()
    if isinstance(value, cls):
      return value
    if not isinstance(value, dict):
      raise TypeError(f"{impl} tuning must be a {cls.__name__} or a dict of its fields, "
                      f"got {type(value).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(known))
    if unknown:
      raise ValueError(f"{impl} tuning: unknown key(s) {unknown}; known: {', '.join(known)}")
    return cls(**value)


@dataclasses.dataclass(frozen=True)
class GpuTuning(_Tuning):
  """Knobs of ``"pallas_gpu"``: the Triton kernels (``gpu_scan``) and the Mosaic GPU inference
  forward (``mgpu_scan``)."""
  # Which kernels: "triton" (Triton through jax-triton) or "pallas_triton" (the same kernels
  # lowered by Pallas' Triton backend, which jax deprecates; interpret=True then needs no torch).
  kernels: str = "triton"
  # Triton forward.
  block_d: int | None = None      # channels per program; None: 64 if batch x D >= 65,536, else 32
  num_warps: int = 1              # warps per program
  rows_ahead: int | None = None   # steps ahead u, Δ, z are loaded; None: 2 at 64 channels, else 4
  bc_ahead: int = 1               # steps ahead the B_t, C_t scalars are loaded
  fwd_chunk: int = 4              # inference steps unrolled per loop iteration
  maxnreg: int | None = None      # register cap (PTX .maxnreg, 24-255); None: ptxas' choice
  fwd_states: int | None = None   # states per program (a power of two <= 32), more are split;
  #                                 None: 16, or 8 where a launch has fewer programs than SMs
  # Training: the forward's checkpoints and the backward.
  ckpt_every: int = 4             # the training forward stores the state every this many steps
  bwd_chunk: int | None = None    # sub-chunk; None: 2 where it divides ckpt_every, else ckpt_every
  bwd_maxnreg: int | None = 168   # backward register cap; 168 fits 12 one-warp programs per SM
  bwd_num_warps: int = 1          # backward warps per program (32 channels each)
  bwd_states: int | None = None   # backward states per program; None: as fwd_states' None
  # Inference forward on Mosaic GPU.
  fwd_backend: str = "mosaic"     # "mosaic" (sm_90+ where D % 128 == 0) or "triton": `kernels`
  mosaic_chunk: int | None = None  # steps per shared-memory chunk; None: 32 bytes (8 fp32 steps)
  mosaic_concurrent: int = 2      # chunks in flight in the TMA pipeline

  def __post_init__(self):
    for name in ("num_warps", "bwd_num_warps", "bc_ahead", "fwd_chunk", "ckpt_every",
                 "mosaic_concurrent"):
      _int(name, getattr(self, name), 1)
    for name in ("block_d", "rows_ahead", "mosaic_chunk"):
      _int(name, getattr(self, name), 1, none_ok=True)
    if self.block_d is not None and self.block_d & (self.block_d - 1):
      raise ValueError(f"tuning block_d must be a power of two (Triton's blocks are), got "
                       f"{self.block_d}")
    for name in ("maxnreg", "bwd_maxnreg"):
      _register_cap(name, getattr(self, name))
    for name in ("fwd_states", "bwd_states"):
      if getattr(self, name) is not None:
        _states(name, getattr(self, name))
    sub = self.bwd_chunk
    if sub is not None and (isinstance(sub, bool) or not isinstance(sub, int) or sub < 1
                            or self.ckpt_every % sub):
      raise ValueError(f"tuning bwd_chunk must divide ckpt_every = {self.ckpt_every} (or be "
                       f"None), got {sub!r}")
    if self.kernels not in ("triton", "pallas_triton"):
      raise ValueError(f"tuning kernels must be 'triton' (jax-triton) or 'pallas_triton', got "
                       f"{self.kernels!r}")
    if self.fwd_backend not in ("mosaic", "triton"):
      raise ValueError(f"tuning fwd_backend must be 'mosaic' or 'triton', got "
                       f"{self.fwd_backend!r}")


@dataclasses.dataclass(frozen=True)
class TpuTuning(_Tuning):
  """Knobs of ``"pallas_tpu"`` (``tpu_scan``)."""
  lane_tile: int = 128            # channels per program (a multiple of 128, the lane count)
  max_seq_tile: int = 128         # most steps per sequence tile; L is split into equal tiles

  def __post_init__(self):
    lane = self.lane_tile
    if isinstance(lane, bool) or not isinstance(lane, int) or lane < 128 or lane % 128:
      raise ValueError(f"tuning lane_tile must be a multiple of 128 (the lane count), got {lane!r}")
    _int("max_seq_tile", self.max_seq_tile, 1)
