"""Evaluation results on disk: JSON reports, Markdown tables, plots and TensorBoard scalars.

Everything lands under ``<workdir>/reports/`` (process 0 only):
  eval_<split>_<step>.json, eval_<split>_latest.json      one evaluation (:func:`write_report`)
  eval_<split>_<variant>_<step>.json                      a diagnostic variant (e.g. shuffled_audio)
  audio_use_<split>_<step>.json                           matched vs shuffled audio (:func:`write_audio_use_report`)
  noise_<split>_<step>.{json,md,png}                      the SNR sweep (:func:`write_noise_report`)
"""
from __future__ import annotations

import contextlib
import json
import logging
import os

import jax

from qdformer_jax import workdir as workdir_lib
from qdformer_jax.data import noise
from qdformer_jax.evaluation import overlays

METRIC_MODES = {
    'J': 'AVSBench J: frame-mean IoU, empty-GT frames score the empty fraction of the prediction',
    'F_official_per_batch': 'AVSBench F (beta2=0.3, 255 thresholds), official per-batch max',
    'F_dataset': 'AVSBench F, max over thresholds of the dataset-mean curve',
    'mIoU': 'AVSS mIoU over all classes incl. background, never-seen classes count 0',
    'F': 'AVSS F (beta2=0.3) over all classes, never-seen classes count 0',
    'davis_J': 'DAVIS region J', 'davis_F': 'DAVIS boundary F (tolerance 0.008 of the diagonal)',
}


# The file-name prefix of each evaluation kind's report (qdformer_jax.evaluation.evals kinds).
REPORT_PREFIX = {'segmentation': 'eval', 'audio_use': 'audio_use', 'noise': 'noise'}


def report_stem(kind: str, split: str, step) -> str:
  """<prefix>_<split>_<step>: the name (without extension) of the report an evaluation writes."""
  return f'{REPORT_PREFIX[kind]}_{split}_{step}'


def report_path(workdir: str, kind: str, split: str, step) -> str:
  """DIR/reports/<stem>.json of the report an evaluation of ``kind`` writes at ``step``."""
  return os.path.join(workdir_lib.reports_dir(workdir), report_stem(kind, split, step) + '.json')


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


def _report_header(config, split: str, step: int) -> dict:
  return {'config': config.name, 'dataset': f'{config.data.name}/{config.data.builder_config}',
          'split': split, 'step': int(step)}


def _write_json(workdir: str, name: str, report: dict) -> str:
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
  report = dict(_report_header(config, split, step), metrics=results,
                modes={k: v for k, v in METRIC_MODES.items() if k in results})
  name = f'{split}_{variant}' if variant else split
  path = _write_json(workdir, report_stem('segmentation', name, step) + '.json', report)
  _write_json(workdir, report_stem('segmentation', name, 'latest') + '.json', report)
  if writer is not None:
    for k, v in results.items():
      if isinstance(v, float):
        writer.add_scalar(f'eval_{name}/{k}', v, step)
    writer.flush()
  return path


def write_audio_use_report(workdir: str, split: str, step: int, config, matched: dict,
                           shuffled: dict) -> str:
  """DIR/reports/audio_use_<split>_<step>.json: every metric with each clip's own audio, with
  another clip's audio, and the drop (matched - shuffled). A model that ignores the audio drops 0."""
  if jax.process_index() != 0:
    return ''
  metrics = {k: {'matched_audio': matched[k], 'shuffled_audio': shuffled[k],
                 'drop': matched[k] - shuffled[k]}
             for k in matched if isinstance(matched[k], float) and isinstance(shuffled.get(k), float)
             and k in METRIC_MODES}
  report = dict(_report_header(config, split, step), metrics=metrics,
                shuffle='each real clip of an eval batch hears the next real clip of the batch (cyclically)')
  return _write_json(workdir, report_stem('audio_use', split, step) + '.json', report)


def _format(value) -> str:
  return f'{value:.4f}' if isinstance(value, float) else str(value)


def _format_snr(value) -> str:
  return f'{value:g}' if isinstance(value, float) else str(value)


def write_noise_report(workdir: str, split: str, step: int, config, clean_results: dict, sweep: dict,
                       writer=None) -> dict:
  """The noise-robustness sweep (paper Fig. 7) as DIR/reports/noise_<split>_<step>.{json,md,png}.

  clean_results: ``Evaluator.run`` without noise; sweep: SNR (dB) -> ``Evaluator.run`` at that SNR.
  The table has one row per SNR (clean first, then from high to low SNR) and a column per metric
  of the task (J, F... for binary tasks, mIoU and F for AVSS); the plot draws each metric against
  the SNR with the clean score as a dashed line. With a TensorBoard ``writer`` the plot is also
  logged as an image. Returns {'json': path, 'markdown': path, 'plot': path} (process 0 only;
  other processes return {}).
  """
  if jax.process_index() != 0:
    return {}
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  names = [k for k in METRIC_MODES if isinstance(clean_results.get(k), float)]
  if not names:
    raise ValueError(f'write_noise_report: clean_results has none of the metrics {list(METRIC_MODES)}')
  snrs = sorted((float(s) for s in sweep), reverse=True)
  by_snr = {float(k): v for k, v in sweep.items()}
  noise_dir = config.eval.get('noise_dir') or None
  source = noise.noise_source(noise_dir).description
  table = [dict({'snr_db': 'clean'}, **{k: clean_results[k] for k in names})]
  table += [dict({'snr_db': snr}, **{k: by_snr[snr].get(k, float('nan')) for k in names}) for snr in snrs]
  dataset = f'{config.data.name}/{config.data.builder_config}'
  report = {'config': config.name, 'dataset': dataset, 'split': split, 'step': int(step),
            'noise': {'source': source, 'noise_dir': noise_dir, 'seed': int(config.eval.noise_seed)},
            'metrics': names, 'table': table, 'clean': clean_results,
            'sweep': {str(snr): by_snr[snr] for snr in snrs},
            'modes': {k: METRIC_MODES[k] for k in names}}
  out = workdir_lib.reports_dir(workdir)
  os.makedirs(out, exist_ok=True)
  base = os.path.join(out, report_stem('noise', split, step))
  paths = {'json': base + '.json', 'markdown': base + '.md', 'plot': base + '.png'}
  with open(paths['json'], 'w') as f:
    json.dump(report, f, indent=2)

  lines = [f'# Noise robustness: {config.name} on {dataset} {split}, step {step}', '',
           f'Background noise: {source}, seed {int(config.eval.noise_seed)}, mixed into each clip\'s '
           'waveform at the given SNR (signal power / noise power) before the log-mel.', '',
           '| SNR (dB) | ' + ' | '.join(names) + ' |', '|' + '---|' * (len(names) + 1)]
  lines += ['| ' + ' | '.join([_format_snr(row['snr_db'])] + [_format(row[k]) for k in names]) + ' |'
            for row in table]
  with open(paths['markdown'], 'w') as f:
    f.write('\n'.join(lines) + '\n')

  fig = Figure(figsize=(5.0, 3.6), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  for i, k in enumerate(names):
    colour = f'C{i}'
    ax.plot(snrs, [by_snr[s].get(k, float('nan')) for s in snrs], 'o-', color=colour, label=k)
    ax.axhline(clean_results[k], color=colour, linestyle='--', linewidth=1, label=f'{k} (clean)')
  if len(snrs) > 1:
    ax.invert_xaxis()  # noisier to the right
  ax.set_xlabel('SNR (dB)')
  ax.set_ylabel('score')
  ax.set_title(f'{config.name} {dataset} {split} @ {step}', fontsize=9)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(paths['plot'])
  if writer is not None:
    writer.add_image(f'noise_{split}/plot', overlays.figure_to_array(fig), step, dataformats='HWC')
    writer.flush()
  return paths
