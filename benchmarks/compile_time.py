"""XLA compile time of the train step, piece by piece, and its run time (default: the synthetic default job).

  python benchmarks/compile_time.py                       # configs/synthetic.py, its batch (8): ~4 min
  python benchmarks/compile_time.py --config configs/synthetic.py:smoke --out compile.json

Each row is one jitted program on the config's train state and batch shapes, compiled from scratch
(no persistent cache), built up towards the shipped step:

  forward + loss               the model in train mode and ``compute_loss``
  + backward                   gradients of the trained parameters (``nnx.value_and_grad``)
  + AdamW update               ``optimizer.update`` (gradient clipping, two AdamW groups)
  train step (as shipped)      ``training.step.make_train_step``: + gradient norm, codebook
                               diagnostics, the non-finite guard on loss and gradient norm
  + check every new parameter  the shipped step, plus the guard's former test of every updated
                               parameter for finiteness before the state is selected

The shipped step is then run (``--runs`` calls after one warm-up on a random batch) and its median
and fastest times printed: the device step alone, without input pipeline, logging or checkpoints.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks.model_cost import load_config, make_batch  # noqa: E402
from qdformer_jax import sharding  # noqa: E402
from qdformer_jax.data import pipeline  # noqa: E402
from qdformer_jax.losses.criterion import compute_loss  # noqa: E402
from qdformer_jax.training import optim  # noqa: E402
from qdformer_jax.training import state as state_lib  # noqa: E402
from qdformer_jax.training import step as step_lib  # noqa: E402


def programs(graphdef, config):
  """name -> function (state, batch) of each row but the shipped step."""
  num_classes = config.data.num_classes

  def forward(model, batch):
    outputs = model(batch['frames'], batch['log_mel'], batch['frame_valid'], train=True)
    return compute_loss(outputs, batch, config.loss, num_classes)

  def partial(level):
    def step(state, batch):
      model, optimizer = nnx.merge(graphdef, state)
      if level == 0:
        loss, terms = forward(model, batch)
        return nnx.state((model, optimizer)), dict(terms, loss=loss)
      trainable = nnx.DiffState(0, optim.trainable_filter(model))
      (loss, terms), grads = nnx.value_and_grad(forward, argnums=trainable, has_aux=True)(model, batch)
      if level == 1:
        return nnx.state((model, optimizer)), dict(terms, loss=loss, grads=grads)
      optimizer.update(model, grads)
      return nnx.state((model, optimizer)), dict(terms, loss=loss)
    return step

  def checked(state, batch):
    """The shipped step's body, with the former guard (every new parameter tested) added."""
    before = jax.tree.map(lambda x: x, state)
    model, optimizer = nnx.merge(graphdef, state)
    count = optimizer.step[...]
    trainable = nnx.DiffState(0, optim.trainable_filter(model))
    (loss, terms), grads = nnx.value_and_grad(forward, argnums=trainable, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    grad_norm = optax.tree.norm(grads)
    new_params = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(jnp.stack(new_params))
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), nnx.state((model, optimizer)), before)
    model, optimizer = nnx.merge(graphdef, kept)
    optimizer.step[...] = count + 1
    return nnx.state((model, optimizer)), dict(terms, loss=loss, grad_norm=grad_norm)

  return {'forward + loss': partial(0), '+ backward': partial(1), '+ AdamW update': partial(2),
          '+ check every new parameter': checked}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/synthetic.py')
  parser.add_argument('--runs', type=int, default=20, help='timed calls of the shipped step')
  parser.add_argument('--out', default='', help='write the JSON here')
  args = parser.parse_args(argv)

  jax.config.update('jax_enable_compilation_cache', False)
  config = load_config(args.config)
  mesh = sharding.make_mesh(config)
  graphdef, abstract_state = state_lib.abstract_train_state(config, mesh, ())
  shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
  spec = pipeline.batch_spec(config.data, config.batch_size, mesh)
  rows = {}

  def compile_row(name, jitted):
    t0 = time.perf_counter()
    lowered = jitted.lower(abstract_state, spec)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    rows[name] = {'lower_seconds': round(t1 - t0, 1), 'compile_seconds': round(time.perf_counter() - t1, 1)}
    print(f"  {name}: lowered in {rows[name]['lower_seconds']} s, compiled in {rows[name]['compile_seconds']} s",
          flush=True)
    return compiled

  extra = programs(graphdef, config)
  for name in ('forward + loss', '+ backward', '+ AdamW update'):
    compile_row(name, jax.jit(extra[name], donate_argnums=0))
  step = compile_row('train step (as shipped)', step_lib.make_train_step(graphdef, config, shardings, mesh))
  compile_row('+ check every new parameter', jax.jit(extra['+ check every new parameter'], donate_argnums=0))

  with jax.threefry_partitionable(False):
    state = state_lib.init_train_state(config, abstract_state, ())
  t, size = int(config.data.num_frames), int(config.data.image_size)
  batch = make_batch(config.batch_size, t, size, int(config.data.num_classes))
  batch = {k: jax.device_put(np.asarray(v).astype(spec[k].dtype), spec[k].sharding) for k, v in batch.items()}
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.runs):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  result = {'config': args.config, 'batch': int(config.batch_size), 'backend': jax.default_backend(),
            'jax': jax.__version__, 'cpus': os.cpu_count(), 'load_average': os.getloadavg()[0], 'rows': rows,
            'step_seconds_median': float(np.median(times)), 'step_seconds_min': float(min(times)),
            'runs': args.runs}
  print(f"\n{args.config}: train step at batch {result['batch']} ({result['backend']}, jax {result['jax']}, "
        f"{result['cpus']} CPUs, 1-min load {result['load_average']:.1f}); compile from scratch\n")
  print('| program | lower s | XLA compile s |')
  print('|---|---:|---:|')
  for name, row in rows.items():
    print(f"| {name} | {row['lower_seconds']} | {row['compile_seconds']} |")
  print(f"\nshipped step, {args.runs} runs: median {1000 * result['step_seconds_median']:.0f} ms "
        f"({1 / result['step_seconds_median']:.2f} steps/s), fastest {1000 * result['step_seconds_min']:.0f} ms\n")
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == '__main__':
  main()
