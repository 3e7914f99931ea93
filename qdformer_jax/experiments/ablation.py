"""Table 2 and Fig. 7 on the synthetic task: named variants × seeds, one command, resumable.

  python -m qdformer_jax.experiments.ablation --out DIR [--variants full,no_quant,...] [--seeds 0,1,2]
      [--config configs/synthetic.py] [--steps 600] [--snrs 20,10,0,-10] [--negative_fraction 0.1]
      [--recipe shipped|before_warmup|warmup_32]

Every run trains ``--config`` with the variant's overrides for the same number of steps on the same
data, seeds 0..S-1 (the seed draws the initial weights, the data order and the augmentation), then
evaluates its final checkpoint on the test split: plain, with each clip given another clip's audio
(the audio-use check), with pink noise mixed in at each SNR (the paper's Fig. 7) and with negative
audio (silence, noise, off-screen: the FPR; docs/DESIGN.md §5.1). ``--negative_fraction`` trains
every run with that fraction of negative clips (use another ``--out``); ``--recipe`` starts every
variant from a codebook recipe that earlier tables were measured with (a variant's own fields win). A finished run (its test
negative-audio report exists) is not redone (``--reevaluate`` evaluates its final checkpoint again);
an interrupted one resumes from its checkpoint.

Writes under DIR: ``runs/<variant>/seed<k>/`` (each run's workdir and reports), ``results.json``
(every run's numbers), ``results.md`` (mean ± std over seeds per variant, then the per-seed values)
and ``results.png`` (test mIoU per variant; mIoU against SNR per variant).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time

import ml_collections

from qdformer_jax import console
from qdformer_jax import workdir as workdir_lib
from qdformer_jax.evaluation import evals
from qdformer_jax.evaluation import reports as reports_lib
from qdformer_jax.training import eval_mode, resume, startup, train

# The codebook recipes that earlier rows were measured on (configs/synthetic.py's values then: with
# another --config they still set K = 32), pinned so that a variant keeps naming the model it was
# measured as when the shipped recipe changes: before the continuous warm-up, and the warm-up recipe
# shipped until the commitment term was dropped and K raised to 128 (README, "Making the bottleneck
# carry the audio").
BEFORE_WARMUP = {'model.vq_warmup_fraction': 0.0, 'model.vq_warmup_steps': 0, 'loss.commit_weight': 0.25,
                 'model.codebook_size': 32}
WARMUP_32 = {'model.vq_warmup_fraction': 0.25, 'model.vq_warmup_steps': 0, 'loss.commit_weight': 0.25,
             'model.codebook_size': 32}
# --recipe: the recipe every variant starts from (a variant's own fields still win), so that a table
# measured before a recipe change is made again by the command beside it.
RECIPES = {'shipped': {}, 'before_warmup': BEFORE_WARMUP, 'warmup_32': WARMUP_32}
# The paper's Table 2 rows as switches of the model (row 2, time-domain separation with an
# off-the-shelf model, has no counterpart here) on the recipe the variants start from (--recipe), then
# the recipe choices and the bottleneck's remedies, each pinned to the recipe it was measured on.
VARIANTS: dict[str, dict] = {
    'baseline': {'model.decomposition': False},                              # row 1
    'no_quant': {'model.quantize': False},                                   # row 3: Non-Q-SD
    'qsd': {'model.avsr': False, 'model.local_calibration': False},          # row 4: Q-based-SD
    'qsd_avsr': {'model.local_calibration': False},                          # row 5: + AVSR
    'full': {},                                                              # row 6: + LC (ours)
    # The recipe choices, one at a time from the recipe they were measured on (`no_warmup`) towards the
    # paper's, then all of them (`literal`: the paper's recipe on the synthetic model).
    'plain_codebook': {**BEFORE_WARMUP, 'model.vq_normalize': False, 'model.vq_restart_dead': False},
    'eq9_sum': {**BEFORE_WARMUP, 'loss.quant_reduction': 'sum'},
    'focal': {**BEFORE_WARMUP, 'loss.focal_alpha': 0.25, 'loss.focal_gamma': 2.0},
    'literal': {**BEFORE_WARMUP, 'model.vq_normalize': False, 'model.vq_restart_dead': False,
                'loss.quant_reduction': 'sum', 'loss.focal_alpha': 0.25, 'loss.focal_gamma': 2.0},
    # Is the quantized models' gap the size of the bottleneck? The paper's K = 128 instead of 32 (measured
    # before the warm-up, on that recipe).
    'codebook_128': {**BEFORE_WARMUP, 'model.codebook_size': 128},
    # Remedies for a bottleneck that drops the audio (docs/DESIGN.md §1.6), each one change on the
    # recipe without the continuous warm-up (`no_warmup`), then combinations with the warm-up
    # (`warmup_kmeans`). Each names the recipe it was measured on, so that it names the same model
    # whatever the configs ship.
    'no_warmup': dict(BEFORE_WARMUP),
    'rotation': {**BEFORE_WARMUP, 'model.vq_gradient': 'rotation'},                 # rotation trick
    'ema': {**BEFORE_WARMUP, 'model.vq_ema_decay': 0.99},                           # EMA codebook
    'fsq': {**BEFORE_WARMUP, 'model.quantizer': 'fsq', 'loss.quant_weight': 0.0},   # FSQ 4x4x2
    'slot_entropy': {**BEFORE_WARMUP, 'loss.slot_entropy_weight': 0.1},             # per-slot entropy
    'audio_tokens': {**BEFORE_WARMUP, 'model.local_audio_tokens': True},            # local ASD: many keys
    'token_pos': {**BEFORE_WARMUP, 'model.query_pos_from_token': True},             # no audio-free queries
    'warmup_kmeans': dict(WARMUP_32),             # continuous for 1/4 of the run, then k-means
    'warmup_token_pos': {**WARMUP_32, 'model.query_pos_from_token': True},
    'warmup_slot_entropy': {**WARMUP_32, 'loss.slot_entropy_weight': 0.1},
    'warmup_ema': {**WARMUP_32, 'model.vq_ema_decay': 0.99},
    'warmup_rotation': {**WARMUP_32, 'model.vq_gradient': 'rotation'},
    'warmup_no_commit': {**WARMUP_32, 'loss.commit_weight': 0.0},  # suspect 3
    'warmup_commit_005': {**WARMUP_32, 'loss.commit_weight': 0.05},  # a fifth of it
    'warmup_128': {**WARMUP_32, 'model.codebook_size': 128},  # K alone, the commitment term kept
    # Both helps: what the configs ship since (so `full` on configs/synthetic.py is this model).
    'warmup_no_commit_128': {**WARMUP_32, 'loss.commit_weight': 0.0, 'model.codebook_size': 128},
    'warmup_no_commit_256': {**WARMUP_32, 'loss.commit_weight': 0.0, 'model.codebook_size': 256},
    'warmup_no_commit_512': {**WARMUP_32, 'loss.commit_weight': 0.0, 'model.codebook_size': 512},
}
TABLE2 = ('baseline', 'no_quant', 'qsd', 'qsd_avsr', 'full')
PAPER_TABLE2 = {'baseline': 33.5, 'no_quant': 39.4, 'qsd': 42.5, 'qsd_avsr': 44.5, 'full': 46.6}  # AVSS mIoU, R50
ROW = {'baseline': 'row 1: no decomposition', 'no_quant': 'row 3: decomposition w/o quantization',
       'qsd': 'row 4: Q-based-SD', 'qsd_avsr': 'row 5: + AVSR', 'full': 'row 6: + LC (full)',
       'plain_codebook': 'recipe: plain L2 codebook, no restarts', 'eq9_sum': 'recipe: Eq. 9 summed over d',
       'focal': 'recipe: focal class loss (α .25, γ 2)', 'literal': 'recipe: all three (paper-literal)',
       'codebook_128': 'no_warmup with the paper\'s K = 128 codes (not 32)',
       'rotation': 'no_warmup + rotation trick', 'ema': 'no_warmup + EMA codebook (0.99)',
       'fsq': 'no_warmup with FSQ (4x4x2) for the codebook', 'slot_entropy': 'no_warmup + slot entropy (0.1)',
       'audio_tokens': 'no_warmup, local ASD over the audio map', 'token_pos': 'no_warmup, query pos from token',
       'no_warmup': 'K = 32, commitment term, no continuous warm-up',
       'warmup_kmeans': 'K = 32 codes with the commitment term, continuous for 1/4 of the steps, then k-means',
       'warmup_token_pos': 'warmup_kmeans + query pos from token',
       'warmup_slot_entropy': 'warmup_kmeans + slot entropy term (0.1)',
       'warmup_ema': 'warmup_kmeans + EMA codebook (0.99)',
       'warmup_rotation': 'warmup_kmeans + rotation trick',
       'warmup_no_commit': 'warmup_kmeans without the commitment term',
       'warmup_commit_005': 'warmup_kmeans, commitment weight 0.05 (not 0.25)',
       'warmup_128': 'warmup_kmeans with K = 128 codes (not 32)',
       'warmup_no_commit_128': 'warmup_no_commit with K = 128 codes (not 32)',
       'warmup_no_commit_256': 'warmup_no_commit with K = 256 codes (not 32)',
       'warmup_no_commit_512': 'warmup_no_commit with K = 512 codes (not 32)'}
# The bottleneck's diagnostics (evaluation/bottleneck.py) of the test report, as table columns.
DIAGNOSTICS = (('slot_perplexity', 'slot ppl'), ('code_class_mi', 'code MI'),
               ('code_class_mi_heldout', 'code MI held out'),
               ('probe_r2_codes', 'probe codes'), ('probe_r2_tokens', 'probe tokens'))


def load_config(spec: str) -> ml_collections.ConfigDict:
  """A config file as main.py's --config reads it ('configs/synthetic.py:arg'): its get_config(arg)."""
  import importlib.util
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--config {spec}: no config file {path!r}')
  module_spec = importlib.util.spec_from_file_location(f'_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def set_field(config, dotted: str, value) -> None:
  *parents, leaf = dotted.split('.')
  node = config
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise ValueError(f'variant field {dotted!r} is not a config field')
  node[leaf] = value


def base_config(spec: str, recipe: str = 'shipped', negative_fraction: float | None = None):
  """The config every run of the command starts from: ``spec`` (as --config), then the ``recipe``'s
  fields (RECIPES), then ``negative_fraction`` when given; each run then sets its variant's fields."""
  base = load_config(spec)
  for field, value in RECIPES[recipe].items():
    set_field(base, field, value)
  if negative_fraction is not None:
    base.data.negative_fraction = negative_fraction
  return base


def run_dir(out: str, variant: str, seed: int) -> str:
  return os.path.join(out, 'runs', variant, f'seed{seed}')


def done_report(workdir: str, config, test_split: str) -> str:
  """The report a finished run has written last (its final checkpoint's negative-audio evaluation)."""
  return reports_lib.report_path(workdir, evals.kind_module('negative_audio').REPORT_PREFIX, test_split,
                                 int(config.total_steps))


def run_config(base, variant: str, seed: int, steps: int, data_dir: str) -> ml_collections.ConfigDict:
  config = base.copy_and_resolve_references()
  with config.unlocked():
    for k, v in VARIANTS[variant].items():
      set_field(config, k, v)
    config.seed = seed
    if steps:
      config.total_steps = steps
      config.lr_drop_steps = (int(steps * 0.85),)
      config.eval_every = max(1, steps // 2)
      config.checkpoint_every = max(1, steps // 4)
    config.data.data_dir = data_dir
  return config


EVAL_KINDS = ('test', 'audio_use', 'noise', 'negative_audio')  # evaluate_final's evaluations, in order


def evaluate_final(config, workdir: str, test_split: str, snrs, kinds=EVAL_KINDS) -> None:
  """Eval mode on the run's latest checkpoint: the test split plain, with shuffled audio, under noise
  at ``snrs`` and under negative audio (each writes its report); ``kinds``: a subset of EVAL_KINDS."""
  eval_config = config.copy_and_resolve_references()
  with eval_config.unlocked():
    eval_config.mode = 'eval'
    eval_config.eval.update(split=test_split, checkpoint='latest', noise_snrs=tuple(snrs))
    eval_config.evals = ml_collections.ConfigDict({
        name: {'kind': 'segmentation' if name == 'test' else name, 'split': '', 'every': 0}
        for name in EVAL_KINDS if name in kinds})
  eval_mode.evaluate_checkpoint(eval_config, workdir)


# Fields of the quantizer: a run without one (model.quantize or model.decomposition off) is the same
# model whatever they hold, so a finished continuous run stays valid when the shipped recipe changes.
# (Not model.quantizer: the FSQ and VQ modules draw different numbers of initial values, and so change
# the initial weights of every module built after them.)
QUANTIZER_FIELDS = ('model.codebook_size', 'model.fsq_levels', 'model.vq_', 'loss.commit_weight', 'loss.quant_',
                    'loss.slot_entropy_')


def check_finished_run(workdir: str, variant: str, config) -> None:
  """Raises ValueError when the finished run in ``workdir`` was trained with another config than
  ``variant`` resolves to now (e.g. the configs' recipe changed since, and the variant follows it), in
  a field that a resume could not change either; its reports would be read as the variant's numbers."""
  stored = workdir_lib.read_config(workdir)
  if stored is None:
    logging.warning('%s has no %s: its config cannot be checked against variant %s', workdir,
                    workdir_lib.CONFIG_FILE, variant)
    return
  fixed, _ = resume.config_differences(stored, resume.config_json(startup.resolved_config(config)))
  continuous = not (config.model.quantize and config.model.decomposition)
  if continuous:
    fixed = [d for d in fixed if not d[0].startswith(QUANTIZER_FIELDS)]
  if fixed:
    parts = '; '.join(f'{field}: run {json.dumps(a)}, variant {json.dumps(b)}' for field, a, b in fixed[:8])
    raise ValueError(f'{workdir} holds a finished run of {variant!r} trained with another config ({parts}'
                     f'{"; ..." if len(fixed) > 8 else ""}); its numbers are not this variant\'s. Use another '
                     '--out, the --recipe it was measured with, or move that run directory away to train it '
                     'again')


def as_trained(config, workdir: str):
  """``config`` with the quantizer fields the finished run in ``workdir`` was trained with, where the
  model does not use them (a continuous run, which ``check_finished_run`` lets keep an older codebook
  recipe: its unused codebook still has the old shape in the checkpoint)."""
  stored = workdir_lib.read_config(workdir)
  if stored is None or (config.model.quantize and config.model.decomposition):
    return config
  fixed, _ = resume.config_differences(stored, resume.config_json(startup.resolved_config(config)))
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for field, trained_with, _ in fixed:
      if field.startswith(QUANTIZER_FIELDS):
        set_field(config, field, tuple(trained_with) if isinstance(trained_with, list) else trained_with)
  return config


def run_one(base, variant: str, seed: int, out: str, steps: int, snrs, data_dir: str, test_split: str,
            reevaluate=()) -> dict:
  """Trains (or resumes) one run and evaluates its final checkpoint; returns its numbers.
  ``reevaluate``: the EVAL_KINDS a finished run is evaluated again with (e.g. after an evaluator gained
  a measurement; the others' reports are read as they are).
  A finished run is read as it is: ``main`` checks every one against its variant first."""
  workdir = run_dir(out, variant, seed)
  config = run_config(base, variant, seed, steps, data_dir)
  reports = workdir_lib.reports_dir(workdir)
  total = int(config.total_steps)
  done = done_report(workdir, config, test_split)
  t0 = time.time()
  if not os.path.exists(done):
    logging.info('run %s seed %d -> %s', variant, seed, workdir)
    train.train_and_evaluate(config, workdir)
    evaluate_final(config, workdir, test_split, snrs)
  elif reevaluate:
    logging.info('evaluating %s seed %d again (%s: %s)', variant, seed, workdir, ', '.join(reevaluate))
    evaluate_final(as_trained(config, workdir), workdir, test_split, snrs, reevaluate)
  seconds = time.time() - t0

  def report(kind, split, step):
    with open(reports_lib.report_path(workdir, evals.kind_module(kind).REPORT_PREFIX, split, step)) as f:
      return json.load(f)

  curve = {}
  prefix = reports_lib.report_stem(reports_lib.SEGMENTATION_PREFIX, config.data.eval_split, '')
  for name in sorted(os.listdir(reports)):
    if name.startswith(prefix) and name[len(prefix):-5].isdigit():
      curve[int(name[len(prefix):-5])] = report('segmentation', config.data.eval_split,
                                                name[len(prefix):-5])['metrics'].get(config.best_metric)
  noise = report('noise', test_split, total)
  audio_use = report('audio_use', test_split, total)['metrics']
  test = report('segmentation', test_split, total)['metrics']
  negative = report('negative_audio', test_split, total)
  metric = config.best_metric
  log = reports_lib.read_train_log(workdir)
  restarts = [row['codebook_restarts'] for row in log.values() if 'codebook_restarts' in row]
  # Quantization errors at the end of training: the log's values over the last 100 steps.
  # (Logged summed over d where Eq. 9 is summed, so divided by d here; no local tokens: no local error.)
  late = [row for step, row in log.items() if int(step) > total - 100]
  per_channel = float(config.model.hidden_dim) if config.loss.quant_reduction == 'sum' else 1.0
  sqerr = {key: statistics.fmean([row[key] for row in late]) / per_channel
           if late and all(key in row for row in late) else None for key in ('vq_global_sqerr', 'vq_local_sqerr')}
  if not config.model.local_calibration:
    sqerr['vq_local_sqerr'] = None
  return {
      'variant': variant, 'seed': seed, 'steps': total, 'workdir': workdir,
      'metric': metric, 'val_curve': {str(k): curve[k] for k in sorted(curve)},
      'test': test.get(metric), 'test_F': test.get('F'),
      'test_shuffled_audio': audio_use.get(metric, {}).get('shuffled_audio'),
      'bottleneck': test.get('bottleneck', {}),
      # Codeword churn: restarts per 100 steps (the log's per-step means, averaged over intervals).
      'restarts_per_100': 100.0 * statistics.fmean(restarts) if restarts else None,
      **sqerr,
      'noise': {row['snr_db'] if isinstance(row['snr_db'], str) else f"{row['snr_db']:g}": row.get(metric)
                for row in noise['table']},
      'negative_audio': {'foreground_positive': negative['positive']['foreground_fraction'],
                         **{f'fpr_{k}': v['fpr'] for k, v in negative['scenarios'].items()},
                         'G-mIoU': negative.get('G-mIoU'), 'G-F': negative.get('G-F'),
                         # the dataset's own negative clips (synthetic_avs 1.2.0), where the report has them
                         **{f'stored_fpr_{k}': v['fpr'] for k, v in negative.get('stored', {}).items()}},
      'negative_fraction': float(config.data.negative_fraction),
      'seconds_this_invocation': round(seconds, 1),
  }


NEGATIVE_COLUMNS = (('foreground_positive', 'foreground, own audio'), ('fpr_silence', 'FPR silence'), ('fpr_noise', 'FPR noise'), ('fpr_offscreen', 'FPR off-screen'),
                    ('G-mIoU', 'G-mIoU'), ('G-F', 'G-F'), ('stored_fpr_silence', 'stored silent clips: FPR'),
                    ('stored_fpr_noise', 'stored noise-only: FPR'), ('stored_fpr_offscreen', 'stored off-screen-only: FPR'))


def _mean_std(values) -> tuple[float, float]:
  values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
  if not values:
    return float('nan'), float('nan')
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: list[dict], variants, snrs) -> dict:
  by = {v: [r for r in results if r['variant'] == v] for v in variants}
  summary = {}
  for v, runs in by.items():
    entry = {'n': len(runs)}
    for key in ('test', 'test_shuffled_audio', 'restarts_per_100', 'vq_global_sqerr', 'vq_local_sqerr'):
      entry[key] = _mean_std([r.get(key) for r in runs])
    entry['drop'] = _mean_std([r['test'] - r['test_shuffled_audio'] for r in runs])
    for key, _ in DIAGNOSTICS:
      entry[key] = _mean_std([r.get('bottleneck', {}).get(key) for r in runs])
    entry['noise'] = {s: _mean_std([r['noise'].get(s) for r in runs]) for s in ['clean'] + [f'{x:g}' for x in snrs]}
    entry['negative_audio'] = {key: _mean_std([r.get('negative_audio', {}).get(key) for r in runs])
                               for key, _ in NEGATIVE_COLUMNS}
    summary[v] = entry
  return summary


def _table(caption: str, labels: list[str], rows: dict[str, list[str]]) -> list[str]:
  """A captioned markdown table with one row per variant (the lines, preceded by a blank one)."""
  return (['', caption, '', '| variant | ' + ' | '.join(labels) + ' |', '|---' * (1 + len(labels)) + '|']
          + [f'| {v} | ' + ' | '.join(cells) + ' |' for v, cells in rows.items()])


def markdown(results, summary, variants, snrs, metric: str, header: str) -> str:
  fmt = lambda ms: '–' if math.isnan(ms[0]) else f'{ms[0]:.3f} ± {ms[1]:.3f}'  # noqa: E731
  fmt2 = lambda ms: '–' if math.isnan(ms[0]) else f'{ms[0]:.2f}'  # noqa: E731
  lines = [header, '',
           f'| variant | what | test {metric} | with shuffled audio | drop | ' + ' | '.join(f'SNR {s:g} dB' for s in snrs)
           + ' | paper (AVSS) |', '|---' * (6 + len(snrs)) + '|']
  for v in variants:
    s = summary[v]
    paper = f'{PAPER_TABLE2[v]:.1f}' if v in PAPER_TABLE2 else ''
    lines.append(f'| {v} | {ROW.get(v, "")} | {fmt(s["test"])} | {fmt(s["test_shuffled_audio"])} | {fmt(s["drop"])} | '
                 + ' | '.join(fmt(s['noise'][f'{x:g}']) for x in snrs) + f' | {paper} |')
  lines += _table('The bottleneck (test split; docs/DESIGN.md §1.6): per-slot code perplexity, code→class '
                  'normalised MI (plug-in, and held out), held-out probe R² of the sounding classes from the '
                  'codes and from the continuous tokens; from the training log: codeword restarts per 100 '
                  'steps, and the quantization errors over the last 100 steps (per clip, Σ over slots of '
                  '‖code − token‖² / d, and the same over the frames for the local tokens; on the √d sphere '
                  'each token adds 2(1 − cos)). Means over seeds.',
                  [label for _, label in DIAGNOSTICS] + ['restarts / 100 steps', 'quant. error global',
                                                         'quant. error local'],
                  {v: [fmt2(summary[v][key]) for key, _ in DIAGNOSTICS]
                   + [fmt2(summary[v][key]) for key in ('restarts_per_100', 'vq_global_sqerr', 'vq_local_sqerr')]
                   for v in variants})
  lines += _table('Negative audio (test split; docs/DESIGN.md §5.1): the FPR with silence, noise and off-screen '
                  'audio (every predicted pixel is false: nothing visible sounds) beside the foreground fraction '
                  "predicted with each clip's own audio, and the harmonic means G-mIoU, G-F; then the FPR on the "
                  "dataset's own negative clips (test_silence, test_noise, test_offscreen; – where a run's report "
                  'predates them or the dataset has none).',
                  [label for _, label in NEGATIVE_COLUMNS],
                  {v: [fmt(summary[v]['negative_audio'][key]) for key, _ in NEGATIVE_COLUMNS] for v in variants})
  lines += ['', f'Per seed (test {metric}):', '', '| variant | ' + ' | '.join(
      f'seed {r["seed"]}' for r in results if r['variant'] == variants[0]) + ' |',
      '|---' * (1 + sum(r['variant'] == variants[0] for r in results)) + '|']
  for v in variants:
    lines.append(f'| {v} | ' + ' | '.join(f'{r["test"]:.3f}' for r in results if r['variant'] == v) + ' |')
  return '\n'.join(lines) + '\n'


def plot(path: str, summary, variants, snrs, metric: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(10, 3.8), dpi=100)
  FigureCanvasAgg(fig)
  left, right = fig.subplots(1, 2)
  means = [summary[v]['test'][0] for v in variants]
  stds = [summary[v]['test'][1] for v in variants]
  left.bar(range(len(variants)), means, yerr=stds, capsize=3, color=['C0' if v in TABLE2 else 'C1' for v in variants])
  left.set_xticks(range(len(variants)), variants, rotation=35, ha='right', fontsize=8)
  left.set_ylabel(f'test {metric}')
  left.set_title('variants (mean ± std over seeds)', fontsize=9)
  for i, v in enumerate(variants):
    ys = [summary[v]['noise'][f'{x:g}'][0] for x in snrs]
    right.plot(snrs, ys, 'o-', color=f'C{i % 10}', label=v)
  right.invert_xaxis()
  right.set_xlabel('SNR of added noise (dB)')
  right.set_ylabel(f'test {metric}')
  right.set_title('noise robustness (Fig. 7)', fontsize=9)
  right.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--config', default='configs/synthetic.py')
  parser.add_argument('--recipe', default='shipped', choices=sorted(RECIPES),
                      help="the codebook recipe the variants start from: the config's ('shipped'), or one "
                           'that earlier tables were measured with on configs/synthetic.py (before_warmup: '
                           'K = 32, λ_com = 0.25, no warm-up; warmup_32: the same with the warm-up)')
  parser.add_argument('--variants', default=','.join(TABLE2))
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--steps', type=int, default=0, help='steps per run (0: the config\'s total_steps)')
  parser.add_argument('--snrs', default='20,10,0,-10')
  parser.add_argument('--test_split', default='test')
  parser.add_argument('--negative_fraction', type=float, default=None,
                      help="train every run with this fraction of negative clips (data.negative_fraction; "
                           "default: the config's)")
  parser.add_argument('--data_dir', default='', help='TFDS dir shared by all runs (default OUT/tfds)')
  parser.add_argument('--reevaluate', nargs='?', const=','.join(EVAL_KINDS), default=None,
                      help='evaluate finished runs again (their final checkpoint) instead of reading their '
                           f'reports: every evaluation, or those named ({",".join(EVAL_KINDS)}; e.g. '
                           '"--reevaluate test" for the bottleneck diagnostics alone)')
  parser.add_argument('--verbosity', type=int, default=0)
  parser.add_argument('--debug', action='store_true')
  args = parser.parse_args(argv)
  console.setup(args.verbosity)
  with console.user_errors(args.debug):
    variants = [v for v in args.variants.split(',') if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
      raise ValueError(f'unknown variants {unknown}; known: {sorted(VARIANTS)}')
    reevaluate = () if args.reevaluate is None else tuple(k for k in args.reevaluate.split(',') if k)
    if args.reevaluate is not None and not reevaluate:
      raise ValueError(f'--reevaluate: name the evaluations to redo ({",".join(EVAL_KINDS)}), or give the flag '
                       'alone to redo all of them')
    if set(reevaluate) - set(EVAL_KINDS):
      raise ValueError(f'--reevaluate {args.reevaluate}: unknown {sorted(set(reevaluate) - set(EVAL_KINDS))}; '
                       f'known: {",".join(EVAL_KINDS)}')
    seeds = [int(s) for s in args.seeds.split(',') if s]
    snrs = [float(s) for s in args.snrs.split(',') if s]
    os.makedirs(args.out, exist_ok=True)
    base = base_config(args.config, args.recipe, args.negative_fraction)
    data_dir = args.data_dir or os.path.join(args.out, 'tfds')
    # Every finished run is checked before anything trains, so that a stale one fails the command at once.
    for variant in variants:
      for seed in seeds:
        workdir, config = run_dir(args.out, variant, seed), run_config(base, variant, seed, args.steps, data_dir)
        if os.path.exists(done_report(workdir, config, args.test_split)):
          check_finished_run(workdir, variant, config)
    results = []
    for variant in variants:
      for seed in seeds:
        results.append(run_one(base, variant, seed, args.out, args.steps, snrs, data_dir, args.test_split,
                               reevaluate))
        logging.info('%s seed %d: test %s %.4f (shuffled audio %.4f)', variant, seed, results[-1]['metric'],
                     results[-1]['test'], results[-1]['test_shuffled_audio'])
    metric = results[0]['metric']
    summary = summarize(results, variants, snrs)
    steps = results[0]['steps']
    header = (f'# Ablation on {args.config}: {steps} steps per run, seeds {seeds}\n\n'
              f'Command: python -m qdformer_jax.experiments.ablation --out {args.out} --config {args.config} '
              f'--variants {",".join(variants)} --seeds {args.seeds} --steps {args.steps} --snrs {args.snrs}'
              + (f' --negative_fraction {args.negative_fraction:g}' if args.negative_fraction is not None else '')
              + (f' --recipe {args.recipe}' if args.recipe != 'shipped' else ''))
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
      json.dump({'command': sys.argv, 'runs': results, 'summary': summary}, f, indent=2)
    table = markdown(results, summary, variants, snrs, metric, header)
    with open(os.path.join(args.out, 'results.md'), 'w') as f:
      f.write(table)
    plot(os.path.join(args.out, 'results.png'), summary, variants, snrs, metric)
    print(table)
    print(f'wrote {args.out}/results.json, results.md, results.png')
  return 0


if __name__ == '__main__':
  sys.exit(main())
