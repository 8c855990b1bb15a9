"""``--mode=study``: does alignment beat removal? Dense training, then pruning at matched GFLOPs.

For each seed in ``config.study.seeds``:

1. train the dense model (``toppax.train``, workdir ``<workdir>/seed<S>/dense``);
2. for every pruning method (``top``: alignment, ``removal``, ``evit``: fused token) and keep
   ratio in ``config.study.keep_ratios``, and for the importance ablation (``config.study.
   importances`` at ``ablation_ratio`` with ToP): evaluate the dense weights pruned as they are
   (zero-shot), then fine-tune them pruned for ``finetune_epochs`` (same budget for every
   method) and evaluate again;
3. fine-tune the dense model with that same budget too ("dense+ft"), so that the gain of the
   pruned fine-tunes is not confused with plain extra training.

Every finished entry goes to ``<workdir>/study-seed<S>.json`` at once (``-part<i>`` appended
when ``config.study.part`` splits the work); a rerun (or a killed one) skips what is there, and
the training runs resume from their checkpoints (an entry stopped during its fine-tune keeps its
zero-shot result in the file, so the rerun does not evaluate it again).
``config.study.part="i/n"`` splits the work over n processes on one workdir: part 0 trains the
dense models, parts 1..n-1 share the entries; while part 0 trains, the others compile their
entries' programs into JAX's persistent compilation cache (``<workdir>/compilation_cache``
unless one is set; the GPU scan's Triton kernels are kept next to it), so that their fine-tunes
start at once when the dense model is there; they run at the lowest CPU priority, so that part
0's compilation and input pipeline come first. Then ``study.json`` (every seed), ``study.md``
(per-seed rows and means over seeds) and ``study.png`` (top-1 or mIoU vs GFLOPs, zero-shot and
fine-tuned) are written next to them. All methods at one keep ratio keep the same
number of tokens per stage; their GFLOPs (toppax.tools.flops) differ only by ToP's alignment
decay and EViT's one fused token, and are reported per row.
"""
from __future__ import annotations

import copy
import glob
import json
import logging
import os
import statistics
import threading
import time

import jax

from toppax import checkpointing, evaluate, factory, input_pipeline, sharding, train
from toppax.timing import format_duration, versions

METHODS = ("top", "removal", "evit")
LABELS = {"top": "ToP (alignment)", "removal": "removal", "evit": "EViT (fused token)",
          "dense": "dense", "dense+ft": "dense + same fine-tune"}


def _key(seed, method, ratio, importance):
  return f"seed{seed}/{method}/r{ratio:g}/{importance}"


def _check(config):
  s = config.study
  bad = [m for m in s.methods if m not in METHODS]
  if bad:
    raise ValueError(f"config.study.methods: unknown {bad}; choose from {METHODS}")
  for r in list(s.keep_ratios) + [s.ablation_ratio]:
    if not 0.0 < float(r) <= 1.0:
      raise ValueError(f"keep ratio {r} is outside (0, 1]: fix config.study.keep_ratios / "
                       "ablation_ratio")
  if not config.pruning.layers:
    raise ValueError("config.pruning.layers is empty: the study prunes after those blocks")
  if not s.seeds:
    raise ValueError("config.study.seeds is empty")


def _with(config, **fields):
  c = copy.deepcopy(config)
  c.unlock()
  for k, v in fields.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    old = node.get(leaf)
    if isinstance(old, int) and not isinstance(old, bool) and isinstance(v, float):
      if not v.is_integer():
        raise ValueError(f"config.{k} is an integer field; got {v}")
      v = int(v)
    node[leaf] = v
  return c


def _pruned(config, method, ratio, importance):
  if method == "dense":
    return _with(config, **{"pruning.enabled": False})
  return _with(config, **{"pruning.enabled": True, "pruning.keep_ratio": float(ratio),
                          "pruning.keep_ratios": (), "pruning.importance": importance,
                          "pruning.alignment": method == "top",
                          "pruning.fused_token": method == "evit"})


def _entry(config, method, ratio, importance, dense_dir):
  """(the entry's model config, its fine-tune's config); "dense+ft" is the unpruned model."""
  c = _pruned(config, "dense" if method == "dense+ft" else method, ratio, importance)
  return c, _finetune(c, dense_dir)


def _finetune(config, dense_dir):
  s = config.study
  return _with(config, init_from=dense_dir, num_epochs=s.finetune_epochs,
               total_steps=int(s.finetune_steps),
               lr=float(s.finetune_lr), min_lr=float(s.finetune_min_lr), warmup_epochs=0.0,
               warmup_steps=0, eval_every_epochs=0.0, eval_every_steps=0,
               ema_decay=float(s.finetune_ema_decay), compare=(),
               **{"model.drop_path_rate": float(s.finetune_drop_path),
                  "checkpoint_every": 10**9, "keep_checkpoints": 1})


class _Task:
  """What the study needs of a task: classification (top-1) or segmentation (mIoU)."""

  def __init__(self, config):
    self.segmentation = factory.is_segmentation(config)
    self.metric = "mIoU" if self.segmentation else "top1"
    self.label = "mIoU" if self.segmentation else "top-1"
    if self.segmentation:
      from toppax.segmentation import train as seg_train
      self._seg = seg_train

  def train(self, config, workdir) -> dict:
    if self.segmentation:
      return self._seg.train_and_evaluate(config, workdir)
    return train.train_and_evaluate(config, workdir)

  def compile_ahead(self, config, mesh) -> float:
    """Compiles the fine-tune ``config``'s train step and its evaluation (toppax.train.
    compile_ahead); returns the seconds it took."""
    t = time.perf_counter()
    fit_task = (self._seg.SegmentationTask(config) if self.segmentation
                else train.ClassificationTask(config))
    train.compile_ahead(config, fit_task, mesh)
    self.compile_eval_ahead(config, mesh, fit_task.eval_source)
    return time.perf_counter() - t

  def compile_eval_ahead(self, config, mesh, source=None) -> None:
    """Compiles the evaluation step of ``config``'s model from the parameters' shapes; the
    evaluations of this process then run it without compiling."""
    evaluate_ = self._seg.evaluate if self.segmentation else evaluate.evaluate
    defs = factory.model_defs(config)
    repl = sharding.replicated(mesh)
    params, rngs = (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                                 tree) for tree in (defs.params, defs.rngs))
    evaluate_(config, defs.eval, params, rngs,
              source if source is not None else self.eval_source(config), mesh,
              compile_only=True)

  def eval_source(self, config):
    if self.segmentation:
      from toppax.data import seg_sources
      return seg_sources.make_seg_source(config.data, "eval")
    return input_pipeline.make_source(config.data, "eval")

  def evaluate(self, config, defs, params, rngs, source, mesh) -> float:
    if self.segmentation:
      return self._seg.evaluate(config, defs.eval, params, rngs, source, mesh)["mIoU"]
    return evaluate.evaluate(config, defs.eval, params, rngs, source, mesh)["top1"]

  def result(self, result: dict) -> float:
    """The final evaluation's metric of a training run (the EMA one when kept)."""
    return result.get(f"eval_ema/{self.metric}", result.get(f"eval/{self.metric}"))

  def tokens(self, config, pruning) -> str:
    if self.segmentation:
      return self._seg._token_counts(config, pruning)
    return evaluate.token_counts(config, pruning)


class _Results:
  """One seed's finished entries: ``<workdir>/study-seed<S>.json`` (one file per seed, so that
  seeds can run as separate processes on one workdir, e.g. two on one GPU)."""

  def __init__(self, path, others=()):
    self.path = path
    self.rows = {}
    # Zero-shot results of entries whose fine-tune has not finished: a rerun resumes the
    # fine-tune from its checkpoint and does not evaluate the pruned dense model again.
    self.zero_shot = {}
    if os.path.exists(path):
      with open(path) as f:
        data = json.load(f)
      self.rows = {r["key"]: r for r in data["rows"]}
      self.zero_shot = dict(data.get("zero_shot", {}))
      logging.info("study: %d finished entries in %s are kept", len(self.rows), path)
    self.header = {}
    self.others = tuple(others)

  def done(self) -> set:
    """Keys finished here or in the seed's other files (other parts, earlier runs)."""
    keys = set(self.rows)
    for p in self.others:
      if p != self.path and os.path.exists(p):
        with open(p) as f:
          keys |= {r["key"] for r in json.load(f)["rows"]}
    return keys

  def save(self):
    if jax.process_index() != 0:
      return
    tmp = self.path + ".tmp"
    pending = {k: v for k, v in self.zero_shot.items() if k not in self.rows}
    with open(tmp, "w") as f:
      json.dump({**self.header, "rows": list(self.rows.values()),
                 **({"zero_shot": pending} if pending else {})}, f, indent=2)
    os.replace(tmp, self.path)


def run(config, workdir: str) -> dict:
  """Runs (or resumes) the study; returns ``{"rows": [...], "summary": [...]}``."""
  _check(config)
  s = config.study
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh()
  task = _Task(config)
  header = {"model": config.model.to_dict(), "pruning_layers": list(config.pruning.layers),
            "study": s.to_dict(), "train": _train_length(config) | {
                "batch_size": config.batch_size, "lr": config.lr},
            "device": jax.devices()[0].device_kind, "versions": versions(), "metric": task.metric}
  eval_source = None
  entries = [(m, float(r), s.importance) for r in s.keep_ratios for m in s.methods]
  entries += [("top", float(s.ablation_ratio), imp) for imp in s.importances
              if ("top", float(s.ablation_ratio), imp) not in entries]
  entries.append(("dense+ft", 1.0, "-"))
  part, parts = _part(s.get("part", ""))
  if parts > 1:
    # Several processes share one workdir (and a GPU or a few): part 0 trains the dense models,
    # parts 1..n-1 share the entries (every (n-1)-th) and compile theirs while part 0 trains.
    entries = _share(entries, part, parts)
    _persistent_compilation_cache(workdir)
    if part > 0:
      logging.info("study: part %d runs at CPU niceness %d (part 0 comes first)", part,
                   _yield_cpu())
  total = len(entries) + 1
  t0, done_now = time.perf_counter(), 0
  compiled = False

  for n_seed, seed in enumerate(s.seeds):
    suffix = f"-part{part}of{parts}" if parts > 1 else ""
    own = os.path.join(workdir, f"study-seed{seed}{suffix}.json")
    results = _Results(own, [os.path.join(workdir, f"study-seed{seed}.json")] + glob.glob(
        os.path.join(workdir, f"study-seed{seed}-part*.json")))
    results.header = header
    cs = _with(config, seed=int(seed), compare=())
    seed_dir = os.path.join(workdir, f"seed{seed}")
    dense_dir = os.path.join(seed_dir, "dense")
    key = _key(seed, "dense", 1.0, "-")
    dense = _pruned(cs, "dense", 1.0, "-")
    if key not in results.done() and part > 0:
      if not compiled:
        # The entries' programs do not depend on the seed (nor on the dense weights): compiled
        # once, they serve every seed from the persistent cache.
        for method, ratio, importance in entries:
          if _key(seed, method, ratio, importance) not in results.done():
            t = time.perf_counter()
            if _ahead(task.compile_ahead, _entry(cs, method, ratio, importance, dense_dir)[1],
                      mesh):
              logging.info("study: compiled %s ahead in %.0f s",
                           _key(seed, method, ratio, importance), time.perf_counter() - t)
        compiled = True
      _wait_for_dense(dense_dir, seed)
    elif key not in results.done():
      logging.info("study: training the dense model, seed %d (%s)", seed, dense_dir)
      t = time.perf_counter()
      # The final evaluation's step compiles in the background while the model trains.
      ahead = _in_background(task.compile_eval_ahead, dense, mesh)
      res = task.train(dense, dense_dir)
      ahead.join()
      _export_dense(dense, dense_dir, mesh)
      results.rows[key] = _row(task, dense, key, seed, "dense", 1.0, "-", task.result(res), None,
                               train_s=time.perf_counter() - t)
      results.save()
      done_now += 1
    if all(_key(seed, *e) in results.done() for e in entries):
      continue
    defs = factory.model_defs(dense)
    params, stats = _dense_params(dense, dense_dir, defs, mesh)
    eval_source = eval_source or task.eval_source(config)

    for method, ratio, importance in entries:
      key = _key(seed, method, ratio, importance)
      if key in results.done():
        continue
      # The zero-shot evaluation builds the fine-tune's model (they differ only in training
      # fields such as drop-path), so the fine-tune's final evaluation reuses its compilation.
      c, ft = _entry(cs, method, ratio, importance, dense_dir)
      zero = results.zero_shot.get(key)
      if zero is not None:
        logging.info("study: %s zero-shot %.2f%% (from the run that started its fine-tune)",
                     key, 100 * zero)
      elif method != "dense+ft":
        pdefs = factory.model_defs(ft)
        rngs = factory.with_stats(factory.fresh_rngs(ft, sharding.replicated(mesh)), stats)
        zero = task.evaluate(ft, pdefs, params, rngs, eval_source, mesh)
        results.zero_shot[key] = float(zero)
        results.save()
      name = f"{method}-r{ratio:g}-{importance}".replace("+", "_")
      t = time.perf_counter()
      res = task.train(ft, os.path.join(seed_dir, name))
      results.rows[key] = _row(task, c, key, seed, method, ratio, importance, zero,
                               task.result(res),
                               train_s=time.perf_counter() - t)
      results.save()
      done_now += 1
      left = sum(1 for e in entries if _key(seed, *e) not in results.done())
      later = (len(s.seeds) - n_seed - 1) * total    # the next seeds' entries, dense included
      rate = (time.perf_counter() - t0) / max(done_now, 1)
      logging.info("study: %s zero-shot %s fine-tuned %.2f%% | seed %d: %d/%d entries, "
                   "ETA %s", key, "-" if zero is None else f"{100 * zero:.2f}%",
                   100 * task.result(res), seed, total - left, total,
                   format_duration((left + later) * rate))
  return write_report(workdir)


def _train_length(config):
  """The dense run's length as the config sets it: steps where given, else epochs."""
  steps = config.get("total_steps")
  return {"steps": int(steps)} if steps else {"epochs": config.num_epochs}


def _part(spec):
  """``"i/n"`` -> (i, n); "" -> (0, 1)."""
  if not spec:
    return 0, 1
  try:
    i, n = (int(x) for x in str(spec).split("/"))
  except ValueError:
    raise ValueError(f"config.study.part={spec!r}: expected 'i/n', e.g. '0/2'") from None
  if not 0 <= i < n:
    raise ValueError(f"config.study.part={spec!r}: need 0 <= i < n")
  return i, n


def _ahead(fn, *args) -> bool:
  """``fn(*args)``, a compilation ahead of need: a failure is logged, not raised (what it
  prepares then compiles when first run)."""
  try:
    fn(*args)
    return True
  except Exception as e:   # pylint: disable=broad-except
    logging.warning("study: compiling ahead failed (%s: %s); it compiles when first run",
                    type(e).__name__, e)
    return False


def _in_background(fn, *args) -> threading.Thread:
  """``_ahead(fn, *args)`` in a thread (compilation releases the GIL)."""
  thread = threading.Thread(target=_ahead, args=(fn, *args), daemon=True)
  thread.start()
  return thread


def _share(entries, part, parts):
  """Part ``part`` of ``parts`` > 1: none for part 0 (it trains the dense models), every
  (n-1)-th entry for the others."""
  return [e for k, e in enumerate(entries) if part and k % (parts - 1) == part - 1]


def _persistent_compilation_cache(workdir):
  """Turns on JAX's persistent compilation cache (``<workdir>/compilation_cache`` unless one is
  set), through which the study's processes share their compiled programs."""
  if not jax.config.jax_compilation_cache_dir:
    from jax.experimental.compilation_cache import compilation_cache
    compilation_cache.set_cache_dir(os.path.join(workdir, "compilation_cache"))
    compilation_cache.reset_cache()    # takes effect also after earlier compilations
  logging.info("study: persistent compilation cache %s", jax.config.jax_compilation_cache_dir)


def _yield_cpu(niceness=19) -> int | None:
  """Lowers this process's CPU priority to ``niceness``, every thread of it (Linux keeps a
  niceness per thread; threads started later inherit it), and returns the process's niceness
  (None where the OS has no such thing). The entries' parts run beside part 0 on one host:
  compiling ahead at equal priority, seven of them held the dense model's first training step
  back by minutes and starved its input pipeline; at niceness 19 they take the cores it leaves."""
  if not hasattr(os, "setpriority"):
    return None
  try:
    threads = [int(t) for t in os.listdir("/proc/self/task")]
  except OSError:
    threads = [0]                          # no /proc: the call sets the whole process's
  for tid in threads:
    try:
      os.setpriority(os.PRIO_PROCESS, tid, max(niceness, os.getpriority(os.PRIO_PROCESS, tid)))
    except OSError:                        # the thread has ended meanwhile
      pass
  return os.getpriority(os.PRIO_PROCESS, 0)


def _wait_for_dense(dense_dir, seed, poll_s=10.0):
  """Parts other than 0 wait for part 0 to train and export the seed's dense model."""
  where = os.path.join(dense_dir, checkpointing.PARAMS_DIR)
  logging.info("study: waiting for part 0 to train the dense model of seed %d (%s)", seed, where)
  while not os.path.exists(os.path.join(dense_dir, "params_meta.json")):
    time.sleep(poll_s)


def _export_dense(config, dense_dir, mesh):
  """The trained dense model's evaluation parameters (and BatchNorm statistics) as
  ``<dense_dir>/params`` (the format of --mode=convert): what the fine-tunes start from, small
  enough to move between machines."""
  if os.path.isdir(os.path.join(dense_dir, checkpointing.PARAMS_DIR)):
    return
  defs = factory.model_defs(config)
  repl = sharding.replicated(mesh)
  params, stats = _dense_params(config, os.path.join(dense_dir, "checkpoints"), defs, mesh)
  checkpointing.save_params(dense_dir, params,
                            factory.with_stats(factory.fresh_rngs(config, repl), stats),
                            {"source": dense_dir, "model": config.model.to_dict()})


def _dense_params(config, dense_dir, defs, mesh):
  """(params, BatchNorm statistics or {}) of a dense run or its export."""
  stats = factory.batch_stats(config)
  kw = dict(use_ema=bool(config.eval_ema), sharding=sharding.replicated(mesh))
  if stats:
    params, stats, _ = checkpointing.load_params(dense_dir, defs.params, abstract_stats=stats,
                                                 **kw)
    return params, stats
  return checkpointing.load_params(dense_dir, defs.params, **kw)[0], {}


def _row(task, c, key, seed, method, ratio, importance, zero, finetuned, train_s):
  pruning = factory.prune_config(c)
  gflops, _ = evaluate.model_gflops(c, pruning)
  return {"key": key, "seed": int(seed), "method": method, "keep_ratio": float(ratio),
          "importance": importance, "tokens": task.tokens(c, pruning),
          "gflops": gflops, f"zero_shot_{task.metric}": zero,
          f"finetuned_{task.metric}": finetuned, "train_seconds": round(float(train_s), 1)}


# --- the report -----------------------------------------------------------------------------------


def _mean_std(values):
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(mean, std):
  if mean is None:
    return "-"
  return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def summarize(rows, metric: str = "top1") -> list[dict]:
  """Means (and sample std) over seeds per (method, keep ratio, importance) of ``metric``."""
  groups = {}
  for r in rows:
    groups.setdefault((r["method"], r["keep_ratio"], r["importance"]), []).append(r)
  out = []
  for (method, ratio, importance), rs in groups.items():
    zm, zs = _mean_std([r[f"zero_shot_{metric}"] for r in rs])
    fm, fs = _mean_std([r[f"finetuned_{metric}"] for r in rs])
    out.append({"method": method, "keep_ratio": ratio, "importance": importance,
                "tokens": rs[0]["tokens"], "gflops": rs[0]["gflops"], "seeds": len(rs),
                "zero_shot_mean": zm, "zero_shot_std": zs, "finetuned_mean": fm,
                "finetuned_std": fs})
  order = {m: i for i, m in enumerate(("dense", "dense+ft") + METHODS)}
  out.sort(key=lambda g: (-g["keep_ratio"], order.get(g["method"], 9), g["importance"]))
  return out


def format_report(data) -> str:
  metric = data.get("metric", "top1")
  name = "mIoU" if metric == "mIoU" else "top-1"
  rows, summary = data["rows"], summarize(data["rows"], metric)
  imp = data["study"]["importance"]
  main_rows = [g for g in summary if g["importance"] in (imp, "-")]
  lines = [f"| method | keep ratio | tokens per stage | GFLOPs | seeds | zero-shot {name} % | "
           f"fine-tuned {name} % |", "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
  for g in main_rows:
    zs = _fmt(g["zero_shot_mean"], g["zero_shot_std"])
    ft = _fmt(g["finetuned_mean"], g["finetuned_std"])
    lines.append(f"| {LABELS.get(g['method'], g['method'])} | {g['keep_ratio']:g} | "
                 f"{g['tokens']} | {g['gflops']:.4f} | {g['seeds']} | {zs} | {ft} |")
  abl = [g for g in summary if g["method"] == "top" and
         g["keep_ratio"] == float(data["study"]["ablation_ratio"])]
  if len(abl) > 1:
    lines += ["", f"Importance ablation (ToP, keep ratio {data['study']['ablation_ratio']:g}):",
              "", f"| importance | zero-shot {name} % | fine-tuned {name} % |",
              "| --- | ---: | ---: |"]
    for g in sorted(abl, key=lambda g: g["importance"]):
      lines.append(f"| {g['importance']} | {_fmt(g['zero_shot_mean'], g['zero_shot_std'])} | "
                   f"{_fmt(g['finetuned_mean'], g['finetuned_std'])} |")
  lines += ["", "Per seed:", "", "| seed | method | keep ratio | importance | zero-shot % | "
            "fine-tuned % | train s |", "| ---: | --- | ---: | --- | ---: | ---: | ---: |"]
  for r in sorted(rows, key=lambda r: (r["seed"], -r["keep_ratio"], r["method"],
                                       r["importance"])):
    zero, tuned = r[f"zero_shot_{metric}"], r[f"finetuned_{metric}"]
    z = "-" if zero is None else f"{100 * zero:.2f}"
    f = "-" if tuned is None else f"{100 * tuned:.2f}"
    lines.append(f"| {r['seed']} | {r['method']} | {r['keep_ratio']:g} | {r['importance']} | "
                 f"{z} | {f} | {r['train_seconds']:.0f} |")
  lines.append("")
  lines.append(f"{data.get('device', '?')}; " + ", ".join(
      f"{k} {v}" for k, v in data.get("versions", {}).items()) + "; ± is the sample standard "
      "deviation over seeds; dense: the trained model unpruned (its zero-shot column); dense + "
      "same fine-tune: the dense model given the pruned models' fine-tuning budget.")
  return "\n".join(lines)


def plot(data, path):
  """Top-1 vs GFLOPs per method: zero-shot (left) and fine-tuned (right), dense as a point."""
  from toppax.tools import visualize
  metric = data.get("metric", "top1")
  summary = summarize(data["rows"], metric)
  imp = data["study"]["importance"]
  fig, axes = visualize.new_figure(2)
  dense = next((g for g in summary if g["method"] == "dense"), None)
  for ax, field, title in ((axes[0, 0], "zero_shot_mean", "zero-shot (no fine-tuning)"),
                           (axes[0, 1], "finetuned_mean", "after the same short fine-tune")):
    curves = {}
    for m in METHODS:
      pts = sorted((g["gflops"], g[field]) for g in summary
                   if g["method"] == m and g["importance"] == imp and g[field] is not None)
      if pts:
        curves[LABELS[m]] = ([p[0] for p in pts], [p[1] for p in pts])
    if dense is not None:
      curves["dense"] = ([dense["gflops"]], [dense["zero_shot_mean"]])
      ft = next((g for g in summary if g["method"] == "dense+ft"), None)
      if field == "finetuned_mean" and ft is not None and ft["finetuned_mean"] is not None:
        curves[LABELS["dense+ft"]] = ([ft["gflops"]], [ft["finetuned_mean"]])
    visualize.plot_curves(curves, xlabel="GFLOPs per image",
                          ylabel="mIoU" if metric == "mIoU" else "top-1", title=title,
                          ax=ax, percent=True)
  fig.savefig(path, dpi=120)
  return path


def load(workdir) -> dict:
  """All seeds' entries of a study workdir: the header of one file and every row."""
  paths = sorted(glob.glob(os.path.join(workdir, "study-seed*.json")))
  if not paths:
    raise FileNotFoundError(f"no study-seed*.json in {workdir}: run --mode=study first")
  data, rows = None, {}
  for p in paths:
    with open(p) as f:
      d = json.load(f)
    data = data or d
    rows.update({r["key"]: r for r in d["rows"]})
  data["rows"] = list(rows.values())
  data.pop("zero_shot", None)           # a part's pending entries, not results
  return data


def write_report(workdir) -> dict:
  """``study.md``, ``study.png`` and ``study.json`` (all seeds) from the per-seed files."""
  data = load(workdir)
  if jax.process_index() != 0:
    return data
  with open(os.path.join(workdir, "study.json"), "w") as f:
    json.dump({**data, "summary": summarize(data["rows"], data.get("metric", "top1"))}, f,
              indent=2)
  table = format_report(data)
  with open(os.path.join(workdir, "study.md"), "w") as f:
    f.write(table + "\n")
  plot(data, os.path.join(workdir, "study.png"))
  print(table, flush=True)
  data["summary"] = summarize(data["rows"], data.get("metric", "top1"))
  return data
