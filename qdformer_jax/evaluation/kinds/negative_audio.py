"""Does it listen? The split under its own audio (positive) and under negative audio: silence, noise
at the level of the clip's audio, another clip's off-screen audio (AVSBench-Robust, Li et al. 2025;
``qdformer_jax.data.negatives``). A negative clip's target is empty, so every predicted foreground
pixel is a false positive.

Per negative scenario: the FPR (predicted foreground pixels / pixels of the valid frames, i.e. the
per-frame FPR averaged over frames, as AVSBench-Robust computes it) and the fraction of frames with
any predicted mask. The combined scores G-mIoU and G-F are the harmonic means of the positive mIoU
(J on S4/MS3) or F and 1 - FPR, the FPR averaged over the negative scenarios (docs/DESIGN.md,
"Negative audio", says how we read AVSBench-Robust's definition). A dataset that stores negative
clips (synthetic_avs: ``<split>_silence``, ``<split>_noise``, ``<split>_offscreen``) is also scored on
them, reported apart under ``stored``. ``negative_audio_<split>_<step>.{json,md}``.
"""
from __future__ import annotations

import logging

import jax

from qdformer_jax.data import negatives, registry
from qdformer_jax.evaluation import reports

REPORT_PREFIX = 'negative_audio'
_WARNED: set = set()


def check(config, name: str) -> None:
  rule = config.eval.offscreen
  if rule not in negatives.OFFSCREEN_RULES:
    raise ValueError(f'config.eval.offscreen must be one of {negatives.OFFSCREEN_RULES}, got {rule!r} '
                     f'(config.evals.{name})')
  if rule == 'class_aware' and not negatives.class_aware(config.data) and config.data.name not in _WARNED:
    _WARNED.add(config.data.name)  # one line per dataset and process, not one per evaluation
    logging.warning('negative audio: eval.offscreen=class_aware, but %s', negatives.offscreen_rule(config.data))


def harmonic(score: float, fpr: float) -> float:
  """The harmonic mean of ``score`` and 1 - ``fpr`` (0 when both are 0)."""
  specificity = 1.0 - fpr
  total = score + specificity
  return 2.0 * score * specificity / total if total > 0 else 0.0


def positive_scores(config, results: dict) -> dict:
  """{'mIoU': ..., 'F': ...} of a positive evaluation: AVSS mIoU and F, or on binary tasks J (the
  S4/MS3 "mIoU") and the official per-batch F."""
  if config.data.binary:
    return {'mIoU': results.get('J'), 'F': results.get('F_official_per_batch')}
  return {'mIoU': results.get('mIoU'), 'F': results.get('F')}


def run(context, name: str, split: str) -> dict:
  del name
  config = context.config
  positive = context.segmentation(split)
  predicted = context.predicted(split)
  source = registry.open_source(config.data, split)
  total = len(source) if not config.eval.limit else min(len(source), int(config.eval.limit))
  seed = int(config.eval.negative_seed)
  donors, unmatched = negatives.offscreen_donors(source, total, config.data, seed, config.eval.offscreen)
  scenarios = {}
  for kind in negatives.KINDS:
    negative = negatives.Negative(kind, seed=seed, donors=donors if kind == 'offscreen' else None)
    results = context.evaluate(split, negative=negative, predicted=True)
    scenarios[kind] = {'fpr': results['predicted']['foreground_fraction'],
                       'frames_with_mask': results['predicted']['frames_with_mask'],
                       'num_clips': results['num_clips']}
  stored = stored_scenarios(context, split)
  mean_fpr = sum(s['fpr'] for s in scenarios.values()) / len(scenarios)
  scores = positive_scores(config, positive)
  combined = {f'G-{k}': harmonic(v, mean_fpr) for k, v in scores.items() if isinstance(v, float)}
  out = {'positive': dict(scores, foreground_fraction=predicted['foreground_fraction'],
                          frames_with_mask=predicted['frames_with_mask']),
         'scenarios': scenarios, 'mean_fpr': mean_fpr, **combined,
         **({'stored': stored} if stored else {}),
         'offscreen': {'rule': negatives.offscreen_rule(config.data, config.eval.offscreen),
                       'clips_without_compatible_donor': unmatched}}
  paths = context.write(write_report, context.workdir, split, context.step, config, out) or {}
  logging.info('negative audio %s@%d: FPR %s; %s (%s)', split, context.step,
               ', '.join(f'{k} {v["fpr"]:.4f}' for k, v in scenarios.items()),
               ', '.join(f'{k} {v:.4f}' for k, v in combined.items()), paths.get('markdown', ''))
  return out


def stored_split(split: str, kind: str) -> str:
  """The name of the dataset's own negative split of ``split`` hearing ``kind`` ('test_silence'; a
  sliced split 'test[:10]' names the whole negative split, which ``eval.limit`` bounds)."""
  return f'{split.split("[", 1)[0]}_{kind}'


def stored_scenarios(context, split: str) -> dict:
  """{kind: fpr, frames_with_mask, num_clips} on the dataset's stored negative clips of ``split``
  (synthetic_avs's 'test_silence', 'test_noise', 'test_offscreen': generated with nothing visible
  sounding, targets empty); {} when the dataset stores none."""
  available = registry.splits(context.config.data)
  out = {}
  for kind in negatives.KINDS:
    name = stored_split(split, kind)
    if name in available:
      results = context.evaluate(name, predicted=True)
      out[kind] = {'split': name, 'fpr': results['predicted']['foreground_fraction'],
                   'frames_with_mask': results['predicted']['frames_with_mask'],
                   'num_clips': results['num_clips']}
  return out


def summary_line(results: dict) -> str:
  """The run summary's line for these results."""
  fprs = ', '.join(f'{k} {v["fpr"]:.3f}' for k, v in results['scenarios'].items())
  combined = ', '.join(f'{k} {results[k]:.3f}' for k in ('G-mIoU', 'G-F') if k in results)
  line = f'FPR {fprs}; {combined}'
  if results.get('stored'):
    line += '; stored clips FPR ' + ', '.join(f'{k} {v["fpr"]:.3f}' for k, v in results['stored'].items())
  return line


def write_report(workdir: str, split: str, step: int, config, results: dict) -> dict:
  """DIR/reports/negative_audio_<split>_<step>.{json,md} (process 0; others return {})."""
  if jax.process_index() != 0:
    return {}
  header = reports.report_header(config, split, step)
  report = dict(header, **results, threshold=config.eval.threshold,
                definitions={
                    'fpr': 'predicted foreground pixels / pixels of the valid frames (the target is empty)',
                    'frames_with_mask': 'fraction of valid frames with any predicted foreground pixel',
                    'G-mIoU': 'harmonic mean of the positive mIoU (J on binary tasks) and 1 - mean FPR',
                    'G-F': 'harmonic mean of the positive F and 1 - mean FPR',
                    'silence': 'an all-zero waveform through the front end',
                    'noise': "white Gaussian noise at the RMS of the clip's own audio",
                    'offscreen': results['offscreen']['rule'],
                    'stored': "the dataset's own negative splits (<split>_<kind>), where it has them; "
                              'not part of mean_fpr, G-mIoU or G-F'})
  stem = reports.report_stem(REPORT_PREFIX, split, step)
  json_path = reports.write_json(workdir, stem + '.json', report)
  positive = results['positive']
  lines = [f'# Negative audio: {config.name} on {header["dataset"]} {split}, step {step}', '',
           'Each clip keeps its frames and hears silence, noise at the level of its own audio, or another '
           "clip's off-screen audio; its target is empty, so every predicted pixel is a false positive.", '',
           '| audio | FPR | frames with a mask |', '|---|---|---|',
           f'| own (positive): foreground fraction | {positive["foreground_fraction"]:.4f} | '
           f'{positive["frames_with_mask"]:.4f} |']
  lines += [f'| {kind} | {s["fpr"]:.4f} | {s["frames_with_mask"]:.4f} |' for kind, s in results['scenarios'].items()]
  lines += ['', '| positive mIoU | positive F | mean FPR | G-mIoU | G-F |', '|---|---|---|---|---|',
            '| ' + ' | '.join(_fmt(v) for v in (positive.get('mIoU'), positive.get('F'), results['mean_fpr'],
                                                 results.get('G-mIoU'), results.get('G-F'))) + ' |', '',
            f'Off-screen audio: {results["offscreen"]["rule"]}; clips without a compatible donor: '
            f'{results["offscreen"]["clips_without_compatible_donor"]}.']
  if results.get('stored'):
    lines += ['', "The dataset's own negative clips (frames drawn as for any clip, nothing visible sounds, "
              'targets empty):', '', '| split | FPR | frames with a mask | clips |', '|---|---|---|---|']
    lines += [f'| {s["split"]} | {s["fpr"]:.4f} | {s["frames_with_mask"]:.4f} | {s["num_clips"]} |'
              for s in results['stored'].values()]
  md_path = json_path[:-len('.json')] + '.md'
  with open(md_path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return {'json': json_path, 'markdown': md_path}


def _fmt(value) -> str:
  return f'{value:.4f}' if isinstance(value, float) else '—'
