"""Training: ``train_and_evaluate(config, workdir)``, importable from a notebook.

One ``jax.jit`` step over the train state (toppax.factory): ``nnx.merge`` inside, replicated
state, batch sharded on the mesh's 'data' axis, state donated. ``fit`` is the loop every task
shares (classification here, segmentation in toppax.segmentation.train): checkpoints with exact
resume, metrics files, progress with ETA, and the non-finite guard: every step's loss and
gradient norm are checked on the device, and no checkpoint is ever written from a non-finite
state.
"""
from __future__ import annotations

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

from toppax import augment, checkpointing, evaluate, factory, input_pipeline, optim, sharding
from toppax.errors import NonFiniteError
from toppax.metric_writer import MetricWriter
from toppax.timing import format_duration


# --- what a classification run trains on ----------------------------------------------------------


class ClassificationTask:
  """The parts of a run that depend on the task: data, loss, evaluation, the final report."""

  def __init__(self, config):
    self.config = config
    self.train_source = input_pipeline.make_source(config.data, "train")
    self.eval_source = input_pipeline.make_source(config.data, "eval")
    self.num_train, self.num_eval = len(self.train_source), len(self.eval_source)

  def train_batches(self, plan, start: int, stop: int):
    return input_pipeline.train_batches(self.train_source, plan, self.config, start, stop)

  def loss(self, key, batch, apply):
    return classification_loss(self.config, key, batch, apply)

  def evaluate(self, defs, state, mesh, writer, step) -> dict:
    config, result = self.config, {"step": step}
    runs = [("eval", state["params"])]
    if config.ema_decay > 0:
      runs.append(("eval_ema", state["ema"]))
    for prefix, params in runs:
      m = evaluate.evaluate(config, defs.eval, params, state["rngs"], self.eval_source, mesh)
      logging.info("step %d %s: top-1 %.2f%% top-5 %.2f%% loss %.4f (%d examples)", step,
                   prefix, 100 * m["top1"], 100 * m["top5"], m["loss"], m["count"])
      writer.write(step, {f"{prefix}/{k}": v for k, v in m.items()})
      result.update({f"{prefix}/{k}": v for k, v in m.items()})
    return result

  def finish(self, state, mesh, workdir) -> dict:
    """After training: the dense-vs-pruned comparison of ``config.compare``."""
    config = self.config
    if not config.compare:
      return {}
    rows = evaluate.compare(config, factory.eval_params(config, state), state["rngs"],
                            self.eval_source, mesh)
    evaluate.report_table(rows, evaluate.format_table(rows, config), workdir)
    return {"compare": rows}


# --- the step -------------------------------------------------------------------------------------


def classification_loss(config, key, batch, apply):
  """(loss, new model state) of one step; ``apply(images, call=None)`` runs the model in
  training mode (``call(model, images)``: what to run, default ``model(images)``).
  Augmentation (on the device) draws its randomness from ``key``, a function of (seed, step)."""
  images, targets = augment.train_inputs(key, batch, config)
  logits, new_rngs = apply(images)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean(), new_rngs


def make_train_step(config, defs: factory.ModelDefs, tx, schedule, mesh, loss_of=None):
  """``step(state, batch) -> (state, metrics)``, one jit over the mesh, state donated.

  ``metrics["finite"]`` says whether the step's loss and gradient norm were finite. With
  ``config.skip_nonfinite`` a non-finite step changes nothing but the step counter and the RNG
  streams (its update is dropped, ``metrics["skipped"]`` is 1); otherwise the loop stops at it
  before anything is saved. ``loss_of(key, batch, apply)`` is the task's (default: classification
  with the config's augmentation)."""
  base_key = jax.random.key(config.seed)
  ema_decay = float(config.ema_decay)
  skip = bool(config.get("skip_nonfinite", False))
  loss_of = loss_of or (lambda key, batch, apply: classification_loss(config, key, batch, apply))

  def train_step(state, batch, base_key):
    step = state["step"]
    key = jax.random.fold_in(base_key, step)

    def loss_fn(params, rngs):
      def apply(images, call=None):
        return sharding.apply_model(defs.train, params, rngs, images, mesh, call=call)
      return loss_of(key, batch, apply)

    (loss, rngs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"],
                                                                     state["rngs"])
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = state["ema"]
    if ema_decay > 0:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
    if skip:
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      params, opt_state, ema = (keep(params, state["params"]),
                                keep(opt_state, state["opt_state"]), keep(ema, state["ema"]))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(step), "finite": finite,
               "skipped": (~finite).astype(jnp.float32) if skip else jnp.zeros(())}
    new_state = {"step": step + 1, "params": params, "rngs": rngs, "opt_state": opt_state,
                 "ema": ema}
    return new_state, metrics

  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  # The seed's key is an argument, not a constant: runs that differ only in their seed compile
  # to the same program (one persistent-compilation-cache entry serves them all).
  jitted = jax.jit(train_step, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                   donate_argnums=(0,))
  return _Step(jitted, jax.device_put(base_key, repl))


class _Step:
  """``step(state, batch)``; ``step.lower(state, batch)`` lowers it without running it (``state``
  may be abstract, as ``factory.abstract_state`` gives it)."""

  def __init__(self, jitted, base_key):
    self.jitted, self.base_key = jitted, base_key

  def __call__(self, state, batch):
    return self.jitted(state, batch, self.base_key)

  def lower(self, state, batch):
    return self.jitted.lower(state, batch, self.base_key)


# --- the non-finite guard ------------------------------------------------------------------------


def check_finite(records, first_step: int, ckpt=None, config=None, resumed_from=None) -> None:
  """Raises NonFiniteError at the first step among ``records`` (the metrics of steps
  ``first_step + 1 ...``) whose loss or gradient norm was not finite, naming it, the last
  checkpoint on disk (nothing after it was saved) and the fix. Skipped steps
  (``config.skip_nonfinite``) do not count. ``resumed_from``: the step this run resumed at; a
  run that diverges within a few steps of it may have resumed from weights that had diverged
  already without being non-finite yet, which the message says."""
  for i, m in enumerate(records):
    finite = bool(m["finite"]) if "finite" in m else bool(
        np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]))
    if finite or float(m.get("skipped", 0.0)) > 0:
      continue
    bad = first_step + i + 1
    last = ckpt.latest_step() if ckpt is not None else None
    if last is None:
      where = "no checkpoint was saved, so a rerun starts from scratch"
    else:
      where = (f"the last checkpoint is {os.path.join(ckpt.directory, str(last))} (step {last}); "
               f"nothing after it was saved, and a rerun of the same command resumes from it")
    if resumed_from and bad - resumed_from <= 3:
      where += (f". This run resumed from step {resumed_from} and diverged {bad - resumed_from} "
                "step(s) later: that checkpoint may hold weights that had diverged already "
                "(finite, but too large); move it away to resume from an earlier one, or use a "
                "new --workdir")
    fix = "lower config.lr, set config.grad_clip, or train in float32 (config.model.dtype)"
    if config is not None:
      fix = (f"lower config.lr (now {config.lr:g}), set config.grad_clip (now "
             f"{config.grad_clip:g}), or train in float32 (config.model.dtype, now "
             f"{config.model.dtype})")
    raise NonFiniteError(
        f"non-finite loss or gradients at step {bad} (loss={float(m['loss']):.4g}, grad_norm="
        f"{float(m['grad_norm']):.4g}): {where}. Fix: {fix}; or set "
        "config.skip_nonfinite=True to skip such steps")


# --- the stored config ----------------------------------------------------------------------------


# Fields that may change when a run is resumed (length, evaluation, logging, host settings).
RESUMABLE_FIELDS = ("total_steps", "num_epochs", "max_steps_per_run", "eval_batch_size",
                    "eval_every_epochs", "eval_ema", "compare", "log_every", "checkpoint_every",
                    "keep_checkpoints", "init_from", "multihost", "workdir", "bench", "study",
                    "data.workers", "data.eval_examples", "data.eval_dir", "data.eval_split",
                    "aug.eval_crop", "resume_fallback", "skip_nonfinite", "eval_every_steps",
                    "seg.pictures", "seg.eval_bucket", "seg.eval_canvas", "seg.test_mode",
                    "seg.slide_stride")


def config_changes(config, workdir) -> list[str]:
  """Dotted fields where ``config`` differs from ``workdir/config.json`` (the stored run),
  ignoring RESUMABLE_FIELDS; [] when there is no stored config."""
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
  """Trains a classifier (resuming from ``workdir/checkpoints`` when present) and evaluates.

  Returns the final eval metrics (and, with ``config.compare``, the comparison rows).
  """
  mesh = sharding.make_mesh()
  factory.check_config(config, mesh)
  return fit(config, workdir, ClassificationTask(config), mesh)


def _setup(config, task):
  """(plan, steps, schedule, optimizer, model definitions) of a run: what fixes its program."""
  plan = input_pipeline.TrainPlan(task.num_train, config.batch_size, jax.process_index(),
                                  jax.process_count())
  n_steps = total_steps(config, plan.steps_per_epoch)
  schedule = optim.lr_schedule(config, plan.steps_per_epoch, n_steps)
  return plan, n_steps, schedule, optim.make_optimizer(config, schedule), factory.model_defs(config)


def compile_ahead(config, task, mesh=None) -> float:
  """Compiles the train step that ``fit(config, workdir, task)`` runs, from the state's shapes
  and one batch, without running it or touching a workdir; returns the seconds it took.

  With JAX's persistent compilation cache on (``jax_compilation_cache_dir``), the run itself
  then loads the compiled program instead of compiling it (and, in the same process,
  jax-triton's kernels are compiled already): a study's processes compile their fine-tunes
  while the dense model they start from is still training."""
  t = time.perf_counter()
  mesh = mesh if mesh is not None else sharding.make_mesh()
  plan, _, schedule, tx, defs = _setup(config, task)
  batches = task.train_batches(plan, 0, 1)
  try:
    batch = next(iter(batches))
  finally:
    close = getattr(batches, "close", None)
    if close is not None:
      close()
  step = make_train_step(config, defs, tx, schedule, mesh, task.loss)
  step.lower(factory.abstract_state(config, defs, tx, mesh),
             sharding.to_global(batch, mesh)).compile()
  return time.perf_counter() - t


def fit(config, workdir: str, task, mesh=None) -> dict:
  """The training loop of every task: restore or initialise, train to ``total_steps``
  (``max_steps_per_run`` at a time), log, checkpoint, evaluate, then ``task.finish``."""
  mesh = mesh if mesh is not None else sharding.make_mesh()
  plan, n_steps, schedule, tx, defs = _setup(config, task)
  logging.info("%d train / %d eval examples, %d steps per epoch, %d steps, peak lr %.3g, "
               "%d devices", task.num_train, task.num_eval, plan.steps_per_epoch, n_steps,
               optim.peak_lr(config), mesh.devices.size)

  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    keep=config.keep_checkpoints, every=config.checkpoint_every)
  meta_base = {"seed": config.seed, "model": config.model.to_dict(),
               "global_batch": config.batch_size}
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore_latest(factory.abstract_state(config, defs, tx, mesh),
                                      config=config,
                                      fallback=bool(config.get("resume_fallback", False)))
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
    state = factory.init_state(config, defs, tx, mesh)
  # Only now, with the resume accepted: a refused run never overwrites the stored config.
  write_config(config, workdir)
  start = int(jax.device_get(state["step"]))
  if start >= n_steps:
    logging.warning("training is already complete: the checkpoint is at step %d of %d; only "
                    "evaluation runs (raise config.total_steps / num_epochs to train on)",
                    start, n_steps)
  step_fn = make_train_step(config, defs, tx, schedule, mesh, task.loss)
  eval_every = int(config.get("eval_every_steps", 0) or
                   config.eval_every_epochs * plan.steps_per_epoch)
  # A run killed between a checkpoint at an eval step and the end of that eval lost the eval:
  # a run resumed at such a step evaluates it again (its old rows, if any, are replaced).
  eval_again = bool(eval_every) and 0 < start < n_steps and start % eval_every == 0
  writer = MetricWriter(workdir, start, rerun_eval=start >= n_steps or eval_again)
  if eval_again:
    task.evaluate(defs, state, mesh, writer, start)
  stop = n_steps if not config.max_steps_per_run else min(n_steps, start + config.max_steps_per_run)

  # ``pending``: the metrics of the steps since the last log line, still on the device. They are
  # fetched (one small transfer) and checked at each log line and before each checkpoint.
  pending, window_start, t_window, t_start_steps, input_wait = [], start, None, None, 0.0
  batches = task.train_batches(plan, start, stop)
  batch_iter = iter(batches)
  try:
    for step in range(start, stop):
      t_in = time.perf_counter()
      batch = next(batch_iter)
      input_wait += time.perf_counter() - t_in
      state, metrics = step_fn(state, sharding.to_global(batch, mesh))
      pending.append(metrics)
      done = step + 1
      if t_window is None:
        # The first step includes compilation: time from its end.
        check_finite(jax.device_get(pending), step, ckpt, config, start)
        t_window = t_start_steps = time.perf_counter()
        pending, window_start, input_wait = [], done, 0.0
      elif done % config.log_every == 0 or done == stop:
        records = jax.device_get(pending)
        check_finite(records, window_start, ckpt, config, start)
        now = time.perf_counter()
        n, wall = done - window_start, max(now - t_window, 1e-9)
        ips = n * config.batch_size / wall
        rate = (done - (start + 1)) / max(now - t_start_steps, 1e-9)
        row = {"train/loss": float(np.mean([r["loss"] for r in records])),
               "train/lr": float(records[-1]["lr"]), "train/grad_norm": float(records[-1]["grad_norm"]),
               "train/img_per_s": ips, "train/epoch": done / plan.steps_per_epoch,
               "train/step_ms": 1e3 * wall / n, "train/input_wait_frac": input_wait / wall}
        skipped = sum(float(r["skipped"]) for r in records)
        if config.get("skip_nonfinite", False):
          row["train/skipped_steps"] = skipped
        logging.info("step %d/%d (epoch %.2f) loss %.4f lr %.3g grad_norm %.3f | %.1f img/s, "
                     "%.0f ms/step, input wait %.0f%% | ETA %s%s", done, n_steps,
                     row["train/epoch"], row["train/loss"], row["train/lr"],
                     row["train/grad_norm"], ips, row["train/step_ms"],
                     100 * row["train/input_wait_frac"],
                     format_duration((n_steps - done) / max(rate, 1e-9)),
                     f" | {skipped:.0f} non-finite step(s) skipped" if skipped else "")
        writer.write(done, row)
        pending, window_start, t_window, input_wait = [], done, now, 0.0
      if ckpt.should_save(done):
        check_finite(jax.device_get(pending), window_start, ckpt, config, start)
        ckpt.save(done, state, {**meta_base, "step": done, "data_position": done})
      if eval_every and done % eval_every == 0 and done < n_steps:
        task.evaluate(defs, state, mesh, writer, done)
  finally:
    close = getattr(batches, "close", None)
    if close is not None:
      close()   # stops the pipeline's worker processes now, also when a step raised
  check_finite(jax.device_get(pending), window_start, ckpt, config, start)
  done = int(jax.device_get(state["step"]))
  ckpt.save(done, state, {**meta_base, "step": done, "data_position": done}, force=True)
  ckpt.close()
  if done < n_steps:
    logging.info("stopped at step %d of %d (config.max_steps_per_run)", done, n_steps)
    writer.close()
    return {"step": done}
  result = task.evaluate(defs, state, mesh, writer, done)
  result.update(task.finish(state, mesh, workdir))
  writer.close()
  return result
