"""What a run settles before it starts: the config resolved and checked in one place (:func:`validate`,
so that a typo fails in the first second, not at the first evaluation an hour later), and JAX's
persistent compilation cache."""
from __future__ import annotations

import os

import jax

from qdformer_jax.data import negatives
from qdformer_jax.evaluation import evals
from qdformer_jax.evaluation.evaluator import check_eval_batch
from qdformer_jax.training.checkpoint import parse_checkpoint_choice

MODES = ('train', 'eval')
NONFINITE_MODES = ('error', 'skip')


def resolve_data_dir(config) -> str:
  return config.data.data_dir or os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def resolved_config(config, *, mode: str = 'train'):
  """A resolved copy of ``config`` (placeholders filled, the data directory settled), validated for
  ``mode``; raises ValueError naming the field on the first problem."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.data_dir = resolve_data_dir(config)
  validate(config, mode=mode)
  return config


def validate(config, *, mode: str = 'train') -> None:
  """Every check of ``config`` that does not need data or a compiled program, run once at start-up:
  the run mode, the non-finite policy, the evaluation entries (kinds, fields, the noise sweep's SNRs),
  the post-processing threshold, the official-F batch grouping, the training negatives and, in eval
  mode, the checkpoint choice."""
  if config.mode not in MODES:
    raise ValueError(f'config.mode must be one of {list(MODES)}, got {config.mode!r}')
  if config.nonfinite not in NONFINITE_MODES:
    raise ValueError(f'config.nonfinite must be one of {list(NONFINITE_MODES)}, got {config.nonfinite!r}')
  if int(config.nonfinite_max_consecutive) < 1:
    raise ValueError(f'config.nonfinite_max_consecutive must be >= 1, got {config.nonfinite_max_consecutive}')
  for field in ('checkpoint_every', 'log_every'):
    if int(config[field]) < 1:
      raise ValueError(f'config.{field} must be >= 1, got {config[field]}')
  if int(config.eval_every) < 1 and int(config.eval_every) != -1:
    raise ValueError(f'config.eval_every must be >= 1, or -1 (evaluate in eval mode only), got {config.eval_every}')
  fraction = float(config.data.negative_fraction)
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f'config.data.negative_fraction must be in [0, 1), got {fraction}')
  kinds = tuple(config.data.negative_kinds)
  if fraction and (not kinds or set(kinds) - set(negatives.KINDS)):
    raise ValueError(f'config.data.negative_kinds must be a non-empty subset of {negatives.KINDS}, got {kinds}')
  check_eval_batch(config)
  evals.entries(config, mode=mode)
  evals.parse_threshold(config)
  if mode == 'eval':
    parse_checkpoint_choice(config.eval.checkpoint)


def enable_compilation_cache(config) -> str | None:
  """Turns on JAX's persistent compilation cache (``config.compilation_cache``: a directory, '' for
  ``$XDG_CACHE_HOME/qdformer_jax/xla`` (~/.cache/...), 'off' to disable), so a resumed or repeated
  run loads its compiled programs instead of compiling them again. Returns the directory or None."""
  where = config.compilation_cache
  if where == 'off':
    return None
  if not where and jax.config.jax_compilation_cache_dir:  # set by the environment: keep it
    return jax.config.jax_compilation_cache_dir
  if not where:
    where = os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'qdformer_jax', 'xla')
  jax.config.update('jax_compilation_cache_dir', where)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return where
