"""The optimizer of the official recipes: AdamW with each recipe's weight-decay exemptions,
optional global-norm clipping, and a warm-up + cosine learning-rate schedule scaled linearly with
the batch size (DeiT / Vim)."""
from __future__ import annotations

import functools

import jax
import optax


def peak_lr(config) -> float:
  return config.lr * config.batch_size / config.lr_base_batch


def lr_schedule(config, steps_per_epoch: int, total_steps: int):
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


def restore_optimizer(config):
  """An optimizer with the structure of ``make_optimizer``'s (its state restores from any
  checkpoint of the config) and a constant schedule: for evaluation, which never steps it."""
  return make_optimizer(config, optax.constant_schedule(0.0))


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
