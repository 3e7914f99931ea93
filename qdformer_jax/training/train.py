"""The training loop, top to bottom: mesh, data, sharded state, jitted step, checkpoints, evals.

Importable from Colab: ``train_and_evaluate(config, workdir)`` runs the job ``main.py`` runs;
``create_train_state`` and ``make_train_step`` are the pieces.

Every step is one XLA program: frames enter as uint8 and are normalised on the device, the Hungarian
matching runs inside the step, the train state is donated, shapes are static (the step compiles once)
and the step's metrics accumulate on the device between log lines.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qdformer_jax.data import pipeline
from qdformer_jax.evaluation import evaluate as evaluation
from qdformer_jax.losses.criterion import compute_loss
from qdformer_jax.models import build_model
from qdformer_jax.models.quantizer import codebook_usage
from qdformer_jax.training import optim
from qdformer_jax.training.checkpoint import Checkpoints

BATCH_AXES = ('data', 'fsdp')


# -- mesh and shardings ----------------------------------------------------------------------------

def make_mesh(config) -> jax.sharding.Mesh:
  """All devices as a (data, fsdp) mesh; ``config.mesh_fsdp`` (default 1) devices share parameters."""
  fsdp = int(config.get('mesh_fsdp', 1))
  n = jax.device_count()
  if n % fsdp:
    raise ValueError(f'mesh_fsdp={fsdp} does not divide the {n} devices')
  # Auto axes: GSPMD propagates shardings through the model (no per-op sharding annotations).
  return jax.make_mesh((n // fsdp, fsdp), BATCH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def param_sharding(mesh, x) -> NamedSharding:
  """Replicated, or split over 'fsdp' along the largest divisible axis when the mesh has one."""
  fsdp = mesh.shape['fsdp']
  shape = getattr(x, 'shape', ())
  if fsdp > 1 and len(shape) >= 1 and np.prod(shape) >= 2 ** 14:
    for axis in np.argsort(shape)[::-1]:
      if shape[axis] % fsdp == 0:
        spec = [None] * len(shape)
        spec[axis] = 'fsdp'
        return NamedSharding(mesh, P(*spec))
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def to_global(batch: dict, mesh) -> dict:
  """Per-process numpy batch -> global jax arrays sharded over the batch axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


# -- state -----------------------------------------------------------------------------------------

def _model_and_optimizer(config, drop_steps):
  model = build_model(config, config.seed)
  return model, optim.make_optimizer(model, config.optim, drop_steps)


def abstract_train_state(config, mesh, drop_steps):
  """(graphdef, abstract state with shardings): shapes only, nothing is initialised (restores)."""
  abstract = nnx.eval_shape(lambda: _model_and_optimizer(config, drop_steps))
  graphdef, abstract_state = nnx.split(abstract)
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=param_sharding(mesh, x)), abstract_state)
  return graphdef, abstract_state


def create_train_state(config, mesh, drop_steps):
  """(graphdef, state, abstract state with shardings); the state is created already sharded."""
  graphdef, abstract_state = abstract_train_state(config, mesh, drop_steps)

  @functools.partial(jax.jit, out_shardings=jax.tree.map(lambda x: x.sharding, abstract_state))
  def init():
    return nnx.split(_model_and_optimizer(config, drop_steps))[1]

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
  num_classes = config.data.num_classes

  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(model):
      outputs = model(batch['frames'], batch['log_mel'], batch['frame_valid'], train=True)
      loss, terms = compute_loss(outputs, batch, config.loss, num_classes)
      return loss, (terms, outputs['vq'])

    # Differentiate only what the optimizer holds: no gradient tree for frozen VGGish (72M zeros)
    # and no backward pass through the frozen backbone stages, which XLA then drops.
    trainable = nnx.DiffState(0, optim.trainable_filter(model))
    (loss, (terms, vq)), grads = nnx.value_and_grad(loss_fn, argnums=trainable, has_aux=True)(model)
    optimizer.update(model, grads)
    metrics = dict(terms, loss=loss, grad_norm=optax.tree.norm(grads))
    if vq is not None:
      usage = codebook_usage(vq['global_indices'], config.model.codebook_size)
      metrics.update(codebook_perplexity=usage['perplexity'], codebook_dead_codes=usage['dead_codes'])
      tokens, indices = vq['global_tokens'].reshape(-1, vq['global_tokens'].shape[-1]), vq['global_indices']
      if vq.get('local_indices') is not None:
        local = codebook_usage(vq['local_indices'], config.model.codebook_size,
                               jnp.broadcast_to(vq['local_valid'][..., None], vq['local_indices'].shape))
        metrics['codebook_local_perplexity'] = local['perplexity']
        # Restart candidates include the local tokens: a restart is not a gradient step (the codebook
        # is still trained only by Eq. 9's first term), and codewords where the local tokens are keep
        # the per-frame audio from collapsing onto one code.
        tokens = jnp.concatenate([tokens, vq['local_tokens'].reshape(-1, tokens.shape[-1])])
        indices = jnp.concatenate([indices.reshape(-1), vq['local_indices'].reshape(-1)])
      if config.model.get('vq_restart_dead', False):
        key = jax.random.fold_in(jax.random.key(config.seed), optimizer.step[...])
        metrics['codebook_restarts'] = model.quantizer.restart_dead_codes(tokens, indices, key)
    return nnx.state((model, optimizer)), metrics

  return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding(mesh)),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=0)


# -- loop ------------------------------------------------------------------------------------------

class _Progress:
  """A progress line with throughput and ETA."""

  def __init__(self, start_step: int, total_steps: int):
    self.t0, self.s0, self.total = time.time(), start_step, total_steps

  def line(self, step: int, metrics: dict) -> str:
    elapsed = time.time() - self.t0
    rate = (step - self.s0) / max(elapsed, 1e-9)
    eta = (self.total - step) / max(rate, 1e-9)
    shown = ' '.join(f'{k}={metrics[k]:.4g}' for k in ('loss', 'loss_class', 'loss_mask', 'loss_dice', 'loss_quant',
                                                       'codebook_perplexity', 'codebook_local_perplexity', 'codebook_restarts')
                 if k in metrics)
    return f'step {step}/{self.total} {shown} | {rate:.2f} steps/s, ETA {eta / 60:.1f} min'


def default_data_dir(config, workdir: str) -> str:
  return config.data.data_dir or os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the last eval metrics."""
  os.makedirs(workdir, exist_ok=True)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.data_dir = default_data_dir(config, workdir)
  is_chief = jax.process_index() == 0
  if is_chief:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh = make_mesh(config)
  logging.info('mesh %s over %d devices (%d processes)', dict(mesh.shape), jax.device_count(), jax.process_count())

  # Data.
  train_iter = pipeline.make_train_iterator(
      config.data, global_batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  steps_per_epoch = max(1, len(pipeline.load_source(config.data, config.data.train_split)) // config.batch_size)
  total_steps, drop_steps = optim.total_and_drop_steps(config, steps_per_epoch)

  # Sharded state, resumed when the workdir has a checkpoint.
  graphdef, state, abstract_state = create_train_state(config, mesh, drop_steps)
  ckpt = Checkpoints(workdir, keep=config.keep_checkpoints, best_metric=config.best_metric)
  start_step = 0
  if ckpt.latest_step() is not None:
    state, meta, start_step = ckpt.restore(abstract_state, data_iterator=train_iter)
    logging.info('resumed from step %d', start_step)
  else:
    state = load_pretrained(config, state, graphdef)
  train_step = make_train_step(graphdef, config, jax.tree.map(lambda x: x.sharding, abstract_state), mesh)
  evaluator = evaluation.Evaluator(config, mesh, graphdef)
  writer = evaluation.make_writer(workdir) if is_chief else None

  progress = _Progress(start_step, total_steps)
  sums, count = None, 0
  last_eval = {}
  step = start_step
  while step < total_steps:
    batch = to_global(pipeline.device_batch(next(train_iter)), mesh)
    state, metrics = train_step(state, batch)
    step += 1
    sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
    count += 1
    if step % config.log_every == 0 or step == total_steps:
      means = {k: float(v) / count for k, v in jax.device_get(sums).items()}
      sums, count = None, 0
      logging.info(progress.line(step, means))
      if writer is not None:
        for k, v in means.items():
          writer.add_scalar(f'train/{k}', v, step)
        writer.flush()
    if step % config.checkpoint_every == 0 or step == total_steps:
      ckpt.save(step, state, train_iter, {'step': step, 'config': config.name})
    if step % config.eval_every == 0 or step == total_steps:
      split = config.eval.split or config.data.eval_split
      last_eval = evaluator.run(state, split, step, writer=writer,
                                overlay_dir=os.path.join(workdir, 'reports', 'overlays', f'{split}_{step}'))
      evaluation.write_report(workdir, split, step, config, last_eval, writer)
      ckpt.save_best(step, state, last_eval, {'step': step, 'config': config.name, 'split': split})
  ckpt.wait()
  ckpt.close()
  if writer is not None:
    writer.close()
  return last_eval


def evaluate_checkpoint(config, workdir: str) -> dict:
  """``config.mode = 'eval'``: restores the latest/best/<step> checkpoint and evaluates it."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.data_dir = default_data_dir(config, workdir)
  mesh = make_mesh(config)
  graphdef, abstract_state = abstract_train_state(config, mesh, ())  # restored, never initialised
  ckpt = Checkpoints(workdir, keep=config.keep_checkpoints, best_metric=config.best_metric)
  which = config.eval.checkpoint
  step = None if which in ('latest', 'best') else int(which)
  state, meta, step = ckpt.restore(abstract_state, step=step, which='best' if which == 'best' else 'latest')
  ckpt.close()
  split = config.eval.split or config.data.eval_split
  evaluator = evaluation.Evaluator(config, mesh, graphdef)
  writer = evaluation.make_writer(workdir) if jax.process_index() == 0 else None
  results = evaluator.run(state, split, step, writer=writer,
                          overlay_dir=os.path.join(workdir, 'reports', 'overlays', f'{split}_{step}'))
  evaluation.write_report(workdir, split, step, config, results, writer)
  if config.eval.shuffle_audio:
    # The audio-use check: the same clips, each with another clip's audio, beside the plain scores.
    shuffled = evaluator.run(state, split, step, shuffle_audio=True)
    evaluation.write_report(workdir, split, step, config, shuffled, writer, variant='shuffled_audio')
    evaluation.write_audio_use_report(workdir, split, step, config, results, shuffled)
    logging.info('audio use %s step %d: %s', split, step, json.dumps(
        {k: {'matched': results[k], 'shuffled': shuffled[k]} for k in ('mIoU', 'J', 'F') if k in results}))
  if config.eval.noise_snrs:
    sweep = {snr: evaluator.run(state, split, step, noise_snr=snr) for snr in config.eval.noise_snrs}
    evaluation.write_noise_report(workdir, split, step, config, results, sweep)
  if writer is not None:
    writer.close()
  logging.info('eval %s step %d: %s', split, step, json.dumps(results))
  return results
