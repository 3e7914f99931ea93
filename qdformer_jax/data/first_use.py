"""First-use preparation that several processes may start at once (two seeds launched together, every
host of a pod building into one shared ``data_dir``): exactly one process builds, the others wait for
it and then read what it built.

``exclusive(target, what)``: an inter-process lock file beside ``target`` (``<target>.lock``, a
``filelock`` lock: released by the kernel when its holder dies, so a killed builder never blocks the
next one). The holder re-checks "already built?" after acquiring, so a process that waited reads the
finished dataset instead of building it again; it says so in one line while it waits.

``process_zero_first(prepare, what)``: in a multi-process JAX run, process 0 prepares first while the
others wait on the coordination service's key-value store (no device collective, so it may run in a
thread beside compilation); then every other process runs ``prepare`` too, which only reads when
``data_dir`` is shared and builds its own copy (under the lock) when each host has a local one.
"""
from __future__ import annotations

import contextlib
import logging
import os

# How long a process waits for process 0's first-use build before giving up.
WAIT_FOR_PROCESS_ZERO_MS = 2 * 3600 * 1000
_announced: set[str] = set()  # what process 0 has already prepared (and announced) in this run


@contextlib.contextmanager
def exclusive(target: str, what: str):
  """Holds the lock ``<target>.lock`` (waiting, with one log line, while another process holds it).
  No lock on object stores (``gs://...``): they have no file locks; multi-host runs there rely on
  ``process_zero_first``."""
  target = os.fspath(target)
  if '://' in target:
    yield
    return
  import filelock
  path = target.rstrip('/') + '.lock'
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  lock = filelock.FileLock(path)
  try:
    lock.acquire(timeout=0)
  except filelock.Timeout:
    logging.info('waiting for another process building %s (lock %s) ...', what, path)
    lock.acquire()
  try:
    yield
  finally:
    lock.release()


def _client():
  """The JAX coordination-service client of a multi-process run, or None."""
  import jax
  if jax.process_count() == 1:
    return None
  try:
    from jax._src import distributed
  except ImportError:
    return None
  return distributed.global_state.client


def process_zero_first(prepare, what: str):
  """``prepare()`` on process 0 first; the other processes wait until it has finished, then run it."""
  client = _client()
  if client is None:
    return prepare()
  import jax
  key = f'qdformer_jax/first_use/{what}'
  if jax.process_index() == 0:
    try:
      result = prepare()
    except BaseException:
      if what not in _announced:
        _announced.add(what)
        client.key_value_set(key, 'failed')
      raise
    if what not in _announced:  # later calls (other splits) find it prepared: nothing to wait for
      _announced.add(what)
      client.key_value_set(key, 'done')
    return result
  status = client.blocking_key_value_get(key, WAIT_FOR_PROCESS_ZERO_MS)
  if status != 'done':
    raise RuntimeError(f'process 0 failed to prepare {what} (see its log)')
  return prepare()
