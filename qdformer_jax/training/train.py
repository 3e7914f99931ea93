"""The training loop, top to bottom: mesh, data, sharded state, jitted step, checkpoints, evals.

Importable from Colab: ``train_and_evaluate(config, workdir)`` runs the job ``main.py`` runs;
``evaluate_checkpoint(config, workdir)`` is eval mode; ``create_train_state`` and
``make_train_step`` are the pieces.

Every step is one XLA program: frames enter as uint8 and are normalised on the device, the Hungarian
matching runs inside the step, the train state is donated, shapes are static (the step compiles once)
and the step's metrics accumulate on the device between log lines.
"""
from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from concurrent import futures

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qdformer_jax import sharding
from qdformer_jax import workdir as workdir_lib
from qdformer_jax.data import pipeline, registry
from qdformer_jax.evaluation import evals, reports
from qdformer_jax.evaluation.evaluator import Evaluator, check_eval_batch
from qdformer_jax.losses.criterion import compute_loss
from qdformer_jax.models.qdformer import build_model  # eager: see the builder import in _train
from qdformer_jax.training import full_disk, optim
from qdformer_jax.training.checkpoint import (
    Checkpoints,
    UnreadableCheckpoint,
    abstract_saveable,
    shape_differences,
    shapes_of,
)

# -- state -----------------------------------------------------------------------------------------


def model_and_optimizer(config, drop_steps):
  """The model and its optimizer as ``config`` describes them (initialised; trace under
  ``nnx.eval_shape`` for shapes only)."""
  model = build_model(config, config.seed)
  return model, optim.make_optimizer(model, config.optim, drop_steps)


def abstract_train_state(config, mesh, drop_steps):
  """(graphdef, abstract state with shardings): shapes only, nothing is initialised (restores)."""
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: model_and_optimizer(config, drop_steps)))
  return graphdef, sharding.shard_abstract(mesh, abstract_state)


def create_train_state(config, mesh, drop_steps):
  """(graphdef, state, abstract state with shardings); the state is created already sharded."""
  graphdef, abstract_state = abstract_train_state(config, mesh, drop_steps)
  return graphdef, init_train_state(config, abstract_state, drop_steps), abstract_state


def load_pretrained(config, state, graphdef):
  """Loads converted backbone / VGGish weights named by the config into ``state``."""
  paths = {'backbone': config.model.backbone.get('pretrained'), 'audio_encoder': config.model.audio.get('pretrained')}
  if not any(paths.values()):
    return state
  from qdformer_jax.convert import load_converted
  model, optimizer = nnx.merge(graphdef, state)
  for attr, path in paths.items():
    if path:
      load_converted(getattr(model, attr), path)
      logging.info('loaded converted %s weights from %s', attr, path)
  return nnx.state((model, optimizer))


# -- step ------------------------------------------------------------------------------------------

NONFINITE_MODES = ('error', 'skip')


def make_train_step(graphdef, config, state_shardings, mesh):
  """The jitted train step: (state, global batch) -> (state, metrics); the state is donated.

  An update whose loss or gradient norm is not finite is not applied (the state keeps its values,
  on the device, no host round trip); ``metrics['skipped']`` is 1 for it. The optimizer's step
  count advances either way, so it always equals the number of batches consumed.

  The new parameters are not checked again: from finite parameters, a finite gradient norm (every
  squared gradient finite) gives finite AdamW moments and an update bounded by the learning rate,
  hence finite parameters. Checking every new parameter as well made XLA:CPU compile the
  synthetic config's step in 77.8 s instead of 22.4 s (``benchmarks/compile_time.py``: the select
  of every state leaf then depends on a reduction over all the new parameters) for no case it
  could catch.
  """
  num_classes = config.data.num_classes

  def train_step(state, batch):
    before = jax.tree.map(lambda x: x, state)  # the input values (merge shares variables that update mutates)
    model, optimizer = nnx.merge(graphdef, state)
    count = optimizer.step[...]

    def loss_fn(model):
      outputs = model(batch['frames'], batch['log_mel'], batch['frame_valid'], train=True)
      loss, terms = compute_loss(outputs, batch, config.loss, num_classes)
      return loss, (terms, outputs)

    # Differentiate only what the optimizer holds: no gradient tree for frozen VGGish (72M zeros)
    # and no backward pass through the frozen backbone stages, which XLA then drops.
    trainable = nnx.DiffState(0, optim.trainable_filter(model))
    (loss, (terms, outputs)), grads = nnx.value_and_grad(loss_fn, argnums=trainable, has_aux=True)(model)
    optimizer.update(model, grads)
    grad_norm = optax.tree.norm(grads)
    metrics = dict(terms, loss=loss, grad_norm=grad_norm)
    key = jax.random.fold_in(jax.random.key(config.seed), optimizer.step[...])
    metrics.update(model.train_diagnostics(outputs, key))
    updated = nnx.state((model, optimizer))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, before)
    model, optimizer = nnx.merge(graphdef, kept)
    optimizer.step[...] = count + 1
    metrics['skipped'] = (~finite).astype(jnp.float32)
    return nnx.state((model, optimizer)), metrics

  return jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


@jax.jit
def _accumulate(acc, metrics):
  """Adds one step's metrics to the running sums of the log interval (skipped steps excluded) and
  tracks non-finite steps: their count, the first one and its non-finite terms, the longest run of
  consecutive ones. On the device: the host reads it only at log, eval and checkpoint boundaries."""
  ok = metrics['skipped'] == 0
  values = {k: v for k, v in metrics.items() if k != 'skipped'}
  health = acc['health']
  step = health['step'] + 1
  first = (health['bad'] == 0) & ~ok
  run = jnp.where(ok, 0, health['run'] + 1)
  longer = run > health['max_run']
  return {
      'sums': jax.tree.map(lambda s, v: s + jnp.where(ok, v, 0.0), acc['sums'], values),
      'good': acc['good'] + ok.astype(jnp.int32),
      'health': {
          'step': step,
          'bad': health['bad'] + (~ok).astype(jnp.int32),
          'first_step': jnp.where(first, step, health['first_step']),
          'first_terms': {k: jnp.where(first, ~jnp.isfinite(v), health['first_terms'][k]) for k, v in values.items()},
          'run': run,
          'max_run': jnp.maximum(run, health['max_run']),
          'max_run_end': jnp.where(longer, step, health['max_run_end']),
      },
  }


def _new_accumulator(metrics, step: int) -> dict:
  values = {k: v for k, v in metrics.items() if k != 'skipped'}
  zero = jnp.zeros((), jnp.int32)
  return {'sums': jax.tree.map(jnp.zeros_like, values), 'good': zero,
          'health': {'step': jnp.asarray(step, jnp.int32), 'bad': zero, 'first_step': zero,
                     'first_terms': {k: jnp.zeros((), bool) for k in values}, 'run': zero, 'max_run': zero,
                     'max_run_end': zero}}


class NonFiniteError(ValueError):
  """Training met a non-finite loss or gradient norm (``config.nonfinite``); nothing non-finite was saved."""


def check_finite(health: dict, config, latest_checkpoint: int | None, skipped_before: int) -> None:
  """Raises NonFiniteError when ``config.nonfinite`` says the run stops: 'error' at the first
  non-finite step, 'skip' after ``nonfinite_max_consecutive`` of them in a row."""
  if not int(health['bad']):
    return
  terms = sorted(k for k, v in health['first_terms'].items() if bool(v)) or ['the updated parameters']
  shown = ', '.join(terms[:8]) + (f' (+{len(terms) - 8} more)' if len(terms) > 8 else '')
  kept = (f'the latest checkpoint is step {latest_checkpoint}' if latest_checkpoint is not None
          else 'no checkpoint was written')
  if config.nonfinite == 'error':
    raise NonFiniteError(
        f'non-finite training values at step {int(health["first_step"])}: {shown}; the update was not applied '
        f'and nothing after it was saved ({kept}). Lower --config.optim.learning_rate (now '
        f'{config.optim.learning_rate}), or pass --config.nonfinite=skip to skip such updates')
  limit = int(config.nonfinite_max_consecutive)
  if int(health['max_run']) >= limit:
    raise NonFiniteError(
        f'{int(health["max_run"])} consecutive non-finite updates ending at step {int(health["max_run_end"])} '
        f'(config.nonfinite_max_consecutive={limit}; {skipped_before + int(health["bad"])} skipped in all, the '
        f'first at step {int(health["first_step"])}: {shown}); stopped ({kept}). Lower '
        '--config.optim.learning_rate or resume from an earlier checkpoint')


# -- loop ------------------------------------------------------------------------------------------

class Progress:
  """One progress line per log interval: the interval's mean metrics, and steps/s and ETA from the
  interval's wall time (checkpoint saves and host syncs included, as they recur; evaluation time
  excluded, it has its own lines; the first step's compile is before ``start``)."""

  def __init__(self, total_steps: int):
    self.total = total_steps
    self.last = None      # (step, time) of the previous line, or of ``start``
    self.excluded = 0.0   # seconds since then that are not training (evaluations)
    self.rate = None

  def start(self, step: int):
    self.last, self.excluded = (step, time.perf_counter()), 0.0

  def exclude(self, seconds: float):
    self.excluded += seconds

  def line(self, step: int, metrics: dict) -> str:
    now = time.perf_counter()
    if self.last is not None and step > self.last[0]:
      self.rate = (step - self.last[0]) / max(now - self.last[1] - self.excluded, 1e-9)
    self.last, self.excluded = (step, now), 0.0
    shown = ' '.join(f'{k}={v:.4g}' for k, v in metrics.items() if '_aux_' not in k)
    speed = f' | {self.rate:.2f} steps/s, ETA {(self.total - step) / self.rate / 60:.1f} min' if self.rate else ''
    return f'step {step}/{self.total} {shown}{speed}'


def resolve_data_dir(config) -> str:
  return config.data.data_dir or os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def enable_compilation_cache(config) -> str | None:
  """Turns on JAX's persistent compilation cache (``config.compilation_cache``: a directory, '' for
  ``$XDG_CACHE_HOME/qdformer_jax/xla`` (~/.cache/...), 'off' to disable), so a resumed or repeated
  run loads its compiled programs instead of compiling them again. Returns the directory or None."""
  where = config.get('compilation_cache', '')
  if where == 'off':
    return None
  if not where and jax.config.jax_compilation_cache_dir:  # set by the environment: keep it
    return jax.config.jax_compilation_cache_dir
  if not where:
    where = os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'qdformer_jax', 'xla')
  jax.config.update('jax_compilation_cache_dir', where)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return where


def _resolved(config):
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.data_dir = resolve_data_dir(config)
  return config


def check_run_config(config) -> None:
  """The training-loop fields of ``config`` that have a fixed set of values."""
  mode = config.get('nonfinite', 'error')
  if mode not in NONFINITE_MODES:
    raise ValueError(f'config.nonfinite must be one of {list(NONFINITE_MODES)}, got {mode!r}')
  if int(config.get('nonfinite_max_consecutive', 1)) < 1:
    raise ValueError(f'config.nonfinite_max_consecutive must be >= 1, got {config.nonfinite_max_consecutive}')


# -- resuming: config drift -------------------------------------------------------------------------

# Fields that may change when a run resumes (schedule length, cadences, where data and caches are,
# which evaluations run, how non-finite steps are handled); any other difference from the run's
# config.json stops the resume. A prefix ending in '.' covers a whole sub-config.
RESUMABLE_FIELDS = ('mode', 'total_steps', 'num_epochs', 'lr_drop_steps', 'lr_drop_epochs', 'eval_every',
                    'log_every', 'checkpoint_every', 'keep_checkpoints', 'compilation_cache', 'data.data_dir',
                    'data.read_threads', 'evals', 'evals.', 'best_eval', 'eval.', 'nonfinite',
                    'nonfinite_max_consecutive', 'debug_nan_step')


def _flat(tree, prefix: str = '') -> dict:
  if isinstance(tree, dict) and tree:
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: tree}


def _resumable(field: str) -> bool:
  return any(field == f or (f.endswith('.') and field.startswith(f)) for f in RESUMABLE_FIELDS)


def config_differences(stored: dict, requested: dict) -> tuple[list, list]:
  """(fields that may not change, fields that may) as (field, stored value, requested value); a field
  only one side has (written by another version of the code) is listed among those that may."""
  old, new = _flat(stored), _flat(requested)
  fixed, free = [], []
  for field in sorted(set(old) | set(new)):
    a, b = old.get(field, '<absent>'), new.get(field, '<absent>')
    if a == b:
      continue
    one_sided = field not in old or field not in new
    (free if one_sided or _resumable(field) else fixed).append((field, a, b))
  return fixed, free


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _write_run_config(config, workdir: str) -> None:
  """config.json of the run; for a resumed run only after its checkpoint was restored."""
  with open(workdir_lib.config_path(workdir), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))


def read_run_config(workdir: str) -> dict | None:
  path = workdir_lib.config_path(workdir)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def drift_message(workdir: str, fixed: list, params: list[str]) -> str:
  """One line: what differs between the run in ``workdir`` and the requested config, and the fix."""
  parts = [f'{field}: stored {json.dumps(a)}, requested {json.dumps(b)}' for field, a, b in fixed]
  if params:
    parts.append(f'{len(params)} parameter(s) differ from the checkpoint: ' + '; '.join(params[:6])
                 + ('; ...' if len(params) > 6 else ''))
  flags = ' '.join(f'--config.{field}={json.dumps(a) if isinstance(a, str) else a}' for field, a, _ in fixed
                   if a != '<absent>')
  fix = f'resume with {flags}' if flags else 'resume with the config the run was trained with'
  return (f'{workdir} holds a run trained with another config ({"; ".join(parts)}); {fix}, or start the '
          'new config in a new --workdir (nothing was changed in this one)')


# -- resuming: evaluations -------------------------------------------------------------------------

def unevaluated(workdir: str, entries: dict, step: int, total_steps: int, config, ckpt) -> dict:
  """The entries due at checkpoint ``step`` whose report is missing, plus ``best_eval`` when the step
  holds no metrics yet (process 0 decides; every process gets its answer)."""
  due = {name: e for name, e in entries.items() if evals.due(e, step, total_steps)}
  missing = {name for name, e in due.items() if not os.path.exists(reports.report_path(workdir, e.kind, e.split, step))}
  if config.best_eval in due and ckpt.metrics(step) is None:
    missing.add(config.best_eval)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    flags = np.array([name in missing for name in due], np.int32)
    flags = multihost_utils.broadcast_one_to_all(flags)
    missing = {name for name, flag in zip(due, flags) if flag}
  return {name: due[name] for name in due if name in missing}


# -- preemption ------------------------------------------------------------------------------------

class Preempted(SystemExit):
  """The run was asked to stop (SIGTERM, a preemption notice or Ctrl-C) and saved its current step.
  A SystemExit with code 143 (128 + SIGTERM), or 130 (128 + SIGINT) after Ctrl-C, as if the signal
  had ended the process."""

  def __init__(self, message: str, code: int = 143):
    super().__init__(code)
    self.message = message

  def __str__(self) -> str:
    return self.message


def _preemption_service() -> bool:
  """Whether JAX's distributed preemption sync manager runs (multi-process jobs after
  ``jax.distributed.initialize``); it then owns SIGTERM and synchronises the stop step."""
  try:
    from jax._src import distributed
  except ImportError:
    return False
  state = distributed.global_state
  return state.client is not None and getattr(state, 'preemption_sync_manager', None) is not None


class StopRequest:
  """Asks the loop to save and exit at a step boundary when the job is told to stop.

  One process: a SIGTERM handler sets a flag, read every step (no device work). Several processes
  with JAX's preemption service: ``multihost_utils.reached_preemption_sync_point(step)`` every step
  (local until a notice arrives; then the service picks the same step on every host). Several
  processes without it: the SIGTERM flags are combined every ``agree_every`` steps (one small
  collective), so every process stops at the same step.

  Ctrl-C (SIGINT) is a stop request too (exit code 130 instead of 143; with the preemption service
  it is passed on as SIGTERM, which the service turns into a notice). A second Ctrl-C stops the
  process at once, with one line saying that the step being saved was not saved.
  """

  def __init__(self, agree_every: int = 10, where: str = ''):
    self.agree_every = agree_every
    self.where = where  # the checkpoint directory, named by the second Ctrl-C's line
    self.multiprocess = jax.process_count() > 1
    self.use_service = self.multiprocess and _preemption_service()
    self.flag = threading.Event()
    self.reason = 'preemption notice' if self.use_service else 'SIGTERM'
    self.code = 143
    self.interrupted = False
    self.step = None  # the last step the loop asked about
    self.seen = None  # the step at which the loop saw the stop request (and saves)
    self.previous = {}
    handlers = {}
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # ignored: a script's background job; keep it so
      handlers[signal.SIGINT] = self._on_interrupt
    if not self.use_service:
      handlers[signal.SIGTERM] = self._on_signal
    for signum, handler in handlers.items():
      try:
        self.previous[signum] = signal.signal(signum, handler)
      except ValueError:  # not the main thread (e.g. a notebook worker thread): no handler
        logging.info('%s handler not installed (not the main thread)', signal.Signals(signum).name)

  def _on_signal(self, signum, frame):
    del signum, frame
    self.flag.set()

  def _on_interrupt(self, signum, frame):
    del signum, frame
    if self.interrupted:
      # The step being saved when the loop has seen the request, else the one being computed.
      step = (f'step {self.seen}' if self.seen is not None else
              f'step {self.step + 1}' if self.step is not None else 'the current step')
      _say(f'error: second Ctrl-C: stopped at once; {step} was not saved (the rerun resumes from the latest '
           f'complete checkpoint{" in " + self.where if self.where else ""})')
      if _interactive():  # a notebook or a REPL: keep the session
        raise KeyboardInterrupt
      os._exit(130)
    self.interrupted, self.reason, self.code = True, 'Ctrl-C (SIGINT)', 130
    _say('warning: Ctrl-C: saving the current step, then stopping (Ctrl-C again stops at once, unsaved)')
    if self.use_service:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notifier: every process stops at one step
    else:
      self.flag.set()

  def requested(self, step: int) -> bool:
    self.step = step
    stop = self._requested(step)
    if stop:
      self.seen = step
    return stop

  def _requested(self, step: int) -> bool:
    if self.use_service:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    if not self.multiprocess:
      return self.flag.is_set()
    if step % self.agree_every:
      return False
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.flag.is_set()))))

  def close(self):
    for signum, previous in self.previous.items():
      signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    self.previous = {}


def _interactive() -> bool:
  """Whether this process is a REPL or a running IPython/Jupyter shell. Having imported ipykernel
  is not enough (a test process that checks for it has it in sys.modules, with no shell)."""
  if hasattr(sys, 'ps1'):
    return True
  ipython = sys.modules.get('IPython')
  get_ipython = getattr(ipython, 'get_ipython', None)
  return get_ipython is not None and get_ipython() is not None


def _say(text: str) -> None:
  """One line on stderr from a signal handler (os.write: no lock the interrupted code may hold)."""
  os.write(2, f'{time.strftime("%H:%M:%S")} {text}\n'.encode())


# -- the run ---------------------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str, *, config_arg: str | None = None) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the last evaluation
  (the metrics of the ``config.best_eval`` entry; every entry's reports are under ``<workdir>/reports``).
  ``config_arg``: the ``--config`` argument the run was started with, for the commands of the summary.

  What survives what: SIGTERM (or Ctrl-C) saves the current step and raises :class:`Preempted`
  (exit 143, or 130 after Ctrl-C); a rerun resumes there. A non-finite update is never applied nor
  saved (``config.nonfinite``). An unreadable latest checkpoint is moved aside and the previous one
  restored. A config that differs from the run's ``config.json`` in a field that cannot change raises
  ValueError before anything is written. An evaluation missing at the resumed step runs first. A full disk raises
  :class:`full_disk.DiskFull` (one line: directory, free space, checkpoint size, remedies) after the
  partial save is removed; earlier checkpoints are kept."""
  started = time.time()
  os.makedirs(workdir, exist_ok=True)
  config = _resolved(config)
  check_eval_batch(config)
  check_run_config(config)
  enable_compilation_cache(config)
  is_chief = jax.process_index() == 0
  ckpt = Checkpoints(workdir, keep=config.keep_checkpoints, best_metric=config.best_metric)
  try:
    with full_disk.quiet_writes():  # a failed async save's thread noise stays off the terminal
      try:
        return _train(config, workdir, ckpt, is_chief, started, config_arg)
      finally:
        ckpt.close()  # the saving threads end here, before partial saves are removed
  except Exception as e:
    if not full_disk.is_full(e):
      raise
    raise full_disk.report(workdir, workdir_lib.checkpoints_dir(workdir), e,
                           keep_checkpoints=config.keep_checkpoints, clean=is_chief) from e


def _train(config, workdir, ckpt, is_chief, started, config_arg):
  stored_config = read_run_config(workdir) if ckpt.all_steps() else None
  if stored_config is None and is_chief:
    _write_run_config(config, workdir)  # a new run: nothing to protect, and the config is on record at once
  mesh = sharding.make_mesh(config)
  logging.info('mesh %s over %d devices (%d processes)', dict(mesh.shape), jax.device_count(), jax.process_count())
  # Opening the train split builds the synthetic dataset on first use (~20 s here). The compiler
  # needs no data and the build no program: the build runs in a thread while the state is created
  # and the train step compiled (a schedule in epochs needs the split's length first).
  # The builder module (and TFDS with it) is imported here first: TFDS runs some of its own imports
  # under etils' lazy-import hook, which patches builtins.__import__ for the whole process while it
  # runs, so a first import in this thread at that moment (the model's) got a lazy placeholder
  # ("'LazyModule' object is not callable", seen when the dataset was already built).
  importlib.import_module(registry.get(config.data.name).builder_module)
  pool = futures.ThreadPoolExecutor(1, thread_name_prefix='open_data')
  train_source = pool.submit(registry.open_source, config.data, config.data.train_split)
  pool.shutdown(wait=False)  # nothing else is submitted; the thread ends with the build
  steps_per_epoch = 0
  if config.total_steps <= 0:
    steps_per_epoch = max(1, len(train_source.result()) // config.batch_size)
  total_steps, drop_steps = optim.total_and_drop_steps(config, steps_per_epoch)
  graphdef, abstract_state = abstract_train_state(config, mesh, drop_steps)

  # Resume: compare configs and shapes before anything is restored or written, then restore the
  # newest readable step.
  start_step, meta = 0, {}
  if ckpt.all_steps():
    _check_drift(workdir, stored_config, config, ckpt, abstract_state)
    state, meta, start_step, _ = ckpt.restore_latest(abstract_state)
    logging.info('resumed from step %d', start_step)
  else:
    state = init_train_state(optim.resolve_warmup(config, total_steps), abstract_state, drop_steps)
    state = load_pretrained(config, state, graphdef)
  if is_chief:
    _write_run_config(config, workdir)

  # Compiled ahead of time, from shapes, once (while the data may still be building).
  spec = pipeline.batch_spec(config.data, config.batch_size, mesh)
  if start_step < total_steps:
    t0 = time.perf_counter()
    train_step = make_train_step(graphdef, config, jax.tree.map(lambda x: x.sharding, abstract_state),
                                 mesh).lower(abstract_state, spec).compile()
    logging.info('compiled the train step in %.1f s', time.perf_counter() - t0)

  # Data: every process starts at the run's global batch position, whatever the process count.
  train_source.result()  # re-raises a failed build here, naming the dataset
  data_start = int(meta.get('global_batch', start_step))
  train_iter = pipeline.make_train_iterator(
      config.data, global_batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(), start_batch=data_start)
  if meta and int(meta.get('process_count', jax.process_count())) != jax.process_count():
    logging.info('checkpoint written by %d processes, resumed by %d at global batch %d',
                 meta['process_count'], jax.process_count(), data_start)
  skipped_before = int(meta.get('skipped_updates', 0))

  evaluator = Evaluator(config, mesh, graphdef)
  eval_entries = evals.entries(config)
  writer = reports.make_writer(workdir) if is_chief else None
  stop = StopRequest(where=workdir_lib.checkpoints_dir(workdir))
  last_eval = {}
  step = start_step
  try:
    if start_step:
      pending = unevaluated(workdir, eval_entries, start_step, total_steps, config, ckpt)
      if pending:
        logging.info('evaluating step %d (its evaluation was missing: %s)', start_step, ', '.join(pending))
        last_eval.update(_evaluate(evaluator, state, start_step, config, workdir, pending, writer, ckpt))

    progress = Progress(total_steps)
    acc = None
    debug_nan_step = int(config.get('debug_nan_step', 0) or 0)
    while step < total_steps:
      t0 = time.perf_counter()  # the first step's time is logged
      host_batch = pipeline.device_batch(next(train_iter))
      if step + 1 == debug_nan_step:  # tests only: NaN audio, hence NaN gradients (and mostly a NaN loss)
        host_batch = dict(host_batch, log_mel=np.full_like(host_batch['log_mel'], np.nan))
      if step == start_step:
        pipeline.check_batch(host_batch, spec, config.data)
      batch = pipeline.to_global(host_batch, mesh)
      state, metrics = train_step(state, batch)
      step += 1
      acc = _accumulate(acc if acc is not None else _new_accumulator(metrics, step - 1), metrics)
      if step == start_step + 1:
        jax.block_until_ready(acc)
        logging.info('first train step (and its first batch) in %.1f s', time.perf_counter() - t0)
        progress.start(step)
      stopping = stop.requested(step)
      due = {name: e for name, e in eval_entries.items() if evals.due(e, step, total_steps)}
      save = step % config.checkpoint_every == 0 or bool(due) or step == total_steps or stopping
      if step % config.log_every == 0 or step == total_steps or save:
        acc = jax.device_get(acc)
        check_finite(acc['health'], config, ckpt.latest_step(), skipped_before)
        if step % config.log_every == 0 or step == total_steps:
          _log_interval(progress, step, acc, skipped_before, writer, workdir)
          acc = dict(acc, sums=jax.tree.map(np.zeros_like, acc['sums']), good=np.zeros((), np.int32))
      if save:
        skipped = skipped_before + int(acc['health']['bad'])
        ckpt.save(step, state, train_iter, {
            'step': step, 'config': config.name, 'global_batch': data_start + step - start_step,
            'global_batch_size': config.batch_size, 'process_count': jax.process_count(),
            'skipped_updates': skipped})
      if stopping:
        ckpt.wait()
        message = (f'stopped by {stop.reason} at step {step}: checkpoint {step} saved in '
                   f'{workdir_lib.checkpoints_dir(workdir)}; rerun the same command to resume from it')
        logging.warning(message)
        raise Preempted(message, stop.code)
      if due:
        t0 = time.perf_counter()
        last_eval.update(_evaluate(evaluator, state, step, config, workdir, due, writer, ckpt))
        progress.exclude(time.perf_counter() - t0)
    ckpt.wait()
  finally:
    stop.close()
    if writer is not None:
      writer.close()

  best = ckpt.best_step()
  final = last_eval.get(config.best_eval) or dict(ckpt.metrics(step) or {})
  if is_chief:
    for line in summary(config, workdir, step - start_step, time.time() - started, final, best, config_arg):
      logging.info(line)
  return final


def init_train_state(config, abstract_state, drop_steps):
  """A freshly initialised train state, created already sharded as ``abstract_state`` says."""

  @functools.partial(jax.jit, out_shardings=jax.tree.map(lambda x: x.sharding, abstract_state))
  def init():
    return nnx.split(model_and_optimizer(config, drop_steps))[1]

  return init()


def _check_drift(workdir, stored_config, config, ckpt, abstract_state) -> None:
  """Raises ValueError (before anything is restored or written) when ``config`` differs from the
  run's config.json in a field that cannot change on resume, or from the checkpoint in a parameter
  shape; logs the differences that are allowed."""
  fixed, free = config_differences(stored_config, _config_json(config)) if stored_config else ([], [])
  params = []
  requested = shapes_of(abstract_saveable(abstract_state))
  for step in sorted(ckpt.all_steps(), reverse=True):  # the newest step whose metadata reads
    try:
      params = shape_differences(ckpt.stored_shapes(step), requested)
      break
    except UnreadableCheckpoint:
      continue
  if fixed or params:
    raise ValueError(drift_message(workdir, fixed, params))
  for field, a, b in free:
    logging.info('resuming with %s = %s (was %s)', field, json.dumps(b), json.dumps(a))


def _evaluate(evaluator, state, step, config, workdir, entries, writer, ckpt) -> dict:
  """Runs ``entries`` at ``step`` (already saved) and ranks the step by the ``best_eval`` entry."""
  results = evals.run(evaluator, state, step, config, workdir, entries, writer)
  if config.best_eval in results:
    ckpt.record_metrics(step, results[config.best_eval])
  return results


def _log_interval(progress, step: int, acc: dict, skipped_before: int, writer, workdir: str) -> None:
  good = int(acc['good'])
  means = {k: float(v) / good for k, v in acc['sums'].items()} if good else {}
  line = progress.line(step, means)
  skipped = skipped_before + int(acc['health']['bad'])
  if skipped:
    line += f' | {skipped} non-finite update(s) skipped so far (first at step {int(acc["health"]["first_step"])})'
    means['skipped_updates'] = float(skipped)
  logging.info(line)
  if writer is not None:
    for k, v in means.items():
      writer.add_scalar(f'train/{k}', v, step)
    writer.flush()
    reports.append_train_log(workdir, step, means)


def summary(config, workdir: str, steps: int, seconds: float, final: dict, best_step: int | None,
            config_arg: str | None) -> list[str]:
  """The closing lines of a run: what it reached and where everything is."""
  metric = config.best_metric
  value = final.get(metric)
  reached = f'{metric} {value:.4f}' if isinstance(value, float) else 'no evaluation'
  lines = [f'done: {steps} steps in {seconds / 60:.1f} min; final {reached}; best checkpoint: step {best_step}',
           f'  reports      {workdir_lib.reports_dir(workdir)}',
           f'  checkpoints  {workdir_lib.checkpoints_dir(workdir)}',
           f'  tensorboard  tensorboard --logdir {workdir_lib.tensorboard_dir(workdir)}']
  config_flag = f'--config {config_arg}' if config_arg else '--config <the same config>'
  lines.append(f'  test split   python main.py {config_flag} --workdir {workdir} --config.mode=eval '
               '--config.eval.split=test --config.eval.checkpoint=best')
  lines.append(f'  your video   python -m qdformer_jax.predict --workdir {workdir} --video CLIP.mp4 --out OUT')
  return lines


def parse_checkpoint_choice(value) -> tuple[str, int | None]:
  """``config.eval.checkpoint`` -> ('latest' | 'best', None) or ('latest', step)."""
  text = str(value).strip().lower()
  if text in ('latest', 'best'):
    return text, None
  if text.isdigit():
    return 'latest', int(text)
  raise ValueError(f"config.eval.checkpoint must be 'latest', 'best' or a step number (e.g. 1200), got {value!r}")


def evaluate_checkpoint(config, workdir: str) -> dict:
  """``config.mode = 'eval'``: restores the latest/best/<step> checkpoint and runs every evaluation
  entry of the config on it (``evals.entries(config, mode='eval')``); returns the metrics of the
  ``config.best_eval`` entry (all reports are under ``<workdir>/reports``)."""
  config = _resolved(config)
  parse_checkpoint_choice(config.eval.checkpoint)  # a typo fails before anything is built
  enable_compilation_cache(config)
  mesh = sharding.make_mesh(config)
  graphdef, abstract_state = abstract_train_state(config, mesh, ())  # restored, never initialised
  ckpt = Checkpoints(workdir, keep=config.keep_checkpoints, best_metric=config.best_metric)
  try:
    which, step = parse_checkpoint_choice(config.eval.checkpoint)
    if which == 'best' and ckpt.best_step() is None:
      raise FileNotFoundError(f'{workdir} has no evaluated checkpoint to pick the best from (steps: '
                              f'{", ".join(map(str, ckpt.all_steps())) or "none"}); use --config.eval.checkpoint=latest')
    state, _, step = ckpt.restore(abstract_state, step=step, which=which)
  finally:
    ckpt.close()
  evaluator = Evaluator(config, mesh, graphdef)
  writer = _eval_writer(workdir) if jax.process_index() == 0 else None
  # Nothing was written before the restore; with no space left the evaluation still runs and prints
  # its metrics, then one error says that its reports could not be written.
  with full_disk.quiet_writes():
    try:
      results = evals.run(evaluator, state, step, config, workdir, evals.entries(config, mode='eval'),
                          writer, full_disk_ok=True)
    finally:
      if writer is not None:
        _close_eval_writer(writer, workdir)
  return results.get(config.best_eval) or next(iter(results.values()), {})


def _close_eval_writer(writer, workdir: str) -> None:
  try:
    writer.close()
  except OSError as e:
    if e.errno not in full_disk.FULL_ERRNOS:
      raise
    logging.warning('the TensorBoard events of this evaluation could not be written under %s: %s',
                    workdir_lib.tensorboard_dir(workdir), e.strerror or e)


def _eval_writer(workdir: str, min_free_bytes: int = 2 ** 20):
  """Eval mode's TensorBoard writer, or None when the workdir has (almost) no space left: the writer
  writes from a thread, whose failure could only print a traceback (reports say it in one line)."""
  try:
    if shutil.disk_usage(workdir).free < min_free_bytes:
      return None
    return reports.make_writer(workdir)
  except OSError as e:
    if e.errno not in full_disk.FULL_ERRNOS:
      raise
    return None
