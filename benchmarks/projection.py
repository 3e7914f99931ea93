"""Projected epoch times of S4, MS3 and AVSS on one TPU v5e chip, a v5e-8 slice and one H100: an ESTIMATE.

  python benchmarks/projection.py --out projection.json          # ~3 min: traces 3 train steps, times decoding
  python benchmarks/projection.py --mfu 0.25 --pipeline_json pipeline.json

What is measured here, and what is assumed:

  measured  FLOPs of one train step of each shipped config (``configs/{s4,ms3,avss}.py``, ResNet-50,
            and the AVSS config with PVT-v2-B5 or AST,
            224², the config's T and global batch): forward, matching, losses, backward and the AdamW
            update, the project's own jitted step (``training.step.make_train_step``), counted by XLA's
            cost analysis of the lowered program (a multiply-add = 2 flops; the Hungarian matcher's
            while loop is counted once per trace, a negligible share). Per clip = step FLOPs / batch.
  measured  the input pipeline's decode + transform rate per CPU core (``benchmarks/input_pipeline.py``,
            single-thread ``direct train`` rows: S4 at T = 5, AVSS at T = 10), run here unless
            ``--pipeline_json`` gives a result of that script.
  assumed   peak dense bfloat16 FLOP/s per chip (vendor figures: TPU v5e 197 TFLOP/s, H100 SXM
            989 TFLOP/s) and a model FLOPs utilisation (``--mfu``, default 0.35) for the bfloat16
            compute path (``model.dtype=bfloat16``). Nothing here ran on those chips.

The comparison rows (``avss_pvt_v2_b5``: PVT-v2-B5 backbone; ``avss_ast``: the Audio Spectrogram
Transformer as audio encoder) are the AVSS config with that word; for ``avss_ast`` the per-core rate
also pays the AST filterbanks the pipeline computes from each clip's waveform (timed here).

Epoch = one pass over the train split (S4 3,452 clips, MS3 296, AVSS 8,498 = v1s 3,452 + v1m 296 +
v2 4,750; AVSS clips are padded to T = 10 so every clip costs the same). Needed clips/s per host =
the projected step rate of the chips one host drives (v5e-8: one host, 8 chips) x the batch; CPU cores
needed = that / the measured clips/s per core.

Prints two Markdown tables and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

TASKS = {  # name: (config file, train clips per epoch, input-pipeline row giving its decode rate)
    's4': ('configs/s4.py', 3452, 'avs_object/s4'),
    'ms3': ('configs/ms3.py', 296, 'avs_object/s4'),
    'avss': ('configs/avss.py', 3452 + 296 + 4750, 'avs_semantic/all'),
    # The comparison choices (issue: AVSegFormer / COMBO use PVT-v2-B5; a stronger audio encoder).
    'avss_pvt_v2_b5': ('configs/avss.py:pvt_v2_b5', 3452 + 296 + 4750, 'avs_semantic/all'),
    'avss_ast': ('configs/avss.py:ast', 3452 + 296 + 4750, 'avs_semantic/all'),
}
# (name, chips, chips per host, peak dense bfloat16 FLOP/s per chip, memory per chip GiB)
HARDWARE = (
    ('TPU v5e, 1 chip', 1, 1, 197e12, 16),
    ('TPU v5e-8 slice', 8, 8, 197e12, 16),
    ('H100 SXM, 1 GPU', 1, 1, 989e12, 80),
)


def step_flops(spec: str) -> dict:
  """FLOPs of the config's whole train step (lowered program, XLA cost analysis) at its global batch."""
  import jax

  from benchmarks.model_cost import load_config
  from qdformer_jax import sharding
  from qdformer_jax.data import pipeline
  from qdformer_jax.training import state as state_lib
  from qdformer_jax.training import step as step_lib

  config = load_config(spec)
  config.model.dtype = config.model.backbone.dtype = 'bfloat16'
  mesh = sharding.make_mesh(config)
  graphdef, abstract_state = state_lib.abstract_train_state(config, mesh, ())
  step = step_lib.make_train_step(graphdef, config, jax.tree.map(lambda x: x.sharding, abstract_state), mesh)
  batch = int(config.batch_size)
  t0 = time.time()
  lowered = step.lower(abstract_state, pipeline.batch_spec(config.data, batch, mesh))
  flops = float(lowered.cost_analysis()['flops'])
  return {'config': spec, 'batch': batch, 'frames': int(config.data.num_frames),
          'image_size': int(config.data.image_size), 'step_flops': flops, 'clip_flops': flops / batch,
          'lower_seconds': round(time.time() - t0, 1)}


def pipeline_rates(path: str, seconds: float) -> dict:
  """{dataset: clips/s per core} from benchmarks/input_pipeline.py's 'direct train' rows."""
  if not path:
    path = os.path.join(tempfile.mkdtemp(prefix='qdformer_projection_'), 'pipeline.json')
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'input_pipeline.py'),
                          '--seconds', str(seconds), '--json', path], capture_output=True, text=True)
    if run.returncode:
      sys.stderr.write(run.stderr[-4000:])
      raise RuntimeError(f'benchmarks/input_pipeline.py failed (exit {run.returncode})')
  with open(path) as f:
    rows = json.load(f)['rows']
  return {r['dataset']: r['clips_per_s'] for r in rows if r['mode'] == 'direct train'}


def ast_front_end_seconds(frames: int = 10, repeats: int = 3) -> float:
  """Seconds one core spends on a clip's AST filterbanks (``frames`` seconds of audio -> [T, 98, 128]),
  which an 'ast' config's pipeline computes on top of the decoding measured by input_pipeline.py."""
  import numpy as np

  from qdformer_jax.data import audio
  waveform = np.random.default_rng(0).standard_normal(frames * audio.SAMPLE_RATE) * 0.1
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    audio.clip_examples(waveform, audio.SAMPLE_RATE, num_frames=frames, num_real=frames, pad_mode='zeros',
                        encoder='ast')
    best = min(best, time.perf_counter() - t0)
  return best


def project(flops: dict, rates: dict, mfu: float, ast_seconds: dict | None = None) -> list[dict]:
  """``ast_seconds``: {task: AST front-end seconds per clip} for the 'ast' tasks (added to the
  measured decode time per clip)."""
  rows = []
  for task, f in flops.items():
    _, clips, dataset = TASKS[task]
    rate = rates[dataset]
    if ast_seconds and task in ast_seconds:
      rate = 1.0 / (1.0 / rate + ast_seconds[task])
    for name, chips, per_host, peak, memory in HARDWARE:
      clips_per_s = chips * peak * mfu / f['clip_flops']
      per_host_clips = clips_per_s * per_host / chips
      rows.append({'task': task, 'hardware': name, 'chips': chips, 'peak_flops_per_chip': peak,
                   'memory_gib_per_chip': memory, 'mfu': mfu, 'clips_per_s': clips_per_s,
                   'steps_per_s': clips_per_s / f['batch'], 'epoch_seconds': clips / clips_per_s,
                   'host_clips_per_s_needed': per_host_clips,
                   'pipeline_clips_per_s_per_core': rate,
                   'cores_needed_per_host': per_host_clips / rate})
  return rows


def print_tables(r: dict) -> None:
  print(f"\nTrain-step FLOPs (XLA cost analysis of the lowered step, bfloat16 path; measured on "
        f"{r['backend']}, jax {r['jax']})\n")
  print('| task | config | T | batch | GFLOP / step | GFLOP / clip | train clips / epoch |')
  print('|---|---|---:|---:|---:|---:|---:|')
  for task, f in r['flops'].items():
    print(f"| {task} | `{f['config']}` | {f['frames']} | {f['batch']} | {f['step_flops'] / 1e9:.1f} | "
          f"{f['clip_flops'] / 1e9:.1f} | {TASKS[task][1]} |")
  print(f"\nESTIMATE, not measured on these chips: epoch time at {r['mfu']:.0%} of peak dense bfloat16 "
        f"FLOP/s; input pipeline measured at {r['cpus']} CPU cores here (decode + transform, 1 thread)\n")
  print('| task | hardware | peak TFLOP/s / chip | clips/s | steps/s | epoch | clips/s needed per host '
        '| measured clips/s per core | CPU cores needed per host |')
  print('|---|---|---:|---:|---:|---:|---:|---:|---:|')
  for row in r['projection']:
    epoch = row['epoch_seconds']
    epoch = f'{epoch:.1f} s' if epoch < 120 else f'{epoch / 60:.1f} min'
    print(f"| {row['task']} | {row['hardware']} | {row['peak_flops_per_chip'] / 1e12:.0f} | "
          f"{row['clips_per_s']:.1f} | {row['steps_per_s']:.2f} | {epoch} | {row['host_clips_per_s_needed']:.1f} | "
          f"{row['pipeline_clips_per_s_per_core']:.1f} | {math.ceil(row['cores_needed_per_host'])} |")
  print()


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--mfu', type=float, default=0.35, help='assumed model FLOPs utilisation')
  parser.add_argument('--tasks', default='s4,ms3,avss,avss_pvt_v2_b5,avss_ast')
  parser.add_argument('--pipeline_json', default='',
                      help="a benchmarks/input_pipeline.py --json result ('' = run it here)")
  parser.add_argument('--pipeline_seconds', type=float, default=8.0)
  parser.add_argument('--out', default='', help='write the JSON here')
  args = parser.parse_args(argv)

  import jax
  tasks = [t for t in args.tasks.split(',') if t]
  unknown = sorted(set(tasks) - set(TASKS))
  if unknown:
    parser.error(f'unknown task(s) {unknown}; choose from {sorted(TASKS)}')
  flops = {}
  for task in tasks:
    flops[task] = step_flops(TASKS[task][0])
    print(f"  {task}: {flops[task]['step_flops'] / 1e9:.1f} GFLOP per step of {flops[task]['batch']} clips "
          f"({flops[task]['lower_seconds']} s to trace)", flush=True)
  rates = pipeline_rates(args.pipeline_json, args.pipeline_seconds)
  ast_seconds = {task: ast_front_end_seconds(flops[task]['frames']) for task in tasks if task.endswith('_ast')}
  result = {'backend': jax.default_backend(), 'jax': jax.__version__, 'cpus': os.cpu_count(), 'mfu': args.mfu,
            'flops': flops, 'pipeline_clips_per_s_per_core': rates, 'ast_front_end_seconds_per_clip': ast_seconds,
            'projection': project(flops, rates, args.mfu, ast_seconds)}
  print_tables(result)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == '__main__':
  main()
