"""Checkpoints: an orbax ``CheckpointManager`` over ``{state, meta}``.

``state`` is the whole train state pytree (params, optimizer state, EMA, step, the model's RNG
streams); ``meta`` is JSON with the step, the data-iterator position (the step: batches are a
pure function of (seed, step), toppax.input_pipeline) and the model config it was written for.
Resume is automatic from ``<workdir>/checkpoints``. A checkpoint that cannot be read, or whose
arrays do not fit the configured model, raises ``CheckpointError``: never a silent restart.
"""
from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

from toppax.sharding import is_prng_key as _is_key


class _DropOrbaxInfo(logging.Filter):

  def filter(self, record):
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def quiet_orbax():
  """Drops orbax's INFO records (dozens per save) from the absl/root log handlers."""
  for h in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    if not any(isinstance(f, _DropOrbaxInfo) for f in h.filters):
      h.addFilter(_DropOrbaxInfo())


class CheckpointError(RuntimeError):
  """A checkpoint in the workdir is corrupt or does not match the config."""




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

  def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
    if step == self.latest_step():
      return False
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_savable(state)), meta=ocp.args.JsonSave(meta)),
        force=force)
    if saved:
      logging.info("saved checkpoint %d in %s", step, self.directory)
    return saved

  def restore(self, abstract_state, step: int | None = None):
    """(state, meta) of ``step`` (default: the latest), sharded like ``abstract_state``."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    where = os.path.join(self.directory, str(step))
    hint = (f"Move {where} away to resume from an earlier step, or use a new --workdir to start "
            "afresh (nothing is restarted silently).")
    target = _abstract_savable(abstract_state)
    try:
      stored = self.manager.item_metadata(step)["state"]
    except Exception as e:
      raise CheckpointError(f"checkpoint {where} is unreadable (corrupt or incomplete): "
                            f"{type(e).__name__}: {e}. {hint}") from e
    if stored is None:
      raise CheckpointError(f"checkpoint {where} has no 'state' item (corrupt or not a toppax "
                            f"checkpoint). {hint}")
    bad = _shape_mismatches(stored, target)
    if bad:
      shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
      raise CheckpointError(f"checkpoint {where} does not match the configured model/optimizer:"
                            f"\n  {shown}\n{hint}")
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
      state = _from_savable(out["state"], abstract_state)
      # Force a full read now, so a truncated array file fails here and not mid-training.
      jax.block_until_ready(state)
    except Exception as e:
      raise CheckpointError(f"checkpoint {where} could not be restored: "
                            f"{type(e).__name__}: {e}. {hint}") from e
    meta = out["meta"] or {}
    if meta.get("step", step) != step:
      raise CheckpointError(f"checkpoint {where} says step {meta.get('step')} in its metadata "
                            f"but is stored as step {step}. {hint}")
    return state, meta

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


def _target_from_metadata(tree, sharding):
  def conv(m):
    return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding)
  return jax.tree.map(conv, tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def load_params(path: str, abstract_params, *, use_ema: bool = True, sharding=None):
  """Parameters from a toppax directory: a training workdir (its latest checkpoint; the EMA
  copy when kept and ``use_ema``) or a ``--mode=convert`` output. Returns ``(params, what)``.

  ``abstract_params`` (ShapeDtypeStructs of the configured model) is checked against what is
  stored; a mismatch raises CheckpointError listing the paths. Pruning does not change any
  parameter shape, so a dense run's parameters start a pruned fine-tune.
  """
  path = os.path.abspath(path)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  quiet_orbax()
  if os.path.isdir(os.path.join(path, PARAMS_DIR)):
    where = os.path.join(path, PARAMS_DIR)
    try:
      with ocp.StandardCheckpointer() as ck:
        stored = ck.metadata(where)
        stored = getattr(stored, "item_metadata", stored)
        stored = getattr(stored, "tree", stored)
        out = ck.restore(where, _target_from_metadata(dict(stored), sharding))
    except Exception as e:
      raise CheckpointError(f"{where} could not be read ({type(e).__name__}: {e}); write it "
                            "again with --mode=convert") from e
    params, what = out["params"], f"converted parameters in {where}"
  else:
    ckdir = os.path.join(path, "checkpoints") if os.path.isdir(
        os.path.join(path, "checkpoints")) else path
    ck = Checkpointer(ckdir)
    step = ck.latest_step()
    if step is None:
      raise CheckpointError(f"no checkpoint in {ckdir}: config.init_from must name a toppax "
                            "workdir with a finished (or saved) training run, a --mode=convert "
                            "output, or an official .pth/.npz file")
    try:
      stored = ck.manager.item_metadata(step)["state"]
      stored = getattr(stored, "tree", stored)
      target = _target_from_metadata(dict(stored), sharding)
      out = ck.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))["state"]
    except Exception as e:
      raise CheckpointError(f"checkpoint {ckdir}/{step} could not be restored "
                            f"({type(e).__name__}: {e})") from e
    finally:
      ck.close()
    ema = out.get("ema") or {}
    if use_ema and ema:
      params, what = ema, f"EMA parameters of {ckdir} step {step}"
    else:
      params, what = out["params"], f"parameters of {ckdir} step {step}"
  bad = _shape_mismatches(params, abstract_params)
  if bad:
    shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
    raise CheckpointError(f"{what} do not fit the configured model:\n  {shown}\nCheck "
                          "config.model (name, depth, embed_dim, img_size, num_classes).")
  # orbax returns nested dicts; the model's pure dict may key layers by int: match its structure.
  params = jax.tree.unflatten(jax.tree.structure(abstract_params),
                              [_flatten(params)[k] for k in _flatten(abstract_params)])
  jax.block_until_ready(params)
  return params, what
