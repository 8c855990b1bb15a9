"""Segmentation training and evaluation: ``train_and_evaluate(config, workdir)`` and
``run_eval(config, workdir)``, what ``python -m toppax.main`` runs for an ``upernet_*`` model.

Training is the classification loop (``toppax.train.fit``: checkpoints with exact resume, metrics
files, progress with ETA, the non-finite guard) with this task's data, loss and evaluation:
mmseg's pipelines (toppax.data.segmentation), the loss of mmseg's EncoderDecoder (cross-entropy
of the decode logits at the label size, ignoring 255 and averaged over every pixel, as mmseg
0.29's CrossEntropyLoss does by default, plus ``config.seg.aux_weight`` times the auxiliary
head's), and mIoU / mAcc / aAcc accumulated over the evaluation set as mmseg computes them.
BatchNorm statistics cover the whole data-parallel batch (SyncBN, toppax.factory.create_model).
"""
from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from toppax import augment, factory, sharding, train
from toppax import evaluate as classification_eval
from toppax.data import seg_sources
from toppax.data import segmentation as seg_data
from toppax.segmentation import inference, metrics
from toppax.segmentation.layers import resize
from toppax.timing import time_call

IGNORE_INDEX = seg_sources.IGNORE_INDEX


def pixel_cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX):
  """mmseg 0.29's CrossEntropyLoss: per-pixel cross-entropy, 0 where the label is
  ``ignore_index``, averaged over all pixels (``avg_non_ignore=False``, its default)."""
  logits = logits.astype(jnp.float32)
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), safe[..., None], axis=-1)[..., 0]
  return jnp.mean(jnp.where(valid, nll, 0.0))


def _logits_and_aux(model, images):
  logits, info = model(images, return_info=True)
  return logits, info["aux"]


class SegmentationTask:
  """Data, loss, evaluation and the final report of a segmentation run (``toppax.train.fit``)."""

  def __init__(self, config):
    self.config = config
    self.train_source = seg_sources.make_seg_source(config.data, "train")
    self.eval_source = seg_sources.make_seg_source(config.data, "eval")
    self.num_train, self.num_eval = len(self.train_source), len(self.eval_source)

  def train_batches(self, plan, start: int, stop: int):
    return seg_data.seg_train_batches(self.train_source, plan, self.config, start, stop)

  def loss(self, key, batch, apply):
    del key        # the host pipeline drew every random choice from (seed, step)
    config = self.config
    images = augment.normalize(batch["image"], config.data.mean, config.data.std)
    (logits, aux), new_state = apply(images, call=_logits_and_aux)
    labels = batch["label"]
    aux = resize(aux, labels.shape[1:3])
    loss = pixel_cross_entropy(logits, labels) + float(config.seg.aux_weight) * (
        pixel_cross_entropy(aux, labels))
    return loss, new_state

  def evaluate(self, defs, state, mesh, writer, step) -> dict:
    config = self.config
    params = factory.eval_params(config, state)
    summary = evaluate(config, defs.eval, params, state["rngs"], self.eval_source, mesh)
    logging.info("step %d eval: mIoU %.2f%% mAcc %.2f%% aAcc %.2f%% (%d images)", step,
                 100 * summary["mIoU"], 100 * summary["mAcc"], 100 * summary["aAcc"],
                 summary["count"])
    row = {f"eval/{k}": summary[k] for k in ("mIoU", "mAcc", "aAcc", "count")}
    writer.write(step, row)
    return {"step": step, **row, "eval/summary": summary}

  def finish(self, state, mesh, workdir) -> dict:
    config = self.config
    out = {}
    if config.compare:
      out["compare"] = compare_and_report(config, factory.eval_params(config, state),
                                          state["rngs"], self.eval_source, mesh, workdir)
    if config.seg.get("pictures", 0):
      out["pictures"] = save_pictures(config, factory.eval_params(config, state), state["rngs"],
                                      self.eval_source, workdir)
    return out


# --- evaluation ------------------------------------------------------------------------------------


def _predict(model, images, mode, stride):
  """Logits at the images' size, by ``config.seg.test_mode`` (``mode``): "whole" or "slide"
  (windows of the model's img_size every ``stride`` pixels, mmseg's slide mode)."""
  if mode == "whole":
    return model(images)
  if mode == "slide":
    return inference.slide_inference(model, images, stride=stride)
  raise ValueError(f"config.seg.test_mode must be 'whole' or 'slide', got {mode!r}")


def _to_label_canvas(logits, image_size, label_size, label_hw):
  """One example's logits over its image region ``[:h, :w]`` resized (bilinear,
  align_corners=False, no antialias: torch's F.interpolate) to ``label_size`` at the top-left of
  a ``label_hw`` canvas. Rows and columns past the region repeat its last one, so the padding
  never leaks into the border pixels (torch clamps its source coordinates the same way)."""
  hc, wc = logits.shape[:2]
  h, w = image_size[0], image_size[1]
  rows = jnp.minimum(jnp.arange(hc), h - 1)
  cols = jnp.minimum(jnp.arange(wc), w - 1)
  logits = logits[rows][:, cols]
  scale = jnp.stack([label_size[0] / h, label_size[1] / w]).astype(jnp.float32)
  return jax.image.scale_and_translate(
      logits, tuple(label_hw) + (logits.shape[-1],), (0, 1), scale,
      jnp.zeros((2,), jnp.float32), method="linear", antialias=False)


def _eval_fields(config) -> tuple:
  """What the evaluation step depends on besides the model, hashable: its compilation cache
  key, so that runs differing only in training fields (a fine-tune after a zero-shot
  evaluation) share it."""
  stride = config.seg.get("slide_stride")
  return (config.data.num_classes, tuple(config.data.mean), tuple(config.data.std),
          config.seg.test_mode, tuple(stride) if stride else None)


@functools.lru_cache(maxsize=16)
def _eval_step(graphdef, fields: tuple, mesh):
  num_classes, mean, std, mode, stride = fields

  def step(params, rngs, batch):
    images = augment.normalize(batch["image"], mean, std)
    logits, _ = sharding.apply_model(graphdef, params, rngs, images, mesh,
                                     call=lambda m, x: _predict(m, x, mode, stride))
    label_hw = batch["label"].shape[1:3]
    canvas = jax.vmap(lambda l, s, ls: _to_label_canvas(l, s, ls, label_hw))(
        logits.astype(jnp.float32), batch["image_size"], batch["label_size"])
    pred = jnp.argmax(canvas, axis=-1)
    # Padding examples (mask 0) have all-255 labels: they count nothing.
    return metrics.intersect_and_union(pred, batch["label"], num_classes, IGNORE_INDEX)

  repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(repl, repl, data), out_shardings=repl)


def evaluate(config, graphdef, params, rngs, source, mesh, num_examples=None,
             compile_only=False) -> dict:
  """mmseg's metrics over ``source`` (all of it unless limited): the summary of
  ``toppax.segmentation.metrics.summarize`` plus ``count`` (images). ``compile_only``: compile
  the step for the first batch and return {} (``params`` and ``rngs`` may be abstract); see
  ``toppax.train.compile_ahead``."""
  sharding.check_batch(config.eval_batch_size, mesh, name="config.eval_batch_size")
  step = _eval_step(graphdef, _eval_fields(config), mesh)
  acc = metrics.Accumulator(config.data.num_classes)
  count = 0
  n = num_examples or config.data.get("eval_examples", 0) or None
  with seg_data.seg_eval_batches(source, config, n) as batches:
    for batch in batches:
      if compile_only:
        step.lower(params, rngs, sharding.to_global(batch, mesh)).compile()
        return {}
      count += int(np.sum(batch["mask"]))
      acc.add(jax.device_get(step(params, rngs, sharding.to_global(batch, mesh))))
  summary = acc.summary(getattr(source, "classes", None))
  summary["count"] = count
  return summary


# --- dense vs pruned -------------------------------------------------------------------------------


def compare(config, params, rngs, source, mesh, variants=None) -> list[dict]:
  """mIoU, GFLOPs (toppax.tools.flops, test path) and forward img/s of ``params`` as each of
  ``config.compare`` (dense, top, removal, evit)."""
  from toppax.tools import flops
  variants = variants or tuple(config.compare)
  size = config.model.img_size
  images = jnp.zeros((config.eval_batch_size, size, size, 3), jnp.float32)
  rows = []
  for variant in variants:
    pruning = factory.prune_config(config, variant)
    defs = factory.model_defs(config, pruning=pruning)
    summary = evaluate(config, defs.eval, params, rngs, source, mesh)
    overrides = {k: v for k, v in factory.model_overrides(config).items()
                 if k not in factory.RUNTIME_FIELDS + ("img_size", "num_classes", "bn_axis_name")}
    gflops = flops.model_gflops(config.model.name, size, pruning,
                                num_classes=config.data.num_classes, **overrides)
    f = jax.jit(lambda p, r, x, d=defs: nnx.merge(d.eval, p, r)(x))
    ips = images.shape[0] / time_call(f, params, rngs, images, repeats=5, warmup=2)
    tokens = _token_counts(config, pruning)
    rows.append({"variant": variant, "tokens": tokens, "mIoU": summary["mIoU"],
                 "mAcc": summary["mAcc"], "aAcc": summary["aAcc"], "count": summary["count"],
                 "gflops": gflops, "img_per_s": ips, "batch": int(images.shape[0]),
                 "device": jax.devices()[0].device_kind})
  return rows


def compare_and_report(config, params, rngs, source, mesh, workdir) -> list[dict]:
  """``compare``'s rows, printed as a table and written as ``compare.md`` / ``compare.json``."""
  rows = compare(config, params, rngs, source, mesh)
  classification_eval.report_table(rows, format_compare(rows, config), workdir)
  return rows


def _token_counts(config, pruning) -> str:
  model = nnx.eval_shape(lambda: factory.create_model(config, pruning=pruning))
  backbone = model.backbone
  n = backbone.cfg.num_patches
  counts = [n] + (pruning.token_counts(n, has_cls=False) if pruning is not None else [])
  return " -> ".join(str(c) for c in counts)


def format_compare(rows, config) -> str:
  return classification_eval.comparison_table(
      rows, f"{config.model.name} on {config.data.source} ({rows[0]['count']} images, "
            f"{rows[0]['device']}, batch {rows[0]['batch']}, {config.seg.test_mode} inference):",
      [("mIoU %", "mIoU"), ("mAcc %", "mAcc"), ("aAcc %", "aAcc")],
      "GFLOPs: toppax.tools.flops (backbone, neck, decode head); img/s: the jitted forward at "
      "the model's img_size, median of 5 after warm-up.")


# --- pictures --------------------------------------------------------------------------------------


def save_pictures(config, params, rngs, source, workdir) -> str:
  """``<workdir>/segmentation.png``: for ``config.seg.pictures`` validation images, the image, its
  ground truth, the dense and the ToP-pruned predictions, and the tokens each pruning stage
  keeps (toppax.tools.visualize)."""
  from toppax.tools import visualize
  n = int(config.seg.pictures)
  size = config.model.img_size
  items = [source.load(i) for i in range(min(n, len(source)))]
  raw = np.stack([np.asarray(seg_data.transforms.as_image(im).resize((size, size)))
                  for im, _ in items]).astype(np.uint8)
  labels = [np.asarray(lab) for _, lab in items]
  images = augment.normalize(jnp.asarray(raw), config.data.mean, config.data.std)
  preds, positions = {}, None
  for variant in ("dense", "top"):
    pruning = factory.prune_config(config, variant)
    if variant == "top" and pruning is None:
      continue
    defs = factory.model_defs(config, pruning=pruning)
    logits, info = nnx.merge(defs.eval, params, rngs)(images, return_info=True)
    preds[variant] = np.asarray(jnp.argmax(logits, axis=-1))
    if variant == "top":
      positions = info["positions"]
  grid = nnx.eval_shape(lambda: factory.create_model(config)).backbone.cfg.grid
  path = os.path.join(workdir, "segmentation.png")
  visualize.plot_segmentation(raw, labels, preds, positions, grid,
                              num_classes=config.data.num_classes, path=path)
  logging.info("wrote %s", path)
  return path


# --- entry points ----------------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (resuming from ``workdir/checkpoints``) and evaluates a segmentation model."""
  mesh = sharding.make_mesh()
  factory.check_config(config, mesh)
  return train.fit(config, workdir, SegmentationTask(config), mesh)


def run_eval(config, workdir: str) -> dict:
  """``--mode=eval``: the latest checkpoint in ``workdir`` (else ``config.init_from``)."""
  mesh = sharding.make_mesh()
  factory.check_config(config, mesh, training=False)
  source = seg_sources.make_seg_source(config.data, "eval")
  defs = factory.model_defs(config)
  params, rngs = classification_eval.params_to_evaluate(config, workdir, defs, mesh)
  if config.compare:
    return {"compare": compare_and_report(config, params, rngs, source, mesh, workdir)}
  summary = evaluate(config, defs.eval, params, rngs, source, mesh)
  print(metrics.format_table(summary), flush=True)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    metrics.write_json(summary, os.path.join(workdir, "eval.json"), model=config.model.name)
  return summary
