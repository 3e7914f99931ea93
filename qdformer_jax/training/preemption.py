"""Stopping a run cleanly: SIGTERM, a preemption notice or Ctrl-C asks the loop to save the current
step and exit (:class:`StopRequest`); the loop then raises :class:`Preempted`."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import jax
import numpy as np


class Preempted(SystemExit):
  """The run was asked to stop (SIGTERM, a preemption notice or Ctrl-C) and saved its current step.
  A SystemExit with code 143 (128 + SIGTERM), or 130 (128 + SIGINT) after Ctrl-C, as if the signal
  had ended the process."""

  def __init__(self, message: str, code: int = 143):
    super().__init__(code)
    self.message = message

  def __str__(self) -> str:
    return self.message


def _preemption_service() -> bool:
  """Whether JAX's distributed preemption sync manager runs (multi-process jobs after
  ``jax.distributed.initialize``); it then owns SIGTERM and synchronises the stop step."""
  try:
    from jax._src import distributed
  except ImportError:
    return False
  state = distributed.global_state
  return state.client is not None and getattr(state, 'preemption_sync_manager', None) is not None


class StopRequest:
  """Asks the loop to save and exit at a step boundary when the job is told to stop.

  One process: a SIGTERM handler sets a flag, read every step (no device work). Several processes
  with JAX's preemption service: ``multihost_utils.reached_preemption_sync_point(step)`` every step
  (local until a notice arrives; then the service picks the same step on every host). Several
  processes without it: the SIGTERM flags are combined every ``agree_every`` steps (one small
  collective), so every process stops at the same step.

  Ctrl-C (SIGINT) is a stop request too (exit code 130 instead of 143; with the preemption service
  it is passed on as SIGTERM, which the service turns into a notice). A second Ctrl-C stops the
  process at once, with one line saying that the step being saved was not saved.
  """

  def __init__(self, agree_every: int = 10, where: str = ''):
    self.agree_every = agree_every
    self.where = where  # the checkpoint directory, named by the second Ctrl-C's line
    self.multiprocess = jax.process_count() > 1
    self.use_service = self.multiprocess and _preemption_service()
    self.flag = threading.Event()
    self.reason = 'preemption notice' if self.use_service else 'SIGTERM'
    self.code = 143
    self.interrupted = False
    self.step = None  # the last step the loop asked about
    self.seen = None  # the step at which the loop saw the stop request (and saves)
    self.previous = {}
    handlers = {}
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # ignored: a script's background job; keep it so
      handlers[signal.SIGINT] = self._on_interrupt
    if not self.use_service:
      handlers[signal.SIGTERM] = self._on_signal
    for signum, handler in handlers.items():
      try:
        self.previous[signum] = signal.signal(signum, handler)
      except ValueError:  # not the main thread (e.g. a notebook worker thread): no handler
        logging.info('%s handler not installed (not the main thread)', signal.Signals(signum).name)

  def _on_signal(self, signum, frame):
    del signum, frame
    self.flag.set()

  def _on_interrupt(self, signum, frame):
    del signum, frame
    if self.interrupted:
      # The step being saved when the loop has seen the request, else the one being computed.
      step = (f'step {self.seen}' if self.seen is not None else
              f'step {self.step + 1}' if self.step is not None else 'the current step')
      _say(f'error: second Ctrl-C: stopped at once; {step} was not saved (the rerun resumes from the latest '
           f'complete checkpoint{" in " + self.where if self.where else ""})')
      if _interactive():  # a notebook or a REPL: keep the session
        raise KeyboardInterrupt
      os._exit(130)
    self.interrupted, self.reason, self.code = True, 'Ctrl-C (SIGINT)', 130
    _say('warning: Ctrl-C: saving the current step, then stopping (Ctrl-C again stops at once, unsaved)')
    if self.use_service:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notifier: every process stops at one step
    else:
      self.flag.set()

  def requested(self, step: int) -> bool:
    self.step = step
    stop = self._requested(step)
    if stop:
      self.seen = step
    return stop

  def _requested(self, step: int) -> bool:
    if self.use_service:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    if not self.multiprocess:
      return self.flag.is_set()
    if step % self.agree_every:
      return False
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.flag.is_set()))))

  def close(self):
    for signum, previous in self.previous.items():
      signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    self.previous = {}


def _interactive() -> bool:
  """Whether this process is a REPL or a running IPython/Jupyter shell. Having imported ipykernel
  is not enough (a test process that checks for it has it in sys.modules, with no shell)."""
  if hasattr(sys, 'ps1'):
    return True
  ipython = sys.modules.get('IPython')
  get_ipython = getattr(ipython, 'get_ipython', None)
  return get_ipython is not None and get_ipython() is not None


def _say(text: str) -> None:
  """One line on stderr from a signal handler (os.write: no lock the interrupted code may hold)."""
  os.write(2, f'{time.strftime("%H:%M:%S")} {text}\n'.encode())
