"""Does the bottleneck carry the audio? Diagnostics of the per-frame tokens the decoder queries come from.

Accumulated on the device in the eval step (sums across batches, like the metrics), finalized on the
host. For every valid frame: its sounding classes y ∈ {0,1}^C (the classes present in its ground
truth), the N continuous tokens the decoder queries are made from (local tokens, or the global tokens
where there is no local calibration, or the baseline's audio-conditioned queries) and, for quantized
models, their N code indices.

  slot_perplexity   mean over slots of the perplexity of each slot's code histogram (1: every slot
                    keeps one code whatever it hears; slot identity alone gives 1 here, N pooled)
  code_class_mi     mean over classes c of max over slots n of I(code_n; y_c) / H(y_c): the fraction
                    of the uncertainty about "does c sound in this frame" that the best slot's code
                    removes (plug-in estimate from the histograms; biased upwards by about
                    (K_used − 1) / (2·M·ln 2) bits for M frames, so it grows with K by itself)
  code_class_mi_heldout
                    the same fraction measured on frames the estimate did not see: per class, the best
                    slot (by leave-one-out log loss) and p(y_c | code) (one pseudo-frame at the class's
                    base rate) are taken from one fold and the log loss they give is scored on the
                    other, against the log loss of
                    the base rate alone (1 − loss_code / loss_base, pooled over both directions);
                    ≤ 0 when the codes tell nothing that holds beyond the frames they were counted on
  probe_r2_codes    held-out R² of a ridge probe from the one-hot codes (N·K features) to y, the best
                    over a grid of ridge strengths (RIDGES)
  probe_r2_tokens   the same probe from the continuous tokens (N·d features): what the codes could say

Probes are fitted on the frames of even batch rows and scored on the odd ones and the reverse (two
folds, pooled), from the sufficient statistics XᵀX, XᵀY, YᵀY of each fold, so nothing but sums
leaves the device; the held-out MI uses the same folds' histograms. Choosing one of the five ridge
strengths on the scored folds favours the probe a little, the same way for codes and tokens.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # ridge strengths, relative to the mean diagonal of XᵀX
PSEUDO_FRAMES = 1.0  # the held-out MI's smoothing of p(y_c | code) towards the class's base rate


def class_presence(semantic: jax.Array, num_classes: int) -> jax.Array:
  """semantic ids [B,T,H,W] (0 background, 1..C classes) -> y [B,T,C] float (class c+1 present)."""
  ids = jnp.arange(1, num_classes + 1, dtype=semantic.dtype)
  return jnp.any(semantic[..., None] == ids, axis=(-3, -2)).astype(jnp.float32)


def _fold_stats(x, y, w):
  """XᵀX, XᵀY, YᵀY (with a bias column in X) over rows weighted by w (0 or 1)."""
  x = jnp.concatenate([x, jnp.ones_like(x[:, :1])], axis=1) * w[:, None]
  yw = y * w[:, None]
  return {'xx': x.T @ x, 'xy': x.T @ yw, 'yy': jnp.sum(yw * y, 0), 'y': jnp.sum(yw, 0), 'n': jnp.sum(w)}


def accumulate(bottleneck: dict, semantic: jax.Array, valid: jax.Array, *, num_classes: int,
               num_codes: int) -> dict:
  """Sums of one eval batch. bottleneck: the model's ``bottleneck`` output ({'tokens' [B,T,N,d],
  optional 'indices' [B,T,N]}); semantic [B,T,H,W]; valid [B,T] (frames with ground truth)."""
  tokens = bottleneck['tokens'].astype(jnp.float32)
  b, t, n, d = tokens.shape
  y = class_presence(semantic, num_classes).reshape(b * t, num_classes)
  w = valid.reshape(b * t).astype(jnp.float32)
  even = jnp.repeat((jnp.arange(b) % 2 == 0), t).astype(jnp.float32)
  folds = (w * even, w * (1.0 - even))
  x_tok = tokens.reshape(b * t, n * d)
  sums = {'tokens': [_fold_stats(x_tok, y, f) for f in folds]}
  if bottleneck.get('indices') is not None:
    onehot = jax.nn.one_hot(bottleneck['indices'].reshape(b * t, n), num_codes, dtype=jnp.float32)  # [M,N,K]
    sums['codes'] = [_fold_stats(onehot.reshape(b * t, n * num_codes), y, f) for f in folds]
    # Per fold, the joint histogram per slot of (code, class present) and the code histogram:
    # [2,N,K,C], [2,N,K].
    weighted = onehot[None] * jnp.stack(folds)[:, :, None, None]
    sums['code_class'] = jnp.einsum('fmnk,mc->fnkc', weighted, y)
    sums['code_count'] = jnp.sum(weighted, 1)
  return sums


def _probe_r2(folds, ridge: float) -> float:
  """Two-fold held-out R² (pooled over classes) of a ridge probe, from each fold's statistics."""
  sse = sst = 0.0
  for fit, score in ((folds[0], folds[1]), (folds[1], folds[0])):
    xx, xy = np.asarray(fit['xx'], np.float64), np.asarray(fit['xy'], np.float64)
    if float(fit['n']) < 1 or float(score['n']) < 1:
      return float('nan')
    strength = ridge * max(float(np.mean(np.diag(xx))), 1e-12)
    w = np.linalg.solve(xx + strength * np.eye(xx.shape[0]), xy)
    sxx, sxy = np.asarray(score['xx'], np.float64), np.asarray(score['xy'], np.float64)
    syy, sy, n = np.asarray(score['yy'], np.float64), np.asarray(score['y'], np.float64), float(score['n'])
    sse += float(np.sum(w * (sxx @ w)) - 2.0 * np.sum(w * sxy) + np.sum(syy))
    sst += float(np.sum(syy - sy ** 2 / n))
  return 1.0 - sse / sst if sst > 0 else float('nan')


def _best_probe_r2(folds) -> float:
  scores = [_probe_r2(folds, r) for r in RIDGES]
  finite = [x for x in scores if np.isfinite(x)]
  return max(finite) if finite else float('nan')


def _entropy(p):
  p = np.clip(p, 1e-12, 1.0)
  return -np.sum(p * np.log2(p), axis=-1)


def _plugin_mi(count, joint_pos):
  """count [N,K], joint_pos [N,K,C] -> (I(code_n; y_c) / H(y_c) [N,C] (nan where H = 0), probs [N,K])."""
  total = count.sum(-1, keepdims=True)                       # [N,1] valid frames
  probs = count / np.maximum(total, 1.0)
  p_c = joint_pos.sum(1) / np.maximum(total, 1.0)            # [N,C] P(y_c = 1)
  h_c = _entropy(np.stack([p_c, 1 - p_c], -1))               # [N,C]
  p_c_given_k = joint_pos / np.maximum(count[..., None], 1.0)
  h_c_given_k = _entropy(np.stack([p_c_given_k, 1 - p_c_given_k], -1))  # [N,K,C]
  mi = h_c - np.sum(probs[..., None] * h_c_given_k, axis=1)  # [N,C]
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(h_c > 1e-9, mi / h_c, np.nan), probs


def _log_loss(pos, count, p):
  """Σ over frames of −log2 p(y) for ``pos`` positives among ``count`` frames predicted p (broadcast)."""
  p = np.clip(p, 1e-12, 1 - 1e-12)
  return -(pos * np.log2(p) + (count - pos) * np.log2(1 - p))


def _leave_one_out_loss(count, joint_pos, base):
  """count [N,K], joint_pos [N,K,C], base [C] -> [N,C]: the log loss over one fold's frames of
  p(y_c | code_n) smoothed towards ``base``, each frame predicted from the others (so a slot whose many
  codes only name the frames they were counted on does not look informative, as it does in plug-in MI)."""
  pos, cnt = joint_pos, count[..., None]                      # [N,K,C], [N,K,1]
  denom = cnt - 1.0 + PSEUDO_FRAMES
  p_pos = (pos - 1.0 + PSEUDO_FRAMES * base) / np.maximum(denom, 1e-12)   # a positive frame, left out
  p_neg = (pos + PSEUDO_FRAMES * base) / np.maximum(denom, 1e-12)         # a negative frame, left out
  loss = -(pos * np.log2(np.clip(p_pos, 1e-12, 1.0)) + (cnt - pos) * np.log2(np.clip(1.0 - p_neg, 1e-12, 1.0)))
  return np.sum(loss, axis=1)


def _heldout_mi(count, joint_pos) -> float:
  """count [2,N,K], joint_pos [2,N,K,C] per fold -> the cross-fitted code_class_mi_heldout."""
  num_classes = joint_pos.shape[-1]
  loss_code, loss_base = np.zeros(num_classes), np.zeros(num_classes)
  present = np.zeros((2, num_classes), bool)
  for fit, score in ((0, 1), (1, 0)):
    frames = count[fit, 0].sum()                              # every slot sees every valid frame
    base = (joint_pos[fit, 0].sum(0) + 0.5) / (frames + 1.0)  # [C] the class's base rate (KT estimate)
    best = np.argmin(_leave_one_out_loss(count[fit], joint_pos[fit], base), axis=0)   # [C] slot chosen on fit
    cls = np.arange(num_classes)
    fit_pos, fit_count = joint_pos[fit][best, :, cls], count[fit][best]               # [C,K], [C,K]
    p_given_k = (fit_pos + PSEUDO_FRAMES * base[:, None]) / (fit_count + PSEUDO_FRAMES)
    score_pos, score_count = joint_pos[score][best, :, cls], count[score][best]       # [C,K], [C,K]
    loss_code += np.sum(_log_loss(score_pos, score_count, p_given_k), -1)
    loss_base += _log_loss(score_pos.sum(-1), score_count.sum(-1), base)
    positives = joint_pos[score, 0].sum(0)
    present[score] = (positives > 0) & (positives < count[score, 0].sum())
  scored = present.all(0) & (loss_base > 0)                   # classes both present and absent in both folds
  return float(np.mean(1.0 - loss_code[scored] / loss_base[scored])) if scored.any() else float('nan')


def finalize(sums: dict) -> dict:
  """The host-side figures of the module docstring from the accumulated sums."""
  sums = jax.device_get(sums)
  out = {'probe_r2_tokens': _best_probe_r2(sums['tokens'])}
  if 'codes' not in sums:
    return out
  out['probe_r2_codes'] = _best_probe_r2(sums['codes'])
  count_folds = np.asarray(sums['code_count'], np.float64)       # [2,N,K]
  joint_folds = np.asarray(sums['code_class'], np.float64)      # [2,N,K,C]: code k and class c present
  normalized, probs = _plugin_mi(count_folds.sum(0), joint_folds.sum(0))
  out['slot_perplexity'] = float(np.mean(2.0 ** _entropy(probs)))
  # Per class, the best slot; a class absent (or always present) in every frame has no score.
  scored = np.isfinite(normalized).any(axis=0)               # [C]
  best = np.max(np.where(np.isfinite(normalized), normalized, -np.inf), axis=0)[scored]
  out['code_class_mi'] = float(np.mean(best)) if best.size else float('nan')
  out['code_class_mi_heldout'] = _heldout_mi(count_folds, joint_folds)
  return out
