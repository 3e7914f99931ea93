"""What a person sees: a smoke run prints a short log without third-party noise and ends with the
summary; a bad config argument is one clear line, not a traceback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # compiles and runs a train step end to end: not in the quick command
def test_smoke_run_console_is_short_and_ends_with_the_summary(tmp_path):
  workdir = tmp_path / 'w'
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config', 'configs/synthetic.py:smoke', '--workdir', str(workdir),
       f'--config.data.data_dir={tmp_path / "tfds"}'],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ours = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
  # The first-use dataset build is two lines of ours, no TFDS banner or progress bars.
  assert not any('examples/s' in line or '%|' in line or 'Downloading and preparing' in line for line in ours)
  assert sum(line.split(maxsplit=1)[1].startswith(('building synthetic_avs', 'built ')) for line in ours) == 2
  assert len(ours) <= 30, '\n'.join(ours)
  for noise in ('Closing _NonBlockingMetadataStore', 'async_io', 'atomicity', 'xla_bridge'):
    assert not any(noise in line for line in ours), noise
  assert 'done: 6 steps' in ''.join(ours[-7:])
  assert ours[-1].split(maxsplit=1)[1].startswith('your video   python -m qdformer_jax.predict')
  assert any('reports' in line and str(workdir) in line for line in ours[-6:])


def test_bad_config_argument_is_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config', 'configs/synthetic.py:smok', '--workdir', str(tmp_path / 'w')],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "unknown config argument 'smok'" in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_unknown_config_field_is_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config', 'configs/synthetic.py:smoke', '--workdir', str(tmp_path / 'w'),
       '--config.model.hiden_dim=48'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "the config has no field 'hiden_dim' (named by a --config.* override); did you mean 'hidden_dim'" in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_debug_true_keeps_the_traceback(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config', 'configs/synthetic.py:smoke', '--workdir', str(tmp_path / 'w'),
       '--config.model.hiden_dim=48', '--debug=true'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert 'Traceback' in proc.stderr and 'hiden_dim' in proc.stderr
