"""Evaluation: jitted eval step with on-device metric sums, reports, overlays, noise sweeps.

The eval step is one XLA program: forward pass, post-processing (DESIGN.md §3) at the evaluation size
and the metric accumulators of ``qdformer_jax.evaluation.metrics`` (the same code as the public metric
functions). The host only adds nothing: sums stay on the device across batches and are divided once.
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
    self._steps = {}

  def _step(self, shuffle_audio: bool):
    if shuffle_audio in self._steps:
      return self._steps[shuffle_audio]
    config, binary, size, group = self.config, self.binary, self.size, self.group
    graphdef = self.graphdef

    def eval_step(state, batch, sums):
      model, _ = nnx.merge(graphdef, state)
      log_mel = batch['log_mel']
      if shuffle_audio:  # every clip hears another clip of the batch
        log_mel = jnp.roll(log_mel, 1, axis=0)
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

  def run(self, state, split: str, step: int, *, shuffle_audio: bool | None = None,
          noise_snr: float | None = None, overlay_dir: str | None = None) -> dict:
    from qdformer_jax.training.train import to_global
    config = self.config
    shuffle_audio = bool(config.eval.shuffle_audio) if shuffle_audio is None else shuffle_audio
    data_config = config.data
    if noise_snr is not None:
      data_config = data_config.copy_and_resolve_references()
      with data_config.unlocked():
        data_config.noise_snr_db = float(noise_snr)
        data_config.noise_seed = int(config.eval.noise_seed)
    iterator, total = pipeline.make_eval_iterator(
        data_config, split, global_batch_size=config.eval_batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), limit=config.eval.limit or None)
    eval_step = self._step(shuffle_audio)
    t0 = time.time()
    sums, overlays = None, []
    for host_batch in iterator:
      batch = to_global(pipeline.device_batch(host_batch), self.mesh)
      sums, preds = eval_step(state, batch, sums)
      if len(overlays) < config.eval.num_overlays and jax.process_index() == 0 and overlay_dir:
        overlays.append((host_batch, np.asarray(jax.device_get(preds.addressable_shards[0].data))))
    results = metrics_lib.finalize(jax.device_get(sums))
    results.update(num_clips=total, eval_seconds=round(time.time() - t0, 2), shuffle_audio=shuffle_audio)
    if noise_snr is not None:
      results['noise_snr_db'] = float(noise_snr)
    if overlays:
      from qdformer_jax.evaluation import overlays as overlays_lib
      overlays_lib.write_overlays(overlay_dir, overlays, config, limit=config.eval.num_overlays)
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


def write_report(workdir: str, split: str, step: int, config, results: dict, writer=None) -> str:
  """DIR/reports/eval_<split>_<step>.json and eval_<split>_latest.json (process 0 only)."""
  if jax.process_index() != 0:
    return ''
  report = {'config': config.name, 'dataset': f'{config.data.name}/{config.data.builder_config}',
            'split': split, 'step': int(step), 'metrics': results,
            'modes': {k: v for k, v in METRIC_MODES.items() if k in results}}
  out = os.path.join(workdir, 'reports')
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, f'eval_{split}_{step}.json')
  for p in (path, os.path.join(out, f'eval_{split}_latest.json')):
    with open(p, 'w') as f:
      json.dump(report, f, indent=2)
  if writer is not None:
    for k, v in results.items():
      if isinstance(v, float):
        writer.add_scalar(f'eval_{split}/{k}', v, step)
    writer.flush()
  return path
