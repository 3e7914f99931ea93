"""Orbax checkpoints of a run: one manager, keep the latest N plus the best by metric.

Every checkpoint step (``<workdir>/checkpoints/<step>/``, see ``qdformer_jax.workdir``) holds the
train state, the grain iterator state and a JSON meta item (step, global data position, process
count); a step that was evaluated also holds the evaluation's metrics. One ``CheckpointManager`` with
a preservation policy (``LatestN`` or ``BestN`` by ``config.best_metric``) decides what is kept, so a
step that is both the latest and the best is written once.

An evaluated step is saved first and evaluated while it is written; its metrics are added to the
step afterwards (:meth:`Checkpoints.record_metrics`), so a crash or preemption during a long
evaluation never loses the trained state. A step without metrics is not ranked; a missing or
non-finite metric ranks last and never becomes the best.

Faults: :meth:`Checkpoints.restore_latest` tries the newest step first; a step that cannot be read
(missing or truncated file, unreadable metadata) is reported in one line, moved aside to
``<step>.corrupt-<n>`` (outside Orbax's step naming, so it is ignored but kept) and the previous step
is tried.

``state`` is the pure nested dict of the NNX state of ``(model, optimizer)`` (PRNG keys stored as
raw key data), so it restores onto any mesh: give ``restore`` the abstract target with the shardings
of the new mesh (8 TPU chips -> 1 Colab GPU) and Orbax reshards while reading.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import sys
import tempfile
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from flax import nnx
from orbax.checkpoint import checkpoint_managers

from qdformer_jax import console
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


# The files every complete step holds (relative to the step directory); checked before a restore so
# that a missing one is named instead of surfacing as a pytree or tensorstore error.
REQUIRED_FILES = ('_CHECKPOINT_METADATA', f'{workdir_lib.STATE_ITEM}/_METADATA',
                  f'{workdir_lib.STATE_ITEM}/manifest.ocdbt', f'{workdir_lib.META_ITEM}/metadata')
METRICS_FILE = 'metrics/metrics'   # Orbax's metrics item of a step (JSON), read by its BestN policy


class UnreadableCheckpoint(Exception):
  """A checkpoint step that cannot be read: ``file`` (or the step directory) and ``reason``."""

  def __init__(self, step: int, file: str, reason: str):
    self.step, self.file, self.reason = step, file, reason
    super().__init__(f'checkpoint step {step}: {file}: {reason}')


def describe_restore_error(step: int, step_dir, error: Exception) -> UnreadableCheckpoint:
  """The file and a one-line reason of a failed restore (tensorstore names the file in its message)."""
  text = str(error)
  files = re.findall(r'(?:local )?file "([^"]+)"', text)
  file = files[-1] if files else str(step_dir)
  reason = text.split(f'"{files[-1]}"', 1)[-1] if files else text
  reason = reason.split(' [tensorstore_spec', 1)[0].lstrip(': ').strip().splitlines()
  reason = reason[0] if reason else type(error).__name__
  return UnreadableCheckpoint(step, file, f'{type(error).__name__}: {reason[:300]}')


def _path_key(path) -> str:
  """'0.backbone.conv1.kernel' for a tree path (dict keys and sequence indices alike, as strings)."""
  return '.'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)


def shapes_of(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """{path: (shape, dtype)} of the arrays (or array metadata) of a tree."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(x, 'shape'):
      out[_path_key(path)] = (tuple(int(d) for d in x.shape), str(np.dtype(x.dtype)) if x.dtype is not None else '?')
  return out


def shape_differences(stored: dict, requested: dict) -> list[str]:
  """Human lines for every parameter whose shape or dtype differs, or that only one side has."""
  lines = []
  for key in sorted(set(stored) | set(requested)):
    a, b = stored.get(key), requested.get(key)
    if a == b:
      continue
    if a is None:
      lines.append(f'{key} is new (requested shape {b[0]})')
    elif b is None:
      lines.append(f'{key} is gone (stored shape {a[0]})')
    elif a[0] != b[0]:
      lines.append(f'{key} stored shape {a[0]}, requested {b[0]}')
    else:
      lines.append(f'{key} stored dtype {a[1]}, requested {b[1]}')
  return lines


def parse_checkpoint_choice(value) -> tuple[str, int | None]:
  """``config.eval.checkpoint`` -> ('latest' | 'best', None) or ('latest', step)."""
  text = str(value).strip().lower()
  if text in ('latest', 'best'):
    return text, None
  if text.isdigit():
    return 'latest', int(text)
  raise ValueError(f"config.eval.checkpoint must be 'latest', 'best' or a step number (e.g. 1200), got {value!r}")


# -- the model alone: eval mode, inference and the notebook read checkpoints through this ----------

MODEL_KEY = '0'  # the model's key in the saved pure dict of nnx.state((model, optimizer))


def restore_model(state_dir, abstract_model_state: nnx.State) -> nnx.State:
  """The model part of a checkpoint step's ``state`` item, restored onto the shardings of
  ``abstract_model_state`` (the abstract ``nnx.state(model)``, e.g. one device, or a mesh).

  The item is the pure dict of ``nnx.state((model, optimizer))``, the model under key ``'0'``; that
  subtree alone is read with Orbax's partial restore, so the optimizer moments are neither read nor
  described (they depend on the optimizer code and config of the run, and are about three times the
  bytes). A model-only item (no ``'0'``) restores too. Shapes and dtypes are checked against the
  checkpoint's metadata first: a config that does not describe the checkpoint fails naming the
  parameters that differ."""
  target = abstract_saveable(abstract_model_state)
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    saved = checkpointer.metadata(state_dir)
    saved = getattr(saved, 'item_metadata', saved)  # StepMetadata -> TreeMetadata -> nested dict
    saved = getattr(saved, 'tree', saved)
    if isinstance(saved.get(MODEL_KEY), dict):
      item, saved_model = {MODEL_KEY: target}, saved[MODEL_KEY]
    else:
      item, saved_model = target, saved
    differences = shape_differences(shapes_of(saved_model), shapes_of(target))
    if differences:
      shown = '; '.join(differences[:8]) + (f'; ... ({len(differences)} in all)' if len(differences) > 8 else '')
      raise ValueError(f'the checkpoint {state_dir} does not hold the model this config describes: {shown}. '
                       'Pass the config the run was trained with.')
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
  finally:
    checkpointer.close()
  return from_saveable(abstract_model_state, restored[MODEL_KEY] if MODEL_KEY in item else restored)


def _all_processes_ok(ok: bool) -> bool:
  """Whether ``ok`` holds on every process (one small collective when there are several)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


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
        # Handlers given up front so that a step's metadata (the stored shapes) reads before a restore.
        item_handlers={workdir_lib.STATE_ITEM: ocp.StandardCheckpointHandler(),
                       workdir_lib.DATA_ITEM: grain.checkpoint.CheckpointHandler(),
                       workdir_lib.META_ITEM: ocp.JsonCheckpointHandler()})

  @property
  def directory(self) -> epath.Path:
    return epath.Path(self.manager.directory)

  def step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return best_step(self.manager, self.best_metric, self.best_mode)

  def metrics(self, step: int) -> dict | None:
    return self.manager.metrics(step)

  def save(self, step: int, state: nnx.State, data_iterator, meta: dict, metrics: dict | None = None):
    """Saves ``step`` (asynchronously); ``metrics`` (an evaluation of this step) rank it for best."""
    args = {workdir_lib.STATE_ITEM: ocp.args.StandardSave(to_saveable(state)),
            workdir_lib.META_ITEM: ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      args[workdir_lib.DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**args), metrics=_float_metrics(metrics))

  def record_metrics(self, step: int, metrics: dict) -> None:
    """Adds the metrics of an evaluation of ``step`` to that (already saved) step, where Orbax keeps
    them, so that the step is ranked for best. Waits for pending saves; process 0 writes."""
    self.wait()
    if jax.process_index() == 0:
      target = self.step_dir(step) / METRICS_FILE
      target.parent.mkdir(parents=True, exist_ok=True)
      partial = target.parent / f'{target.name}.partial'
      partial.write_text(json.dumps(_float_metrics(metrics) or {}))
      partial.rename(target)
    _barrier(f'record_metrics_{step}')
    self.manager.reload()

  def stored_shapes(self, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """{parameter path: (shape, dtype)} of ``step``'s train state, from its metadata (no array read).
    Raises UnreadableCheckpoint when the metadata cannot be read."""
    self._check_files(step)
    error = None
    with _quiet_third_party(), _stderr_held_back() as held:  # see restore_latest
      try:
        metadata = self.manager.item_metadata(step)[workdir_lib.STATE_ITEM]
      except Exception as e:  # noqa: BLE001  (any failure to read is reported as this step's fault)
        error = e
        _drop_abandoned_future_logs()
        held.settle()
        gc.collect()
        held.settle()
    if error is not None:
      raise describe_restore_error(step, self.step_dir(step), error) from error
    if metadata is None:
      raise UnreadableCheckpoint(step, str(self.step_dir(step) / workdir_lib.STATE_ITEM), 'no readable metadata')
    return shapes_of(metadata)

  def _check_files(self, step: int) -> None:
    for name in REQUIRED_FILES:
      if not (self.step_dir(step) / name).exists():
        raise UnreadableCheckpoint(step, str(self.step_dir(step) / name), 'missing')

  def restore(self, abstract_state: nnx.State, *, step: int | None = None, data_iterator=None,
              which: str = 'latest'):
    """Restores (state, meta, step) of ``step``, else of the latest or best one (``which``), and,
    when given, the data iterator in place (same process count only; training positions its
    iterator from the meta's ``global_batch`` instead)."""
    if which not in ('latest', 'best'):
      raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
    if step is None:
      step = self.best_step() if which == 'best' else self.latest_step()
    if step is None:
      raise FileNotFoundError(f'no {which} checkpoint in {self.manager.directory}')
    if step not in self.manager.all_steps():
      available = ', '.join(map(str, self.all_steps())) or 'none'
      raise FileNotFoundError(f'no checkpoint step {step} in {self.manager.directory} (steps: {available})')
    args = {workdir_lib.STATE_ITEM: ocp.args.StandardRestore(abstract_saveable(abstract_state)),
            workdir_lib.META_ITEM: ocp.args.JsonRestore()}
    if data_iterator is not None:
      args[workdir_lib.DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return (from_saveable(abstract_state, restored[workdir_lib.STATE_ITEM]),
            dict(restored[workdir_lib.META_ITEM]), step)

  def read(self, abstract_state: nnx.State, step: int):
    """``restore`` of ``step`` with every failure turned into UnreadableCheckpoint (file, reason).
    Call it under ``_quiet_third_party()`` and ``_stderr_held_back()`` (as ``restore_latest`` does): a
    failed restore's third-party noise then stays off the terminal."""
    self._check_files(step)
    try:
      return self.restore(abstract_state, step=step)
    except Exception as e:  # noqa: BLE001  (any failure to read is reported as this step's fault)
      if absl_logging.get_verbosity() >= 1:
        logging.info('restore of step %d failed', step, exc_info=True)
      raise describe_restore_error(step, self.step_dir(step), e) from e

  def restore_latest(self, abstract_state: nnx.State):
    """Restores the newest readable step -> (state, meta, step, [UnreadableCheckpoint of each newer
    step, moved aside]). Every process must agree that a step read, else all move on together.
    Raises FileNotFoundError when no step is readable.

    A failed Orbax restore leaves TensorStore reads in flight; their callbacks then hit Orbax's closed
    event loop and print hundreds of tracebacks from C++ threads, and the abandoned futures log
    "exception was never retrieved" when collected. While steps are tried, stderr and other packages'
    log records are held back (shown at ``--verbosity=1``); after a failure the held region lasts until
    the stragglers are done. Each unreadable step is then reported in one line."""
    unreadable, moved_to, result = [], [], None
    with _quiet_third_party(), _stderr_held_back() as held:
      for step in sorted(self.manager.all_steps(), reverse=True):
        try:
          result = self.read(abstract_state, step)
          error = None
        except UnreadableCheckpoint as e:
          result, error = None, e
          _drop_abandoned_future_logs()
          held.settle()
        if _all_processes_ok(error is None):
          break
        error = error or UnreadableCheckpoint(step, str(self.step_dir(step)), 'unreadable on another process')
        result = None
        moved_to.append(self.move_aside(step))
        unreadable.append(error)
      if unreadable:
        gc.collect()  # the failed restores' futures log their exceptions now, while held back
        held.settle()
    for error, moved in zip(unreadable, moved_to):
      logging.warning('checkpoint step %d cannot be read (%s: %s); moved it to %s, trying the previous step',
                      error.step, error.file, error.reason, moved)
    if result is None:
      raise FileNotFoundError(f'no readable checkpoint in {self.directory}: '
                              + '; '.join(str(e) for e in unreadable))
    return (*result, unreadable)

  def move_aside(self, step: int) -> str:
    """Renames step ``step`` to ``<step>.corrupt-<n>`` (kept for inspection, ignored by Orbax)."""
    self.wait()
    target = None
    if jax.process_index() == 0:
      n = 1
      while (self.directory / f'{step}.corrupt-{n}').exists():
        n += 1
      target = self.directory / f'{step}.corrupt-{n}'
      self.step_dir(step).rename(target)
    _barrier(f'move_aside_{step}')
    self.manager.reload()
    return str(target) if target is not None else f'{self.step_dir(step)}.corrupt-*'

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def _float_metrics(metrics: dict | None) -> dict | None:
  if metrics is None:
    return None
  return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _quiet_third_party:  # noqa: N801  (a context manager used as a statement)
  """At verbosity < 1, holds back other packages' log records (asyncio, Orbax, tensorstore) while a
  restore is attempted: a failure is reported by the caller in one line."""

  def __enter__(self):
    self.handlers = []
    if absl_logging.get_verbosity() < 1:
      self.filter = console.OwnRecordsOnly(foreign_level=None)
      self.handlers = list(logging.getLogger().handlers)
      for h in self.handlers:
        h.addFilter(self.filter)
    return self

  def __exit__(self, *exc):
    for h in self.handlers:
      h.removeFilter(self.filter)
    return False


class _stderr_held_back:  # noqa: N801  (a context manager used as a statement)
  """Redirects file descriptor 2 to a temporary file while a restore is attempted, so that what
  third-party C++ threads print there (the TensorStore callbacks of a failed restore) does not reach
  the terminal; at verbosity >= 1 it is written out afterwards. No-op where stderr has no descriptor."""

  def __enter__(self):
    self.saved = None
    try:
      fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
      return self
    sys.stderr.flush()
    self.file = tempfile.TemporaryFile()
    self.fd, self.saved = fd, os.dup(fd)
    os.dup2(self.file.fileno(), fd)
    return self

  def settle(self, quiet_s: float = 1.0, limit_s: float = 20.0):
    """Waits until nothing was written for ``quiet_s`` (at most ``limit_s``)."""
    if self.saved is None:
      return
    deadline, size, since = time.time() + limit_s, -1, time.time()
    while time.time() < deadline:
      now = os.fstat(self.file.fileno()).st_size
      if now != size:
        size, since = now, time.time()
      elif time.time() - since >= quiet_s:
        return
      time.sleep(0.05)

  def __exit__(self, *exc):
    if self.saved is None:
      return False
    sys.stderr.flush()
    os.dup2(self.saved, self.fd)
    os.close(self.saved)
    self.file.seek(0)
    held = self.file.read()
    self.file.close()
    if held and absl_logging.get_verbosity() >= 1:
      sys.stderr.write(held.decode(errors='replace'))
      sys.stderr.flush()
    return False


def _drop_abandoned_future_logs() -> None:
  if absl_logging.get_verbosity() < 1:  # at verbosity >= 1 every record is shown
    console.drop_abandoned_future_logs()
