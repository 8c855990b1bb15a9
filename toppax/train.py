"""Training: ``train_and_evaluate(config, workdir)``, importable from a notebook.

The train state is a plain pytree ``{step, params, rngs, opt_state, ema}``: params and ``rngs``,
the model's non-parameter state (its RNG streams, drop-path rates), as nnx pure dicts. One ``jax.jit`` step over it: ``nnx.merge`` inside,
replicated state, batch sharded on the mesh's 'data' axis, state donated (STYLE.md).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from toppax import augment, checkpointing, evaluate, input_pipeline, sharding
from toppax.pruning import PruneConfig

# Model fields that change compute but not parameter shapes (not passed to the FLOPs counter).
RUNTIME_FIELDS = ("drop_path_rate", "drop_rate", "dtype", "scan_implementation", "scan_layers")


# --- model ----------------------------------------------------------------------------------------


def model_overrides(config, **changes) -> dict:
  """``toppax.models.create`` overrides from ``config.model``: every field but ``name``, in the
  model constructor's own words (ViM: depth, embed_dim; PlainMamba: num_layers, embed_dims);
  None fields keep the variant's value."""
  out = {k: v for k, v in config.model.items() if k != "name" and v is not None}
  out = {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}
  out["num_classes"] = config.data.num_classes
  out.update(changes)
  return out


def prune_config(config, variant: str | None = None) -> PruneConfig | None:
  """The PruneConfig of ``config.pruning``; ``variant`` forces one for comparisons:
  "dense" (None), "top" (alignment), "removal" (no alignment), "evit" (fused token)."""
  p = config.pruning
  if variant is None:
    if not p.enabled:
      return None
    variant = "config"
  if variant == "dense":
    return None
  per_layer = tuple(p.get("keep_ratios", ()) or ())
  kw = dict(layers=tuple(p.layers), keep_ratio=per_layer or p.keep_ratio, importance=p.importance,
            alignment=p.alignment, cls_mode=p.cls_mode, fused_token=p.fused_token,
            gap_delta=p.gap_delta)
  if variant == "top":
    kw.update(alignment=True, fused_token=False, cls_mode="keep_position")
  elif variant == "removal":
    kw.update(alignment=False, fused_token=False)
  elif variant == "evit":
    kw.update(alignment=False, fused_token=True)
  elif variant != "config":
    raise ValueError(f"unknown pruning variant {variant!r}: dense, top, removal, evit")
  return PruneConfig(**kw)


def _depth_and_tokens(config) -> tuple[int | None, int | None]:
  """(number of blocks, ViM sequence length) of ``config.model``, None where not known cheaply."""
  name = config.model.name
  if name.startswith("vim"):
    from toppax.models import vim
    keys = ("depth", "img_size", "patch_size")
    try:
      cfg = vim.config_for(name, **{k: config.model[k] for k in keys if config.model.get(k)})
    except (KeyError, TypeError, ValueError):
      return None, None  # the model's own constructor reports it, still before training
    return cfg.depth, cfg.num_tokens
  depth = config.model.get("num_layers")
  return (depth if isinstance(depth, int) else None), None


def check_pruning(config) -> None:
  """Builds every pruning variant this run will use (``config.pruning`` when enabled, each of
  ``config.compare``) and fails now, naming the field, rather than after training."""
  variants = ([None] if config.pruning.enabled else []) + list(config.compare)
  depth, n_tokens = _depth_and_tokens(config) if variants else (None, None)
  for v in variants:
    what = "config.pruning" if v is None else f"config.compare variant {v!r}"
    try:
      p = prune_config(config, v)
      if p is not None and depth:
        p.validate(depth)
      if p is not None and n_tokens:
        p.token_counts(n_tokens)
    except ValueError as e:
      fix = "config.pruning" if v is None else "config.pruning or drop it from config.compare"
      raise ValueError(f"{what}: {e}. Fix {fix} (checked before training, which would "
                       "otherwise fail only when this variant is built after it)") from e


def check_config(config, mesh, *, training: bool = True) -> None:
  """Fails fast on settings that would otherwise fail only after training: batch sizes (positive,
  divisible by the mesh's devices) and the pruning variants."""
  fields = ("batch_size", "eval_batch_size") if training else ("eval_batch_size",)
  for field in fields:
    sharding.check_batch(config[field], mesh, name=f"config.{field}")
  check_pruning(config)


def create_model(config, *, pruning="config", seed=None):
  from toppax import models
  pruning = prune_config(config) if pruning == "config" else pruning
  seed = config.seed if seed is None else seed
  return models.create(config.model.name, pruning=pruning, seed=seed, **model_overrides(config))


@dataclasses.dataclass(frozen=True)
class ModelDefs:
  """Static graph definitions: train (drop-path on) and eval, and the abstract state."""
  train: nnx.GraphDef
  eval: nnx.GraphDef
  params: dict
  rngs: dict


def model_defs(config, pruning="config") -> ModelDefs:
  abstract = nnx.eval_shape(lambda: create_model(config, pruning=pruning))
  abstract.eval()
  gd_eval, params, rngs = nnx.split(abstract, nnx.Param, ...)
  abstract.train()
  gd_train, _, _ = nnx.split(abstract, nnx.Param, ...)
  return ModelDefs(gd_train, gd_eval, nnx.to_pure_dict(params), nnx.to_pure_dict(rngs))


# --- optimizer ------------------------------------------------------------------------------------


def peak_lr(config) -> float:
  return config.lr * config.batch_size / config.lr_base_batch


def lr_schedule(config, steps_per_epoch: int, total_steps: int):
  peak = peak_lr(config)
  warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else peak, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=min(config.min_lr, peak))


def weight_decay_mask(params, model_name: str = "vim"):
  """Which parameters decay, as each official recipe does it.

  ViM: timm's param_groups_weight_decay as Vim uses it: no decay on 1-D params (biases, norms, D,
  ...) nor on the names in VisionMamba.no_weight_decay (pos_embed, cls_token); A_log decays.
  PlainMamba (its mmcls paramwise_cfg): additionally none on A_log, D and direction_Bs.
  """
  exempt = {"pos_embed", "cls_token"}
  if model_name.startswith("plainmamba"):
    exempt |= {"A_log", "D", "direction_Bs"}

  def mask(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    return x.ndim > 1 and name not in exempt
  return jax.tree_util.tree_map_with_path(mask, params)


def make_optimizer(config, schedule):
  parts = []
  if config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=1e-8,
                           weight_decay=config.weight_decay,
                           mask=functools.partial(weight_decay_mask,
                                                  model_name=config.model.name)))
  return optax.chain(*parts)


# --- state ----------------------------------------------------------------------------------------


def _fresh_copy(tree):
  # EMA starts as a copy of the params; separate buffers, so donating the state is legal.
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def init_state(config, defs: ModelDefs, tx, mesh):
  """Fresh (or ``config.init_from``) state, created replicated on the mesh by one jit."""
  repl = sharding.replicated(mesh)
  if config.init_from:
    params, rngs = load_init_params(config, defs, repl)
  else:
    def init():
      _, params, rngs = nnx.split(create_model(config), nnx.Param, ...)
      return nnx.to_pure_dict(params), nnx.to_pure_dict(rngs)
    params, rngs = jax.jit(init, out_shardings=repl)()
  opt_state = jax.jit(tx.init, out_shardings=repl)(params)
  return {"step": jax.device_put(jnp.zeros((), jnp.int32), repl), "params": params,
          "rngs": rngs, "opt_state": opt_state,
          "ema": _fresh_copy(params) if config.ema_decay > 0 else {}}


def fresh_rngs(config, sharding_):
  """The model's non-parameter state (RNG streams from ``config.seed``, drop-path rates) as a
  pure dict, created by one jit without materialising the parameters."""
  return jax.jit(lambda: nnx.to_pure_dict(nnx.split(create_model(config), nnx.Param, ...)[2]),
                 out_shardings=sharding_)()


def load_init_params(config, defs: ModelDefs, sharding_):
  """(params, rngs) of ``config.init_from``: a toppax workdir (its latest checkpoint, EMA copy
  when ``config.eval_ema``; or a ``--mode=convert`` output) or an official .pth/.npz state dict
  (toppax.convert.from_torch). The model's RNG streams start fresh from ``config.seed``."""
  from toppax import checkpointing
  if checkpointing.is_toppax_dir(config.init_from):
    params, what = checkpointing.load_params(config.init_from, defs.params,
                                             use_ema=bool(config.eval_ema), sharding=sharding_,
                                             config=config)
    logging.info("initialised from the %s", what)
    return params, fresh_rngs(config, sharding_)
  from toppax import convert
  model = convert.from_torch(config.model.name, config.init_from, pruning=prune_config(config),
                             **model_overrides(config))
  _, params, rngs = nnx.split(model, nnx.Param, ...)
  logging.info("initialised from %s", config.init_from)
  return (jax.device_put(nnx.to_pure_dict(params), sharding_),
          jax.device_put(nnx.to_pure_dict(rngs), sharding_))


def abstract_state(config, defs: ModelDefs, tx, mesh):
  """ShapeDtypeStructs (with shardings) of the train state, for restoring checkpoints."""
  repl = sharding.replicated(mesh)
  params = defs.params
  opt_state = jax.eval_shape(tx.init, params)
  tree = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "rngs": defs.rngs,
          "opt_state": opt_state, "ema": params if config.ema_decay > 0 else {}}
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), tree)


# --- the step -------------------------------------------------------------------------------------


def make_train_step(config, defs: ModelDefs, tx, schedule, mesh):
  """``step(state, batch) -> (state, metrics)``, one jit over the mesh, state donated."""
  base_key = jax.random.key(config.seed)
  ema_decay = float(config.ema_decay)

  def train_step(state, batch, base_key):
    step = state["step"]
    # Augmentation randomness is a function of (seed, step): resume repeats it exactly.
    images, targets = augment.train_inputs(jax.random.fold_in(base_key, step), batch, config)

    def loss_fn(params, rngs):
      logits, new_rngs = sharding.apply_model(defs.train, params, rngs, images, mesh)
      loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
      return loss, new_rngs

    (loss, rngs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"],
                                                                     state["rngs"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = state["ema"]
    if ema_decay > 0:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(step)}
    new_state = {"step": step + 1, "params": params, "rngs": rngs, "opt_state": opt_state,
                 "ema": ema}
    return new_state, metrics

  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  # The seed's key is an argument, not a constant: runs that differ only in their seed compile
  # to the same program (one persistent-compilation-cache entry serves them all).
  jitted = jax.jit(train_step, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                   donate_argnums=(0,))
  base_key = jax.device_put(base_key, repl)
  return lambda state, batch: jitted(state, batch, base_key)


# --- metrics --------------------------------------------------------------------------------------


class MetricWriter:
  """TensorBoard events (tensorboardX: no TensorFlow needed) and ``metrics.jsonl``; process 0
  writes, the others drop everything (big_vision's BigVisionMetricWriter)."""

  def __init__(self, workdir: str, start_step: int = 0, rerun_eval: bool = False):
    """Continues a run at ``start_step`` (its checkpoint): rows of later steps, written by a run
    killed after that checkpoint, are dropped (they are trained again), so each step is logged
    once. ``rerun_eval``: the eval rows at ``start_step`` go too (evaluated again)."""
    self.active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      _truncate_metrics(path, start_step, rerun_eval)
      self._jsonl = open(path, "a")
      try:
        from tensorboardX import SummaryWriter
        # purge_step hides the killed run's events from the step after the checkpoint on.
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                 purge_step=start_step + 1)
      except ImportError:
        logging.warning("tensorboardX not installed: metrics go to metrics.jsonl only")

  def write(self, step: int, metrics: dict):
    if not self.active:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _truncate_metrics(path: str, start_step: int, rerun_eval: bool = False) -> None:
  """Drops rows of steps after ``start_step`` (and, with ``rerun_eval``, eval rows at it) from
  ``path``, atomically; a torn last line (killed mid-write) goes too."""
  if not os.path.exists(path):
    return
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
        step = int(row["step"])
      except (ValueError, KeyError, TypeError):
        dropped += 1
        continue
      is_eval = all(k.startswith("eval") for k in row if k != "step")
      if step > start_step or (rerun_eval and step == start_step and is_eval):
        dropped += 1
        continue
      kept.append(line if line.endswith("\n") else line + "\n")
  if not dropped:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)
  logging.info("metrics.jsonl: dropped %d row(s) after step %d (re-run from its checkpoint)",
               dropped, start_step)


def _check_finite(records, first_step):
  """Raise naming the step range when any loss or gradient norm is NaN/Inf."""
  for i, m in enumerate(records):
    if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
      bad = first_step + i + 1
      raise FloatingPointError(
          f"non-finite loss/gradients at step {bad} (loss={m['loss']}, grad_norm="
          f"{m['grad_norm']}); steps {first_step + 1}..{first_step + len(records)} were checked "
          f"together, the last checkpoint is before step {first_step + 1}. Lower config.lr, "
          "set config.grad_clip, or use float32.")


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


# Fields that may change when a run is resumed (length, evaluation, logging, host settings).
RESUMABLE_FIELDS = ("total_steps", "num_epochs", "max_steps_per_run", "eval_batch_size",
                    "eval_every_epochs", "eval_ema", "compare", "log_every", "checkpoint_every",
                    "keep_checkpoints", "init_from", "multihost", "workdir", "bench", "study",
                    "data.workers", "data.eval_examples", "data.eval_dir", "data.eval_split",
                    "aug.eval_crop")


def config_changes(config, workdir) -> list[str]:
  """Dotted fields where ``config`` differs from ``workdir/config.json`` (the stored run),
  ignoring RESUMABLE_FIELDS; [] when there is no stored config."""
  from toppax import checkpointing
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return []
  try:
    with open(path) as f:
      old = checkpointing.flat_config(json.load(f))
  except (OSError, ValueError) as e:
    logging.warning("could not read the stored %s (%s): not comparing configs", path, e)
    return []
  new = checkpointing.flat_config(json.loads(config.to_json_best_effort()))
  def resumable(k):
    return any(k == f or k.startswith(f + ".") for f in RESUMABLE_FIELDS)
  return sorted(k for k in set(old) | set(new)
                if not resumable(k) and old.get(k, "<absent>") != new.get(k, "<absent>"))


def write_config(config, workdir):
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


# --- the loop -------------------------------------------------------------------------------------


def total_steps(config, steps_per_epoch: int) -> int:
  return config.total_steps or int(math.ceil(config.num_epochs * steps_per_epoch))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from ``workdir/checkpoints`` when present) and evaluates.

  Returns the final eval metrics (and, with ``config.compare``, the comparison rows).
  """
  mesh = sharding.make_mesh()
  check_config(config, mesh)
  train_source = input_pipeline.make_source(config.data, "train")
  eval_source = input_pipeline.make_source(config.data, "eval")
  plan = input_pipeline.TrainPlan(len(train_source), config.batch_size,
                                  jax.process_index(), jax.process_count())
  n_steps = total_steps(config, plan.steps_per_epoch)
  schedule = lr_schedule(config, plan.steps_per_epoch, n_steps)
  tx = make_optimizer(config, schedule)
  defs = model_defs(config)
  logging.info("%d train / %d eval examples, %d steps per epoch, %d steps, peak lr %.3g, "
               "%d devices", len(train_source), len(eval_source), plan.steps_per_epoch, n_steps,
               peak_lr(config), mesh.devices.size)

  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    keep=config.keep_checkpoints, every=config.checkpoint_every)
  meta_base = {"seed": config.seed, "model": config.model.to_dict(),
               "global_batch": config.batch_size}
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract_state(config, defs, tx, mesh), config=config)
    if meta.get("seed") != config.seed or meta.get("global_batch") != config.batch_size:
      raise checkpointing.CheckpointError(
          f"checkpoint in {ckpt.directory} was written with seed={meta.get('seed')}, "
          f"batch_size={meta.get('global_batch')}; the config has seed={config.seed}, "
          f"batch_size={config.batch_size}: resuming would change the data order. Use the "
          "original values or a new --workdir.")
    logging.info("resumed from step %d (%s)", int(state["step"]), ckpt.directory)
    changed = config_changes(config, workdir)
    if changed:
      logging.warning("resuming %s with a config that differs from its stored config.json in: "
                      "%s. Training continues from the checkpoint with the new values (and "
                      "config.json records them); use a new --workdir for a run trained with "
                      "them throughout.", workdir, ", ".join(changed))
  else:
    state = init_state(config, defs, tx, mesh)
  # Only now, with the resume accepted: a refused run never overwrites the stored config.
  write_config(config, workdir)
  start = int(jax.device_get(state["step"]))
  if start >= n_steps:
    logging.warning("training is already complete: the checkpoint is at step %d of %d; only "
                    "evaluation runs (raise config.total_steps / num_epochs to train on)",
                    start, n_steps)
  step_fn = make_train_step(config, defs, tx, schedule, mesh)
  eval_every = int(config.eval_every_epochs * plan.steps_per_epoch)
  # A run killed between a checkpoint at an eval step and the end of that eval lost the eval:
  # a run resumed at such a step evaluates it again (its old rows, if any, are replaced).
  eval_again = bool(eval_every) and 0 < start < n_steps and start % eval_every == 0
  writer = MetricWriter(workdir, start, rerun_eval=start >= n_steps or eval_again)
  if eval_again:
    _log_eval(config, defs, state, eval_source, mesh, writer, start)
  stop = n_steps if not config.max_steps_per_run else min(n_steps, start + config.max_steps_per_run)

  pending, window_start, t_window, t_start_steps = [], start, None, None
  batches = input_pipeline.train_batches(train_source, plan, config, start, stop)
  for step, batch in zip(range(start, stop), batches):
    state, metrics = step_fn(state, sharding.to_global(batch, mesh))
    pending.append(metrics)
    done = step + 1
    if t_window is None:
      # The first step includes compilation: time from its end.
      jax.block_until_ready(metrics)
      t_window = t_start_steps = time.perf_counter()
      window_start = done
      records = jax.device_get(pending)
      _check_finite(records, step)
      pending = []
    elif done % config.log_every == 0 or done == stop:
      records = jax.device_get(pending)
      _check_finite(records, window_start)
      now = time.perf_counter()
      n = done - window_start
      ips = n * config.batch_size / max(now - t_window, 1e-9)
      rate = (done - (start + 1)) / max(now - t_start_steps, 1e-9)
      last = records[-1]
      logging.info("step %d/%d (epoch %.2f) loss %.4f lr %.3g grad_norm %.3f | %.1f img/s | "
                   "ETA %s", done, n_steps, done / plan.steps_per_epoch, last["loss"], last["lr"],
                   last["grad_norm"], ips, _fmt_time((n_steps - done) / max(rate, 1e-9)))
      writer.write(done, {"train/loss": np.mean([r["loss"] for r in records]),
                          "train/lr": last["lr"], "train/grad_norm": last["grad_norm"],
                          "train/img_per_s": ips, "train/epoch": done / plan.steps_per_epoch})
      pending, window_start, t_window = [], done, now
    ckpt.save(done, state, {**meta_base, "step": done, "data_position": done})
    if eval_every and done % eval_every == 0 and done < n_steps:
      _log_eval(config, defs, state, eval_source, mesh, writer, done)
  if pending:
    _check_finite(jax.device_get(pending), window_start)
  done = int(jax.device_get(state["step"]))
  ckpt.save(done, state, {**meta_base, "step": done, "data_position": done}, force=True)
  ckpt.close()
  if done < n_steps:
    logging.info("stopped at step %d of %d (config.max_steps_per_run)", done, n_steps)
    writer.close()
    return {"step": done}
  result = _log_eval(config, defs, state, eval_source, mesh, writer, done)
  if config.compare:
    rows = evaluate.compare(config, eval_params(config, state), state["rngs"], eval_source, mesh)
    print(evaluate.format_table(rows, config), flush=True)
    evaluate.write_table(rows, config, workdir)
    result["compare"] = rows
  writer.close()
  return result


def eval_params(config, state):
  """The EMA parameters when kept and ``config.eval_ema``, else the raw ones."""
  return state["ema"] if (config.ema_decay > 0 and config.eval_ema) else state["params"]


def _log_eval(config, defs, state, eval_source, mesh, writer, step):
  result = {"step": step}
  runs = [("eval", state["params"])]
  if config.ema_decay > 0:
    runs.append(("eval_ema", state["ema"]))
  for prefix, params in runs:
    m = evaluate.evaluate(config, defs.eval, params, state["rngs"], eval_source, mesh)
    logging.info("step %d %s: top-1 %.2f%% top-5 %.2f%% loss %.4f (%d examples)", step, prefix,
                 100 * m["top1"], 100 * m["top5"], m["loss"], m["count"])
    writer.write(step, {f"{prefix}/{k}": v for k, v in m.items()})
    result.update({f"{prefix}/{k}": v for k, v in m.items()})
  return result
