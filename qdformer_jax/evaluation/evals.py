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

import json
import logging

import ml_collections

from qdformer_jax import workdir as workdir_lib
from qdformer_jax.evaluation import overlays, reports

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


def run(evaluator, state, step: int, config, workdir: str, selected: dict, writer=None) -> dict:
  """Runs the ``selected`` entries at ``step``; writes their reports; returns name -> results."""
  plain = {}

  def segmentation(split, overlay: bool):
    if split not in plain:
      collect = int(config.eval.num_overlays) if overlay else 0
      results = evaluator.run(state, split, collect=collect)
      if evaluator.collected:
        overlays.write_overlays(workdir_lib.overlays_dir(workdir, split, step), evaluator.collected, config,
                                limit=collect, writer=writer, tag=f'overlays_{split}', step=step)
      reports.write_report(workdir, split, step, config, results, writer)
      plain[split] = results
    return plain[split]

  out = {}
  for name, entry in selected.items():
    split = entry.split
    if entry.kind == 'segmentation':
      out[name] = segmentation(split, overlay=True)
      _log(name, split, step, out[name])
    elif entry.kind == 'audio_use':
      matched = segmentation(split, overlay=False)
      shuffled = evaluator.run(state, split, shuffle_audio=True)
      reports.write_report(workdir, split, step, config, shuffled, writer, variant='shuffled_audio')
      reports.write_audio_use_report(workdir, split, step, config, matched, shuffled)
      out[name] = {'matched': matched, 'shuffled': shuffled}
      logging.info('audio use %s@%d: %s', split, step, json.dumps(
          {k: {'matched': matched[k], 'shuffled': shuffled[k]} for k in ('mIoU', 'J', 'F') if k in matched}))
    else:
      clean = segmentation(split, overlay=False)
      sweep = {snr: evaluator.run(state, split, noise_snr=snr) for snr in config.eval.noise_snrs}
      paths = reports.write_noise_report(workdir, split, step, config, clean, sweep, writer)
      out[name] = {'clean': clean, 'sweep': sweep}
      logging.info('noise sweep %s@%d: %s', split, step, paths.get('markdown', ''))
  return out


def _log(name: str, split: str, step: int, results: dict) -> None:
  shown = ' '.join(f'{k}={results[k]:.4f}' for k in reports.METRIC_MODES if isinstance(results.get(k), float))
  logging.info('eval %s (%s) @ %d: %s (%d clips, %.1f s)', name, split, step, shown,
               results.get('num_clips', 0), results.get('eval_seconds', 0.0))
