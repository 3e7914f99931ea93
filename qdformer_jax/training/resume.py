"""Resuming a run: what may differ from the run's ``config.json`` and checkpoint (config drift), and
which evaluations of the resumed step are still missing."""
from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from qdformer_jax import workdir as workdir_lib
from qdformer_jax.evaluation import evals
from qdformer_jax.training.checkpoint import UnreadableCheckpoint, abstract_saveable, shape_differences, shapes_of

# Fields that may change when a run resumes (schedule length, cadences, where data and caches are,
# which evaluations run, how non-finite steps are handled); any other difference from the run's
# config.json stops the resume. A prefix ending in '.' covers a whole sub-config.
RESUMABLE_FIELDS = ('mode', 'total_steps', 'num_epochs', 'lr_drop_steps', 'lr_drop_epochs', 'eval_every',
                    'log_every', 'checkpoint_every', 'keep_checkpoints', 'compilation_cache', 'data.data_dir',
                    'data.read_threads', 'evals', 'evals.', 'best_eval', 'eval.', 'nonfinite',
                    'nonfinite_max_consecutive')


def _flat(tree, prefix: str = '') -> dict:
  if isinstance(tree, dict) and tree:
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: tree}


def _resumable(field: str) -> bool:
  return any(field == f or (f.endswith('.') and field.startswith(f)) for f in RESUMABLE_FIELDS)


def config_differences(stored: dict, requested: dict) -> tuple[list, list]:
  """(fields that may not change, fields that may) as (field, stored value, requested value); a field
  only one side has (written by another version of the code) is listed among those that may."""
  old, new = _flat(stored), _flat(requested)
  fixed, free = [], []
  for field in sorted(set(old) | set(new)):
    a, b = old.get(field, '<absent>'), new.get(field, '<absent>')
    if a == b:
      continue
    one_sided = field not in old or field not in new
    (free if one_sided or _resumable(field) else fixed).append((field, a, b))
  return fixed, free


def config_json(config) -> dict:
  """The config as ``config.json`` holds it (a dict, placeholders resolved)."""
  return json.loads(config.to_json_best_effort())


def write_run_config(config, workdir: str) -> None:
  """config.json of the run; for a resumed run only after its checkpoint was restored."""
  with open(workdir_lib.config_path(workdir), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))


def drift_message(workdir: str, fixed: list, params: list[str]) -> str:
  """One line: what differs between the run in ``workdir`` and the requested config, and the fix."""
  parts = [f'{field}: stored {json.dumps(a)}, requested {json.dumps(b)}' for field, a, b in fixed]
  if params:
    parts.append(f'{len(params)} parameter(s) differ from the checkpoint: ' + '; '.join(params[:6])
                 + ('; ...' if len(params) > 6 else ''))
  flags = ' '.join(f'--config.{field}={json.dumps(a) if isinstance(a, str) else a}' for field, a, _ in fixed
                   if a != '<absent>')
  fix = f'resume with {flags}' if flags else 'resume with the config the run was trained with'
  return (f'{workdir} holds a run trained with another config ({"; ".join(parts)}); {fix}, or start the '
          'new config in a new --workdir (nothing was changed in this one)')


# -- resuming: evaluations -------------------------------------------------------------------------

def unevaluated(workdir: str, entries: dict, step: int, total_steps: int, config, ckpt) -> dict:
  """The entries due at checkpoint ``step`` whose report is missing, plus ``best_eval`` when the step
  holds no metrics yet (process 0 decides; every process gets its answer)."""
  due = {name: e for name, e in entries.items() if evals.due(e, step, total_steps)}
  missing = {name for name, e in due.items() if not os.path.exists(evals.report_path(workdir, e, step))}
  if config.best_eval in due and ckpt.metrics(step) is None:
    missing.add(config.best_eval)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    flags = np.array([name in missing for name in due], np.int32)
    flags = multihost_utils.broadcast_one_to_all(flags)
    missing = {name for name, flag in zip(due, flags) if flag}
  return {name: due[name] for name in due if name in missing}


def check_drift(workdir, stored_config, config, ckpt, abstract_state) -> None:
  """Raises ValueError (before anything is restored or written) when ``config`` differs from the
  run's config.json in a field that cannot change on resume, or from the checkpoint in a parameter
  shape; logs the differences that are allowed."""
  fixed, free = config_differences(stored_config, config_json(config)) if stored_config else ([], [])
  params = []
  requested = shapes_of(abstract_saveable(abstract_state))
  for step in sorted(ckpt.all_steps(), reverse=True):  # the newest step whose metadata reads
    try:
      params = shape_differences(ckpt.stored_shapes(step), requested)
      break
    except UnreadableCheckpoint:
      continue
  if fixed or params:
    raise ValueError(drift_message(workdir, fixed, params))
  for field, a, b in free:
    logging.info('resuming with %s = %s (was %s)', field, json.dumps(b), json.dumps(a))
