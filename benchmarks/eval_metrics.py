"""Cost of on-device evaluation: post-processing + metric accumulation time ÷ forward time.

    python benchmarks/eval_metrics.py [--model small|full] [--tasks avss,s4] [--batch 2] [--reps 5]

For each task, on a batch of its evaluation size (AVSS: T = 10 frames at 224², 70 classes +
background; S4: T = 5 at 224², binary, the batch rounded up to whole official test batches of 4
clips) and random inputs, times three jitted programs after a
warm-up call, median over ``--reps`` calls:

* ``forward``: the model's forward pass (``train=False``), outputs as the evaluator consumes them;
* ``metrics``: what the eval step adds to the forward pass, given its outputs: post-processing
  (docs/DESIGN.md §3: bilinear mask upsampling to 224², AVSS labels / binary probabilities) and the
  metric accumulators of ``qdformer_jax.evaluation.metrics`` (AVSS: per-class IoU/F sums over 71
  classes; S4: J, 255-threshold F curves, DAVIS sums where enabled), added to running sums;
* ``eval step``: ``Evaluator``'s whole jitted step (forward + metrics, one XLA program).

``--model small`` is the task config with ``configs.common.apply_smoke`` (ResNet-18 at width 8,
d = 32, 3 queries, small audio encoder); ``--model full`` the task config as published (ResNet-50,
d = 256, VGGish); parameters are drawn host-side (values do not change the timings). Prints a table
and a JSON line (also written to ``--json``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flax import nnx  # noqa: E402

from configs import avss, common, s4  # noqa: E402
from qdformer_jax import sharding, testing  # noqa: E402
from qdformer_jax.data import pipeline  # noqa: E402
from qdformer_jax.evaluation import evaluator as evaluator_lib  # noqa: E402
from qdformer_jax.evaluation import metrics as metrics_lib  # noqa: E402
from qdformer_jax.evaluation import postprocess  # noqa: E402
from qdformer_jax.training import state as state_lib  # noqa: E402

TASKS = {'avss': avss.get_config, 's4': s4.get_config}


def task_config(task: str, model: str, batch: int):
  config = TASKS[task]('')
  if model == 'small':
    common.apply_smoke(config)
  if config.data.binary:  # the official S4/MS3 F groups whole test batches of 4 clips
    group = int(config.eval.official_batch_clips)
    batch = group * -(-batch // group)
  config.eval_batch_size = batch
  return config


def random_batch(config, batch: int, mesh) -> dict:
  """A batch of the contract (docs/DESIGN.md §4.2) with random frames, audio and class-id masks."""
  rng = np.random.default_rng(1)
  t, s = int(config.data.num_frames), int(config.data.image_size)
  num_ids = 2 if config.data.binary else int(config.data.num_classes) + 1
  host = {
      'frames': rng.integers(0, 256, (batch, t, s, s, 3), dtype=np.uint8),
      'log_mel': rng.standard_normal((batch, t, 96, 64)).astype(np.float32),
      'semantic': rng.integers(0, num_ids, (batch, t, s, s)).astype(np.uint8),
      'gt_valid': np.ones((batch, t), bool),
      'frame_valid': np.ones((batch, t), bool),
      'clip_valid': np.ones((batch,), bool),
  }
  return pipeline.to_global(host, mesh)


def median_seconds(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_task(task: str, model: str, batch: int, reps: int) -> dict:
  config = task_config(task, model, batch)
  batch = int(config.eval_batch_size)
  mesh = sharding.make_mesh(config)
  graphdef, state = state_lib.model_part(*testing.random_train_state(config, mesh)[:2])  # the model alone
  data = random_batch(config, batch, mesh)
  evaluator = evaluator_lib.Evaluator(config, mesh, graphdef)
  size, binary = evaluator.size, evaluator.binary

  @jax.jit
  def forward(state, batch):
    model_ = nnx.merge(graphdef, state)
    out = model_(batch['frames'], batch['log_mel'], batch['frame_valid'], train=False)
    return {'pred_logits': out['pred_logits'], 'pred_masks': out['pred_masks']}

  @jax.jit
  def post_and_metrics(outputs, batch, sums):
    valid = batch['gt_valid'] & batch['frame_valid'] & batch['clip_valid'][:, None]
    if binary:
      prob = postprocess.binary_probability(outputs, size, size)
      new = metrics_lib.binary_accumulate(prob, batch['semantic'], valid, group_size=evaluator.group)
    else:
      labels = postprocess.semantic_labels(outputs, size, size)
      padded = (~batch['frame_valid']) & batch['clip_valid'][:, None]
      new = metrics_lib.semantic_accumulate(
          labels, batch['semantic'], valid, padded, num_classes=config.data.num_classes + 1,
          keep_padded=bool(config.eval.keep_padded_frames))
    return jax.tree.map(jnp.add, sums, new)

  step = evaluator._step(False)
  sums = evaluator._zero_sums(step, state, data)
  t_forward = median_seconds(forward, state, data, reps=reps)
  outputs = forward(state, data)
  t_metrics = median_seconds(post_and_metrics, outputs, data, sums, reps=reps)
  t_step = median_seconds(step, state, data, sums, reps=reps)
  return {
      'task': task, 'model': model, 'backbone': config.model.backbone.name,
      'hidden_dim': int(config.model.hidden_dim), 'batch': batch, 'frames': int(config.data.num_frames),
      'size': size, 'classes': 1 if binary else int(config.data.num_classes) + 1,
      'forward_s': round(t_forward, 4), 'metrics_s': round(t_metrics, 4), 'eval_step_s': round(t_step, 4),
      'metrics_over_forward': round(t_metrics / t_forward, 4),
      'step_minus_forward_over_forward': round((t_step - t_forward) / t_forward, 4),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', choices=('small', 'full'), default='small')
  parser.add_argument('--tasks', default='avss', help='comma-separated: avss, s4')
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--json', default='', help='also write the JSON results here')
  args = parser.parse_args(argv)
  tasks = [t for t in args.tasks.split(',') if t]
  unknown = [t for t in tasks if t not in TASKS]
  if unknown:
    parser.error(f'unknown task(s) {unknown}; choose from {sorted(TASKS)}')
  rows = [bench_task(t, args.model, args.batch, args.reps) for t in tasks]
  header = ('task', 'model', 'backbone', 'batch', 'frames', 'size', 'classes', 'forward_s', 'metrics_s',
            'eval_step_s', 'metrics_over_forward')
  print(f'JAX {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s), '
        f'{os.cpu_count()} CPUs)')
  print(' | '.join(header))
  print(' | '.join('---' for _ in header))
  for r in rows:
    print(' | '.join(str(r[k]) for k in header))
  result = {'platform': jax.devices()[0].platform, 'results': rows}
  print(json.dumps(result))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  main()
