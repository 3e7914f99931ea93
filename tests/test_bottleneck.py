"""The bottleneck's diagnostics (evaluation/bottleneck.py) and the slot-conditioned entropy term."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qdformer_jax.evaluation import bottleneck
from qdformer_jax.losses.criterion import slot_entropy_loss


def _semantic(y, size=4):
  """Class-presence [B,T,C] -> id maps [B,T,size,size] where class c+1 covers pixel (0, c)."""
  b, t, c = y.shape
  sem = np.zeros((b, t, size, size), np.uint8)
  for cls in range(c):
    sem[..., 0, cls] = np.where(y[..., cls], cls + 1, 0)
  return sem


def _diagnose(tokens, indices, y, valid, num_codes):
  sums = bottleneck.accumulate({'tokens': jnp.asarray(tokens), 'indices': jnp.asarray(indices)},
                               jnp.asarray(_semantic(y)), jnp.asarray(valid), num_classes=y.shape[-1],
                               num_codes=num_codes)
  return bottleneck.finalize(sums)


def _ridge_r2(x, y, fold):
  """Reference: the two-fold held-out R² of the ridge probe computed on the rows themselves, the best
  over the ridge grid."""
  x = np.concatenate([x, np.ones((len(x), 1))], 1)
  scores = []
  for ridge in bottleneck.RIDGES:
    sse = sst = 0.0
    for a, b in ((fold, ~fold), (~fold, fold)):
      xx = x[a].T @ x[a]
      w = np.linalg.solve(xx + ridge * np.mean(np.diag(xx)) * np.eye(x.shape[1]), x[a].T @ y[a])
      sse += np.sum((x[b] @ w - y[b]) ** 2)
      sst += np.sum((y[b] - y[b].mean(0)) ** 2)
    scores.append(1 - sse / sst)
  return max(scores)


def _mi_bits(codes, labels):
  """Plug-in I(code; label) / H(label) from the rows (reference, by counting)."""
  def h(values):
    _, counts = np.unique(values, return_counts=True, axis=0)
    p = counts / counts.sum()
    return -np.sum(p * np.log2(p))
  h_y = h(labels)
  if h_y < 1e-9:
    return np.nan
  return (h(codes) + h_y - h(np.stack([codes, labels], 1))) / h_y


def _heldout_mi_reference(indices, y, fold):
  """Reference for code_class_mi_heldout, row by row: [M,N] codes, [M,C] presence, [M] fold mask."""
  m, n = indices.shape
  losses = np.zeros((2, y.shape[1]))
  for fit, score in ((fold, ~fold), (~fold, fold)):
    for c in range(y.shape[1]):
      base = (y[fit, c].sum() + 0.5) / (fit.sum() + 1.0)
      loo = []  # per slot: each fit frame predicted from the other fit frames with its code
      for s in range(n):
        total = 0.0
        for row in np.flatnonzero(fit):
          others = fit & (indices[:, s] == indices[row, s])
          others[row] = False
          p = (y[others, c].sum() + bottleneck.PSEUDO_FRAMES * base) / (others.sum() + bottleneck.PSEUDO_FRAMES)
          total -= np.log2(p if y[row, c] else 1 - p)
        loo.append(total)
      slot = int(np.argmin(loo))
      for row in np.flatnonzero(score):
        same = fit & (indices[:, slot] == indices[row, slot])
        p = (y[same, c].sum() + bottleneck.PSEUDO_FRAMES * base) / (same.sum() + bottleneck.PSEUDO_FRAMES)
        losses[0, c] -= np.log2(p if y[row, c] else 1 - p)
        losses[1, c] -= np.log2(base if y[row, c] else 1 - base)
  return float(np.mean(1 - losses[0] / losses[1]))


def test_probe_matches_a_direct_ridge_fit_and_codes_that_name_the_class_score_high():
  rng = np.random.default_rng(0)
  b, t, n, d, c, k = 40, 3, 2, 5, 3, 6
  y = rng.random((b, t, c)) > 0.5
  # Slot 0's code names class 0's presence; slot 1's code is noise. Tokens: a noisy linear map of y.
  indices = np.stack([y[..., 0].astype(int) * 3, rng.integers(0, k, (b, t))], -1)
  tokens = (y.astype(np.float32) @ rng.standard_normal((c, n * d)) + 0.3 * rng.standard_normal((b, t, n * d)))
  tokens = tokens.reshape(b, t, n, d).astype(np.float32)
  valid = np.ones((b, t), bool)
  out = _diagnose(tokens, indices, y, valid, k)
  fold = np.repeat(np.arange(b) % 2 == 0, t)
  onehot = np.eye(k)[indices.reshape(b * t, n)].reshape(b * t, n * k)
  np.testing.assert_allclose(out['probe_r2_tokens'], _ridge_r2(tokens.reshape(b * t, -1), y.reshape(b * t, c).astype(float), fold), rtol=1e-3)
  np.testing.assert_allclose(out['probe_r2_codes'], _ridge_r2(onehot, y.reshape(b * t, c).astype(float), fold), rtol=1e-3)
  assert out['probe_r2_tokens'] > 0.8
  # MI: class 0 fully explained by slot 0 (1.0), classes 1, 2 by nothing (~0): mean ~1/3.
  assert 0.3 < out['code_class_mi'] < 0.45, out
  np.testing.assert_allclose(out['code_class_mi_heldout'],
                             _heldout_mi_reference(indices.reshape(b * t, n), y.reshape(b * t, c), fold), rtol=1e-6)
  assert 0.3 < out['code_class_mi_heldout'] < 0.34, out  # ~1/3: slot 0 names class 0, nothing names 1, 2
  # Slot perplexities: slot 0 uses 2 codes equally often (~2), slot 1 ~uniform over 6 (~5.5+).
  assert 3.3 < out['slot_perplexity'] < 4.2, out


def test_heldout_mi_is_not_fooled_by_slots_with_many_random_codes():
  # Slot 0's two codes name class 0's presence (90 % right); the other slots draw from K = 512 codes at
  # random. The plug-in MI would pick a random slot (its bias grows with the codes in use); the
  # held-out figure must keep scoring slot 0, whatever the number of random slots.
  rng = np.random.default_rng(4)
  b, t, d = 60, 4, 3
  y = rng.random((b, t, 1)) > 0.5
  named = np.where(rng.random((b, t)) < 0.9, y[..., 0], ~y[..., 0]).astype(int)
  scores = []
  for random_slots in (0, 1, 3):
    indices = np.concatenate([named[..., None], rng.integers(0, 512, (b, t, random_slots))], -1)
    tokens = rng.standard_normal((b, t, 1 + random_slots, d)).astype(np.float32)
    scores.append(_diagnose(tokens, indices, y, np.ones((b, t), bool), 512)['code_class_mi_heldout'])
  assert min(scores) > 0.4 and max(scores) - min(scores) < 1e-9, scores


def test_heldout_mi_does_not_grow_with_the_codebook_where_the_plugin_estimate_does():
  # Codes drawn at random, independent of the classes: the plug-in MI rises with K (its bias), the
  # held-out one stays at or below 0.
  rng = np.random.default_rng(3)
  b, t, n, d, c = 60, 4, 2, 3, 4
  y = rng.random((b, t, c)) > 0.7
  tokens = rng.standard_normal((b, t, n, d)).astype(np.float32)
  plugin, heldout = [], []
  for k in (4, 32, 128):
    out = _diagnose(tokens, rng.integers(0, k, (b, t, n)), y, np.ones((b, t), bool), k)
    plugin.append(out['code_class_mi'])
    heldout.append(out['code_class_mi_heldout'])
  assert plugin[0] < plugin[1] < plugin[2] and plugin[2] > 0.2, plugin
  assert max(heldout) < 0.02, heldout
  fold = np.repeat(np.arange(b) % 2 == 0, t)
  indices = rng.integers(0, 16, (b, t, n))
  out = _diagnose(tokens, indices, y, np.ones((b, t), bool), 16)
  np.testing.assert_allclose(out['code_class_mi_heldout'],
                             _heldout_mi_reference(indices.reshape(b * t, n), y.reshape(b * t, c), fold), rtol=1e-6)


def test_constant_codes_tell_nothing():
  rng = np.random.default_rng(1)
  b, t, n, d, c, k = 20, 2, 3, 4, 2, 5
  y = rng.random((b, t, c)) > 0.5
  indices = np.broadcast_to(np.arange(n), (b, t, n))      # slot identity only
  out = _diagnose(rng.standard_normal((b, t, n, d)).astype(np.float32), indices, y, np.ones((b, t), bool), k)
  np.testing.assert_allclose(out['slot_perplexity'], 1.0, rtol=1e-6)
  assert abs(out['code_class_mi']) < 1e-9
  assert out['code_class_mi_heldout'] <= 1e-9
  assert out['probe_r2_codes'] < 0.01


def test_invalid_frames_are_left_out():
  rng = np.random.default_rng(2)
  b, t, n, d, c, k = 20, 2, 2, 3, 2, 4
  y = rng.random((b, t, c)) > 0.5
  indices = rng.integers(0, k, (b, t, n))
  tokens = rng.standard_normal((b, t, n, d)).astype(np.float32)
  valid = np.ones((b, t), bool)
  valid[:, 1] = False
  full = _diagnose(tokens, indices, y, valid, k)
  garbage_y, garbage_i = y.copy(), indices.copy()
  garbage_y[:, 1] = ~garbage_y[:, 1]
  garbage_i[:, 1] = 0
  changed = _diagnose(tokens, garbage_i, garbage_y, valid, k)
  for key in full:
    np.testing.assert_allclose(changed[key], full[key], rtol=1e-6)


def _slot_entropy_reference(sqdist, valid, tau, dim):
  logits = -sqdist / (2 * dim * tau)
  logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) - logits.max(-1, keepdims=True)
  p = np.exp(logp)
  n, k = sqdist.shape[-2:]
  p, logp = p.reshape(-1, n, k)[valid.reshape(-1)], logp.reshape(-1, n, k)[valid.reshape(-1)]
  token_h = -np.sum(p * logp, -1).mean()
  marginal = p.mean(0)
  marginal_h = -np.sum(marginal * np.log(marginal + 1e-10), -1).mean()
  return token_h - marginal_h


def test_slot_entropy_matches_its_formula_and_prefers_codes_that_vary_within_a_slot():
  rng = np.random.default_rng(3)
  sqdist = rng.random((6, 2, 3, 5)).astype(np.float32) * 20      # [B, T, N, K]
  valid = rng.random((6, 2)) > 0.2
  got = float(slot_entropy_loss(jnp.asarray(sqdist), jnp.asarray(valid), 0.1, 8))
  np.testing.assert_allclose(got, _slot_entropy_reference(sqdist, valid, 0.1, 8), rtol=1e-4, atol=1e-5)
  # Every slot confidently on one constant code (slot identity only): the marginal entropy is 0.
  constant = np.full((8, 3, 4), 50.0, np.float32)
  constant[:, np.arange(3), np.arange(3)] = 0.0
  varying = np.full((8, 3, 4), 50.0, np.float32)
  for i in range(8):
    varying[i, :, i % 4] = 0.0
  ones = jnp.ones((8,), bool)
  assert float(slot_entropy_loss(jnp.asarray(varying), ones, 0.1, 8)) < float(slot_entropy_loss(jnp.asarray(constant), ones, 0.1, 8)) - 1.0
  grad = jax.grad(lambda s: slot_entropy_loss(s, ones, 0.1, 8))(jnp.asarray(constant))
  assert np.all(np.isfinite(np.asarray(grad)))
