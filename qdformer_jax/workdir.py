"""The layout of a run's workdir, in one place (written by training and evaluation, read by inference),
and the one reader of its ``config.json`` (:func:`read_config`, :func:`config_from_json`).

  <workdir>/config.json                 the resolved config of the run
  <workdir>/checkpoints/<step>/         Orbax steps: state/, data/ (grain iterator), meta/, metrics/
                                        (eval steps); the latest N and the best by metric are kept
  <workdir>/reports/                    eval_<split>_<step>.json, ..., overlays/<split>_<step>/*.png
  <workdir>/tensorboard/                TensorBoard event files
"""
from __future__ import annotations

import json
import os

import ml_collections
from etils import epath

CONFIG_FILE = 'config.json'
CHECKPOINTS = 'checkpoints'
REPORTS = 'reports'
TENSORBOARD = 'tensorboard'
STATE_ITEM = 'state'      # the train state item of a checkpoint step
DATA_ITEM = 'data'        # the grain iterator state
META_ITEM = 'meta'        # JSON facts of the step (step, config name, ...)


def config_path(workdir) -> str:
  return os.path.join(os.fspath(workdir), CONFIG_FILE)


def checkpoints_dir(workdir) -> str:
  return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINTS)


def reports_dir(workdir) -> str:
  return os.path.join(os.fspath(workdir), REPORTS)


def overlays_dir(workdir, split: str, step: int) -> str:
  return os.path.join(reports_dir(workdir), 'overlays', f'{split}_{step}')


def tensorboard_dir(workdir) -> str:
  return os.path.join(os.fspath(workdir), TENSORBOARD)


def read_config(workdir, *, missing_ok: bool = True) -> dict | None:
  """The dict a run's ``config.json`` holds (``workdir`` may also name the file itself); None when
  there is none and ``missing_ok``. A file that does not hold a QDFormer config fails naming it."""
  path = epath.Path(workdir)
  if path.name != CONFIG_FILE:
    path = path / CONFIG_FILE
  try:
    data = json.loads(path.read_text())
  except FileNotFoundError as e:
    if missing_ok:
      return None
    raise FileNotFoundError(f'{path} not found: pass config= (a ConfigDict) or a path inside a workdir '
                            'written by train_and_evaluate') from e
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); restore it from a copy, or pass config=') from e
  if not isinstance(data, dict) or 'model' not in data or 'data' not in data:
    raise ValueError(f'{path} does not hold a QDFormer config (no "model" and "data" sections)')
  return data


def _lists_to_tuples(value):
  if isinstance(value, dict):
    return {k: _lists_to_tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_lists_to_tuples(v) for v in value)
  return value


def _merged(defaults: dict, stored: dict) -> dict:
  out = dict(defaults)
  for k, v in stored.items():
    out[k] = _merged(defaults[k], v) if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v
  return out


def config_from_json(workdir) -> ml_collections.ConfigDict:
  """The ConfigDict of a run's ``config.json`` (written by ``ConfigDict.to_json_best_effort``).

  A file written by an older version lacks the fields added since: they take the defaults of
  ``configs/base.py`` (the only place defaults live), which keep the behaviour those versions had.
  JSON has no tuples, so every list becomes a tuple again (configs hold sequences as tuples, e.g.
  ``lr_drop_steps``); placeholders were resolved to their values, unset ones to None.
  """
  from configs import base  # the repository's config package (installed with the library)
  defaults = json.loads(base.get_base_config().copy_and_resolve_references().to_json_best_effort())
  return ml_collections.ConfigDict(_lists_to_tuples(_merged(defaults, read_config(workdir, missing_ok=False))))
