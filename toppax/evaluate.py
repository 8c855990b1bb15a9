"""Evaluation: top-1 / top-5 / loss over a padded, masked eval set; dense-vs-pruned comparison.

``evaluate`` counts every example exactly once (the last batch is padded, padding has mask 0).
``compare`` evaluates the same parameters as dense, ToP (alignment) and plain removal models
and reports accuracy, GFLOPs and img/s side by side; ``run_eval`` is ``--mode=eval``.
"""
from __future__ import annotations

import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from toppax import augment, checkpointing, factory, input_pipeline, optim, sharding
from toppax.timing import time_call


@functools.lru_cache(maxsize=16)
def _eval_step(graphdef, mean, std, mesh):
  def step(params, rngs, batch):
    images = augment.normalize(batch["image"], mean, std)
    logits = sharding.apply_model(graphdef, params, rngs, images, mesh)[0].astype(jnp.float32)
    labels, mask = batch["label"], batch["mask"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    correct5 = jnp.any(top5 == labels[:, None], axis=-1)
    correct1 = top5[:, 0] == labels
    return {"loss": jnp.sum(loss * mask), "top1": jnp.sum(correct1 * mask),
            "top5": jnp.sum(correct5 * mask), "count": jnp.sum(mask)}
  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(repl, repl, data), out_shardings=repl)


def evaluate(config, graphdef, params, rngs, source, mesh, num_examples=None,
             compile_only=False) -> dict:
  """{"top1", "top5", "loss", "count"} over the eval source (all of it unless limited).
  ``compile_only``: compile the step for the first batch and return {} (``params`` and
  ``rngs`` may be abstract); see ``toppax.train.compile_ahead``."""
  step = _eval_step(graphdef, tuple(config.data.mean), tuple(config.data.std), mesh)
  sharding.check_batch(config.eval_batch_size, mesh, name="config.eval_batch_size")
  totals = None
  n = num_examples or config.data.eval_examples or None
  with input_pipeline.eval_batches(source, config, n) as batches:
    for batch in batches:
      if compile_only:
        step.lower(params, rngs, sharding.to_global(batch, mesh)).compile()
        return {}
      out = step(params, rngs, sharding.to_global(batch, mesh))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  return {"top1": float(totals["top1"]) / count, "top5": float(totals["top5"]) / count,
          "loss": float(totals["loss"]) / count, "count": int(count)}


def model_gflops(config, pruning) -> tuple[float, str]:
  """GFLOPs per image: toppax.tools.flops when available, else XLA's cost analysis."""
  overrides = factory.model_overrides(config)
  img = overrides.pop("img_size")
  structural = {k: v for k, v in overrides.items() if k not in factory.RUNTIME_FIELDS}
  try:
    from toppax.tools import flops
    return float(flops.model_gflops(config.model.name, img_size=img, pruning=pruning,
                                    **structural)), "toppax.tools.flops"
  except (ImportError, AttributeError, TypeError, ValueError) as e:
    logging.info("toppax.tools.flops unavailable (%s): using XLA cost analysis", e)
  defs = factory.model_defs(config, pruning=pruning)
  x = jax.ShapeDtypeStruct((1, img, img, config.model.get("channels", 3) or 3), jnp.float32)
  f = jax.jit(lambda p, r, x: nnx.merge(defs.eval, p, r)(x))
  cost = f.lower(defs.params, defs.rngs, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # XLA counts a multiply-add as 2 flops; the papers' GFLOPs count MACs (fvcore).
  return float(cost.get("flops", float("nan"))) / 2e9, "XLA cost analysis (MACs)"


def inference_throughput(graphdef, params, rngs, images, repeats=5, warmup=2) -> float:
  """img/s of the jitted forward on ``images`` (warm-up excluded, median of ``repeats``)."""
  f = jax.jit(lambda p, r, x: nnx.merge(graphdef, p, r)(x))
  t = time_call(f, params, rngs, images, repeats=repeats, warmup=warmup)
  return images.shape[0] / t


def compare(config, params, rngs, source, mesh, variants=None) -> list[dict]:
  """Evaluates ``params`` as each variant in ``config.compare`` (dense, top, removal, evit)."""
  variants = variants or tuple(config.compare)
  # One fixed batch for timing, normalised on host, placed like a train batch.
  with input_pipeline.eval_batches(source, config, batch_size=config.eval_batch_size) as batches:
    first = next(batches)
  images = sharding.to_global(
      {"x": np.asarray(augment.normalize(first["image"], config.data.mean, config.data.std))},
      mesh)["x"]
  rows = []
  for variant in variants:
    pruning = factory.prune_config(config, variant)
    defs = factory.model_defs(config, pruning=pruning)
    m = evaluate(config, defs.eval, params, rngs, source, mesh)
    gflops, gflops_source = model_gflops(config, pruning)
    ips = inference_throughput(defs.eval, params, rngs, images)
    n_tokens = token_counts(config, pruning)
    rows.append({"variant": variant, "tokens": n_tokens, **m, "gflops": gflops,
                 "gflops_source": gflops_source, "img_per_s": ips,
                 "batch": int(images.shape[0]), "device": jax.devices()[0].device_kind})
  return rows


def token_counts(config, pruning) -> str:
  """"17 -> 13 -> 9": the static sequence lengths of a ViM (cls token included)."""
  if not config.model.name.startswith("vim"):
    return ""
  from toppax.models import vim
  n = vim.config_for(config.model.name, img_size=config.model.img_size,
                     patch_size=config.model.patch_size).num_tokens
  counts = [n] + (pruning.token_counts(n) if pruning is not None else [])
  return " -> ".join(str(c) for c in counts)


def comparison_table(rows, title: str, columns, footer: str) -> str:
  """A markdown table of dense-vs-pruned ``rows`` (``variant``, ``tokens``, ``gflops``,
  ``img_per_s``, and the metrics): ``columns`` is ``[(header, key), ...]`` of fractions shown as
  percentages, or ``(header, key, format)`` shown as they are; img/s gets the speed-up over the
  dense row."""
  dense = next((r for r in rows if r["variant"] == "dense"), None)
  heads = [c[0] for c in columns]
  lines = [title, "| model | tokens | " + " | ".join(heads) + " | GFLOPs | img/s |",
           "| --- | --- | " + "---: | " * len(heads) + "---: | ---: |"]
  for r in rows:
    speed = f"{r['img_per_s']:.1f}"
    if dense is not None and r is not dense:
      speed += f" ({r['img_per_s'] / dense['img_per_s']:.2f}x)"
    cells = [format(r[c[1]], c[2]) if len(c) > 2 else f"{100 * r[c[1]]:.2f}" for c in columns]
    lines.append(f"| {r['variant']} | {r['tokens']} | " + " | ".join(cells) +
                 f" | {r['gflops']:.4f} | {speed} |")
  lines.append(footer)
  return "\n".join(lines)


def format_table(rows, config) -> str:
  return comparison_table(
      rows, f"{config.model.name} on {config.data.source} ({rows[0]['count']} eval images, "
            f"{rows[0]['device']}, batch {rows[0]['batch']}):",
      [("top-1 %", "top1"), ("top-5 %", "top5"), ("loss", "loss", ".4f")],
      f"GFLOPs from {rows[0]['gflops_source']}; img/s: jitted forward, median of 5 after "
      "warm-up.")


def report_table(rows, table: str, workdir):
  """Prints ``table``; writes ``compare.json`` (the rows) and ``compare.md`` (``table``) in
  ``workdir`` (process 0 only)."""
  print(table, flush=True)
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "compare.json"), "w") as f:
    json.dump(rows, f, indent=2)
  with open(os.path.join(workdir, "compare.md"), "w") as f:
    f.write(table + "\n")


def params_to_evaluate(config, workdir: str, defs, mesh):
  """(params, rngs) that ``--mode=eval`` evaluates: the latest checkpoint in ``workdir`` (its EMA
  parameters when ``config.eval_ema``), else ``config.init_from``."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  ckpt = checkpointing.Checkpointer(ckpt_dir) if os.path.isdir(ckpt_dir) else None
  if ckpt is not None and ckpt.latest_step() is not None:
    # The optimizer's state shapes do not depend on the schedule: any one restores them.
    tx = optim.restore_optimizer(config)
    state, _ = ckpt.restore(factory.abstract_state(config, defs, tx, mesh), config=config)
    logging.info("evaluating checkpoint step %d from %s", int(state["step"]), ckpt_dir)
    return factory.eval_params(config, state), state["rngs"]
  if config.init_from:
    return factory.load_init_params(config, defs, sharding.replicated(mesh))
  raise FileNotFoundError(f"nothing to evaluate: no checkpoint in {ckpt_dir} and no "
                          "config.init_from")


def run_eval(config, workdir: str) -> dict:
  """``--mode=eval``: the latest checkpoint in ``workdir`` (else ``config.init_from``)."""
  mesh = sharding.make_mesh()
  factory.check_config(config, mesh, training=False)
  source = input_pipeline.make_source(config.data, "eval")
  defs = factory.model_defs(config)
  params, rngs = params_to_evaluate(config, workdir, defs, mesh)
  if config.compare:
    rows = compare(config, params, rngs, source, mesh)
    report_table(rows, format_table(rows, config), workdir)
    return {"compare": rows}
  m = evaluate(config, defs.eval, params, rngs, source, mesh)
  print(f"{config.model.name}: top-1 {100 * m['top1']:.2f}% top-5 {100 * m['top5']:.2f}% "
        f"loss {m['loss']:.4f} ({m['count']} images)", flush=True)
  return m
