"""Cost of the paper-sized QDFormer: parameters, FLOPs (XLA cost analysis), wall time, memory.

  python benchmarks/model_cost.py                                   # configs/avss.py, T=10, 224², batch 1
  python benchmarks/model_cost.py --config configs/s4.py:swin_t --json /tmp/cost.json
  python benchmarks/model_cost.py --image_size 64 --frames 2 --forward_only

Prints a table and one JSON line (also written to --json):
  params        total nnx.Param count; 'trained' = what the optimizer holds and what receives
                gradient (`optim.trainable_filter`: all but the frozen backbone stages and, when
                model.audio.trainable is False, the audio encoder); per module (backbone, input_proj,
                encoder, audio_encoder = VGGish, head = everything else)
  flops         XLA cost analysis of the compiled programs (`jax.jit(f).lower(...).compile()
                .cost_analysis()['flops']`, a multiply-add = 2 flops): the eval-mode forward of one
                batch, and the train-mode forward + compute_loss + backward (gradients of the trained
                parameters, no optimizer update); per clip = divided by the batch
  time          wall seconds of one call after a warm-up call (and the compile times)
  memory        XLA memory analysis of each program (arguments + outputs + temporaries - aliased) and
                the process's peak resident set size

Parameters are drawn with ``jax.threefry_partitionable(False)``: with the default (True) the XLA:CPU
compile of the initialiser takes minutes (4-D random draws compile slowly); values do not matter here.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from qdformer_jax.losses.criterion import compute_loss  # noqa: E402
from qdformer_jax.models import build_model  # noqa: E402
from qdformer_jax.training import optim  # noqa: E402

GROUPS = ('backbone', 'input_proj', 'encoder', 'audio_encoder')


def load_config(spec: str):
  """'configs/avss.py:swin_t' -> the ConfigDict (the ml_collections config-file convention)."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('task_config', os.path.join(ROOT, path)
                                                       if not os.path.isabs(path) else path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def parameter_counts(config) -> dict:
  model = nnx.eval_shape(lambda: build_model(config, 0))
  params = nnx.state(model, nnx.Param)
  modules = {name: count(sub) for name, sub in params.items()}
  groups = {g: modules.get(g, 0) for g in GROUPS}
  groups['head'] = sum(v for k, v in modules.items() if k not in GROUPS)
  total = sum(modules.values())
  # trainable_filter already leaves out a frozen audio encoder (no update, no weight decay).
  trained = count(nnx.state(model, optim.trainable_filter(model)))
  return {'total': total, 'trained': trained, 'groups': groups, 'modules': dict(sorted(modules.items()))}


def make_batch(batch: int, frames: int, size: int, num_classes: int, audio_shape: tuple = (96, 64)) -> dict:
  """A random batch of the contract; ``audio_shape`` = ``data.audio.example_shape(model.audio.encoder)``."""
  rng = np.random.default_rng(0)
  semantic = np.zeros((batch, frames, size, size), np.uint8)
  for b in range(batch):
    for t in range(frames):
      for cls in rng.choice(np.arange(1, num_classes + 1), size=min(2, num_classes), replace=False):
        y, x = rng.integers(0, size // 2, 2)
        semantic[b, t, y:y + size // 3, x:x + size // 3] = cls
  return {'frames': jnp.asarray(rng.integers(0, 256, (batch, frames, size, size, 3), dtype=np.uint8)),
          'log_mel': jnp.asarray(rng.normal(size=(batch, frames, *audio_shape)), jnp.float32),
          'semantic': jnp.asarray(semantic),
          'gt_valid': jnp.ones((batch, frames), bool), 'frame_valid': jnp.ones((batch, frames), bool)}


def flops_of(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get('flops', float('nan'))) if analysis else float('nan')


def memory_of(compiled) -> dict:
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  out = {k: int(getattr(stats, f'{k}_size_in_bytes', 0)) for k in ('argument', 'output', 'temp', 'alias')}
  out['total'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  return out


def measure(fn, args, name: str, results: dict, batch: int) -> None:
  t0 = time.time()
  lowered = jax.jit(fn).lower(*args)
  t1 = time.time()
  compiled = lowered.compile()
  t2 = time.time()
  jax.block_until_ready(compiled(*args))   # warm-up
  t3 = time.time()
  jax.block_until_ready(compiled(*args))
  t4 = time.time()
  flops = flops_of(compiled)
  results[name] = {'flops': flops, 'flops_per_clip': flops / batch, 'seconds': round(t4 - t3, 3),
                   'first_call_seconds': round(t3 - t2, 3), 'trace_seconds': round(t1 - t0, 2),
                   'compile_seconds': round(t2 - t1, 2), 'memory_bytes': memory_of(compiled)}
  print(f'  {name}: compiled in {t2 - t1:.1f} s, one call {t4 - t3:.2f} s', flush=True)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/avss.py', help='task config file[:args]')
  parser.add_argument('--batch', type=int, default=1, help='clips per batch')
  parser.add_argument('--frames', type=int, default=0, help='T (0: config.data.num_frames)')
  parser.add_argument('--image_size', type=int, default=0, help='(0: config.data.image_size)')
  parser.add_argument('--forward_only', action='store_true', help='skip the forward + backward program')
  parser.add_argument('--json', default='', help='also write the results here')
  args = parser.parse_args(argv)

  config = load_config(args.config)
  frames = args.frames or int(config.data.num_frames)
  size = args.image_size or int(config.data.image_size)
  num_classes = int(config.data.num_classes)
  results = {'config': args.config, 'batch': args.batch, 'frames': frames, 'image_size': size,
             'backend': jax.default_backend(), 'devices': jax.device_count(), 'jax': jax.__version__}
  print(f'{args.config}: batch {args.batch}, T={frames}, {size}x{size}, {jax.default_backend()}', flush=True)

  results['params'] = parameter_counts(config)
  t0 = time.time()
  with jax.threefry_partitionable(False):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(config, 0)))
    state = jax.jit(lambda: nnx.split(build_model(config, config.seed))[1])()
  jax.block_until_ready(state)
  results['init_seconds'] = round(time.time() - t0, 2)
  print(f'  parameters initialised in {results["init_seconds"]:.1f} s', flush=True)
  batch = make_batch(args.batch, frames, size, num_classes)

  def forward(state, batch):
    model = nnx.merge(graphdef, state)
    out = model(batch['frames'], batch['log_mel'], batch['frame_valid'], train=False)
    return out['pred_logits'], out['pred_masks']

  measure(forward, (state, batch), 'forward', results, args.batch)

  if not args.forward_only:
    trained = optim.trainable_filter(nnx.merge(graphdef, state))

    def forward_backward(state, batch):
      model = nnx.merge(graphdef, state)

      def loss_fn(model):
        outputs = model(batch['frames'], batch['log_mel'], batch['frame_valid'], train=True)
        return compute_loss(outputs, batch, config.loss, num_classes)[0]

      return nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trained))(model)

    measure(forward_backward, (state, batch), 'forward_backward', results, args.batch)

  results['peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print_table(results)
  line = json.dumps(results)
  print(line)
  if args.json:
    with open(args.json, 'w') as f:
      f.write(line + '\n')
  return results


def print_table(r: dict) -> None:
  p = r['params']
  rows = [('parameters, total', f"{p['total']:,}"),
          ('  trained (in the optimizer)', f"{p['trained']:,}")]
  rows += [(f'  {k}', f'{v:,}') for k, v in p['groups'].items()]
  for name in ('forward', 'forward_backward'):
    if name in r:
      m = r[name]
      mem = m['memory_bytes'].get('total')
      rows += [(f'{name}: GFLOPs per clip', f"{m['flops_per_clip'] / 1e9:,.1f}"),
               (f'{name}: wall s per batch (compile s)', f"{m['seconds']:.2f} ({m['compile_seconds']:.0f})"),
               (f'{name}: XLA memory GB', f'{mem / 2 ** 30:.2f}' if mem is not None else 'n/a')]
  rows.append(('process peak RSS GB', f"{r['peak_rss_bytes'] / 2 ** 30:.2f}"))
  width = max(len(k) for k, _ in rows)
  print(f"\n{r['config']}  batch {r['batch']}  T={r['frames']}  {r['image_size']}x{r['image_size']}  "
        f"({r['backend']}, jax {r['jax']})")
  for k, v in rows:
    print(f'{k:<{width}}  {v:>16}')
  print()


if __name__ == '__main__':
  main()
