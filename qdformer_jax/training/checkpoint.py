"""Orbax checkpoints of a run: one manager, keep the latest N plus the best by metric.

Every checkpoint step (``<workdir>/checkpoints/<step>/``, see ``qdformer_jax.workdir``) holds the
train state, the grain iterator state and a JSON meta item; a step that was evaluated also holds the
evaluation's metrics. One ``CheckpointManager`` with a preservation policy (``LatestN`` or ``BestN``
by ``config.best_metric``) decides what is kept, so a step that is both the latest and the best is
written once.

``state`` is the pure nested dict of the NNX state of ``(model, optimizer)`` (PRNG keys stored as
raw key data), so it restores onto any mesh: give ``restore`` the abstract target with the shardings
of the new mesh (8 TPU chips -> 1 Colab GPU) and Orbax reshards while reading.
"""
from __future__ import annotations

import math

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers

from qdformer_jax import workdir as workdir_lib


def _is_key(x) -> bool:
  return hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_saveable(state: nnx.State) -> dict:
  """NNX state -> pure dict with PRNG keys as uint32 key data."""
  pure = nnx.to_pure_dict(state)
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, pure)


def abstract_saveable(abstract_state: nnx.State) -> dict:
  """Abstract (ShapeDtypeStruct, with shardings) target matching ``to_saveable``."""
  pure = nnx.to_pure_dict(abstract_state)

  def convert(x):
    if _is_key(x):
      data = jax.eval_shape(jax.random.key_data, x)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, 'sharding', None))
    return x
  return jax.tree.map(convert, pure)


def from_saveable(abstract_state: nnx.State, restored: dict) -> nnx.State:
  """Inverse of ``to_saveable`` onto the structure (and key types) of ``abstract_state``."""
  template = nnx.to_pure_dict(abstract_state)
  pure = jax.tree.map(lambda t, x: jax.random.wrap_key_data(x) if _is_key(t) else x, template, restored)
  state = jax.tree.map(lambda x: x, abstract_state)
  nnx.replace_by_pure_dict(state, pure)
  return state


def metric_rank(metrics, metric: str, mode: str = 'max') -> float:
  """The value a checkpoint is ranked by, larger is better; a missing or non-finite metric ranks last."""
  try:
    value = float((metrics or {})[metric])
  except (KeyError, TypeError, ValueError):
    return -math.inf
  if not math.isfinite(value):
    return -math.inf
  return value if mode == 'max' else -value


def best_step(manager: ocp.CheckpointManager, metric: str | None, mode: str = 'max') -> int | None:
  """The step with the best ``metric`` among the manager's steps that hold metrics, or None."""
  if not metric:
    return None
  ranked = []
  for step in manager.all_steps():
    metrics = manager.metrics(step)
    if metrics is not None and metric_rank(metrics, metric, mode) > -math.inf:
      ranked.append((metric_rank(metrics, metric, mode), step))
  return max(ranked)[1] if ranked else None


class Checkpoints:
  """The checkpoint manager of a workdir."""

  def __init__(self, workdir: str, keep: int = 3, best_metric: str | None = None, best_mode: str = 'max'):
    self.best_metric, self.best_mode = best_metric, best_mode
    policies = [checkpoint_managers.LatestN(n=keep)]
    rank = None
    if best_metric:
      rank = lambda m: metric_rank(m, best_metric, best_mode)  # noqa: E731
      policies.append(checkpoint_managers.BestN(get_metric_fn=rank, n=1, keep_checkpoints_without_metrics=False))
    self.manager = ocp.CheckpointManager(
        workdir_lib.checkpoints_dir(workdir),
        # best_fn makes Orbax write a step's metrics; the preservation policy decides what is kept.
        options=ocp.CheckpointManagerOptions(
            create=True, best_fn=rank, best_mode='max',
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies)),
        item_names=(workdir_lib.STATE_ITEM, workdir_lib.DATA_ITEM, workdir_lib.META_ITEM))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return best_step(self.manager, self.best_metric, self.best_mode)

  def save(self, step: int, state: nnx.State, data_iterator, meta: dict, metrics: dict | None = None):
    """Saves ``step`` (asynchronously); ``metrics`` (an evaluation of this step) rank it for best."""
    args = {workdir_lib.STATE_ITEM: ocp.args.StandardSave(to_saveable(state)),
            workdir_lib.META_ITEM: ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      args[workdir_lib.DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
    if metrics is not None:
      metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics)

  def restore(self, abstract_state: nnx.State, *, step: int | None = None, data_iterator=None,
              which: str = 'latest'):
    """Restores (state, meta, step) of ``step``, else of the latest or best one (``which``), and,
    when given, the data iterator in place."""
    if which not in ('latest', 'best'):
      raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
    if step is None:
      step = self.best_step() if which == 'best' else self.latest_step()
    if step is None:
      raise FileNotFoundError(f'no {which} checkpoint in {self.manager.directory}')
    args = {workdir_lib.STATE_ITEM: ocp.args.StandardRestore(abstract_saveable(abstract_state)),
            workdir_lib.META_ITEM: ocp.args.JsonRestore()}
    if data_iterator is not None:
      args[workdir_lib.DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return (from_saveable(abstract_state, restored[workdir_lib.STATE_ITEM]),
            dict(restored[workdir_lib.META_ITEM]), step)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
