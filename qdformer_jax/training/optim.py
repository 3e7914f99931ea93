"""Optimizer of docs/DESIGN.md §6: AdamW, backbone lr × 0.5, step decay, global-norm clipping.

Which parameters train is decided by an NNX filter (``trainable_filter``): every ``nnx.Param`` except
the backbone's frozen stages and, when ``model.audio.trainable`` is False, the audio encoder (frozen
BatchNorm values are not Params at all). Parameters outside the filter are not in the optimizer, so
they get neither updates nor AdamW's decoupled weight decay (a zero gradient would not stop the
decay). The backbone's lower learning rate is an optax ``multi_transform`` over the path of each
parameter.
"""
from __future__ import annotations

import jax
import optax
from flax import nnx

from qdformer_jax.models.backbones import frozen_param_filter
from qdformer_jax.models.layers import path_prefix_filter


def total_and_drop_steps(config, steps_per_epoch: int) -> tuple[int, tuple[int, ...]]:
  """``total_steps``/``lr_drop_steps`` when set, else derived from ``num_epochs``/``lr_drop_epochs``."""
  if config.total_steps > 0:
    return int(config.total_steps), tuple(int(s) for s in config.lr_drop_steps)
  total = int(config.num_epochs) * steps_per_epoch
  return total, tuple(int(e) * steps_per_epoch for e in config.lr_drop_epochs)


def resolve_warmup(config, total_steps: int):
  """``config`` with ``model.vq_warmup_steps`` = round(``model.vq_warmup_fraction`` × total steps)
  when a fraction is given and no step count (the continuous warm-up of docs/DESIGN.md §1.6, as a
  share of training whatever its length); ``config`` itself otherwise. Used to initialise the state
  only: the length is then model state, restored with every checkpoint."""
  fraction = float(config.model.vq_warmup_fraction or 0.0)
  if fraction <= 0 or int(config.model.vq_warmup_steps or 0) > 0:
    return config
  resolved = config.copy_and_resolve_references()
  with resolved.unlocked():
    resolved.model.vq_warmup_steps = max(1, round(fraction * int(total_steps)))
  return resolved


def learning_rate_schedule(base_lr: float, drop_steps, decay: float, warmup_steps: int = 0):
  """Linear warm-up over ``warmup_steps``, then ``base_lr`` multiplied by ``decay`` at each of the
  ``drop_steps`` (counted from step 0 of training, warm-up included)."""
  if warmup_steps > 0:
    # join_schedules hands the second schedule the step count since the boundary, so its drops are
    # given relative to the end of the warm-up.
    after = optax.piecewise_constant_schedule(
        base_lr, {int(s) - warmup_steps: decay for s in drop_steps if int(s) > warmup_steps})
    warmup = optax.linear_schedule(base_lr * 1e-3, base_lr, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])
  return optax.piecewise_constant_schedule(base_lr, {int(s): decay for s in drop_steps})


def trainable_filter(model) -> nnx.filterlib.Filter:
  """The Params the optimizer holds: all but the frozen backbone stages and a frozen audio encoder."""
  frozen = [frozen_param_filter(model.backbone, ('backbone',))]
  if not model.config.audio.trainable:
    # Its output is under stop_gradient (QDFormer.encode_audio), but AdamW would still decay it.
    frozen.append(path_prefix_filter([('audio_encoder',)]))
  return nnx.All(nnx.Param, nnx.Not(nnx.Any(*frozen)))


def _labels(params):
  def label(path, _):
    first = getattr(path[0], 'key', getattr(path[0], 'name', None))
    return 'backbone' if first == 'backbone' else 'head'
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(model, optim_config, drop_steps) -> nnx.Optimizer:
  cfg = optim_config
  def adamw(mult):
    schedule = learning_rate_schedule(cfg.learning_rate * mult, drop_steps, cfg.decay_factor, cfg.warmup_steps)
    return optax.adamw(schedule, weight_decay=cfg.weight_decay)
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.multi_transform({'backbone': adamw(cfg.backbone_lr_mult), 'head': adamw(1.0)}, _labels))
  return nnx.Optimizer(model, tx, wrt=trainable_filter(model))
