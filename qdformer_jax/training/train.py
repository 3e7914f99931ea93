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
import logging
import os
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qdformer_jax import sharding
from qdformer_jax import workdir as workdir_lib
from qdformer_jax.data import pipeline, registry
from qdformer_jax.evaluation import evals, reports
from qdformer_jax.evaluation.evaluator import Evaluator, check_eval_batch
from qdformer_jax.losses.criterion import compute_loss
from qdformer_jax.models import build_model
from qdformer_jax.training import optim
from qdformer_jax.training.checkpoint import Checkpoints

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

  @functools.partial(jax.jit, out_shardings=jax.tree.map(lambda x: x.sharding, abstract_state))
  def init():
    return nnx.split(model_and_optimizer(config, drop_steps))[1]

  return graphdef, init(), abstract_state


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

def make_train_step(graphdef, config, state_shardings, mesh):
  """The jitted train step: (state, global batch) -> (state, metrics); the state is donated."""
  num_classes = config.data.num_classes

  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(model):
      outputs = model(batch['frames'], batch['log_mel'], batch['frame_valid'], train=True)
      loss, terms = compute_loss(outputs, batch, config.loss, num_classes)
      return loss, (terms, outputs)

    # Differentiate only what the optimizer holds: no gradient tree for frozen VGGish (72M zeros)
    # and no backward pass through the frozen backbone stages, which XLA then drops.
    trainable = nnx.DiffState(0, optim.trainable_filter(model))
    (loss, (terms, outputs)), grads = nnx.value_and_grad(loss_fn, argnums=trainable, has_aux=True)(model)
    optimizer.update(model, grads)
    metrics = dict(terms, loss=loss, grad_norm=optax.tree.norm(grads))
    key = jax.random.fold_in(jax.random.key(config.seed), optimizer.step[...])
    metrics.update(model.train_diagnostics(outputs, key))
    return nnx.state((model, optimizer)), metrics

  return jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


# -- loop ------------------------------------------------------------------------------------------

class Progress:
  """One progress line per log interval: the interval's mean metrics, steps/s and ETA measured over
  the interval's train steps only (compile, eval and checkpoint time are excluded)."""

  def __init__(self, total_steps: int):
    self.total = total_steps
    self.busy = 0.0       # seconds of train steps since the last line
    self.steps = 0
    self.rate = None

  def timed(self, seconds: float, steps: int = 1):
    self.busy += seconds
    self.steps += steps

  def line(self, step: int, metrics: dict) -> str:
    if self.steps:
      self.rate = self.steps / max(self.busy, 1e-9)
    self.busy, self.steps = 0.0, 0
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


def train_and_evaluate(config, workdir: str, *, config_arg: str | None = None) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the last evaluation
  (the metrics of the ``config.best_eval`` entry; every entry's reports are under ``<workdir>/reports``).
  ``config_arg``: the ``--config`` argument the run was started with, for the commands of the summary."""
  started = time.time()
  os.makedirs(workdir, exist_ok=True)
  config = _resolved(config)
  check_eval_batch(config)
  enable_compilation_cache(config)
  is_chief = jax.process_index() == 0
  if is_chief:
    with open(workdir_lib.config_path(workdir), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh = sharding.make_mesh(config)
  logging.info('mesh %s over %d devices (%d processes)', dict(mesh.shape), jax.device_count(), jax.process_count())

  # Data.
  train_iter = pipeline.make_train_iterator(
      config.data, global_batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  steps_per_epoch = max(1, len(registry.open_source(config.data, config.data.train_split)) // config.batch_size)
  total_steps, drop_steps = optim.total_and_drop_steps(config, steps_per_epoch)

  # Sharded state, resumed when the workdir has a checkpoint.
  graphdef, state, abstract_state = create_train_state(config, mesh, drop_steps)
  ckpt = Checkpoints(workdir, keep=config.keep_checkpoints, best_metric=config.best_metric)
  start_step = 0
  if ckpt.latest_step() is not None:
    state, _, start_step = ckpt.restore(abstract_state, data_iterator=train_iter)
    logging.info('resumed from step %d', start_step)
  else:
    state = load_pretrained(config, state, graphdef)
  train_step = make_train_step(graphdef, config, jax.tree.map(lambda x: x.sharding, abstract_state), mesh)
  evaluator = Evaluator(config, mesh, graphdef)
  eval_entries = evals.entries(config)
  writer = reports.make_writer(workdir) if is_chief else None

  progress = Progress(total_steps)
  sums, count = None, 0
  last_eval = {}
  step = start_step
  while step < total_steps:
    t0 = time.perf_counter()
    batch = pipeline.to_global(pipeline.device_batch(next(train_iter)), mesh)
    state, metrics = train_step(state, batch)
    step += 1
    sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
    count += 1
    if step == start_step + 1:
      jax.block_until_ready(sums)
      logging.info('compiled and ran the first train step in %.1f s', time.perf_counter() - t0)
    else:
      progress.timed(time.perf_counter() - t0)
    if step % config.log_every == 0 or step == total_steps:
      means = {k: float(v) / count for k, v in jax.device_get(sums).items()}
      sums, count = None, 0
      logging.info(progress.line(step, means))
      if writer is not None:
        for k, v in means.items():
          writer.add_scalar(f'train/{k}', v, step)
        writer.flush()
    due = {name: e for name, e in eval_entries.items() if evals.due(e, step, total_steps)}
    if due:
      last_eval.update(evals.run(evaluator, state, step, config, workdir, due, writer))
    if step % config.checkpoint_every == 0 or due or step == total_steps:
      ranked = last_eval.get(config.best_eval) if config.best_eval in due else None
      ckpt.save(step, state, train_iter, {'step': step, 'config': config.name}, metrics=ranked)
  ckpt.wait()
  best = ckpt.best_step()
  ckpt.close()
  if writer is not None:
    writer.close()
  final = last_eval.get(config.best_eval, {})
  if is_chief:
    for line in summary(config, workdir, step - start_step, time.time() - started, final, best, config_arg):
      logging.info(line)
  return final


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


def evaluate_checkpoint(config, workdir: str) -> dict:
  """``config.mode = 'eval'``: restores the latest/best/<step> checkpoint and runs every evaluation
  entry of the config on it (``evals.entries(config, mode='eval')``); returns the metrics of the
  ``config.best_eval`` entry (all reports are under ``<workdir>/reports``)."""
  config = _resolved(config)
  enable_compilation_cache(config)
  mesh = sharding.make_mesh(config)
  graphdef, abstract_state = abstract_train_state(config, mesh, ())  # restored, never initialised
  ckpt = Checkpoints(workdir, keep=config.keep_checkpoints, best_metric=config.best_metric)
  which = str(config.eval.checkpoint)
  step = None if which in ('latest', 'best') else int(which)
  state, _, step = ckpt.restore(abstract_state, step=step, which='best' if which == 'best' else 'latest')
  ckpt.close()
  evaluator = Evaluator(config, mesh, graphdef)
  writer = reports.make_writer(workdir) if jax.process_index() == 0 else None
  results = evals.run(evaluator, state, step, config, workdir, evals.entries(config, mode='eval'), writer)
  if writer is not None:
    writer.close()
  return results.get(config.best_eval) or next(iter(results.values()), {})
