"""The layout of a run's workdir, in one place (written by training and evaluation, read by inference).

  <workdir>/config.json                 the resolved config of the run
  <workdir>/checkpoints/<step>/         Orbax steps: state/, data/ (grain iterator), meta/, metrics/
                                        (eval steps); the latest N and the best by metric are kept
  <workdir>/reports/                    eval_<split>_<step>.json, ..., overlays/<split>_<step>/*.png
  <workdir>/tensorboard/                TensorBoard event files
"""
from __future__ import annotations

import os

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
