"""Checkpoints: an orbax ``CheckpointManager`` over ``{state, meta}``.

``state`` is the whole train state pytree (params, optimizer state, EMA, step, the model's RNG
streams); ``meta`` is JSON with the step, the data-iterator position (the step: batches are a
pure function of (seed, step), toppax.input_pipeline), the model config it was written for and
a CRC-32 of every array. Resume is automatic from ``<workdir>/checkpoints``. A checkpoint that
cannot be read, whose bytes differ from their checksums, that holds non-finite values, or whose
arrays do not fit the configured model raises ``CheckpointError``: never a silent restart, never
damaged values. A state that is not finite is never written (``NonFiniteError``).
"""
from __future__ import annotations

import logging
import os
import sys
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from toppax.errors import CheckpointError, NonFiniteError
from toppax.sharding import is_prng_key as _is_key


class _DropOrbaxInfo(logging.Filter):

  def filter(self, record):
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def _is_orbax_read_noise(unraisable) -> bool:
  # A failed restore leaves orbax's pending array reads behind: their coroutines and
  # TensorStore callbacks then fail against a closed event loop, printing pages of tracebacks
  # after the real (already raised) error.
  code = getattr(unraisable.object, "cr_code", None)
  if code is not None and "/orbax/" in code.co_filename:
    return True
  exc = unraisable.exc_value
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _quiet_unraisable_hook(previous):
  def hook(unraisable):
    if not _is_orbax_read_noise(unraisable):
      previous(unraisable)
  hook.toppax_quiet = True
  return hook


def quiet_orbax():
  """Drops orbax's INFO records (dozens per save) from the absl/root log handlers, and the
  leftover async-read tracebacks of a failed restore."""
  for h in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    if not any(isinstance(f, _DropOrbaxInfo) for f in h.filters):
      h.addFilter(_DropOrbaxInfo())
  if not getattr(sys.unraisablehook, "toppax_quiet", False):
    sys.unraisablehook = _quiet_unraisable_hook(sys.unraisablehook)


def brief_error(e: BaseException, limit: int = 300) -> str:
  """``Type: message`` of the innermost cause (orbax wraps TensorStore's precise error in a
  generic one), cut short: TensorStore messages embed whole multi-line specs."""
  for _ in range(8):
    inner = e.__cause__ or e.__context__
    if inner is None:
      break
    e = inner
  msg = str(e).split("See full TensorStore details")[0].strip()
  msg = " ".join(msg.split())
  if len(msg) > limit:
    msg = msg[:limit] + " ..."
  return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _shown(bad: list[str]) -> str:
  return "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")


def flat_config(d, prefix="") -> dict:
  """A nested config dict (or its JSON) as ``{"model.img_size": 224, ...}``; lists as tuples,
  so a config read back from JSON compares equal to the ConfigDict it was written from."""
  out = {}
  for k, v in (d or {}).items():
    if isinstance(v, dict):
      out.update(flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def _read_json(path: str):
  import json
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def config_diff(stored: dict | None, config) -> str:
  """Why a readable checkpoint does not fit: the ``config.model`` (and ``data.num_classes``)
  fields that differ from ``stored`` (``{"model": ..., "data": {"num_classes": ...}}`` of the
  config that wrote it), or the stored values when ``config`` (the current one) is not given."""
  stored = flat_config(stored)
  if not stored:
    return ("The config (config.model: img_size, patch_size, embed_dim, depth, ...; "
            "data.num_classes; ema_decay, grad_clip) differs from the one that wrote it.")
  if config is not None:
    current = flat_config(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    diff = [f"{k}: checkpoint {stored[k]!r}, config {current[k]!r}" for k in sorted(stored)
            if k in current and current[k] != stored[k]]
    if diff:
      return ("The config differs from the one that wrote it:\n  " + "\n  ".join(diff))
    return ("config.model matches the one that wrote it: the optimizer settings (ema_decay, "
            "grad_clip) or data.num_classes differ.")
  fields = ", ".join(f"{k}={v!r}" for k, v in sorted(stored.items()) if v is not None)
  return (f"The config differs from the one that wrote it ({fields}): compare with your "
          "config.model.")


def _to_savable(tree):
  # Typed PRNG keys (the model's dropout streams) are stored as their raw uint32 data.
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_savable(abstract):
  def conv(x):
    if _is_key(x):
      data = jax.eval_shape(jax.random.key_data, x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))
    return x
  return jax.tree.map(conv, abstract)


def _from_savable(tree, abstract):
  def conv(x, a):
    if _is_key(a):
      # The abstract target holds only the key dtype; its implementation (threefry, rbg, ...)
      # is what the stored data must be wrapped back into.
      impl = jax.random.key_impl(a) if isinstance(a, jax.Array) else a.dtype._impl
      return jax.random.wrap_key_data(x, impl=impl)
    return x
  return jax.tree.map(conv, tree, abstract)


def _path(path) -> str:
  # orbax's metadata spells list/tuple/namedtuple entries as string dict keys: compare by name.
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
  return "/".join(parts)


def _flatten(tree) -> dict:
  return {_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shape_mismatches(stored, abstract) -> list[str]:
  """Paths whose stored shape differs from the configured one, plus missing/extra paths."""
  flat_s, flat_a = _flatten(stored), _flatten(abstract)
  out = [f"{k}: in checkpoint, not in the model" for k in sorted(set(flat_s) - set(flat_a))]
  out += [f"{k}: in the model, not in checkpoint" for k in sorted(set(flat_a) - set(flat_s))]
  for k in sorted(set(flat_s) & set(flat_a)):
    s, a = flat_s[k], flat_a[k]
    if tuple(getattr(s, "shape", ())) != tuple(a.shape):
      out.append(f"{k}: checkpoint {tuple(s.shape)} vs config {tuple(a.shape)}")
  return out


def _mismatch(message: str) -> CheckpointError:
  """A readable checkpoint written for another model: falling back to an earlier one of the same
  run would not help."""
  e = CheckpointError(message)
  e.mismatch = True
  return e


class _quiet_failed_reads:
  """While a restore runs: asyncio's "exception was never retrieved" / "Task was destroyed"
  reports of orbax's pending reads, and TensorStore's dumps of them, are dropped. A failed read
  leaves them behind by the hundred after the real error, which CheckpointError reports."""

  def __enter__(self):
    self._logger = logging.getLogger("asyncio")
    self._level = self._logger.level
    self._logger.setLevel(logging.CRITICAL)
    return self

  def __exit__(self, *exc):
    self._logger.setLevel(self._level)
    return False


def _host(x) -> np.ndarray:
  """This process's copy of a (replicated) array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(jax.device_get(x))


def _is_float(a: np.ndarray) -> bool:
  return a.dtype.kind in "fc" or a.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def inspect_arrays(tree) -> tuple[dict[str, str], list[str]]:
  """(``{path: CRC-32 of the array's bytes}``, paths holding NaN or Inf) of a pytree: one pass
  over the host copy of every array (a few hundred MB for ViM-S with its optimizer and EMA)."""
  sums, bad = {}, []
  for path, x in _flatten(tree).items():
    a = np.ascontiguousarray(_host(x))
    sums[path] = f"{zlib.crc32(memoryview(a).cast('B')) & 0xFFFFFFFF:08x}"
    if _is_float(a) and not np.isfinite(a.astype(np.float32, copy=False)).all():
      bad.append(path)
  return sums, bad


class Checkpointer:
  """Saves every ``every`` steps (and when forced), keeps the last ``keep``."""

  def __init__(self, directory: str, *, keep: int = 3, every: int = 1000):
    quiet_orbax()
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(1, every), create=True,
        # Synchronous: a save is on disk before the next step; an interrupted one leaves only a
        # temporary directory, which orbax never lists as a step.
        enable_async_checkpointing=False)
    # Handlers named up front: a fresh process must read metadata before its first save.
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether ``save(step, ...)`` would write (the interval is due and the step is new)."""
    return step != self.latest_step() and self.manager.should_save(step)

  def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
    """Writes ``state`` with ``meta`` (plus the arrays' checksums) when due or forced. A state
    holding NaN or Inf is never written: NonFiniteError names its arrays."""
    if step == self.latest_step() or not (force or self.manager.should_save(step)):
      return False
    savable = _to_savable(state)
    sums, bad = inspect_arrays(savable)
    if bad:
      raise NonFiniteError(
          f"refusing to save checkpoint {step}: non-finite values in {_shown(bad)}. The last "
          f"checkpoint on disk is step {self.latest_step()} in {self.directory}")
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(savable),
        meta=ocp.args.JsonSave({**meta, "checksums": sums})), force=force)
    if saved:
      logging.info("saved checkpoint %d in %s", step, self.directory)
    return saved

  def restore_latest(self, abstract_state, *, config=None, fallback: bool = False):
    """``restore`` of the latest checkpoint. With ``fallback``, a damaged or unreadable one is
    moved aside (to ``damaged-<step>`` in the same directory, kept for inspection) and the one
    before it is tried, down to the first; without it the first error is raised."""
    while True:
      step = self.latest_step()
      try:
        return self.restore(abstract_state, step, config=config)
      except CheckpointError as e:
        earlier = [s for s in self.manager.all_steps() if s < (step or 0)]
        if not fallback or step is None or getattr(e, "mismatch", False):
          raise
        if not earlier:
          raise CheckpointError(f"{e} No earlier checkpoint is left to fall back to.") from None
        aside = os.path.join(self.directory, f"damaged-{step}")
        os.replace(os.path.join(self.directory, str(step)), aside)
        self.manager.reload()
        logging.warning("checkpoint %d is damaged (%s); moved to %s, resuming from step %d "
                        "(config.resume_fallback)", step, e, aside, max(earlier))

  def restore(self, abstract_state, step: int | None = None, *, config=None):
    """(state, meta) of ``step`` (default: the latest), sharded like ``abstract_state``.

    ``config`` (the current one, optional) names the differing fields when the checkpoint was
    written for another model."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    where = os.path.join(self.directory, str(step))
    earlier = [s for s in self.manager.all_steps() if s < step]
    hint = (f"Move {where} away to resume from the checkpoint before it (step {max(earlier)}; "
            "--config.resume_fallback=True does that for you), or use a new --workdir to start "
            "afresh (nothing is restarted silently)." if earlier else
            f"Move {where} away (no earlier checkpoint exists) or use a new --workdir to start "
            "afresh (nothing is restarted silently).")
    target = _abstract_savable(abstract_state)
    try:
      stored = self.manager.item_metadata(step)["state"]
    except Exception as e:
      raise CheckpointError(f"checkpoint {where} is unreadable (corrupt or incomplete): "
                            f"{brief_error(e)}. {hint}") from e
    if stored is None:
      raise CheckpointError(f"checkpoint {where} has no readable 'state' item (corrupt, "
                            f"incomplete or not a toppax checkpoint). {hint}")
    bad = _shape_mismatches(stored, target)
    if bad:
      raise _mismatch(
          f"checkpoint {where} is readable but does not match the configured model/optimizer:"
          f"\n  {_shown(bad)}\n{config_diff(self.stored_config(step), config)}\nRun with the "
          f"config that wrote it (see {os.path.dirname(self.directory)}/config.json), or use a "
          "new --workdir for this config.")
    try:
      with _quiet_failed_reads():
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        # Force a full read now, so a truncated array file fails here and not mid-training.
        jax.block_until_ready(out["state"])
    except Exception as e:
      raise CheckpointError(f"checkpoint {where} could not be restored (corrupt or incomplete): "
                            f"{brief_error(e)}. {hint}") from None
    meta = out["meta"] or {}
    sums, nonfinite = inspect_arrays(out["state"])
    stored_sums = meta.get("checksums")
    if stored_sums is None:
      logging.warning("checkpoint %s has no checksums (written by an older toppax): its bytes "
                      "cannot be verified", where)
    else:
      damaged = sorted(k for k in stored_sums if sums.get(k) != stored_sums[k])
      if damaged:
        raise CheckpointError(f"checkpoint {where} is damaged: {len(damaged)} array(s) differ "
                              f"from the checksums written with it ({', '.join(damaged[:5])}"
                              f"{', ...' if len(damaged) > 5 else ''}). {hint}")
    if nonfinite:
      raise CheckpointError(f"checkpoint {where} holds non-finite values in "
                            f"{', '.join(nonfinite[:5])}{', ...' if len(nonfinite) > 5 else ''}"
                            f" (a diverged run). {hint}")
    state = _from_savable(out["state"], abstract_state)
    if meta.get("step", step) != step:
      raise CheckpointError(f"checkpoint {where} says step {meta.get('step')} in its metadata "
                            f"but is stored as step {step}. {hint}")
    return state, meta

  def stored_config(self, step: int) -> dict | None:
    """``{"model": ..., "data": {"num_classes": ...}}`` of the config that wrote ``step``: the
    checkpoint's own metadata, plus the workdir's config.json where it agrees (a resumed run
    rewrites config.json, so only a matching one describes the checkpoint); None if unknown."""
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"] or {}
    except Exception:  # noqa: BLE001 -- only an error message's detail
      meta = {}
    cfg = _read_json(os.path.join(os.path.dirname(self.directory), "config.json")) or {}
    model = meta.get("model") or cfg.get("model")
    if not model:
      return None
    out = {"model": model}
    n = (cfg.get("data") or {}).get("num_classes")
    if n is not None and cfg.get("model") == model:
      out["data"] = {"num_classes": n}
    return out

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# --- parameters only: `--mode=convert` output and `config.init_from=<toppax workdir>` --------------

PARAMS_DIR = "params"


def save_params(directory: str, params, rngs, meta: dict):
  """Writes ``{params, rngs}`` (orbax) to ``directory/params`` and ``meta`` to
  ``directory/params_meta.json``; refuses to overwrite."""
  import json
  where = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  if os.path.exists(where):
    raise CheckpointError(f"{where} exists already: use a new --workdir (nothing is "
                          "overwritten)")
  os.makedirs(directory, exist_ok=True)
  quiet_orbax()
  with ocp.StandardCheckpointer() as ck:
    ck.save(where, {"params": params, "rngs": _to_savable(rngs)})
    ck.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(directory, "params_meta.json"), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)
  return where


def is_toppax_dir(path: str) -> bool:
  """Whether ``path`` is a toppax workdir (training checkpoints or ``--mode=convert`` params)."""
  return bool(path) and os.path.isdir(path) and (
      os.path.isdir(os.path.join(path, "checkpoints")) or
      os.path.isdir(os.path.join(path, PARAMS_DIR)) or _is_manager_dir(path))


def _is_manager_dir(path):
  return any(e.name.isdigit() and e.is_dir() for e in os.scandir(path))


def not_a_toppax_dir(path: str) -> CheckpointError:
  """The error for a directory given as ``config.init_from`` that holds no toppax checkpoint."""
  path = os.path.abspath(path)
  weights = sorted(f for f in os.listdir(path) if f.endswith((".pth", ".pt", ".npz")))
  found = (f" (it holds {', '.join(weights[:3])}: pass the file itself)" if weights
           else "")
  return CheckpointError(
      f"{path} is not a toppax checkpoint directory{found}: expected a training --workdir "
      "(with checkpoints/<step>/), a --mode=convert output (with params/ and "
      "params_meta.json) or a checkpoints/ folder (with <step>/); for official weights pass "
      "the .pth file (or a .npz state dict) as config.init_from.")


def _target_from_metadata(tree, sharding):
  def conv(m):
    return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding)
  return jax.tree.map(conv, tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def _read_converted(where: str, sharding):
  """``{params, rngs}`` of a ``--mode=convert`` output, read synchronously: an async
  checkpointer leaves its event-loop thread to fail noisily when the read fails."""
  ck = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  try:
    stored = ck.metadata(where)
    stored = getattr(stored, "item_metadata", stored)
    stored = getattr(stored, "tree", stored)
    if not stored:
      raise ValueError("its array metadata is missing or unreadable")
    out = ck.restore(where, ocp.args.StandardRestore(_target_from_metadata(dict(stored),
                                                                           sharding)))
    jax.block_until_ready(out)
    return out
  finally:
    ck.close()


def load_params(path: str, abstract_params, *, use_ema: bool = True, sharding=None,
                config=None, abstract_stats=None):
  """Parameters from a toppax directory: a training workdir (its latest checkpoint; the EMA
  copy when kept and ``use_ema``) or a ``--mode=convert`` output. Returns ``(params, what)``,
  or ``(params, stats, what)`` when ``abstract_stats`` (the pure dict of the model's BatchNorm
  statistics, ``toppax.factory.batch_stats``) asks for the stored statistics too.

  ``abstract_params`` (ShapeDtypeStructs of the configured model) is checked against what is
  stored; a mismatch raises CheckpointError listing the paths. Pruning does not change any
  parameter shape, so a dense run's parameters start a pruned fine-tune. ``config`` (the
  current one, optional) names the differing fields in that error.
  """
  path = os.path.abspath(path)
  if not is_toppax_dir(path):
    if os.path.isdir(path):
      raise not_a_toppax_dir(path)
    raise CheckpointError(f"{path} is not a directory: config.init_from must name a toppax "
                          "workdir, a --mode=convert output, or an official .pth/.npz file")
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  quiet_orbax()
  if os.path.isdir(os.path.join(path, PARAMS_DIR)):
    where = os.path.join(path, PARAMS_DIR)
    meta = _read_json(os.path.join(path, "params_meta.json")) or {}
    try:
      out = _read_converted(where, sharding)
    except Exception as e:
      source = meta.get("source")
      redo = (f"re-run --mode=convert --config.init_from={source} into a new --workdir"
              if source else "write it again with --mode=convert into a new --workdir")
      raise CheckpointError(
          f"converted parameters in {where} could not be read (corrupt or incomplete: "
          f"{brief_error(e)}): {redo}, or point config.init_from at a good checkpoint.") from None
    params, what = out["params"], f"converted parameters in {where}"
    stored_cfg = {"model": meta["model"]} if meta.get("model") else None
    if stored_cfg and meta.get("num_classes") is not None:
      stored_cfg["data"] = {"num_classes": meta["num_classes"]}
  else:
    ckdir = os.path.join(path, "checkpoints") if os.path.isdir(
        os.path.join(path, "checkpoints")) else path
    ck = Checkpointer(ckdir)
    try:
      step = ck.latest_step()
      if step is None:
        raise CheckpointError(f"no checkpoint in {ckdir}: config.init_from must name a toppax "
                              "workdir with a finished (or saved) training run, a "
                              "--mode=convert output, or an official .pth/.npz file")
      where = os.path.join(ckdir, str(step))
      try:
        stored = ck.manager.item_metadata(step)["state"]
        stored = getattr(stored, "tree", stored)
        if not stored:
          raise ValueError("its 'state' metadata is missing or unreadable")
        target = _target_from_metadata(dict(stored), sharding)
        out = ck.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"]
        jax.block_until_ready(out)
      except Exception as e:
        earlier = [s for s in ck.manager.all_steps() if s < step]
        move = (f"; or move {where} away to start from step {max(earlier)}" if earlier else "")
        raise CheckpointError(
            f"checkpoint {where} could not be restored (corrupt or incomplete: {brief_error(e)}): "
            f"point config.init_from at a good checkpoint{move}.") from None
      stored_cfg = ck.stored_config(step)
    finally:
      ck.close()
    ema = out.get("ema") or {}
    if use_ema and ema:
      params, what = ema, f"EMA parameters of {ckdir} step {step}"
    else:
      params, what = out["params"], f"parameters of {ckdir} step {step}"
  bad = _shape_mismatches(params, abstract_params)
  if bad:
    raise CheckpointError(f"{what} do not fit the configured model:\n  {_shown(bad)}\n"
                          f"{config_diff(stored_cfg, config)}\nCheck config.model (name, depth, "
                          "embed_dim, img_size, num_classes).")
  # orbax returns nested dicts; the model's pure dict may key layers by int: match its structure.
  params = jax.tree.unflatten(jax.tree.structure(abstract_params),
                              [_flatten(params)[k] for k in _flatten(abstract_params)])
  jax.block_until_ready(params)
  if abstract_stats is None:
    return params, what
  stored = _flatten(out.get("rngs") or {})
  want = _flatten(abstract_stats)
  missing = [k for k in want if k not in stored or tuple(stored[k].shape) != tuple(want[k].shape)]
  if missing:
    raise CheckpointError(f"{what}: the BatchNorm statistics {_shown(missing)} are not stored "
                          "there; start from a checkpoint of this model")
  stats = jax.tree.unflatten(jax.tree.structure(abstract_stats), [stored[k] for k in want])
  return params, stats, what
