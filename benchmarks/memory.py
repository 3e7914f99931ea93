"""Train-step memory of the paper-sized QDFormer under model.remat x model.dtype, and under FSDP.

  python benchmarks/memory.py --out /tmp/memory.json                       # AVSS R50, T=10, batch 4
  python benchmarks/memory.py --settings float32:none,bfloat16:blocks --xla '' --time_batch 0

For each setting (model.dtype:model.remat; bfloat16 sets model.dtype and model.backbone.dtype) the
real train step (``training.step.make_train_step``: forward, loss with matching, backward, AdamW
update) of one device at the global batch ``--batch`` is measured three ways:

  state       bytes of the train state (parameters + AdamW moments + step) and of the gradients of
              the trained parameters: the step's arguments, and one gradient tree
  residuals   bytes of the activations saved from the forward pass for the backward pass
              (``jax.ad_checkpoint.saved_residuals`` of the loss): what remat and the compute dtype
              change, independent of the backend. est. peak = state + gradients + residuals is the
              accelerator estimate (a lower bound: the largest transient of one op comes on top)
  xla         ``jitted.lower(...).compile().memory_analysis()`` on this backend: argument + output +
              temp - alias bytes (the number used for the 16 GiB target when the backend schedules
              remat, see below), for the settings in ``--xla``

XLA:CPU's scheduler does not honour rematerialisation: it hoists the recomputed forward back next
to the original one, so on CPU ``jax.checkpoint`` never lowers (and usually raises) temp bytes
(a 8-layer MLP: 400 MiB without, 512 MiB with; jax-ml/jax#19822). The residual bytes are therefore
the figure remat is judged by here; on GPU/TPU the compiled memory follows them.

``--time_batch`` > 0 also times one train step at that batch per setting (after a warm-up step).

``--compare`` (default ``pvt_v2_b5,ast``) adds rows for the comparison choices: the same step with
PVT-v2-B5 as backbone, and with the Audio Spectrogram Transformer as audio encoder, under
``--compare_settings`` (XLA analysis and timing where ``--xla`` / ``--time`` name the setting).

FSDP (``--fsdp 1,2,4,8``): in a subprocess with 8 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8), the per-device bytes of the sharded train
state (``sharding.shard_abstract``: the shard shape of every leaf on device 0, summed), for
config.mesh_fsdp = each value; falls as 1/fsdp down to the arrays ``sharding`` keeps replicated.

Prints a Markdown table and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

GIB = 2 ** 30
TARGET_GIB = 16.0
DEFAULT_SETTINGS = 'float32:none,bfloat16:none,float32:blocks,bfloat16:blocks,bfloat16:dots_saveable'


def nbytes(tree) -> int:
  import jax
  return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def configure(spec: str, dtype: str, remat: str, fsdp: int = 1):
  from benchmarks.model_cost import load_config
  config = load_config(spec)
  config.model.dtype = dtype
  config.model.backbone.dtype = dtype
  config.model.remat = remat
  config.mesh_fsdp = fsdp
  return config


def residual_bytes(config, batch: int) -> tuple[int, list]:
  """Bytes the forward pass of the loss saves for its backward pass (trained parameters differentiated)."""
  from flax import nnx
  from jax._src.ad_checkpoint import saved_residuals

  from qdformer_jax import sharding
  from qdformer_jax.data import pipeline
  from qdformer_jax.losses.criterion import compute_loss
  from qdformer_jax.models import build_model
  from qdformer_jax.training import optim

  model = nnx.eval_shape(lambda: build_model(config, 0))
  graphdef, params, rest = nnx.split(model, optim.trainable_filter(model), ...)
  data = pipeline.batch_spec(config.data, batch, sharding.make_mesh(config))

  def loss(params, rest, data):
    m = nnx.merge(graphdef, params, rest)
    out = m(data['frames'], data['log_mel'], data['frame_valid'], train=True)
    return compute_loss(out, data, config.loss, config.data.num_classes)[0]

  saved = [(aval, where) for aval, where in saved_residuals(loss, params, rest, data)
           if 'from the argument' not in where]  # arguments (parameters, batch) are counted as state
  sizes = sorted(((math.prod(a.shape) * a.dtype.itemsize, f'{a.str_short()} {w[:90]}') for a, w in saved),
                 reverse=True)
  return sum(s for s, _ in sizes), sizes[:5]


def measure_setting(spec: str, dtype: str, remat: str, batch: int, xla: bool, time_batch: int) -> dict:
  import jax
  from flax import nnx

  from benchmarks.model_cost import make_batch, memory_of
  from qdformer_jax import sharding
  from qdformer_jax.data import audio, pipeline
  from qdformer_jax.training import optim
  from qdformer_jax.training import state as state_lib
  from qdformer_jax.training import step as step_lib

  config = configure(spec, dtype, remat)
  out = {'config': spec, 'dtype': dtype, 'remat': remat, 'batch': batch}
  t0 = time.time()
  mesh = sharding.make_mesh(config)
  graphdef, abstract_state = state_lib.abstract_train_state(config, mesh, ())
  model = nnx.eval_shape(lambda: state_lib.model_and_optimizer(config, ())[0])
  out['state_bytes'] = nbytes(abstract_state)
  out['grad_bytes'] = nbytes(nnx.state(model, optim.trainable_filter(model)))
  out['residual_bytes'], out['largest_residuals'] = residual_bytes(config, batch)
  out['estimate_bytes'] = out['state_bytes'] + out['grad_bytes'] + out['residual_bytes']
  out['trace_seconds'] = round(time.time() - t0, 1)
  step = step_lib.make_train_step(graphdef, config, jax.tree.map(lambda x: x.sharding, abstract_state), mesh)
  if xla:
    t0 = time.time()
    compiled = step.lower(abstract_state, pipeline.batch_spec(config.data, batch, mesh)).compile()
    out['xla'] = memory_of(compiled)
    out['xla_compile_seconds'] = round(time.time() - t0, 1)
    del compiled
  if time_batch:
    with jax.threefry_partitionable(False):
      state = state_lib.init_train_state(config, abstract_state, ())
    data = make_batch(time_batch, int(config.data.num_frames), int(config.data.image_size),
                      int(config.data.num_classes), audio.example_shape(config.data.audio_encoder))
    data = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in data.items()}
    t0 = time.time()
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    out['time_compile_and_first_seconds'] = round(time.time() - t0, 1)
    times = []
    for _ in range(2):
      t0 = time.perf_counter()
      state, metrics = step(state, data)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
    out['time_batch'] = time_batch
    out['step_seconds'] = round(min(times), 2)
  return out


def fsdp_state_bytes(spec: str, values: list[int]) -> list[dict]:
  """Per-device train-state bytes for each mesh_fsdp (run in a process with 8 fake CPU devices)."""
  import jax

  from qdformer_jax import sharding
  from qdformer_jax.training import state as state_lib

  def per_device(tree, device):
    total = 0
    for leaf in jax.tree.leaves(tree):
      assert device in leaf.sharding.device_set
      total += math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total

  rows, device = [], jax.devices()[0]
  for fsdp in values:
    config = configure(spec, 'float32', 'none', fsdp)
    mesh = sharding.make_mesh(config)
    _, abstract_state = state_lib.abstract_train_state(config, mesh, ())
    model_state, optimizer_state = abstract_state[0], abstract_state[1]
    rows.append({'fsdp': fsdp, 'mesh': dict(mesh.shape), 'devices': jax.device_count(),
                 'state_bytes_per_device': per_device(abstract_state, device),
                 'model_bytes_per_device': per_device(model_state, device),
                 'optimizer_bytes_per_device': per_device(optimizer_state, device),
                 'state_bytes_total': nbytes(abstract_state)})
  return rows


def run_child(args: list[str], env: dict | None = None) -> dict:
  """One measurement in its own process (bounded memory; XLA_FLAGS must be set before jax loads)."""
  cmd = [sys.executable, os.path.abspath(__file__)] + args
  result = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if result.returncode:
    sys.stderr.write(result.stderr[-4000:])
    raise RuntimeError(f'{" ".join(args)} failed (exit {result.returncode})')
  return json.loads(result.stdout.strip().splitlines()[-1])


def gib(x) -> str:
  return '' if x is None else f'{x / GIB:.2f}'


def _setting_row(s: dict) -> str:
  """'| dtype | remat | state | grads | residuals | est. peak | fits | XLA total (temp) | step s |'."""
  x = s.get('xla')
  xla = f"{gib(x['total'])} ({gib(x['temp'])})" if x else 'n/a'
  fits = 'yes' if s['estimate_bytes'] <= TARGET_GIB * GIB else 'no'
  step = f"{s['step_seconds']:.2f} ({s['time_batch']})" if 'step_seconds' in s else 'n/a'
  return (f"| {s['dtype']} | {s['remat']} | {gib(s['state_bytes'])} | {gib(s['grad_bytes'])} | "
          f"{gib(s['residual_bytes'])} | {gib(s['estimate_bytes'])} | {fits} | {xla} | {step} |")


def print_tables(r: dict) -> None:
  print(f"\n{r['config']}: train step, global batch {r['batch']} on one device "
        f"({r['backend']}, jax {r['jax']}); GiB = 2^30 bytes; target {TARGET_GIB:.0f} GiB\n")
  print('| dtype | remat | state GiB | grads GiB | residuals GiB | est. peak GiB | fits 16 GiB (est.) '
        '| XLA:CPU total GiB (temp) | step s (batch) |')
  print('|---|---|---:|---:|---:|---:|:---:|---:|---:|')
  for s in r['settings']:
    print(_setting_row(s))
  if r.get('compare'):
    print('\nThe comparison choices (the same step with another backbone or audio encoder):\n')
    print('| config | dtype | remat | state GiB | grads GiB | residuals GiB | est. peak GiB | fits 16 GiB (est.) '
          '| XLA:CPU total GiB (temp) | step s (batch) |')
    print('|---|---|---|---:|---:|---:|---:|:---:|---:|---:|')
    for s in r['compare']:
      print(f"| {s['config']} " + _setting_row(s))
  if r.get('fsdp'):
    base = r['fsdp'][0]['state_bytes_per_device']
    print(f"\nFSDP on {r['fsdp'][0]['devices']} fake CPU devices, mesh (data, fsdp): per-device train state "
          '(float32 parameters + frozen values + AdamW moments)\n')
    print('| mesh_fsdp | mesh | state GiB / device | model GiB / device | optimizer GiB / device | x of fsdp=1 | 1/fsdp |')
    print('|---:|---|---:|---:|---:|---:|---:|')
    for row in r['fsdp']:
      print(f"| {row['fsdp']} | {row['mesh']} | {gib(row['state_bytes_per_device'])} | "
            f"{gib(row['model_bytes_per_device'])} | {gib(row['optimizer_bytes_per_device'])} | "
            f"{row['state_bytes_per_device'] / base:.3f} | {1 / row['fsdp']:.3f} |")
  print()


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/avss.py')
  parser.add_argument('--batch', type=int, default=4, help='global batch (clips) on one device')
  parser.add_argument('--settings', default=DEFAULT_SETTINGS, help='dtype:remat,... to measure')
  parser.add_argument('--xla', default='float32:none,bfloat16:none',
                      help="settings also compiled for XLA's memory analysis ('all', or '' for none)")
  parser.add_argument('--time_batch', type=int, default=1, help='time one step at this batch (0: skip)')
  parser.add_argument('--time', default='float32:none,bfloat16:none,bfloat16:blocks',
                      help="settings timed ('all' or a list)")
  parser.add_argument('--compare', default='pvt_v2_b5,ast',
                      help="config words measured as extra rows (a backbone name, 'ast'); '' for none")
  parser.add_argument('--compare_settings', default='float32:none,bfloat16:blocks',
                      help='dtype:remat settings of the extra rows (XLA analysis and timing as --xla / --time)')
  parser.add_argument('--fsdp', default='1,2,4,8', help="mesh_fsdp values on 8 fake devices ('' to skip)")
  parser.add_argument('--out', default='', help='write the JSON here')
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.child:  # one measurement, JSON on the last stdout line
    kind, _, rest = args.child.partition('=')
    if kind == 'fsdp':
      result = fsdp_state_bytes(args.config, [int(v) for v in rest.split(',')])
    else:
      dtype, remat, xla, time_batch = rest.split(':')
      result = measure_setting(args.config, dtype, remat, args.batch, xla == '1', int(time_batch))
    print(json.dumps(result))
    return result

  import jax
  settings = [s.split(':') for s in args.settings.split(',') if s]
  xla = set(args.settings.split(',')) if args.xla == 'all' else set(filter(None, args.xla.split(',')))
  timed = set(args.settings.split(',')) if args.time == 'all' else set(filter(None, args.time.split(',')))
  results = {'config': args.config, 'batch': args.batch, 'backend': jax.default_backend(), 'jax': jax.__version__,
             'settings': []}
  for dtype, remat in settings:
    key = f'{dtype}:{remat}'
    t0 = time.time()
    row = run_child(['--config', args.config, '--batch', str(args.batch), '--child',
                     f"setting={dtype}:{remat}:{int(key in xla)}:{args.time_batch if key in timed else 0}"])
    row['wall_seconds'] = round(time.time() - t0, 1)
    print(f'  {key}: residuals {gib(row["residual_bytes"])} GiB, est. {gib(row["estimate_bytes"])} GiB'
          + (f', XLA {gib(row["xla"]["total"])} GiB' if 'xla' in row else '')
          + (f', step {row["step_seconds"]} s at batch {row["time_batch"]}' if 'step_seconds' in row else '')
          + f' ({row["wall_seconds"]} s)', flush=True)
    results['settings'].append(row)
  results['compare'] = []
  for word in filter(None, args.compare.split(',')):
    spec = args.config + (',' if ':' in args.config else ':') + word
    for key in filter(None, args.compare_settings.split(',')):
      dtype, remat = key.split(':')
      t0 = time.time()
      row = run_child(['--config', spec, '--batch', str(args.batch), '--child',
                       f"setting={dtype}:{remat}:{int(key in xla)}:{args.time_batch if key in timed else 0}"])
      row['wall_seconds'] = round(time.time() - t0, 1)
      print(f'  {spec} {key}: residuals {gib(row["residual_bytes"])} GiB, est. {gib(row["estimate_bytes"])} GiB'
            + (f', XLA {gib(row["xla"]["total"])} GiB' if 'xla' in row else '')
            + (f', step {row["step_seconds"]} s at batch {row["time_batch"]}' if 'step_seconds' in row else '')
            + f' ({row["wall_seconds"]} s)', flush=True)
      results['compare'].append(row)
  if args.fsdp:
    env = dict(os.environ, XLA_FLAGS=(os.environ.get('XLA_FLAGS', '')
                                      + ' --xla_force_host_platform_device_count=8').strip())
    results['fsdp'] = run_child(['--config', args.config, '--child', f'fsdp={args.fsdp}'], env)
  print_tables(results)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == '__main__':
  main()
