"""Orbax checkpoints: atomic, keep-N latest (with the data iterator) plus keep-1 best by metric.

Layout under the workdir:
  checkpoints/<step>/{state, data, meta}   the resumable train state, grain iterator state, JSON meta
  best/<step>/{state, meta}                the best evaluation so far (``config.best_metric``)

``state`` is the pure nested dict of the NNX state of ``(model, optimizer)`` (PRNG keys stored as
raw key data), so it restores onto any mesh: give ``restore`` the abstract target with the shardings
of the new mesh (8 TPU chips -> 1 Colab GPU) and Orbax reshards while reading.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx


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


class Checkpoints:
  """The two managers of a workdir."""

  def __init__(self, workdir: str, keep: int = 3, best_metric: str | None = None, best_mode: str = 'max'):
    self.latest = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), 'checkpoints'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=('state', 'data', 'meta'))
    self.best_metric = best_metric
    self.best = None
    if best_metric:
      self.best = ocp.CheckpointManager(
          os.path.join(os.path.abspath(workdir), 'best'),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, best_fn=lambda m: float(m[best_metric]), best_mode=best_mode, create=True),
          item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, state: nnx.State, data_iterator, meta: dict):
    import grain
    args = {'state': ocp.args.StandardSave(to_saveable(state)), 'meta': ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    self.latest.save(step, args=ocp.args.Composite(**args))

  def save_best(self, step: int, state: nnx.State, metrics: dict, meta: dict):
    if self.best is None or self.best_metric not in metrics:
      return
    self.best.save(step, metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                   args=ocp.args.Composite(state=ocp.args.StandardSave(to_saveable(state)),
                                           meta=ocp.args.JsonSave(meta)))

  def restore(self, abstract_state: nnx.State, *, step: int | None = None, data_iterator=None,
              which: str = 'latest'):
    """Restores (state, meta) and, when given, the data iterator in place."""
    import grain
    manager = self.latest if which == 'latest' else self.best
    if manager is None:
      raise ValueError(f'no {which!r} checkpoints are kept by this workdir')
    if step is None:
      step = manager.best_step() if which == 'best' else manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'no {which} checkpoint in {manager.directory}')
    args = {'state': ocp.args.StandardRestore(abstract_saveable(abstract_state)), 'meta': ocp.args.JsonRestore()}
    if data_iterator is not None and which == 'latest':
      args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    return from_saveable(abstract_state, restored['state']), dict(restored['meta']), step

  def wait(self):
    self.latest.wait_until_finished()
    if self.best is not None:
      self.best.wait_until_finished()

  def close(self):
    self.latest.close()
    if self.best is not None:
      self.best.close()
