"""From the model's per-slot outputs to per-pixel predictions (docs/DESIGN.md §3), used alike by the
evaluator (at the evaluation size) and the predictor (at the input's size). Jittable.

Mask logits [B,T,N,h,w] are upsampled bilinearly to height×width, then
  binary:   probability(x) = max_i σ(class_{i,t}) · σ(M_{i,t}(x)); mask = probability > threshold;
  semantic: score(x, c) = max_i σ(class_{i,t}(c)) · σ(M_{i,t}(x)); label = argmax_c + 1, or 0
            (background) where the best score < threshold.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_THRESHOLD = 0.5


def upsample_masks(mask_logits, height: int, width: int):
  """[..., h, w] mask logits -> [..., height, width], bilinear."""
  return jax.image.resize(mask_logits, mask_logits.shape[:-2] + (height, width), 'bilinear')


def binary_probability(outputs, height: int, width: int):
  """max_i σ(class_{i,t}) · σ(M_{i,t}) -> [B,T,height,width] foreground probability."""
  cls = jax.nn.sigmoid(outputs['pred_logits'][..., 0])                            # [B,T,N]
  masks = jax.nn.sigmoid(upsample_masks(outputs['pred_masks'], height, width))    # [B,T,N,H,W]
  return jnp.max(cls[..., None, None] * masks, axis=2)


def semantic_scores(outputs, height: int, width: int):
  """(label int32 [B,T,H,W] of the best class, 1-based; its score float32 [B,T,H,W]).

  For a fixed slot i the best class does not depend on x (σ(M) ≥ 0 scales every class alike), so
  the [C, H, W] score volume is never formed: score_i(x) = σ(M_i(x)) · max_c p_i(c).
  """
  probs = jax.nn.sigmoid(outputs['pred_logits'])                                   # [B,T,N,C]
  best_p, best_c = probs.max(-1), probs.argmax(-1)                                 # [B,T,N]
  masks = jax.nn.sigmoid(upsample_masks(outputs['pred_masks'], height, width))    # [B,T,N,H,W]
  scores = masks * best_p[..., None, None]
  slot = scores.argmax(axis=2)                                                     # [B,T,H,W]
  score = scores.max(axis=2)
  label = jnp.take_along_axis(best_c[..., None, None], slot[:, :, None], axis=2)[:, :, 0] + 1
  return label.astype(jnp.int32), score


def semantic_labels(outputs, height: int, width: int, threshold=DEFAULT_THRESHOLD):
  """int32 [B,T,H,W] class ids: the best class, background (0) where its score < threshold."""
  label, score = semantic_scores(outputs, height, width)
  return jnp.where(score >= threshold, label, 0).astype(jnp.int32)


def postprocess(outputs: dict, threshold=DEFAULT_THRESHOLD, *, height: int, width: int, binary: bool) -> dict:
  """binary: {'probability', 'mask'}; semantic: {'labels', 'scores'} (the best score per pixel)."""
  if binary:
    probability = binary_probability(outputs, height, width)
    return {'probability': probability, 'mask': probability > threshold}
  label, score = semantic_scores(outputs, height, width)
  return {'labels': jnp.where(score >= threshold, label, 0).astype(jnp.int32), 'scores': score}
