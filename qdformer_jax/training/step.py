"""The train step and its on-device health accounting.

The step is one XLA program: frames enter as uint8 and are normalised on the device, the Hungarian
matching runs inside it, the state is donated, shapes are static (it compiles once). Its metrics add
up on the device (:func:`accumulate`) between log lines; :func:`check_finite` reads the health part
at log, eval and checkpoint boundaries and stops the run as ``config.nonfinite`` says.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qdformer_jax import sharding
from qdformer_jax.losses.criterion import compute_loss
from qdformer_jax.training import optim

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
def accumulate(acc, metrics):
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


def new_accumulator(metrics, step: int) -> dict:
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
