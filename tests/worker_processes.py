"""Helpers for tests that run JAX in worker subprocesses (fake CPU devices, multi-process gloo).

XLA_FLAGS must be set before jax is imported, so multi-device and multi-host tests start fresh
Python processes: the test file itself, run as a script with a role and a JSON spec. Imported by
those tests both under pytest and in the workers (the tests folder is on sys.path in both).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cache_dir() -> str:
  """The persistent XLA cache the workers share (QDF_TEST_XLA_CACHE overrides it)."""
  return os.environ.get('QDF_TEST_XLA_CACHE', os.path.join(tempfile.gettempdir(), 'qdformer_jax_test_xla_cache'))


def worker_env(devices: int) -> dict:
  """This environment with ``devices`` fake CPU devices, the CPU platform and the repo importable."""
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}'])
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  return env


def kill(proc: subprocess.Popen) -> None:
  """Kills a worker started with ``start_new_session=True``: its own process group and nothing else."""
  if proc.poll() is None:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()


GLOO_UNAVAILABLE = 'gloo_unavailable'  # the key a worker writes when this jaxlib has no CPU collectives


def worker_results(procs, outs, logs, ok_codes=(0,)) -> list[dict]:
  """The JSON each worker wrote to ``outs``; skips the test when a worker reported GLOO_UNAVAILABLE;
  a pytest failure with every worker's log when one exited with a code outside ``ok_codes`` or wrote
  nothing."""
  import json

  import pytest
  results = []
  for i, (p, out) in enumerate(zip(procs, outs)):
    if os.path.exists(out):
      with open(out) as f:
        results.append(json.load(f))
      if results[-1].get(GLOO_UNAVAILABLE):
        pytest.skip(f'this jaxlib has no gloo CPU collectives: {results[-1][GLOO_UNAVAILABLE]}')
    if p.returncode not in ok_codes or not os.path.exists(out):
      pytest.fail(f'process {i} exited with {p.returncode}; logs:\n' +
                  '\n'.join(f'--- process {j}\n{tail(log)}' for j, log in enumerate(logs)))
  return results


def tail(path: str, n: int = 60) -> str:
  """The last ``n`` lines of a worker's log, for the failure message."""
  with open(path, errors='replace') as f:
    return ''.join(f.readlines()[-n:])


def build_dataset(config, splits=('train', 'val')) -> None:
  """Builds ``config.data``'s dataset splits in the parent process, so that workers only read them."""
  from qdformer_jax.data import registry
  for split in splits:
    registry.open_source(config.data, split)
