"""Models and train states from a config: the one place that turns ``config.model``,
``config.pruning`` and ``config.init_from`` into modules, graph definitions and state pytrees.

Training, evaluation, benchmarks, conversion and the study all build their models here, so none of
them needs to import another. The train state is a plain pytree ``{step, params, rngs, opt_state,
ema}``: params and ``rngs`` (the model's non-parameter state: RNG streams, drop-path rates) as nnx
pure dicts, created replicated on the mesh by one jit (never materialised on the host first).
"""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from toppax import checkpointing, convert, models, segmentation, sharding
from toppax.pruning import PruneConfig

# Model fields that change compute but not parameter shapes (not passed to the FLOPs counter).
RUNTIME_FIELDS = ("drop_path_rate", "drop_rate", "dtype", "scan_implementation", "scan_layers",
                  "remat")


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


def is_segmentation(config) -> bool:
  """Whether ``config.model`` is a segmentation model (``toppax.segmentation.names()``)."""
  return config.model.name.startswith("upernet_")


def _depth_and_tokens(config) -> tuple[int | None, int | None]:
  """(number of blocks, ViM sequence length) of ``config.model``, None where not known cheaply."""
  name = config.model.name
  if is_segmentation(config):
    return None, None   # toppax.segmentation.create checks its backbone's schedule
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
  """``config.model`` built by ``toppax.models.create`` (or ``toppax.segmentation.create`` for
  the ``upernet_*`` names); ``pruning="config"`` takes ``config.pruning``, None builds the dense
  model, a PruneConfig that one. A segmentation model on more than one device normalises its
  BatchNorms over the whole data-parallel batch (SyncBN: the mesh's 'data' axis)."""
  pruning = prune_config(config) if pruning == "config" else pruning
  seed = config.seed if seed is None else seed
  overrides = model_overrides(config)
  if is_segmentation(config):
    if jax.device_count() > 1:
      overrides.setdefault("bn_axis_name", sharding.DATA_AXIS)
    return segmentation.create(config.model.name, pruning=pruning, seed=seed, **overrides)
  return models.create(config.model.name, pruning=pruning, seed=seed, **overrides)


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


def batch_stats(config) -> dict:
  """The pure dict (ShapeDtypeStructs) of the model's BatchNorm running statistics, laid out as
  in the non-parameter state (``rngs``); empty for models without BatchNorm (ViM)."""
  abstract = nnx.eval_shape(lambda: create_model(config))
  return nnx.to_pure_dict(nnx.state(abstract, nnx.BatchStat))


def with_stats(rngs: dict, stats: dict) -> dict:
  """``rngs`` (a non-parameter state pure dict) with its leaves at the paths of ``stats``
  replaced by those of ``stats`` (BatchNorm statistics)."""
  if not isinstance(stats, dict):
    return stats
  out = dict(rngs)
  for k, v in stats.items():
    out[k] = with_stats(rngs[k], v)
  return out


def load_init_params(config, defs: ModelDefs, sharding_):
  """(params, rngs) of ``config.init_from``: a toppax workdir (its latest checkpoint, EMA copy
  when ``config.eval_ema``; or a ``--mode=convert`` output) or an official .pth/.npz state dict
  (toppax.convert.from_torch). The model's RNG streams start fresh from ``config.seed``; its
  BatchNorm running statistics come from the checkpoint."""
  if checkpointing.is_toppax_dir(config.init_from):
    stats = batch_stats(config)
    kw = dict(use_ema=bool(config.eval_ema), sharding=sharding_, config=config)
    if stats:
      params, stats, what = checkpointing.load_params(config.init_from, defs.params,
                                                      abstract_stats=stats, **kw)
    else:
      params, what = checkpointing.load_params(config.init_from, defs.params, **kw)
    logging.info("initialised from the %s", what)
    return params, with_stats(fresh_rngs(config, sharding_), stats)
  if is_segmentation(config):
    from toppax.convert import segmentation as seg_convert
    sd = convert.load_state_dict(config.init_from)
    if any(k.startswith("decode_head.") for k in sd):         # an mmseg checkpoint
      model = seg_convert.from_torch(config.model.name, sd, pruning=prune_config(config),
                                     **model_overrides(config))
    else:                        # a classification checkpoint: the official start of training
      model = seg_convert.from_classification(config.model.name, sd,
                                              pruning=prune_config(config), seed=config.seed,
                                              **model_overrides(config))
  else:
    model = convert.from_torch(config.model.name, config.init_from,
                               pruning=prune_config(config), **model_overrides(config))
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


def eval_params(config, state):
  """The EMA parameters when kept and ``config.eval_ema``, else the raw ones."""
  return state["ema"] if (config.ema_decay > 0 and config.eval_ema) else state["params"]
