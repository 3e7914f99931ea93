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

_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_backend_optimization_level' not in _flags:
  os.environ['XLA_FLAGS'] = (_flags + ' --xla_backend_optimization_level=0').strip()
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'qdformer_jax_test_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


def shared_dir():
  """The steering repo's shared/ folder (beside the checkout), or /work/shared on the dev machines."""
  from pathlib import Path
  beside = Path(__file__).resolve().parents[2] / 'shared'
  return beside if beside.exists() else Path('/work/shared')
