"""Evaluation results on disk: the pieces every evaluation kind writes its reports with (JSON, a
header, TensorBoard scalars) and the plain evaluation's report.

Everything lands under ``<workdir>/reports/`` (process 0 only), named ``<prefix>_<split>_<step>``
after the kind's ``REPORT_PREFIX`` (``qdformer_jax.evaluation.kinds``):
  eval_<split>_<step>.json, eval_<split>_latest.json      one evaluation (:func:`write_report`)
  eval_<split>_<variant>_<step>.json                      a diagnostic variant (e.g. shuffled_audio)
  audio_use_<split>_<step>.json                           matched vs shuffled audio (kinds/audio_use.py)
  noise_<split>_<step>.{json,md,png}                      the SNR sweep (kinds/noise.py)
  negative_audio_<split>_<step>.{json,md}                 silence, noise, off-screen (kinds/negative_audio.py)
  train_log.jsonl                                         the training log lines' means
"""
from __future__ import annotations

import contextlib
import json
import logging
import os

import jax

from qdformer_jax import workdir as workdir_lib

METRIC_MODES = {
    'J': 'AVSBench J: frame-mean IoU, empty-GT frames score the empty fraction of the prediction',
    'F_official_per_batch': 'AVSBench F (beta2=0.3, 255 thresholds), official per-batch max',
    'F_dataset': 'AVSBench F, max over thresholds of the dataset-mean curve',
    'mIoU': 'AVSS mIoU over all classes incl. background, never-seen classes count 0',
    'F': 'AVSS F (beta2=0.3) over all classes, never-seen classes count 0',
    'davis_J': 'DAVIS region J', 'davis_F': 'DAVIS boundary F (tolerance 0.008 of the diagonal)',
}


SEGMENTATION_PREFIX = 'eval'  # the plain evaluation's reports (kinds/segmentation.py)


def report_stem(prefix: str, split: str, step) -> str:
  """<prefix>_<split>_<step>: the name (without extension) of a report."""
  return f'{prefix}_{split}_{step}'


def report_path(workdir: str, prefix: str, split: str, step) -> str:
  """DIR/reports/<prefix>_<split>_<step>.json."""
  return os.path.join(workdir_lib.reports_dir(workdir), report_stem(prefix, split, step) + '.json')


TRAIN_LOG = 'train_log.jsonl'


def append_train_log(workdir: str, step: int, means: dict) -> None:
  """Appends one line {"step": …, metric: mean over the interval} to DIR/reports/train_log.jsonl
  (process 0): the progress lines' numbers, for scripts (after a resume, the later line of a step wins)."""
  if jax.process_index() != 0:
    return
  out = workdir_lib.reports_dir(workdir)
  try:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, TRAIN_LOG), 'a') as f:
      f.write(json.dumps({'step': int(step), **{k: float(v) for k, v in means.items()}}) + '\n')
  except OSError as e:  # a full disk is reported where it matters, at the checkpoint save
    logging.warning('could not append to %s: %s', os.path.join(out, TRAIN_LOG), e)


def read_train_log(workdir: str) -> dict[int, dict]:
  """step -> the metrics of DIR/reports/train_log.jsonl (empty when there is none)."""
  path = os.path.join(workdir_lib.reports_dir(workdir), TRAIN_LOG)
  rows = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          row = json.loads(line)
          rows[int(row.pop('step'))] = row
  return rows


def make_writer(workdir: str):
  from tensorboardX import SummaryWriter
  return SummaryWriter(workdir_lib.tensorboard_dir(workdir))


def report_header(config, split: str, step: int) -> dict:
  return {'config': config.name, 'dataset': f'{config.data.name}/{config.data.builder_config}',
          'split': split, 'step': int(step)}


def write_json(workdir: str, name: str, report: dict) -> str:
  """DIR/reports/<name>; returns its path."""
  out = workdir_lib.reports_dir(workdir)
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, name)
  partial = f'{path}.partial'  # a full disk leaves no truncated report (resuming reads reports)
  try:
    with open(partial, 'w') as f:
      json.dump(report, f, indent=2)
    os.replace(partial, path)
  except OSError:
    with contextlib.suppress(OSError):
      os.remove(partial)
    raise
  return path


def write_report(workdir: str, split: str, step: int, config, results: dict, writer=None,
                 variant: str = '') -> str:
  """DIR/reports/eval_<split>[_<variant>]_<step>.json and eval_<split>[_<variant>]_latest.json
  (process 0 only). ``variant`` (e.g. 'shuffled_audio') keeps a diagnostic evaluation from
  overwriting the report and the TensorBoard curve of the plain one."""
  if jax.process_index() != 0:
    return ''
  report = dict(report_header(config, split, step), metrics=results,
                modes={k: v for k, v in METRIC_MODES.items() if k in results})
  name = f'{split}_{variant}' if variant else split
  path = write_json(workdir, report_stem(SEGMENTATION_PREFIX, name, step) + '.json', report)
  write_json(workdir, report_stem(SEGMENTATION_PREFIX, name, 'latest') + '.json', report)
  if writer is not None:
    for k, v in results.items():
      if isinstance(v, float):
        writer.add_scalar(f'eval_{name}/{k}', v, step)
    writer.flush()
  return path
