"""A full disk (or an exhausted quota) under the workdir: one line that names the cause and the remedy,
and nothing lost.

Orbax writes a checkpoint asynchronously in threads; when the disk fills, the failure surfaces later,
at the next save or wait, wrapped in TensorStore's ``RESOURCE_EXHAUSTED`` text, while the threads
log one error each, abandoned asyncio tasks log "exception was never retrieved" and TensorStore
callbacks print "Event loop is closed" tracebacks. ``quiet_writes`` (around a run, at verbosity 0)
holds that noise back: Orbax's and asyncio's records are kept and shown only if the run fails for
another reason, the closed-loop tracebacks are dropped. ``is_full`` recognises the failure in an
exception chain; ``report`` removes the partial ``<step>.orbax-checkpoint-tmp*`` directories and
returns :class:`DiskFull`, whose message names the directory, the free space, the size of one
checkpoint and what to do. Earlier checkpoints are never touched.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import re
import shutil
import sys
import threading

from absl import logging as absl_logging

from qdformer_jax import console

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|\[Errno (28|122)\]|os_error_code='?(28|122)\b")
PARTIAL = '.orbax-checkpoint-tmp'


class DiskFull(OSError):
  """No space left where the run writes; ``str()`` is the one line for the operator."""

  def __init__(self, message: str):
    super().__init__(errno.ENOSPC, message)
    self.message = message

  def __str__(self) -> str:
    return self.message


def is_full(error: BaseException | None) -> bool:
  """Whether ``error`` (or an exception it was raised from, or that it groups) is a full disk."""
  seen = set()
  todo = [error]
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
      return True
    if _FULL_TEXT.search(str(e)):
      return True
    todo += [e.__cause__, e.__context__, *getattr(e, 'exceptions', ())]
  return False


def megabytes(n: int) -> str:
  return f'{n / 2 ** 20:.1f} MB'


def tree_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      with contextlib.suppress(OSError):
        total += os.lstat(os.path.join(root, name)).st_size
  return total


def remove_partial_saves(checkpoints_dir: str) -> list[str]:
  """Deletes the ``*.orbax-checkpoint-tmp*`` directories of saves that did not complete (complete
  steps are never touched); returns their names."""
  removed = []
  try:
    names = sorted(os.listdir(checkpoints_dir))
  except OSError:
    return removed
  for name in names:
    if PARTIAL in name:
      shutil.rmtree(os.path.join(checkpoints_dir, name), ignore_errors=True)
      removed.append(name)
  return removed


def _complete_steps(checkpoints_dir: str) -> list[int]:
  try:
    return sorted(int(n) for n in os.listdir(checkpoints_dir) if n.isdigit())
  except OSError:
    return []


def report(workdir: str, checkpoints_dir: str, error: BaseException, *, keep_checkpoints: int | None = None,
           clean: bool = True) -> DiskFull:
  """Removes partial checkpoint saves (when ``clean``: process 0, after the saving threads ended) and
  returns the :class:`DiskFull` to raise, naming what failed, the free space, the size of one
  checkpoint and the remedies."""
  removed = remove_partial_saves(checkpoints_dir) if clean else []
  partial_steps = sorted({int(m.group(1)) for n in removed if (m := re.match(r'(\d+)\.', n))})
  steps = _complete_steps(checkpoints_dir)
  if partial_steps:
    what = f'while saving checkpoint step {partial_steps[-1]} in {checkpoints_dir}'
  else:
    path = getattr(error, 'filename', None)
    what = f'while writing {path}' if path else f'while writing under {workdir}'
  where = checkpoints_dir if os.path.isdir(checkpoints_dir) else workdir
  try:
    free = f'{megabytes(shutil.disk_usage(where).free)} free'
  except OSError:
    free = 'free space unknown'
  size = f', one checkpoint takes {megabytes(tree_bytes(os.path.join(checkpoints_dir, str(steps[-1]))))}' if steps else ''
  keep = f' (now {keep_checkpoints})' if keep_checkpoints is not None else ''
  kept = (f'checkpoint steps {", ".join(map(str, steps))} are intact and a rerun resumes from step {steps[-1]}'
          if steps else 'no checkpoint was complete')
  dropped = f'; the partial step {partial_steps[-1]} was removed' if partial_steps else ''
  return DiskFull(f'no space left on device {what}: {free}{size}. Free space there, lower '
                  f'--config.keep_checkpoints{keep}, or use another --workdir; {kept}{dropped}')


# -- keeping the threads' noise off the terminal ---------------------------------------------------

def _third_party_async(record: logging.LogRecord) -> bool:
  path = os.path.abspath(record.pathname)
  return (f'{os.sep}orbax{os.sep}' in path or record.name == 'asyncio' or f'{os.sep}asyncio{os.sep}' in path
          or f'{os.sep}tensorstore' in path)


class _HoldBack(logging.Filter):
  def __init__(self):
    super().__init__()
    self.held: list[tuple[logging.Handler, logging.LogRecord]] = []
    self.handler = None

  def filter(self, record: logging.LogRecord) -> bool:
    if _third_party_async(record):
      self.held.append((self.handler, record))
      return False
    return True


class _Pending:
  """One writing thread's text not yet judged: an open traceback's lines, a line without its newline."""

  def __init__(self):
    self.block: list[str] | None = None
    self.partial = ''


class _ClosedLoopTracebacks:
  """A stand-in for ``sys.stderr`` that drops whole "Traceback ... RuntimeError: Event loop is closed"
  blocks (what TensorStore callbacks print once a failed save closed Orbax's event loop) and passes
  everything else through, line by line.

  Several callback threads print such tracebacks at once, each in many small writes (a frame's
  indent, its source line, the newline), so the text is parsed per writing thread: a line is judged
  only once its own thread completed it, never as a mix of two threads' pieces."""

  def __init__(self, stream):
    self.stream = stream
    self._local = threading.local()
    self._threads: list[_Pending] = []  # every thread's, for release()
    self._lock = threading.Lock()

  def _state(self) -> _Pending:
    state = getattr(self._local, 'state', None)
    if state is None:
      state = self._local.state = _Pending()
      with self._lock:
        self._threads.append(state)
    return state

  def _out(self, text: str) -> None:
    with self._lock:
      self.stream.write(text)

  def write(self, text: str) -> int:
    state = self._state()
    state.partial += text
    *lines, state.partial = state.partial.split('\n')
    for line in lines:
      self._line(state, line + '\n')
    if state.block is None and state.partial and not self._may_become_noise(state.partial):
      self._out(state.partial)
      state.partial = ''
    return len(text)

  @classmethod
  def _may_become_noise(cls, partial: str) -> bool:
    """A line begun outside a traceback block that its next pieces could still make a noise line (an
    indent alone, the start of a traceback header or of a noise line): held until it is complete."""
    stripped = partial.strip()
    return (not stripped or 'Traceback (most recent call last):'.startswith(partial)
            or any(n.startswith(stripped) for n in cls.NOISE))

  # The lines of such a traceback, dropped one by one too when two tracebacks interleave in one thread.
  NOISE = ("self._check_closed()", "raise RuntimeError('Event loop is closed')", 'RuntimeError: Event loop is closed')

  @classmethod
  def _noise(cls, line: str) -> bool:
    return line.strip() in cls.NOISE or ('asyncio' in line and 'base_events.py' in line
                                          and ('call_soon_threadsafe' in line or '_check_closed' in line))

  def _line(self, state, line: str) -> None:
    if state.block is None:
      if line.startswith('Traceback (most recent call last):'):
        state.block = [line]
      elif not self._noise(line):
        self._out(line)
      return
    state.block.append(line)
    if not line.startswith((' ', '\t', 'Traceback (most recent call last):')):  # the exception line ends it
      if 'Event loop is closed' not in line:
        self._out(''.join(state.block))
      state.block = None

  def flush(self) -> None:
    with self._lock:
      self.stream.flush()

  def release(self) -> None:
    """Writes what the threads hold back (an unfinished traceback unless it is one of the noise
    tracebacks, a line without its newline) and forgets it."""
    with self._lock:
      states = list(self._threads)
    for state in states:
      block, partial = state.block or [], state.partial
      state.block, state.partial = None, ''
      if block and not all(self._noise(ln) or ln.startswith('Traceback') for ln in block):
        self._out(''.join(block))
      if partial and not self._noise(partial):
        self._out(partial)
    self.flush()

  def __getattr__(self, name):
    return getattr(self.stream, name)


class quiet_writes:  # noqa: N801  (a context manager used as a statement)
  """Around a run at verbosity < 1: Orbax's, asyncio's and TensorStore's log records, and the
  exceptions of threads that found the disk full (TensorBoard's writer), are held back (shown at the
  end unless the run failed with a full disk, which is then reported in one line); "Event loop is
  closed" tracebacks on stderr are dropped. After a full disk, the process is about to exit with the
  one-line report while the failed save's callbacks may still print: those tracebacks stay dropped
  until it exits, and exceptions reported as unraisable (atexit cleanups that flush to the full
  disk) stay off the terminal too."""

  def __enter__(self):
    self.active = absl_logging.get_verbosity() < 1
    if not self.active:
      return self
    self.thread_hook, self.threads_held = threading.excepthook, []

    def hold_full_disk(args):
      if is_full(args.exc_value):
        self.threads_held.append(args)
      else:
        self.thread_hook(args)
    threading.excepthook = hold_full_disk
    self.filters = []
    for handler in logging.getLogger().handlers:
      f = _HoldBack()
      f.handler = handler
      handler.addFilter(f)
      self.filters.append((handler, f))
    self.stderr = sys.stderr
    sys.stderr = _ClosedLoopTracebacks(sys.stderr)
    return self

  def __exit__(self, exc_type, exc, tb):
    if not self.active:
      return False
    full = exc is not None and is_full(exc)
    ours = isinstance(sys.stderr, _ClosedLoopTracebacks)
    if ours:
      sys.stderr.release()
    if full and ours:  # the failed save's callbacks go on printing, possibly until the process exits
      atexit.register(sys.stderr.release)
    else:
      sys.stderr = self.stderr
    threading.excepthook = self.thread_hook
    for handler, f in self.filters:
      handler.removeFilter(f)
    if full:
      console.drop_abandoned_future_logs()  # collected later, possibly at exit
      _drop_full_disk_unraisables()
    else:
      for handler, f in self.filters:
        for _, record in f.held:
          handler.handle(record)
      for args in self.threads_held:
        self.thread_hook(args)
    return False


def _drop_full_disk_unraisables() -> None:
  """From now on, an unraisable exception (e.g. in an atexit cleanup) that is a full disk is not printed."""
  previous = sys.unraisablehook
  if getattr(previous, 'drops_full_disk', False):
    return

  def hook(unraisable):
    if not is_full(unraisable.exc_value):
      previous(unraisable)
  hook.drops_full_disk = True
  sys.unraisablehook = hook



