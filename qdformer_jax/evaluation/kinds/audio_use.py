"""Matched against shuffled audio: every real clip of an eval batch hears the next real clip's audio.
A model that ignores its audio drops 0. ``audio_use_<split>_<step>.json`` (and the shuffled run's own
``eval_<split>_shuffled_audio_<step>.json``)."""
from __future__ import annotations

import jax

from qdformer_jax.evaluation import evals, reports

REPORT_PREFIX = 'audio_use'


def check(config, name: str) -> None:
  del config, name


def run(context, name: str, split: str) -> dict:
  del name
  matched = context.segmentation(split)
  shuffled = context.evaluate(split, shuffle_audio=True)
  context.write(reports.write_report, context.workdir, split, context.step, context.config, shuffled,
                context.writer, variant='shuffled_audio')
  context.write(write_report, context.workdir, split, context.step, context.config, matched, shuffled)
  evals.log_json('audio use', split, context.step,
                 {k: {'matched': matched[k], 'shuffled': shuffled[k]} for k in ('mIoU', 'J', 'F') if k in matched})
  return {'matched': matched, 'shuffled': shuffled}


def write_report(workdir: str, split: str, step: int, config, matched: dict,
                           shuffled: dict) -> str:
  """DIR/reports/audio_use_<split>_<step>.json: every metric with each clip's own audio, with
  another clip's audio, and the drop (matched - shuffled). A model that ignores the audio drops 0."""
  if jax.process_index() != 0:
    return ''
  metrics = {k: {'matched_audio': matched[k], 'shuffled_audio': shuffled[k],
                 'drop': matched[k] - shuffled[k]}
             for k in matched if isinstance(matched[k], float) and isinstance(shuffled.get(k), float)
             and k in reports.METRIC_MODES}
  report = dict(reports.report_header(config, split, step), metrics=metrics,
                shuffle='each real clip of an eval batch hears the next real clip of the batch (cyclically)')
  return reports.write_json(workdir, reports.report_stem(REPORT_PREFIX, split, step) + '.json', report)
