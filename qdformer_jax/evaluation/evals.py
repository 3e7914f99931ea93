"""The evaluations a run declares (``config.evals``), run during training and by eval mode alike.

``config.evals`` maps a name to an entry (as big_vision's ``config.evals``):

  kind   the module ``qdformer_jax.evaluation.kinds.<kind>`` that runs it: 'segmentation' (the
         split's metrics, a report and overlays), 'audio_use' (matched vs shuffled audio, the drop),
         'noise' (the SNR sweep of ``config.eval.noise_snrs``, paper Fig. 7), 'negative_audio' (silence,
         noise and off-screen audio: what the model segments when nothing visible sounds)
  split  the split ('' = ``config.eval.split`` or ``data.eval_split``)
  every  steps between runs during training (0 = ``config.eval_every``); every entry also runs
         after the last step; -1 = never during training, only in eval mode

A kind module has ``REPORT_PREFIX`` (its report is ``<workdir>/reports/<prefix>_<split>_<step>.json``),
``check(config, name)`` (start-up checks of what it needs) and ``run(context, name, split) -> results``,
which evaluates through ``context`` (:class:`Context`) and writes its own reports. Adding a kind is
adding a module; nothing here changes.

Eval mode (``config.mode='eval'``) runs every entry once on the restored checkpoint; its shortcuts
``config.eval.shuffle_audio=True``, a non-empty ``config.eval.noise_snrs`` and
``config.eval.negative_audio=True`` add an 'audio_use', a 'noise' and a 'negative_audio' entry. One
run evaluates a split once per condition: the plain metrics of a split are shared by the entries that
need them.
"""
from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import shutil
import types

import ml_collections

from qdformer_jax import workdir as workdir_lib
from qdformer_jax.evaluation import overlays, postprocess, reports
from qdformer_jax.evaluation.evaluator import Evaluator

SHORTCUTS = {'shuffle_audio': 'audio_use', 'noise_snrs': 'noise', 'negative_audio': 'negative_audio'}


def kind_module(kind: str, where: str = 'config.evals') -> types.ModuleType:
  """The module of an evaluation kind; a ValueError naming the entry and the kinds there are."""
  if not isinstance(kind, str) or not kind.isidentifier():
    raise ValueError(f'{where}.kind must be the name of an evaluation kind, got {kind!r}')
  try:
    return importlib.import_module(f'qdformer_jax.evaluation.kinds.{kind}')
  except ModuleNotFoundError as e:
    if e.name != f'qdformer_jax.evaluation.kinds.{kind}':
      raise
    raise ValueError(f'{where}.kind must be one of {available_kinds()}, got {kind!r}') from None


def available_kinds() -> list[str]:
  folder = os.path.join(os.path.dirname(__file__), 'kinds')
  return sorted(f[:-3] for f in os.listdir(folder) if f.endswith('.py') and not f.startswith('_'))


def entries(config, *, mode: str = 'train') -> dict[str, ml_collections.ConfigDict]:
  """name -> resolved entry (kind, split, every) of ``config.evals`` (plus eval mode's shortcuts);
  every entry's kind is checked against the config (``check``)."""
  default_split = config.eval.split or config.data.eval_split
  declared = dict(config.evals or {'val': {'kind': 'segmentation'}})
  if mode == 'eval':
    for field, kind in SHORTCUTS.items():
      if config.eval.get(field):
        declared.setdefault(kind, {'kind': kind})
  resolved = {}
  for name, entry in declared.items():
    entry = dict(entry)
    unknown = set(entry) - {'kind', 'split', 'every'}
    if unknown:
      raise ValueError(f'config.evals.{name} has unknown fields {sorted(unknown)}; allowed: kind, split, every')
    kind = entry.get('kind', 'segmentation')
    kind_module(kind, f'config.evals.{name}').check(config, name)
    every = int(entry.get('every', 0) or 0)
    resolved[name] = ml_collections.ConfigDict(dict(
        kind=kind, split=(default_split if mode == 'eval' else entry.get('split')) or default_split,
        every=config.eval_every if every == 0 else every))
  return resolved


def report_path(workdir: str, entry, step) -> str:
  """DIR/reports/<prefix>_<split>_<step>.json: the report ``entry`` writes at ``step``."""
  return reports.report_path(workdir, kind_module(entry.kind).REPORT_PREFIX, entry.split, step)


def due(entry, step: int, total_steps: int) -> bool:
  """Whether a training-time entry runs at ``step``."""
  if entry.every < 0:
    return False
  return step % entry.every == 0 or step == total_steps


def parse_threshold(config):
  """``config.eval.threshold`` -> a float, or 'val' (pick it on the validation split)."""
  value = str(config.eval.threshold).strip()
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


class Context:
  """What a kind module evaluates with, for one step: the model state, the jitted evaluator, the
  post-processing threshold (picked once), the plain metrics of each split (computed once) and
  report writing that tolerates a full disk in eval mode."""

  def __init__(self, evaluations: Evaluations, state, step: int, full_disk_ok: bool):
    self.config, self.workdir, self.writer = evaluations.config, evaluations.workdir, evaluations.writer
    self.evaluator, self.state, self.step = evaluations.evaluator, state, step
    self.full_disk_ok = full_disk_ok
    self.unwritten: list[OSError] = []
    self._plain: dict = {}
    self._predicted: dict = {}
    self._threshold: dict = {}

  def write(self, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; in eval mode a full disk is noted (reported once, at the end)."""
    try:
      return fn(*args, **kwargs)
    except OSError as e:
      if not self.full_disk_ok or e.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise
      self.unwritten.append(e)
      return None

  def evaluate(self, split: str, **conditions) -> dict:
    """The evaluator's results on ``split`` at the run's threshold under ``conditions`` (see
    ``Evaluator.run``: shuffle_audio, noise_condition, negative, predicted), with the threshold's source."""
    results = self.evaluator.run(self.state, split, threshold=self.threshold(), **conditions)
    results['threshold_source'] = self._threshold['source']
    return results

  def plain(self, split: str, threshold: float, overlay: bool = False) -> dict:
    """The split's metrics at ``threshold``, once per step (overlays written the first time)."""
    key = (split, threshold)
    if key not in self._plain:
      collect = int(self.config.eval.num_overlays) if overlay else 0
      results = self.evaluator.run(self.state, split, threshold=threshold, collect=collect, predicted=True)
      self._predicted[key] = results.pop('predicted')
      collected = results.pop('collected', None)
      if collected:
        self.write(overlays.write_overlays, workdir_lib.overlays_dir(self.workdir, split, self.step), collected,
                   self.config, limit=collect, writer=self.writer, tag=f'overlays_{split}', step=self.step)
      self._plain[key] = results
    return self._plain[key]

  def predicted(self, split: str) -> dict:
    """What the model predicts at all on ``split`` with its own audio, at the run's threshold:
    foreground_fraction and frames_with_mask (``Evaluator.run(predicted=True)``)."""
    self.plain(split, self.threshold())
    return self._predicted[(split, self.threshold())]

  def threshold(self) -> float:
    """``config.eval.threshold``, or with 'val' the one of the sweep with the best
    ``config.best_metric`` on ``data.eval_split`` (evaluated first, at the default threshold)."""
    if not self._threshold:
      wanted = parse_threshold(self.config)
      if wanted == 'val':
        split, metric = self.config.data.eval_split, self.config.best_metric
        val = self.plain(split, postprocess.DEFAULT_THRESHOLD)
        self._threshold.update(value=pick_threshold(val, metric), source=(
            f'picked on {split} (step {self.step}) by {metric} among {list(self.evaluator.sweep)}'))
        logging.info('threshold %g %s', self._threshold['value'], self._threshold['source'])
      else:
        self._threshold.update(value=wanted, source='config.eval.threshold')
    return self._threshold['value']

  def segmentation(self, split: str, overlay: bool = False) -> dict:
    """The split's plain metrics at the run's threshold, its report written once."""
    results = self.plain(split, self.threshold(), overlay)
    if not results.get('threshold_source'):
      results['threshold_source'] = self._threshold['source']
      self.write(reports.write_report, self.workdir, split, self.step, self.config, results, self.writer)
    return results


class Evaluations:
  """The evaluation entries of a run (:func:`entries`) on one jitted evaluator.

  ``graphdef``: the model's (``nnx.split(model)``); ``run`` takes the model's state. ``writer``:
  TensorBoard (process 0), or None. ``last``: name -> the latest results of each entry."""

  def __init__(self, config, mesh, graphdef, workdir: str, *, writer=None, mode: str = 'train'):
    self.config, self.workdir, self.writer = config, workdir, writer
    self.entries = entries(config, mode=mode)
    self.evaluator = Evaluator(config, mesh, graphdef)
    self.last: dict[str, dict] = {}

  def due(self, step: int, total_steps: int) -> dict:
    """The entries that run at training step ``step``."""
    return {name: e for name, e in self.entries.items() if due(e, step, total_steps)}

  def run(self, state, step: int, selected: dict | None = None, *, full_disk_ok: bool = False) -> dict:
    """Runs the ``selected`` entries (default: all) on the model ``state`` at ``step``; each writes its
    reports; returns name -> results.

    ``full_disk_ok`` (eval mode): a report, overlay or TensorBoard write that finds no space left is
    skipped, every entry still runs and logs its metrics, then :class:`ReportsNotWritten` is raised.
    """
    context = Context(self, state, step, full_disk_ok)
    out = {}
    for name, entry in (self.entries if selected is None else selected).items():
      out[name] = kind_module(entry.kind).run(context, name, entry.split)
    self.last.update(out)
    if context.unwritten:
      first = context.unwritten[0]
      try:
        free = f'{shutil.disk_usage(self.workdir).free / 2 ** 20:.1f} MB free'
      except OSError:
        free = 'free space unknown'
      raise ReportsNotWritten(
          f'the evaluation of step {step} ran (its metrics are above) but its reports could not be written to '
          f'{workdir_lib.reports_dir(self.workdir)}: {first.strerror or first} ({free}); free space there (or '
          'evaluate a copy of the workdir on another disk)', out)
    return out

  def summary_lines(self) -> list[str]:
    """A line for the latest results of each entry whose kind module has a ``summary_line``."""
    lines = []
    for name, results in self.last.items():
      line = getattr(kind_module(self.entries[name].kind), 'summary_line', None)
      if line is not None and results:
        lines.append(f'  {name} ({self.entries[name].split})  {line(results)}')
    return lines


def log_metrics(name: str, split: str, step: int, results: dict) -> None:
  """One line: an entry's metrics at a step."""
  shown = ' '.join(f'{k}={results[k]:.4f}' for k in reports.METRIC_MODES if isinstance(results.get(k), float))
  logging.info('eval %s (%s) @ %d: %s (%d clips, %.1f s)', name, split, step, shown,
               results.get('num_clips', 0), results.get('eval_seconds', 0.0))


def log_json(what: str, split: str, step: int, value) -> None:
  logging.info('%s %s@%d: %s', what, split, step, json.dumps(value))
