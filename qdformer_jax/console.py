"""What a person sees in the terminal: our own log lines, short; third-party INFO kept out.

``setup(verbosity)``: absl's handler prints ``HH:MM:SS message`` for this project's records (the
library, the builders, ``main.py``); records of other packages (Orbax, TFDS, JAX, grain) pass only at
ERROR and above unless ``verbosity >= 1`` (absl's ``--verbosity`` flag), when everything passes with
absl's full prefix. ``user_errors`` turns the errors a user can cause (and a full disk) into one line and exit code 2;
``interrupted`` turns a Ctrl-C outside the training steps into one line and exit code 130.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import time
import warnings

_OURS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d)
              for d in ('qdformer_jax', 'tfds_builders', 'main.py', 'benchmarks'))
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


class OwnRecordsOnly(logging.Filter):
  """Passes this project's records, and other packages' at ``foreign_level`` and above (None: none of
  theirs; e.g. while a checkpoint restore is attempted, whose failure the caller reports in one line)."""

  def __init__(self, foreign_level: int | None = logging.ERROR):
    super().__init__()
    self.foreign_level = foreign_level

  def filter(self, record: logging.LogRecord) -> bool:
    if self.foreign_level is not None and record.levelno >= self.foreign_level:
      return True
    return os.path.abspath(record.pathname).startswith(_OURS)


class _AbandonedFutures(logging.Filter):
  """Drops asyncio's "exception was never retrieved" records: the futures of a failed checkpoint read
  or write, reported when they are collected (possibly at exit) after the failure itself was
  reported in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'exception was never retrieved' not in record.getMessage()


def drop_abandoned_future_logs() -> None:
  """Installs :class:`_AbandonedFutures` on asyncio's logger (once)."""
  asyncio_logger = logging.getLogger('asyncio')
  if not any(isinstance(f, _AbandonedFutures) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_AbandonedFutures())


class _Short(logging.Formatter):

  def format(self, record: logging.LogRecord) -> str:
    prefix = '' if record.levelno < logging.WARNING else f'{record.levelname.lower()}: '
    return f'{self.formatTime(record, "%H:%M:%S")} {prefix}{record.getMessage()}'


def setup(verbosity: int = 0) -> None:
  """Configures logging once for a command-line run (idempotent)."""
  from absl import flags
  from absl import logging as absl_logging
  if not flags.FLAGS.is_parsed():  # an argparse CLI: absl would warn about logging before flag parsing
    flags.FLAGS.mark_as_parsed()
  absl_logging.use_absl_handler()  # outside absl's app.run (argparse CLIs) too
  handler = absl_logging.get_absl_handler()
  root = logging.getLogger()
  for other in list(root.handlers):  # a basicConfig handler would print every record a second time
    if other is not handler:
      root.removeHandler(other)
  root.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
  for f in list(handler.filters):
    if isinstance(f, OwnRecordsOnly):
      handler.removeFilter(f)
  if verbosity >= 1:
    return
  handler.addFilter(OwnRecordsOnly())
  handler.setFormatter(_Short())
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('GRPC_VERBOSITY', 'ERROR')
  warnings.filterwarnings('ignore', module=r'(orbax|tensorflow_datasets|grain|jax)\b.*')
  for name in ('jax._src.xla_bridge', 'orbax', 'tensorflow_datasets', 'grain'):
    logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def user_errors(debug: bool = False):
  """Errors a user can cause (bad config value, missing file or dataset) -> one line, exit code 2.
  With ``debug`` the traceback is kept."""
  try:
    yield
  except USER_ERRORS as e:
    if debug:
      raise
    print(f'error: {e}', file=sys.stderr)
    print('(rerun with --debug for the traceback)', file=sys.stderr)
    sys.exit(2)
  except OSError as e:  # a full disk or quota: the message (training's names the remedies) is the line
    if debug or e.errno not in (errno.ENOSPC, errno.EDQUOT):
      raise
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def interrupted(workdir: str | None = None):
  """Ctrl-C outside the training steps (those save the current step first; see
  ``train.StopRequest``): one line instead of a KeyboardInterrupt traceback, exit code 130."""
  try:
    yield
  except KeyboardInterrupt:
    where = f' in {workdir}' if workdir else ''
    print(f'interrupted (Ctrl-C) outside the training steps: nothing new was saved; rerun the same command to '
          f'resume from the latest checkpoint{where}', file=sys.stderr)
    sys.exit(130)


class Progress:
  """One progress line per log interval: the interval's mean metrics, and steps/s and ETA from the
  interval's wall time (checkpoint saves and host syncs included, as they recur; evaluation time
  excluded, it has its own lines; the first step's compile is before ``start``)."""

  def __init__(self, total_steps: int):
    self.total = total_steps
    self.last = None      # (step, time) of the previous line, or of ``start``
    self.excluded = 0.0   # seconds since then that are not training (evaluations)
    self.rate = None

  def start(self, step: int):
    self.last, self.excluded = (step, time.perf_counter()), 0.0

  def exclude(self, seconds: float):
    self.excluded += seconds

  def line(self, step: int, metrics: dict) -> str:
    now = time.perf_counter()
    if self.last is not None and step > self.last[0]:
      self.rate = (step - self.last[0]) / max(now - self.last[1] - self.excluded, 1e-9)
    self.last, self.excluded = (step, now), 0.0
    shown = ' '.join(f'{k}={v:.4g}' for k, v in metrics.items() if '_aux_' not in k)
    speed = f' | {self.rate:.2f} steps/s, ETA {(self.total - step) / self.rate / 60:.1f} min' if self.rate else ''
    return f'step {step}/{self.total} {shown}{speed}'
