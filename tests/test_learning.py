"""Learning regression gate: the default job, cut to its first 400 steps, must learn and use the audio.

Run exactly as a user runs it (``main.py``, ``configs/synthetic.py`` as shipped, the normal XLA
flags rather than the suite's cheaper compile level), in a subprocess, on a fresh data dir: the
first 400 steps of ``python main.py --config configs/synthetic.py`` (the schedule's lr drop comes
later), then the README's audio-use check (``--config.mode=eval --config.eval.shuffle_audio=True``)
on that checkpoint.

The shipped model is the quantized one (decomposition, codebook, AVSR, local calibration, and the
continuous warm-up for the first quarter of the run, here 100 of the 400 steps), so the drop floor
is a floor on the quantized model's use of the audio: a change that deafens its bottleneck fails.

Measured on Intel Xeon (family 6, model 207), 2 vCPUs, with the shipped recipe (K = 128 codes, no
commitment term; same seed, same CPU model, same numbers on every run): validation mIoU 0.4214 at
step 400 (the all-background prediction scores ~0.10); with each clip's audio replaced by the next
clip's, 0.1599 (a drop of 0.261). (The previous recipe, K = 32 and λ_com = 0.25, on AMD EPYC Zen 4:
0.3086, drop 0.143; before the warm-up: 0.2757, drop 0.128.) The gate: mIoU >= 0.30 and a drop >=
0.12, so a change that stops the model learning, or learning from the audio, fails; the slack absorbs
other CPUs' float differences. About 4 minutes on two idle cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qdformer_jax.evaluation import reports

pytestmark = pytest.mark.slow  # end-to-end runs: not in `pytest -m "not slow"` (CI runs them)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 400
FLOOR = 0.30
MARGIN = 0.12


def run_main(args, env):
  result = subprocess.run([sys.executable, 'main.py', '--config', 'configs/synthetic.py'] + args,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_default_job_learns_from_frames_and_audio(tmp_path):
  env = dict(os.environ)
  env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                              if not f.startswith('--xla_backend_optimization_level'))
  env['JAX_PLATFORMS'] = 'cpu'
  workdir = str(tmp_path / 'workdir')
  common = ['--workdir', workdir, f'--config.data.data_dir={tmp_path / "tfds"}',
            f'--config.total_steps={STEPS}', f'--config.compilation_cache={tmp_path / "xla"}']
  from configs import synthetic
  shipped = synthetic.get_config()
  assert shipped.model.decomposition and shipped.model.quantize, 'the gate must test the quantized model'
  run_main(common, env)
  run_main(common + ['--config.mode=eval', '--config.eval.shuffle_audio=True'], env)

  with open(reports.report_path(workdir, 'audio_use', 'val', STEPS)) as f:
    use = json.load(f)['metrics']['mIoU']
  with open(reports.report_path(workdir, reports.SEGMENTATION_PREFIX, 'val', STEPS)) as f:
    trained = json.load(f)['metrics']['mIoU']
  print(f'val mIoU at step {STEPS}: {trained:.4f}; matched {use["matched_audio"]:.4f}, shuffled audio '
        f'{use["shuffled_audio"]:.4f}, drop {use["drop"]:.4f}')
  assert abs(use['matched_audio'] - trained) < 1e-6  # eval mode restored the trained step
  assert abs(use['drop'] - (use['matched_audio'] - use['shuffled_audio'])) < 1e-6
  assert trained >= FLOOR, f'the default job no longer learns: val mIoU {trained:.4f} < {FLOOR} at step {STEPS}'
  assert use['drop'] >= MARGIN, (
      f"the model no longer uses the audio: another clip's audio costs {use['drop']:.4f} mIoU (< {MARGIN})")
