"""The jitted evaluator: one split through one XLA program per mode, metric sums on the device.

The eval step is the forward pass, the post-processing of ``postprocess.py`` at the evaluation size
and the metric accumulators of ``metrics.py`` (the same code as the public metric functions). The
host adds nothing: sums stay on the device across batches and are divided once. What the results
become on disk (reports, overlays, plots) is each evaluation kind's module (``kinds/``); which
evaluations run when is ``evals.py``.
"""
from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qdformer_jax import sharding
from qdformer_jax.data import negatives, pipeline
from qdformer_jax.data import noise as noise_lib
from qdformer_jax.evaluation import bottleneck as bottleneck_lib
from qdformer_jax.evaluation import metrics as metrics_lib
from qdformer_jax.evaluation import postprocess


def shifted_among_valid(clip_valid):
  """Index [B] that gives real clip i the audio of real clip i+1 (cyclically); padding clips keep
  their own. Real clips come first in every eval batch (the padding copies are appended), so no real
  clip hears a padding copy, which may be a copy of itself. A batch with a single real clip keeps
  its audio (nothing to swap with)."""
  index = jnp.arange(clip_valid.shape[0])
  count = jnp.maximum(jnp.sum(clip_valid.astype(jnp.int32)), 1)
  return jnp.where(index < count, (index + 1) % count, index)


def check_eval_batch(config) -> None:
  """The official AVSBench F groups ``eval.official_batch_clips`` clips: the eval batch must hold
  whole groups. Checked before training starts, not at the first evaluation hours later."""
  if config.data.binary and (config.eval.official_batch_clips < 1
                             or config.eval_batch_size % config.eval.official_batch_clips):
    raise ValueError(
        f'config.eval_batch_size={config.eval_batch_size} must be a multiple of '
        f'config.eval.official_batch_clips={config.eval.official_batch_clips}: the official AVSBench '
        'F-score takes its max over thresholds per test batch of that many clips. Set '
        '--config.eval_batch_size to a multiple of it (or change official_batch_clips).')


class Evaluator:
  """Runs one split through the jitted eval step; ``run`` returns the finalized metrics.
  ``graphdef``: the model's (``nnx.split(model)``); ``run`` takes the model's state."""

  def __init__(self, config, mesh, graphdef):
    check_eval_batch(config)
    self.config = config
    self.mesh = mesh
    self.graphdef = graphdef
    self.binary = bool(config.data.binary)
    self.size = int(config.data.image_size)
    self.group = int(config.eval.official_batch_clips) * int(config.data.num_frames)
    # Post-processing thresholds scored in the same pass as the main one (metric sums per threshold).
    self.sweep = tuple(float(t) for t in config.eval.thresholds or ())
    self._steps = {}
    self._sums_template = None

  def _step(self, shuffle_audio: bool):
    if shuffle_audio in self._steps:
      return self._steps[shuffle_audio]
    config, binary, size, group = self.config, self.binary, self.size, self.group
    graphdef, sweep = self.graphdef, jnp.asarray(self.sweep, jnp.float32)
    num_ids = config.data.num_classes + 1
    keep_padded = bool(config.eval.keep_padded_frames)

    def eval_step(state, batch, sums, threshold):
      model = nnx.merge(graphdef, state)
      log_mel = batch['log_mel']
      if shuffle_audio:
        log_mel = log_mel[shifted_among_valid(batch['clip_valid'])]
      outputs = model(batch['frames'], log_mel, batch['frame_valid'], train=False)
      valid = batch['gt_valid'] & batch['frame_valid'] & batch['clip_valid'][:, None]
      if binary:
        prob = postprocess.binary_probability(outputs, size, size)
        new = metrics_lib.binary_accumulate(prob, batch['semantic'], valid, group_size=group, threshold=threshold)
        preds = (prob > threshold).astype(jnp.int32)
        # The sweep: J at every threshold (AVSBench F already takes its max over thresholds).
        swept = jax.vmap(lambda t: metrics_lib.avsbench_j_accumulate(
            prob, batch['semantic'], valid, group_size=group, threshold=t))(sweep)
      else:
        label, score = postprocess.semantic_scores(outputs, size, size)
        padded = (~batch['frame_valid']) & batch['clip_valid'][:, None]

        def accumulate(t):
          return metrics_lib.semantic_accumulate(
              jnp.where(score >= t, label, 0), batch['semantic'], valid, padded, num_classes=num_ids,
              keep_padded=keep_padded)
        preds = jnp.where(score >= threshold, label, 0).astype(jnp.int32)
        new = accumulate(threshold)
        swept = jax.lax.map(accumulate, sweep)  # sequential: one [C]-histogram pass per threshold
      # What is predicted at all: foreground pixels and frames with any mask (valid frames only); on
      # clips whose audio has nothing visible sounding, the false positive rate.
      foreground = (preds > 0) & valid[:, :, None, None]
      new = {'metrics': new, 'sweep': swept, 'predicted': {
          'foreground_pixels': jnp.sum(foreground, dtype=jnp.float32),
          'pixels': jnp.sum(valid, dtype=jnp.float32) * size * size,
          'frames_with_mask': jnp.sum(jnp.any(foreground, axis=(2, 3)), dtype=jnp.float32),
          'frames': jnp.sum(valid, dtype=jnp.float32)}}
      if outputs.get('bottleneck') is not None:
        # What the decoder's queries know of the frame's sounding classes (bottleneck.py).
        presence_ids = (batch['semantic'] > 0).astype(jnp.uint8) if binary else batch['semantic']
        new['bottleneck'] = bottleneck_lib.accumulate(
            outputs['bottleneck'], presence_ids, valid, num_classes=1 if binary else config.data.num_classes,
            num_codes=model.num_codes)
      sums = new if sums is None else jax.tree.map(jnp.add, sums, new)
      return sums, preds

    step = jax.jit(eval_step, out_shardings=(sharding.replicated(self.mesh), None))
    self._steps[shuffle_audio] = step
    return step

  def _zero_sums(self, eval_step, state, batch):
    """Zero metric sums of the step's output structure, so the step always gets (and compiles
    for) a sums pytree: one executable per Evaluator and shuffle mode."""
    if self._sums_template is None:
      self._sums_template = jax.eval_shape(eval_step, state, batch, None, np.float32(0.5))[0]
    replicated = sharding.replicated(self.mesh)
    return jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), replicated),
                        self._sums_template)

  def run(self, state, split: str, *, threshold: float = postprocess.DEFAULT_THRESHOLD,
          shuffle_audio: bool = False, noise_condition: noise_lib.Condition | None = None,
          negative: negatives.Negative | None = None, predicted: bool = False, collect: int = 0) -> dict:
    """Evaluates the model ``state`` on ``split``; returns the finalized metrics plus run facts.

    threshold: the post-processing threshold (docs/DESIGN.md §3); a traced input, so every value
      shares one compiled step. ``config.eval.thresholds`` are scored in the same pass, reported
      under ``threshold_sweep``.
    shuffle_audio: give every real clip the next real clip's audio (the audio-use check).
    noise_condition: background noise mixed into every clip's waveform before its audio examples.
    negative: every clip hears silence, noise or another clip's audio and its target is empty.
    collect: keep the host batches and predictions of the first ``collect`` real clips (process 0
      only) under ``results['collected']`` as (host_batch, preds) pairs, for overlays.

    predicted: add ``results['predicted']``: the foreground fraction of the predicted pixels and the
      fraction of frames with any predicted mask (valid frames), whatever the targets.
    """
    config = self.config
    iterator, total = pipeline.make_eval_iterator(
        config.data, split, global_batch_size=config.eval_batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), limit=config.eval.limit or None, noise_condition=noise_condition,
        negative=negative)
    eval_step = self._step(shuffle_audio)
    collect = int(collect) if jax.process_index() == 0 else 0
    t0 = time.time()
    sums, collected, count = None, [], 0
    for host_batch in iterator:
      batch = pipeline.to_global(pipeline.device_batch(host_batch), self.mesh)
      if sums is None:
        sums = self._zero_sums(eval_step, state, batch)
      sums, preds = eval_step(state, batch, sums, np.float32(threshold))
      if count < collect:
        shard = np.asarray(jax.device_get(preds.addressable_shards[0].data))
        collected.append((host_batch, shard))
        count += int(np.sum(host_batch['clip_valid'][:shard.shape[0]]))
    sums = jax.device_get(sums)
    results = metrics_lib.finalize(sums['metrics'])
    results.update(num_clips=total, eval_seconds=round(time.time() - t0, 2), shuffle_audio=shuffle_audio,
                   threshold=float(threshold))
    if predicted:
      counts = sums['predicted']
      results['predicted'] = {
          'foreground_fraction': float(counts['foreground_pixels'] / max(float(counts['pixels']), 1.0)),
          'frames_with_mask': float(counts['frames_with_mask'] / max(float(counts['frames']), 1.0))}
    if self.sweep:
      results['threshold_sweep'] = {
          f'{t:g}': metrics_lib.finalize(jax.tree.map(lambda x, i=i: x[i], sums['sweep']))
          for i, t in enumerate(self.sweep)}
    if 'bottleneck' in sums:
      results['bottleneck'] = bottleneck_lib.finalize(sums['bottleneck'])
    if noise_condition is not None:
      results['noise_snr_db'] = float(noise_condition.snr_db)
    if negative is not None:
      results['negative_audio'] = negative.kind
    logging.debug('eval %s: %s', split, {k: v for k, v in results.items() if isinstance(v, float)})
    if collect:
      results['collected'] = collected
    return results
