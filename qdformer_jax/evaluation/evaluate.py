"""Evaluation: jitted eval step with on-device metric sums, reports, overlays, noise sweeps.

The eval step is one XLA program: forward pass, post-processing (DESIGN.md §3) at the evaluation size
and the metric accumulators of ``qdformer_jax.evaluation.metrics`` (the same code as the public metric
functions). The host adds nothing: sums stay on the device across batches and are divided once.

Outputs under DIR/reports/: ``eval_<split>_<step>.json`` (:func:`write_report`), PNG overlays of the
first ``config.eval.num_overlays`` clips (``Evaluator.run(overlay_dir=...)``,
``qdformer_jax.evaluation.overlays``) and, for a noise sweep (``config.eval.noise_snrs``; noise from
``config.eval.noise_dir`` or built-in pink noise, see ``qdformer_jax.evaluation.noise``),
``noise_<split>_<step>.{json,md,png}`` (:func:`write_noise_report`).
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qdformer_jax.data import pipeline
from qdformer_jax.evaluation import metrics as metrics_lib


# -- post-processing (DESIGN.md §3) ----------------------------------------------------------------

def upsample_masks(mask_logits, size: int):
  """[..., h, w] mask logits -> [..., size, size], bilinear."""
  return jax.image.resize(mask_logits, mask_logits.shape[:-2] + (size, size), 'bilinear')


def binary_probability(outputs, size: int):
  """max_i σ(class_{i,t}) · σ(M_{i,t}) -> [B,T,size,size] foreground probability."""
  cls = jax.nn.sigmoid(outputs['pred_logits'][..., 0])                       # [B,T,N]
  masks = jax.nn.sigmoid(upsample_masks(outputs['pred_masks'], size))        # [B,T,N,S,S]
  return jnp.max(cls[..., None, None] * masks, axis=2)


def semantic_labels(outputs, size: int, threshold: float = 0.5):
  """argmax_c max_i p_{i,t}(c) σ(M_{i,t}(x)), background where the best score < threshold.

  For a fixed slot i the best class does not depend on x (σ(M) ≥ 0 scales every class alike), so
  the [C, H, W] score volume is never formed: score_i(x) = σ(M_i(x)) · max_c p_i(c).
  """
  probs = jax.nn.sigmoid(outputs['pred_logits'])                              # [B,T,N,C]
  best_p, best_c = probs.max(-1), probs.argmax(-1)                             # [B,T,N]
  masks = jax.nn.sigmoid(upsample_masks(outputs['pred_masks'], size))        # [B,T,N,S,S]
  scores = masks * best_p[..., None, None]
  slot = scores.argmax(axis=2)                                                 # [B,T,S,S]
  score = scores.max(axis=2)
  label = jnp.take_along_axis(best_c[..., None, None], slot[:, :, None], axis=2)[:, :, 0] + 1
  return jnp.where(score >= threshold, label, 0).astype(jnp.int32)


def shifted_among_valid(clip_valid):
  """Index [B] that gives real clip i the audio of real clip i+1 (cyclically); padding clips keep
  their own. Real clips come first in every eval batch (the padding copies are appended), so no real
  clip hears a padding copy, which may be a copy of itself. A batch with a single real clip keeps
  its audio (nothing to swap with)."""
  index = jnp.arange(clip_valid.shape[0])
  count = jnp.maximum(jnp.sum(clip_valid.astype(jnp.int32)), 1)
  return jnp.where(index < count, (index + 1) % count, index)


# -- the evaluator ---------------------------------------------------------------------------------

class Evaluator:
  """Runs one split through the jitted eval step; ``run`` returns the finalized metrics."""

  def __init__(self, config, mesh, graphdef):
    self.config = config
    self.mesh = mesh
    self.graphdef = graphdef
    self.binary = bool(config.data.binary)
    self.size = int(config.data.image_size)
    self.group = int(config.eval.official_batch_clips) * int(config.data.num_frames)
    if self.binary and (config.eval.official_batch_clips < 1
                        or config.eval_batch_size % config.eval.official_batch_clips):
      # Checked here, before training starts, not at the first evaluation hours later.
      raise ValueError(
          f'config.eval_batch_size={config.eval_batch_size} must be a multiple of '
          f'config.eval.official_batch_clips={config.eval.official_batch_clips}: the official AVSBench '
          'F-score takes its max over thresholds per test batch of that many clips. Set '
          '--config.eval_batch_size to a multiple of it (or change official_batch_clips).')
    self._steps = {}
    self._sums_template = None

  def _step(self, shuffle_audio: bool):
    if shuffle_audio in self._steps:
      return self._steps[shuffle_audio]
    config, binary, size, group = self.config, self.binary, self.size, self.group
    graphdef = self.graphdef

    def eval_step(state, batch, sums):
      model, _ = nnx.merge(graphdef, state)
      log_mel = batch['log_mel']
      if shuffle_audio:
        log_mel = log_mel[shifted_among_valid(batch['clip_valid'])]
      outputs = model(batch['frames'], log_mel, batch['frame_valid'], train=False)
      valid = batch['gt_valid'] & batch['frame_valid'] & batch['clip_valid'][:, None]
      if binary:
        prob = binary_probability(outputs, size)
        new = metrics_lib.binary_accumulate(prob, batch['semantic'], valid, group_size=group)
        preds = (prob > 0.5).astype(jnp.int32)
      else:
        preds = semantic_labels(outputs, size)
        padded = (~batch['frame_valid']) & batch['clip_valid'][:, None]
        new = metrics_lib.semantic_accumulate(
            preds, batch['semantic'], valid, padded, num_classes=config.data.num_classes + 1,
            keep_padded=bool(config.eval.keep_padded_frames))
      sums = new if sums is None else jax.tree.map(jnp.add, sums, new)
      return sums, preds

    replicated = NamedSharding(self.mesh, P())
    step = jax.jit(eval_step, out_shardings=(replicated, None))
    self._steps[shuffle_audio] = step
    return step

  def _zero_sums(self, eval_step, state, batch):
    """Zero metric sums of the step's output structure, so the step always gets (and compiles
    for) a sums pytree: one executable per Evaluator and shuffle mode."""
    if self._sums_template is None:
      self._sums_template = jax.eval_shape(eval_step, state, batch, None)[0]
    replicated = NamedSharding(self.mesh, P())
    return jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), replicated),
                        self._sums_template)

  def run(self, state, split: str, step: int, *, shuffle_audio: bool = False,
          noise_snr: float | None = None, overlay_dir: str | None = None, writer=None) -> dict:
    """Evaluates ``state`` on ``split``; returns the finalized metrics plus run facts.

    shuffle_audio: give every real clip the next real clip's audio (the audio-use check that eval
      mode runs beside the plain evaluation when ``config.eval.shuffle_audio`` is set).
    noise_snr: mix background noise into every clip's waveform at this SNR (dB) before the
      log-mel (noise from ``config.eval.noise_dir``, else pink; seed ``config.eval.noise_seed``).
    overlay_dir: write PNG overlays of the first ``config.eval.num_overlays`` clips there (process
      0 only); with a TensorBoard ``writer`` they are also logged as images at ``step``.
    """
    from qdformer_jax.training.train import to_global
    config = self.config
    data_config = config.data
    if noise_snr is not None:
      data_config = data_config.copy_and_resolve_references()
      with data_config.unlocked():
        data_config.noise_snr_db = float(noise_snr)
        data_config.noise_seed = int(config.eval.noise_seed)
        data_config.noise_dir = config.eval.get('noise_dir') or None
    iterator, total = pipeline.make_eval_iterator(
        data_config, split, global_batch_size=config.eval_batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), limit=config.eval.limit or None)
    eval_step = self._step(shuffle_audio)
    num_overlays = int(config.eval.num_overlays) if overlay_dir and jax.process_index() == 0 else 0
    t0 = time.time()
    sums, overlays, collected = None, [], 0
    for host_batch in iterator:
      batch = to_global(pipeline.device_batch(host_batch), self.mesh)
      if sums is None:
        sums = self._zero_sums(eval_step, state, batch)
      sums, preds = eval_step(state, batch, sums)
      if collected < num_overlays:
        shard = np.asarray(jax.device_get(preds.addressable_shards[0].data))
        overlays.append((host_batch, shard))
        collected += int(np.sum(host_batch['clip_valid'][:shard.shape[0]]))
    results = metrics_lib.finalize(jax.device_get(sums))
    results.update(num_clips=total, eval_seconds=round(time.time() - t0, 2), shuffle_audio=shuffle_audio)
    if noise_snr is not None:
      results['noise_snr_db'] = float(noise_snr)
    if overlays:
      from qdformer_jax.evaluation import overlays as overlays_lib
      overlays_lib.write_overlays(overlay_dir, overlays, config, limit=num_overlays, writer=writer,
                                  tag=f'overlays_{split}', step=step)
    logging.info('eval %s@%d: %s', split, step, {k: v for k, v in results.items() if isinstance(v, float)})
    return results


# -- reports ---------------------------------------------------------------------------------------

METRIC_MODES = {
    'J': 'AVSBench J: frame-mean IoU, empty-GT frames score the empty fraction of the prediction',
    'F_official_per_batch': 'AVSBench F (beta2=0.3, 255 thresholds), official per-batch max',
    'F_dataset': 'AVSBench F, max over thresholds of the dataset-mean curve',
    'mIoU': 'AVSS mIoU over all classes incl. background, never-seen classes count 0',
    'F': 'AVSS F (beta2=0.3) over all classes, never-seen classes count 0',
    'davis_J': 'DAVIS region J', 'davis_F': 'DAVIS boundary F (tolerance 0.008 of the diagonal)',
}


def make_writer(workdir: str):
  from tensorboardX import SummaryWriter
  return SummaryWriter(os.path.join(workdir, 'tensorboard'))


def _report_header(config, split: str, step: int) -> dict:
  return {'config': config.name, 'dataset': f'{config.data.name}/{config.data.builder_config}',
          'split': split, 'step': int(step)}


def _write_json(workdir: str, name: str, report: dict) -> str:
  """DIR/reports/<name>; returns its path."""
  out = os.path.join(workdir, 'reports')
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, name)
  with open(path, 'w') as f:
    json.dump(report, f, indent=2)
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
  path = _write_json(workdir, f'eval_{name}_{step}.json', report)
  _write_json(workdir, f'eval_{name}_latest.json', report)
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
  return _write_json(workdir, f'audio_use_{split}_{step}.json', report)


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

  from qdformer_jax.evaluation import noise as noise_lib
  names = [k for k in METRIC_MODES if isinstance(clean_results.get(k), float)]
  if not names:
    raise ValueError(f'write_noise_report: clean_results has none of the metrics {list(METRIC_MODES)}')
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
            'modes': {k: METRIC_MODES[k] for k in names}}
  out = os.path.join(workdir, 'reports')
  os.makedirs(out, exist_ok=True)
  base = os.path.join(out, f'noise_{split}_{step}')
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
    from qdformer_jax.evaluation.overlays import figure_to_array
    writer.add_image(f'noise_{split}/plot', figure_to_array(fig), step, dataformats='HWC')
    writer.flush()
  return paths
