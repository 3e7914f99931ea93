"""The evaluations a run declares (``config.evals``), run during training and by eval mode alike.

``config.evals`` maps a name to an entry (as big_vision's ``config.evals``):

  kind   'segmentation'  the split's metrics, a report and overlays (``reports.write_report``)
         'audio_use'     the same clips with matched and with shuffled audio, and the drop
         'noise'         the SNR sweep of ``config.eval.noise_snrs`` (paper Fig. 7)
  split  the split ('' = ``config.eval.split`` or ``data.eval_split``)
  every  steps between runs during training (0 = ``config.eval_every``); every entry also runs
         after the last step; -1 = never during training, only in eval mode

Eval mode (``config.mode='eval'``) runs every entry once on the restored checkpoint; its shortcuts
``config.eval.shuffle_audio=True`` and a non-empty ``config.eval.noise_snrs`` add an 'audio_use' and a
'noise' entry. One call evaluates a split once per mode: the plain metrics of a split are shared by
the entries that need them.
"""
from __future__ import annotations

import errno
import json
import logging
import shutil

import ml_collections

from qdformer_jax import workdir as workdir_lib
from qdformer_jax.evaluation import overlays, postprocess, reports

KINDS = ('segmentation', 'audio_use', 'noise')


def entries(config, *, mode: str = 'train') -> dict[str, ml_collections.ConfigDict]:
  """name -> resolved entry (kind, split, every) of ``config.evals`` (plus eval mode's shortcuts)."""
  default_split = config.eval.get('split') or config.data.eval_split
  declared = dict(config.get('evals', None) or {'val': {'kind': 'segmentation'}})
  if mode == 'eval':
    if config.eval.get('shuffle_audio'):
      declared.setdefault('audio_use', {'kind': 'audio_use'})
    if config.eval.get('noise_snrs'):
      declared.setdefault('noise', {'kind': 'noise'})
  resolved = {}
  for name, entry in declared.items():
    entry = dict(entry)
    unknown = set(entry) - {'kind', 'split', 'every'}
    if unknown:
      raise ValueError(f'config.evals.{name} has unknown fields {sorted(unknown)}; allowed: kind, split, every')
    kind = entry.get('kind', 'segmentation')
    if kind not in KINDS:
      raise ValueError(f'config.evals.{name}.kind must be one of {list(KINDS)}, got {kind!r}')
    if kind == 'noise' and not config.eval.get('noise_snrs'):
      raise ValueError(f'config.evals.{name} is a noise sweep but config.eval.noise_snrs is empty; set '
                       "e.g. --config.eval.noise_snrs='(20, 10, 0)'")
    every = int(entry.get('every', 0) or 0)
    resolved[name] = ml_collections.ConfigDict(dict(
        kind=kind, split=(default_split if mode == 'eval' else entry.get('split')) or default_split,
        every=config.eval_every if every == 0 else every))
  return resolved


def due(entry, step: int, total_steps: int) -> bool:
  """Whether a training-time entry runs at ``step``."""
  if entry.every < 0:
    return False
  return step % entry.every == 0 or step == total_steps


def parse_threshold(config):
  """``config.eval.threshold`` -> a float, or 'val' (pick it on the validation split)."""
  value = str(config.eval.get('threshold', '0.5')).strip()
  if value == 'val':
    if not config.eval.get('thresholds'):
      raise ValueError("config.eval.threshold='val' picks among config.eval.thresholds, which is empty; "
                       "set e.g. --config.eval.thresholds='(0.3, 0.4, 0.5, 0.6)'")
    return value
  try:
    number = float(value)
  except ValueError:
    number = -1.0
  if not 0.0 <= number <= 1.0:
    raise ValueError(f"config.eval.threshold must be a number in [0, 1] or 'val', got {value!r}")
  return number


def pick_threshold(results: dict, metric: str) -> float:
  """The threshold of ``results['threshold_sweep']`` with the best ``metric`` (ties: the lower one)."""
  sweep = results.get('threshold_sweep') or {}
  ranked = [(v[metric], -float(t), float(t)) for t, v in sweep.items()
            if isinstance(v.get(metric), float) and v[metric] == v[metric]]  # NaN never wins
  if not ranked:
    raise ValueError(f'no finite {metric!r} in the threshold sweep: cannot pick a threshold on val')
  return max(ranked)[2]


class ReportsNotWritten(OSError):
  """The evaluation ran (its metrics were logged) but its reports could not be written: no space."""

  def __init__(self, message: str, results: dict):
    super().__init__(errno.ENOSPC, message)
    self.message, self.results = message, results

  def __str__(self) -> str:
    return self.message


def run(evaluator, state, step: int, config, workdir: str, selected: dict, writer=None, *,
        full_disk_ok: bool = False) -> dict:
  """Runs the ``selected`` entries at ``step``; writes their reports; returns name -> results.

  The post-processing threshold is ``config.eval.threshold``, or with 'val' the one of the sweep
  with the best ``config.best_metric`` on ``data.eval_split`` (that split is evaluated first, at the
  default threshold, with the sweep); every report says which threshold it used and why.

  ``full_disk_ok`` (eval mode): a report, overlay or TensorBoard write that finds no space left is
  skipped, every entry still runs and logs its metrics, then :class:`ReportsNotWritten` is raised.
  """
  wanted = parse_threshold(config)
  plain = {}
  chosen = {}
  unwritten = []

  def write(fn, *args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except OSError as e:
      if not full_disk_ok or e.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise
      unwritten.append(e)
      return None

  def evaluate(split, threshold, overlay=False):
    key = (split, threshold)
    if key not in plain:
      collect = int(config.eval.num_overlays) if overlay else 0
      plain[key] = evaluator.run(state, split, threshold=threshold, collect=collect)
      if evaluator.collected:
        write(overlays.write_overlays, workdir_lib.overlays_dir(workdir, split, step), evaluator.collected,
              config, limit=collect, writer=writer, tag=f'overlays_{split}', step=step)
    return plain[key]

  def threshold():
    if not chosen:
      if wanted == 'val':
        val = evaluate(config.data.eval_split, postprocess.DEFAULT_THRESHOLD)
        chosen['value'] = pick_threshold(val, config.best_metric)
        chosen['source'] = (f'picked on {config.data.eval_split} (step {step}) by {config.best_metric} '
                            f'among {list(evaluator.sweep)}')
        logging.info('threshold %g %s', chosen['value'], chosen['source'])
      else:
        chosen.update(value=wanted, source='config.eval.threshold')
    return chosen['value']

  def segmentation(split, overlay):
    results = evaluate(split, threshold(), overlay)
    if not results.get('threshold_source'):
      results['threshold_source'] = chosen['source']
      write(reports.write_report, workdir, split, step, config, results, writer)
    return results

  out = {}
  for name, entry in selected.items():
    split = entry.split
    if entry.kind == 'segmentation':
      out[name] = segmentation(split, overlay=True)
      _log(name, split, step, out[name])
    elif entry.kind == 'audio_use':
      matched = segmentation(split, overlay=False)
      shuffled = evaluator.run(state, split, threshold=threshold(), shuffle_audio=True)
      shuffled['threshold_source'] = chosen['source']
      write(reports.write_report, workdir, split, step, config, shuffled, writer, variant='shuffled_audio')
      write(reports.write_audio_use_report, workdir, split, step, config, matched, shuffled)
      out[name] = {'matched': matched, 'shuffled': shuffled}
      logging.info('audio use %s@%d: %s', split, step, json.dumps(
          {k: {'matched': matched[k], 'shuffled': shuffled[k]} for k in ('mIoU', 'J', 'F') if k in matched}))
    else:
      clean = segmentation(split, overlay=False)
      sweep = {snr: evaluator.run(state, split, threshold=threshold(), noise_snr=snr) for snr in config.eval.noise_snrs}
      paths = write(reports.write_noise_report, workdir, split, step, config, clean, sweep, writer) or {}
      out[name] = {'clean': clean, 'sweep': sweep}
      logging.info('noise sweep %s@%d: %s', split, step, paths.get('markdown', ''))
  if unwritten:
    reports_dir = workdir_lib.reports_dir(workdir)
    try:
      free = f'{shutil.disk_usage(workdir).free / 2 ** 20:.1f} MB free'
    except OSError:
      free = 'free space unknown'
    raise ReportsNotWritten(
        f'the evaluation of step {step} ran (its metrics are above) but its reports could not be written to '
        f'{reports_dir}: {unwritten[0].strerror or unwritten[0]} ({free}); free space there (or evaluate a copy '
        'of the workdir on another disk)', out)
  return out


def _log(name: str, split: str, step: int, results: dict) -> None:
  shown = ' '.join(f'{k}={results[k]:.4f}' for k in reports.METRIC_MODES if isinstance(results.get(k), float))
  logging.info('eval %s (%s) @ %d: %s (%d clips, %.1f s)', name, split, step, shown,
               results.get('num_clips', 0), results.get('eval_seconds', 0.0))
