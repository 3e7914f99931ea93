"""Test-session settings: cheaper XLA compiles and a shared compilation cache.

The suite compiles many small programs on a 2-core CPU; compile time, not run time, dominates it.
Backend optimisation level 0 roughly halves XLA:CPU compile time (numerics are unchanged: the tests
compare against references with stated tolerances), and the persistent cache lets a program that
several tests compile (e.g. the train step before and after a resume) compile once. Subprocess tests
inherit both through the environment.
"""
from __future__ import annotations

import os
import tempfile

import pytest

_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_backend_optimization_level' not in _flags:
  os.environ['XLA_FLAGS'] = (_flags + ' --xla_backend_optimization_level=0').strip()
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'qdformer_jax_test_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


def released_data_dir():
  """tests/data: public files of the datasets' releases (e.g. AVSBench's label2idx.json), shipped with
  the tests so that they compare the code's own copies against the released ones."""
  from pathlib import Path
  return Path(__file__).resolve().parent / 'data'


# A smoke workdir trained once per session (configs/synthetic.py:smoke through train_and_evaluate),
# shared by tests/test_predict.py and tests/test_notebook.py.
_WORKDIRS: dict[str, str] = {}


def smoke_workdir(tmp_path_factory) -> str:
  if 'smoke' not in _WORKDIRS:
    from configs import synthetic
    from qdformer_jax.training import train
    base = tmp_path_factory.mktemp('trained_smoke')
    config = synthetic.get_config('smoke')
    config.data.data_dir = str(base / 'tfds')
    workdir = str(base / 'workdir')
    train.train_and_evaluate(config, workdir)
    _WORKDIRS['smoke'] = workdir
  return _WORKDIRS['smoke']


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory) -> str:
  """The path of a trained smoke workdir (config.json + checkpoints/3, checkpoints/6)."""
  return smoke_workdir(tmp_path_factory)
