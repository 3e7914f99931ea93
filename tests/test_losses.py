"""Targets, matching costs and losses against direct NumPy transcriptions (docs/DESIGN.md §2).

References are float64 loop-based transcriptions of the formulas; the JAX code runs in float32.
Tolerances: 1e-5 relative (+1e-6 absolute) for elementwise terms, 1e-4 relative for the summed
cost matrices and loss terms, exact equality for the integer / boolean targets. The comparison of
a batch sharded over 8 devices with one device is in test_matching.py (it reuses the helpers here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from qdformer_jax.losses import criterion, matching, targets

TERMS = ('class', 'bbox', 'giou', 'mask', 'dice')


# ----------------------------------------------------------------------------------------------
# NumPy transcriptions of the formulas.

def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_focal(x, y, alpha, gamma):
  """-α_t (1 - p_t)^γ log p_t, elementwise."""
  p = np_sigmoid(x)
  p_t = p * y + (1 - p) * (1 - y)
  alpha_t = alpha * y + (1 - alpha) * (1 - y)
  return -alpha_t * (1 - p_t) ** gamma * np.log(p_t)


def np_bce(x, y):
  p = np_sigmoid(x)
  return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def np_mask_loss(x, y, kind, alpha, gamma):
  per_pixel = np_bce(x, y) if kind == 'bce' else np_focal(x, y, alpha, gamma)
  return per_pixel.mean()


def np_dice(x, y):
  p = np_sigmoid(x)
  return 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)


def np_giou(a, b):
  """GIoU of two (cx, cy, w, h) boxes."""
  ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
  bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
  inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
  union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
  hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
  return inter / union - (hull - union) / hull


def np_make_targets(semantic, gt_valid, frame_valid, num_classes, num_queries, stride=4):
  """Loop transcription of the target rules in targets.py's docstring."""
  b_, t_, h_, w_ = semantic.shape
  out = {'labels': np.zeros((b_, num_queries), np.int32),
         'valid': np.zeros((b_, num_queries), bool),
         'masks': np.zeros((b_, t_, num_queries, h_ // stride, w_ // stride), np.float32),
         'boxes': np.zeros((b_, t_, num_queries, 4), np.float32),
         'present': np.zeros((b_, t_, num_queries), bool),
         'frame_has_gt': gt_valid & frame_valid,
         'overflow': np.zeros(b_, bool),
         'num_present': np.zeros(b_, np.int32)}
  for b in range(b_):
    has = out['frame_has_gt'][b]
    area = {c: sum(int((semantic[b, t] == c).sum()) for t in range(t_) if has[t])
            for c in range(1, num_classes + 1)}
    classes = [c for c in area if area[c] > 0]
    out['num_present'][b] = len(classes)
    out['overflow'][b] = len(classes) > num_queries
    chosen = sorted(sorted(classes, key=lambda c: (-area[c], c))[:num_queries])
    for j, c in enumerate(chosen):
      out['labels'][b, j] = c - 1
      out['valid'][b, j] = True
      for t in range(t_):
        mask = (semantic[b, t] == c) & has[t]
        if not mask.any():
          continue
        out['present'][b, t, j] = True
        ys, xs = np.nonzero(mask)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        out['boxes'][b, t, j] = [(x0 + x1) / 2 / w_, (y0 + y1) / 2 / h_, (x1 - x0) / w_,
                                 (y1 - y0) / h_]
        out['masks'][b, t, j] = mask[stride // 2::stride, stride // 2::stride]
  return out


def np_cost(logits, boxes, masks, tg, cfg):
  """Clip-level matching cost [B, N, N], one (slot, object) pair at a time."""
  b_, t_, n_ = logits.shape[:3]
  cost = np.zeros((b_, n_, n_))
  for b in range(b_):
    for i in range(n_):
      for j in range(n_):
        if not tg['valid'][b, j]:
          continue
        cls, geometry = [], []
        for t in range(t_):
          if not tg['frame_has_gt'][b, t]:
            continue
          if not tg['present'][b, t, j]:
            cls.append(0.0)
            continue
          x = logits[b, t, i, tg['labels'][b, j]]
          cls.append(np_focal(x, 1.0, cfg.focal_alpha, cfg.focal_gamma)
                     - np_focal(x, 0.0, cfg.focal_alpha, cfg.focal_gamma))
          pb, tb = boxes[b, t, i], tg['boxes'][b, t, j]
          pm, tm = masks[b, t, i], tg['masks'][b, t, j]
          geometry.append(cfg.l1_weight * np.abs(pb - tb).sum()
                          + cfg.giou_weight * (1 - np_giou(pb, tb))
                          + cfg.mask_weight * np_mask_loss(pm, tm, cfg.mask_loss, cfg.focal_alpha,
                                                           cfg.focal_gamma)
                          + cfg.dice_weight * np_dice(pm, tm))
        cost[b, i, j] = cfg.cls_weight * np.mean(cls) + np.mean(geometry)
  return cost


def np_segmentation_losses(logits, boxes, masks, tg, assignment, normaliser, cfg):
  """Unweighted terms for a given matching (slot i <- target slot assignment[b, i])."""
  b_, t_, n_, c_ = logits.shape
  sums = dict.fromkeys(TERMS, 0.0)
  for b in range(b_):
    for t in range(t_):
      if not tg['frame_has_gt'][b, t]:
        continue
      for i in range(n_):
        j = assignment[b, i]
        present = tg['valid'][b, j] and tg['present'][b, t, j]
        target = np.zeros(c_)
        if present:
          target[tg['labels'][b, j]] = 1.0
        sums['class'] += np_focal(logits[b, t, i], target, cfg.focal_alpha, cfg.focal_gamma).sum()
        if not present:
          continue
        pb, tb = boxes[b, t, i], tg['boxes'][b, t, j]
        pm, tm = masks[b, t, i], tg['masks'][b, t, j]
        sums['bbox'] += np.abs(pb - tb).sum()
        sums['giou'] += 1 - np_giou(pb, tb)
        sums['mask'] += np_mask_loss(pm, tm, cfg.mask_loss, cfg.focal_alpha, cfg.focal_gamma)
        sums['dice'] += np_dice(pm, tm)
  return {k: v / normaliser for k, v in sums.items()}


def np_quant(vq, commit, valid):
  """Eq. 9 per clip (squared L2 over channels, summed over tokens and valid frames), batch mean."""
  g, e = vq['global_tokens'], vq['global_codes']
  l, lq = vq['local_tokens'], vq['local_codes']
  per_clip = []
  for b in range(g.shape[0]):
    total = 0.0
    for i in range(g.shape[1]):
      total += np.sum((e[b, i] - g[b, i]) ** 2) + commit * np.sum((e[b, i] - g[b, i]) ** 2)
      for t in range(l.shape[1]):
        if valid[b, t]:
          total += commit * np.sum((lq[b, t, i] - l[b, t, i]) ** 2)
    per_clip.append(total)
  return np.mean(per_clip)


def np_compute_loss(outputs, batch, cfg, num_classes):
  """The whole loss with scipy matching; returns (terms, assignments per layer)."""
  weights = criterion.loss_weights(cfg)
  n_ = outputs['pred_logits'].shape[2]
  tg = np_make_targets(batch['semantic'], batch['gt_valid'], batch['frame_valid'], num_classes,
                       n_)
  normaliser = max(1, tg['present'].sum())
  layers = [('', outputs)] + [(f'_aux_{i}', a) for i, a in enumerate(outputs['aux_outputs'])]
  terms, assignments = {}, []
  for suffix, layer in layers:
    logits, boxes, masks = (np.asarray(layer[k], np.float64) for k in
                            ('pred_logits', 'pred_boxes', 'pred_masks'))
    cost = np_cost(logits, boxes, masks, tg, cfg)
    assignment = np.zeros(cost.shape[:2], np.int32)
    for b in range(cost.shape[0]):
      rows, cols = linear_sum_assignment(cost[b])
      assignment[b, rows] = cols
    assignments.append(assignment)
    for name, value in np_segmentation_losses(logits, boxes, masks, tg, assignment, normaliser,
                                              cfg).items():
      terms[f'loss_{name}{suffix}'] = weights[name] * value
  vq = outputs['vq']
  vq64 = {k: np.asarray(v, np.float64) for k, v in vq.items() if k.endswith(('tokens', 'codes'))}
  terms['loss_quant'] = cfg.quant_weight * np_quant(vq64, cfg.commit_weight, vq['local_valid'])
  terms['vq_global_sqerr'] = np.mean(np.sum((vq64['global_codes'] - vq64['global_tokens']) ** 2,
                                            axis=(1, 2)))
  local_sq = np.sum((vq64['local_codes'] - vq64['local_tokens']) ** 2, axis=(2, 3))
  terms['vq_local_sqerr'] = np.mean(np.sum(local_sq * vq['local_valid'], axis=1))
  terms['num_target_frames'] = tg['present'].sum()
  terms['overflow_clips'] = tg['overflow'].sum()
  terms['num_gt_frames'] = tg['frame_has_gt'].sum()
  return terms, assignments


# ----------------------------------------------------------------------------------------------
# Random problems.

def random_semantic(rng, shape, num_classes, ignore=True):
  """Label maps made of random rectangles (some with an id outside 1..C, some one pixel)."""
  b_, t_, h_, w_ = shape
  semantic = np.zeros(shape, np.uint8)
  for b in range(b_):
    for t in range(t_):
      for _ in range(rng.integers(0, 5)):
        c = rng.integers(1, num_classes + 1)
        if ignore and rng.uniform() < 0.1:
          c = 255
        y, x = rng.integers(0, h_), rng.integers(0, w_)
        hh, ww = (1, 1) if rng.uniform() < 0.15 else rng.integers(1, h_ // 2 + 1, size=2)
        semantic[b, t, y:y + hh, x:x + ww] = c
  return semantic


def random_problem(seed, b_=3, t_=4, n_=5, c_=7, size=16, layers=2, dim=6, codes=9):
  """Random model outputs (with `layers - 1` aux layers and a vq dict) and batch."""
  rng = np.random.default_rng(seed)
  h_ = size // 4
  semantic = random_semantic(rng, (b_, t_, size, size), c_)
  gt_valid = rng.uniform(size=(b_, t_)) < 0.8
  frame_valid = rng.uniform(size=(b_, t_)) < 0.9
  gt_valid[0, 0] = frame_valid[0, 0] = True
  for c in range(1, c_ + 1):  # clip 0 shows every class (more than N when C > N)
    semantic[0, 0, c % size, :c] = c
  params = {
      'logits': rng.normal(0, 2, (layers, b_, t_, n_, c_)).astype(np.float32),
      'boxes': np_sigmoid(rng.normal(0, 1, (layers, b_, t_, n_, 4))).astype(np.float32),
      'masks': rng.normal(0, 2, (layers, b_, t_, n_, h_, h_)).astype(np.float32),
      'codebook': rng.normal(size=(codes, dim)).astype(np.float32),
      'g': rng.normal(size=(b_, n_, dim)).astype(np.float32),
      'l': rng.normal(size=(b_, t_, n_, dim)).astype(np.float32),
  }

  def nearest(x):
    return np.argmin(((x[..., None, :] - params['codebook']) ** 2).sum(-1), axis=-1)
  indices = {'global': nearest(params['g']).astype(np.int32),
             'local': nearest(params['l']).astype(np.int32)}
  batch = {'semantic': semantic, 'gt_valid': gt_valid, 'frame_valid': frame_valid}
  return params, indices, batch


def build_outputs(params, indices, frame_valid):
  """The model output dict. Unlike the model (which gathers them from stop_gradient(codebook)),
  the local codes here are differentiable w.r.t. the codebook, so that the gradient tests see the
  loss's own stop-gradients."""
  codebook = params['codebook']
  layer = [{'pred_logits': params['logits'][k], 'pred_boxes': params['boxes'][k],
            'pred_masks': params['masks'][k]} for k in range(params['logits'].shape[0])]

  def lookup(index):  # codebook[index] as a one-hot product (shards like the index)
    return jnp.einsum('...k,kd->...d', jax.nn.one_hot(index, codebook.shape[0]), codebook,
                      precision=jax.lax.Precision.HIGHEST)

  vq = {'global_tokens': params['g'], 'global_codes': lookup(indices['global']),
        'local_tokens': params['l'], 'local_codes': lookup(indices['local']),
        'global_indices': indices['global'], 'local_indices': indices['local'],
        'local_valid': frame_valid}
  return {**layer[-1], 'aux_outputs': tuple(layer[:-1]), 'vq': vq}


def to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


# ----------------------------------------------------------------------------------------------
# Tests.

def test_elementwise_terms_match_formulas():
  rng = np.random.default_rng(0)
  x = rng.normal(0, 3, (4, 6, 8)).astype(np.float32)
  y = (rng.uniform(size=(4, 6, 8)) < 0.4).astype(np.float32)
  a = np.concatenate([rng.uniform(0.2, 0.8, (50, 2)), rng.uniform(0.05, 0.6, (50, 2))], -1)
  b = np.concatenate([rng.uniform(0.2, 0.8, (50, 2)), rng.uniform(0.05, 0.6, (50, 2))], -1)
  a, b = a.astype(np.float32), b.astype(np.float32)

  @jax.jit
  def primitives(x, y, a, b):
    return {'focal': criterion.sigmoid_focal_loss(x, y, 0.25, 2.0),
            'bce': criterion.mask_loss(x, y, 'bce', 0.25, 2.0),
            'mask_focal': criterion.mask_loss(x, y, 'focal', 0.3, 1.5),
            'dice': criterion.dice_loss(x, y),
            'giou': matching.generalized_box_iou(a, b),
            'giou_pairwise': matching.generalized_box_iou(a[:, None], b[None, :])}

  got = to_numpy(primitives(x, y, a, b))
  x64, y64 = x.astype(np.float64), y.astype(np.float64)
  tol = {'rtol': 1e-5, 'atol': 1e-6}
  np.testing.assert_allclose(got['focal'], np_focal(x64, y64, 0.25, 2.0), **tol)
  np.testing.assert_allclose(got['bce'], [np_mask_loss(x64[k], y64[k], 'bce', 0, 0)
                                          for k in range(4)], **tol)
  np.testing.assert_allclose(got['mask_focal'], [np_mask_loss(x64[k], y64[k], 'focal', 0.3, 1.5)
                                                 for k in range(4)], **tol)
  np.testing.assert_allclose(got['dice'], [np_dice(x64[k], y64[k]) for k in range(4)], **tol)
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  np.testing.assert_allclose(got['giou'], [np_giou(p, q) for p, q in zip(a64, b64)], **tol)
  np.testing.assert_allclose(got['giou_pairwise'], [[np_giou(p, q) for q in b64] for p in a64],
                             **tol)
  assert got['giou'].min() < 0 < got['giou'].max()  # both overlapping and disjoint pairs


@pytest.mark.parametrize('num_classes, shape', [(7, (4, 5, 16, 20)), (1, (3, 4, 16, 16))])
def test_make_targets_matches_loop(num_classes, shape):
  rng = np.random.default_rng(num_classes)
  semantic = random_semantic(rng, shape, num_classes)
  gt_valid = rng.uniform(size=shape[:2]) < 0.7
  frame_valid = rng.uniform(size=shape[:2]) < 0.9
  if num_classes == 7:  # a clip with 7 classes of equal area: ties resolved by class id
    semantic[0] = 0
    for c in range(1, 8):
      semantic[0, 0, 2 * c, 0:3] = c
    gt_valid[0, 0] = frame_valid[0, 0] = True
  fn = jax.jit(targets.make_targets, static_argnums=(3, 4))
  got = to_numpy(fn(semantic, gt_valid, frame_valid, num_classes, 5))
  want = np_make_targets(semantic, gt_valid, frame_valid, num_classes, 5)
  assert set(got) == set(want)
  for key in want:
    assert got[key].dtype == want[key].dtype, key
    if key == 'boxes':
      np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7)
    else:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  if num_classes == 7:
    assert got['overflow'].any() and not got['overflow'].all()
    np.testing.assert_array_equal(got['labels'][0], [0, 1, 2, 3, 4])
  assert got['present'].any() and not got['present'].all()
  # An object present with an empty subsampled mask exists (one-pixel rectangles).
  assert (got['present'] & (got['masks'].sum((-2, -1)) == 0)).any()


def test_cost_matrix_and_fixed_assignment_losses():
  """Both mask-loss options with non-default weights from an ml_collections config."""
  params, indices, batch = random_problem(seed=3, layers=1)
  configs = [criterion.resolve_loss_config(ml_collections.ConfigDict(dict(
      cls_weight=1.5, l1_weight=4.0, giou_weight=3.0, mask_weight=2.5, dice_weight=0.5,
      focal_alpha=0.3, focal_gamma=1.5, mask_loss=kind, unknown_field=1)))
             for kind in ('bce', 'focal')]
  outputs = build_outputs(params, indices, batch['frame_valid'])
  outputs = {k: outputs[k] for k in ('pred_logits', 'pred_boxes', 'pred_masks')}
  tg_np = np_make_targets(batch['semantic'], batch['gt_valid'], batch['frame_valid'], 7, 5)
  assignment = np.stack([np.random.default_rng(k).permutation(5) for k in range(3)]).astype(
      np.int32)
  normaliser = max(1, tg_np['present'].sum())

  @jax.jit
  def run(outputs, tg, assignment):
    results = []
    for cfg in configs:
      cost = matching.clip_cost_matrix(outputs['pred_logits'], outputs['pred_boxes'],
                                       outputs['pred_masks'], tg, cfg)
      losses = criterion.segmentation_losses(outputs, tg, assignment, float(normaliser), cfg)
      results.append((cost, losses))
    return results

  logits, boxes, masks = (np.asarray(outputs[k], np.float64) for k in
                          ('pred_logits', 'pred_boxes', 'pred_masks'))
  for cfg, (cost, losses) in zip(configs, to_numpy(run(outputs, tg_np, assignment))):
    want_cost = np_cost(logits, boxes, masks, tg_np, cfg)
    np.testing.assert_allclose(cost, want_cost, rtol=1e-4, atol=1e-5, err_msg=cfg.mask_loss)
    assert (cost[~np.broadcast_to(tg_np['valid'][:, None, :], cost.shape)] == 0).all()
    want = np_segmentation_losses(logits, boxes, masks, tg_np, assignment, normaliser, cfg)
    for name in TERMS:
      np.testing.assert_allclose(losses[name], want[name], rtol=1e-4, atol=1e-6,
                                 err_msg=f'{cfg.mask_loss} {name}')


def loss_fn(params, indices, batch):
  """compute_loss (default config, C = 7) of the outputs built from params."""
  outputs = build_outputs(params, indices, batch['frame_valid'])
  return criterion.compute_loss(outputs, batch, None, 7)


LOSS_AND_GRAD = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
FIXTURE_PROBLEM = {'seed': 7, 'b_': 8, 't_': 3, 'layers': 3}


@pytest.fixture(scope='module')
def loss_and_grad():
  """One compiled value-and-gradient of compute_loss on a random problem (8 clips)."""
  params, indices, batch = random_problem(**FIXTURE_PROBLEM)
  (loss, terms), grads = LOSS_AND_GRAD(params, indices, batch)
  return params, indices, batch, float(loss), to_numpy(terms), to_numpy(grads)


def test_compute_loss_matches_numpy(loss_and_grad):
  params, indices, batch, loss, terms, _ = loss_and_grad
  cfg = criterion.resolve_loss_config(None)
  outputs = to_numpy(build_outputs(params, indices, batch['frame_valid']))
  want, _ = np_compute_loss(outputs, batch, cfg, 7)
  expected_keys = {f'loss_{n}{s}' for n in TERMS for s in ('', '_aux_0', '_aux_1')}
  expected_keys |= {'loss_quant', 'num_target_frames', 'num_gt_frames', 'overflow_clips',
                    'vq_global_sqerr', 'vq_local_sqerr'}
  assert set(terms) == expected_keys
  for key, value in want.items():
    np.testing.assert_allclose(terms[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
  np.testing.assert_allclose(loss, sum(v for k, v in want.items() if k.startswith('loss_')),
                             rtol=1e-5)
  assert want['num_target_frames'] > 0 and want['overflow_clips'] >= 1


def test_quantization_gradients(loss_and_grad):
  """Codebook: only the first term of Eq. 9 (e - sg[g]); g and l: only the commitment terms."""
  params, indices, batch, _, _, grads = loss_and_grad
  cfg = criterion.resolve_loss_config(None)
  b_ = params['g'].shape[0]
  e = params['codebook'][indices['global']].astype(np.float64)
  lq = params['codebook'][indices['local']].astype(np.float64)
  scale = cfg.quant_weight / b_
  want_codebook = np.zeros(params['codebook'].shape)
  np.add.at(want_codebook, indices['global'], scale * 2 * (e - params['g']))
  want_g = scale * cfg.commit_weight * 2 * (params['g'] - e)
  want_l = scale * cfg.commit_weight * 2 * (params['l'] - lq) * \
      batch['frame_valid'][:, :, None, None]
  tol = {'rtol': 1e-5, 'atol': 1e-7}
  np.testing.assert_allclose(grads['codebook'], want_codebook, **tol)
  np.testing.assert_allclose(grads['g'], want_g, **tol)
  np.testing.assert_allclose(grads['l'], want_l, **tol)


def test_matching_carries_no_gradient(loss_and_grad):
  """The prediction gradients equal those of the same loss with the matching held constant."""
  params, indices, batch, _, _, grads = loss_and_grad
  cfg = criterion.resolve_loss_config(None)
  weights = criterion.loss_weights(cfg)
  outputs = to_numpy(build_outputs(params, indices, batch['frame_valid']))
  _, assignments = np_compute_loss(outputs, batch, cfg, 7)
  # np_compute_loss lists the last layer first, then aux_0, aux_1, ...; params stack the layers
  # in decoder order (aux_0, aux_1, ..., last).
  fixed = np.stack(assignments[1:] + assignments[:1])

  def fixed_loss(pred, batch, fixed):
    tg = targets.make_targets(batch['semantic'], batch['gt_valid'], batch['frame_valid'], 7, 5)
    n = jnp.maximum(jnp.sum(tg['present']), 1).astype(jnp.float32)

    def layer_loss(logits, boxes, masks, assignment):
      layer = {'pred_logits': logits, 'pred_boxes': boxes, 'pred_masks': masks}
      losses = criterion.segmentation_losses(layer, tg, assignment, n, cfg)
      return sum(weights[name] * value for name, value in losses.items())

    return jnp.sum(jax.vmap(layer_loss)(pred['logits'], pred['boxes'], pred['masks'], fixed))

  pred = {k: params[k] for k in ('logits', 'boxes', 'masks')}
  want = to_numpy(jax.jit(jax.grad(fixed_loss))(pred, batch, fixed))
  for key in pred:
    assert np.abs(want[key]).max() > 0
    np.testing.assert_allclose(grads[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_lowering_has_no_host_callback_and_options():
  params, indices, batch = random_problem(seed=11, layers=2)
  outputs = build_outputs(params, indices, batch['frame_valid'])
  fn = jax.jit(lambda o, b: criterion.compute_loss(o, b, None, 7))
  text = fn.lower(outputs, batch).as_text()
  for marker in ('callback', 'xla_python', 'stablehlo.infeed', 'stablehlo.outfeed',
                 'stablehlo.send', 'stablehlo.recv'):
    assert marker not in text, marker
  assert 'stablehlo.while' in text  # the Hungarian solver is in the program

  # Without quantization: no quant terms; aux_loss=False: no aux terms (shapes only).
  no_vq = {**outputs, 'vq': None}
  _, terms = jax.eval_shape(lambda o, b: criterion.compute_loss(o, b, {'aux_loss': False}, 7),
                            no_vq, batch)
  assert set(terms) == {f'loss_{n}' for n in TERMS} | {'num_target_frames', 'num_gt_frames',
                                                       'overflow_clips'}


def test_bad_inputs_raise_clear_errors():
  params, indices, batch = random_problem(seed=12, layers=1)
  outputs = build_outputs(params, indices, batch['frame_valid'])
  with pytest.raises(ValueError, match='pred_logits'):
    criterion.compute_loss(outputs, batch, None, 6)  # C mismatch
  with pytest.raises(ValueError, match='mask_loss'):
    criterion.compute_loss(outputs, batch, {'mask_loss': 'l2'}, 7)
  with pytest.raises(ValueError, match='semantic'):
    criterion.compute_loss(outputs, {**batch, 'semantic': batch['semantic'][:, :, :15]}, None, 7)
  with pytest.raises(ValueError, match='integer'):
    targets.make_targets(batch['semantic'].astype(np.float32), batch['gt_valid'],
                         batch['frame_valid'], 7, 5)
  with pytest.raises(ValueError, match='gt_valid'):
    targets.make_targets(batch['semantic'], batch['gt_valid'][:, :2], batch['frame_valid'], 7, 5)
