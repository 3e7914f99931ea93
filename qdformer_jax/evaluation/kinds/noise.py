"""Noise robustness (paper Fig. 7): the split with background noise mixed into every clip's waveform at
each SNR of ``config.eval.noise_snrs`` (noise from ``config.eval.noise_dir``, else pink; seed
``config.eval.noise_seed``). ``noise_<split>_<step>.{json,md,png}``."""
from __future__ import annotations

import json
import logging
import os

import jax

from qdformer_jax import workdir as workdir_lib
from qdformer_jax.data import noise as noise_lib
from qdformer_jax.evaluation import overlays, reports

REPORT_PREFIX = 'noise'


def check(config, name: str) -> None:
  if not config.eval.noise_snrs:
    raise ValueError(f'config.evals.{name} is a noise sweep but config.eval.noise_snrs is empty; set '
                     "e.g. --config.eval.noise_snrs='(20, 10, 0)'")


def run(context, name: str, split: str) -> dict:
  del name
  config = context.config
  clean = context.segmentation(split)
  sweep = {snr: context.evaluate(split, noise_condition=noise_lib.Condition(
      float(snr), int(config.eval.noise_seed), config.eval.noise_dir or None)) for snr in config.eval.noise_snrs}
  paths = context.write(write_report, context.workdir, split, context.step, config, clean, sweep,
                        context.writer) or {}
  logging.info('noise sweep %s@%d: %s', split, context.step, paths.get('markdown', ''))
  return {'clean': clean, 'sweep': sweep}


def _format(value) -> str:
  return f'{value:.4f}' if isinstance(value, float) else str(value)


def _format_snr(value) -> str:
  return f'{value:g}' if isinstance(value, float) else str(value)


def write_report(workdir: str, split: str, step: int, config, clean_results: dict, sweep: dict,
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

  names = [k for k in reports.METRIC_MODES if isinstance(clean_results.get(k), float)]
  if not names:
    raise ValueError(f'write_noise_report: clean_results has none of the metrics {list(reports.METRIC_MODES)}')
  snrs = sorted((float(s) for s in sweep), reverse=True)
  by_snr = {float(k): v for k, v in sweep.items()}
  noise_dir = config.eval.get('noise_dir') or None
  source = noise_lib.noise_source(noise_dir).description
  table = [dict({'snr_db': 'clean'}, **{k: clean_results[k] for k in names})]
  table += [dict({'snr_db': snr}, **{k: by_snr[snr].get(k, float('nan')) for k in names}) for snr in snrs]
  dataset = f'{config.data.name}/{config.data.builder_config}'
  report = {'config': config.name, 'dataset': dataset, 'split': split, 'step': int(step),
            'noise': {'source': source, 'noise_dir': noise_dir, 'seed': int(config.eval.noise_seed)},
            'metrics': names, 'table': table, 'clean': clean_results,
            'sweep': {str(snr): by_snr[snr] for snr in snrs},
            'modes': {k: reports.METRIC_MODES[k] for k in names}}
  out = workdir_lib.reports_dir(workdir)
  os.makedirs(out, exist_ok=True)
  base = os.path.join(out, reports.report_stem(REPORT_PREFIX, split, step))
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
