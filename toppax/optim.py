"""The optimizer of the official recipes: AdamW with each recipe's weight-decay exemptions and
per-parameter learning-rate scales, optional global-norm clipping, and the schedules:
classification's warm-up + cosine scaled linearly with the batch size (DeiT / Vim), and
segmentation's linear warm-up + poly decay (mmseg's ``policy='poly'``)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax


def peak_lr(config) -> float:
  return config.lr * config.batch_size / config.lr_base_batch


def lr_schedule(config, steps_per_epoch: int, total_steps: int):
  """``config.schedule``: "cosine" (default) or "poly"."""
  if config.get("schedule", "cosine") == "poly":
    return poly_schedule(config, total_steps)
  return cosine_schedule(config, steps_per_epoch, total_steps)


def cosine_schedule(config, steps_per_epoch: int, total_steps: int):
  """Linear warm-up over ``config.warmup_epochs`` to ``peak_lr``, then cosine decay to
  ``config.min_lr`` at ``total_steps``."""
  peak = peak_lr(config)
  warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
  end = min(config.min_lr, peak)
  decay = max(total_steps - warmup, 1)
  if not warmup:
    return optax.cosine_decay_schedule(peak, decay, alpha=end / peak if peak else 0.0)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=warmup + decay,
      end_value=end)


def poly_schedule(config, total_steps: int):
  """mmcv's ``policy='poly'`` with ``warmup='linear'``: ``(peak - min_lr) (1 - t / T)^power +
  min_lr``, multiplied during the first ``config.warmup_steps`` steps by ``r + (1 - r) t / W``
  (``r = config.warmup_ratio``), as mmcv's LinearWarmup does per iteration."""
  peak, end = peak_lr(config), float(config.min_lr)
  power = float(config.get("poly_power", 1.0))
  warmup, ratio = int(config.get("warmup_steps", 0)), float(config.get("warmup_ratio", 1e-6))
  total = max(int(total_steps), 1)

  def schedule(step):
    t = jnp.minimum(jnp.asarray(step, jnp.float32), total)
    lr = (peak - end) * (1.0 - t / total) ** power + end
    if warmup:
      lr = lr * jnp.where(t < warmup, ratio + (1.0 - ratio) * t / warmup, 1.0)
    return lr
  return schedule


def restore_optimizer(config):
  """An optimizer with the structure of ``make_optimizer``'s (its state restores from any
  checkpoint of the config) and a constant schedule: for evaluation, which never steps it."""
  return make_optimizer(config, optax.constant_schedule(0.0))


def _name(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


# Substrings of parameter names that the PlainMamba segmentation configs exempt from weight decay
# (paramwise_cfg.custom_keys with decay_mult=0.0; mmcv matches any substring of the name).
PLAINMAMBA_SEG_NO_DECAY = (".absolute_pos_embed", ".relative_position_bias_table", "pos_block",
                           "norm", ".pos_embed", ".A_log", ".D", ".direction_Bs")


def weight_decay_mask(params, model_name: str = "vim"):
  """Which parameters decay, as each official recipe does it.

  ViM: timm's param_groups_weight_decay as Vim uses it: no decay on 1-D params (biases, norms, D,
  ...) nor on the names in VisionMamba.no_weight_decay (pos_embed, cls_token); A_log decays.
  PlainMamba (its mmcls paramwise_cfg): additionally none on A_log, D and direction_Bs.
  UperNet on ViM (Vim's LayerDecayOptimizerConstructor): no decay on 1-D params and biases; the
  position embedding decays (the constructor compares the name without its "backbone." prefix).
  UperNet on PlainMamba (its seg configs): none on names containing any of
  ``PLAINMAMBA_SEG_NO_DECAY`` (so every ``norm``, but not BatchNorms, named ``bn``); biases decay.
  """
  if model_name.startswith("upernet_vim"):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim > 1 and not _name(path).endswith(".bias"), params)
  if model_name.startswith("upernet_plainmamba"):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: not any(k in "." + _name(path) for k in PLAINMAMBA_SEG_NO_DECAY), params)
  exempt = {"pos_embed", "cls_token"}
  if model_name.startswith("plainmamba"):
    exempt |= {"A_log", "D", "direction_Bs"}

  def mask(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    return x.ndim > 1 and name not in exempt
  return jax.tree_util.tree_map_with_path(mask, params)


def layer_decay_scales(params, rate: float, num_layers: int):
  """Per-parameter learning-rate scales of Vim's segmentation LayerDecayOptimizerConstructor:
  ``rate ** (num_layers + 1 - layer_id)`` with layer_id 0 for the patch embedding, the position
  embedding and the cls token, ``i + 1`` for parameters of "backbone.blocks.<i>", and
  ``num_layers + 1`` for everything else. Vim names its blocks "backbone.layers.<i>", which that
  rule never matches, so every block trains at the full rate and only the patch and position
  embeddings at ``rate ** (num_layers + 1)``: the official runs trained so, and so does this."""
  def scale(path, x):
    name = _name(path)
    if name.startswith(("backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed")):
      layer_id = 0
    elif name.startswith("backbone.blocks."):
      layer_id = int(name.split(".")[2]) + 1
    else:
      layer_id = num_layers + 1
    return rate ** (num_layers + 1 - layer_id)
  return jax.tree_util.tree_map_with_path(scale, params)


def make_optimizer(config, schedule):
  """AdamW (+ global-norm clipping when ``config.grad_clip``), with the recipe's weight-decay
  mask and, when ``config.layer_decay`` is set, Vim's per-parameter learning-rate scales."""
  parts = []
  if config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=1e-8,
                           weight_decay=config.weight_decay,
                           mask=functools.partial(weight_decay_mask,
                                                  model_name=config.model.name)))
  rate = float(config.get("layer_decay", 0.0) or 0.0)
  if rate:
    num_layers = int(config.get("layer_decay_num_layers", 0) or config.model.get("depth") or 24)

    def update(updates, state, params):
      scales = layer_decay_scales(params, rate, num_layers)
      return jax.tree.map(lambda u, s: u * s, updates, scales), state
    # AdamW's update already holds the decay term: scaling it scales both, as the learning rate
    # of a torch param group does.
    parts.append(optax.GradientTransformation(lambda params: optax.EmptyState(), update))
  return optax.chain(*parts)
