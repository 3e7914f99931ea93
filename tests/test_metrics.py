"""Metrics against loop-based NumPy transcriptions of the official definitions.

References written here, deliberately plain:
* AVSBench ``mask_iou`` / ``_eval_pr`` / ``Eval_Fmeasure`` and the S4/MS3 test loop (batches of 4
  clips, per-batch values averaged over batches);
* AVSBench-semantic ``_batch_miou_fscore`` and the AVSS test loop (per-class sums, NaN -> 0, mean
  over all classes), padded v1 frames as all-background frames;
* davis2017-evaluation ``db_eval_iou`` / ``f_measure`` / ``_seg2bmap``, dilation by
  ``scipy.ndimage.binary_dilation`` with a disk.

Predicted probabilities are drawn from the midpoints between the F-measure thresholds (and exact
0 and 1), so that float32 vs float64 rounding cannot move a pixel across a threshold; agreement is
then required to 1e-6.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from qdformer_jax.evaluation import metrics

TOL = 1e-6
BINARY_STEP = jax.jit(metrics.binary_accumulate,
                      static_argnames=('group_size', 'bound_th', 'with_davis'))
SEMANTIC_STEP = jax.jit(metrics.semantic_accumulate, static_argnames=('num_classes', 'keep_padded'))
T = 5  # frames per S4/MS3 clip
OFFICIAL_BATCH = 4  # clips per official test batch


# ------------------------------------------------------------------------------------------------
# References (official definitions, transcribed)


def ref_mask_iou(prob, target):
  """AVSBench mask_iou of one batch [N, H, W] (prob = sigmoid of the logits)."""
  n = prob.shape[0]
  total = 0.0
  for i in range(n):
    pred = (prob[i] > 0.5).astype(np.float64)
    tgt = target[i].astype(np.float64)
    if tgt.sum() == 0:
      inter = ((1 - tgt) * (1 - pred)).sum()
      union = tgt.size
    else:
      inter = (pred * tgt).sum()
      union = np.maximum(pred, tgt).sum()
    total += inter / (union + 1e-7)
  return total / n


def ref_eval_pr(y_pred, y, num=255):
  thresholds = np.linspace(0, 1 - 1e-10, num)
  prec, recall = np.zeros(num), np.zeros(num)
  for i in range(num):
    y_temp = (y_pred >= thresholds[i]).astype(np.float64)
    tp = (y_temp * y).sum()
    prec[i] = tp / (y_temp.sum() + 1e-20)
    recall[i] = tp / (y.sum() + 1e-20)
  return prec, recall


def ref_f_curve(y_pred, y):
  prec, recall = ref_eval_pr(y_pred, y.astype(np.float64))
  with np.errstate(invalid='ignore', divide='ignore'):
    f = (1 + 0.3) * prec * recall / (0.3 * prec + recall)
  f[f != f] = 0
  return f


def ref_eval_fmeasure(prob, gt):
  """AVSBench Eval_Fmeasure of one batch [N, H, W]."""
  avg_f, img_num = 0.0, 0
  score = np.zeros(255)
  for i in range(prob.shape[0]):
    if np.mean(gt[i]) == 0.0:
      continue
    avg_f = avg_f + ref_f_curve(prob[i], gt[i])
    img_num += 1
    score = avg_f / img_num
  return score.max()


def ref_seg2bmap(seg):
  seg = seg.astype(bool)
  h, w = seg.shape
  b = np.zeros_like(seg)
  for y in range(h):
    for x in range(w):
      east = seg[y, x + 1] if x + 1 < w else False
      south = seg[y + 1, x] if y + 1 < h else False
      southeast = seg[y + 1, x + 1] if (x + 1 < w and y + 1 < h) else False
      if y == h - 1 and x == w - 1:
        b[y, x] = False
      elif x == w - 1:
        b[y, x] = seg[y, x] ^ south
      elif y == h - 1:
        b[y, x] = seg[y, x] ^ east
      else:
        b[y, x] = (seg[y, x] ^ east) | (seg[y, x] ^ south) | (seg[y, x] ^ southeast)
  return b


def ref_disk(radius):
  size = 2 * radius + 1
  d = np.zeros((size, size), bool)
  for i in range(size):
    for j in range(size):
      d[i, j] = (i - radius) ** 2 + (j - radius) ** 2 <= radius ** 2
  return d


def ref_davis_j(pred, gt):
  pred, gt = pred.astype(bool), gt.astype(bool)
  union = np.sum(pred | gt)
  return 1.0 if union == 0 else np.sum(pred & gt) / union


def ref_davis_f(pred, gt, bound_th=0.008):
  bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(pred.shape))
  fg_b = ref_seg2bmap(pred)
  gt_b = ref_seg2bmap(gt)
  d = ref_disk(int(bound_pix))
  fg_dil = ndimage.binary_dilation(fg_b, structure=d)
  gt_dil = ndimage.binary_dilation(gt_b, structure=d)
  n_fg, n_gt = fg_b.sum(), gt_b.sum()
  if n_fg == 0 and n_gt > 0:
    precision, recall = 1, 0
  elif n_fg > 0 and n_gt == 0:
    precision, recall = 0, 1
  elif n_fg == 0 and n_gt == 0:
    precision, recall = 1, 1
  else:
    precision = np.sum(fg_b & gt_dil) / float(n_fg)
    recall = np.sum(gt_b & fg_dil) / float(n_gt)
  if precision + recall == 0:
    return 0.0
  return 2 * precision * recall / (precision + recall)


def ref_avss_frame_stats(pred, target, nclass, beta2=0.3):
  """AVSS _batch_miou_fscore of one frame: per-class iou, fscore, counted flag."""
  ious, fscores, counted = np.zeros(nclass), np.zeros(nclass), np.zeros(nclass)
  for c in range(nclass):
    area_inter = float(np.sum((pred == c) & (target == c)))
    area_pred = float(np.sum(pred == c))
    area_lab = float(np.sum(target == c))
    area_union = area_pred + area_lab - area_inter
    ious[c] = area_inter / (2.220446049250313e-16 + area_union)
    counted[c] = area_union > 0
    with np.errstate(invalid='ignore', divide='ignore'):
      precision = np.float64(area_inter) / area_pred
      recall = np.float64(area_inter) / area_lab
      f = (1 + beta2) * precision * recall / (beta2 * precision + recall)
    fscores[c] = 0.0 if np.isnan(f) else f
  return ious, fscores, counted


def ref_avss_summary(iou_sum, f_sum, count):
  with np.errstate(invalid='ignore', divide='ignore'):
    miou = iou_sum / count
    f = f_sum / count
  miou[np.isnan(miou)] = 0
  f[np.isnan(f)] = 0
  return miou.mean(), f.mean()


# ------------------------------------------------------------------------------------------------
# Data


def grid_probs(rng, shape, p_extreme=0.1):
  """Probabilities on the midpoints between F thresholds, with some exact 0 and 1."""
  k = rng.integers(0, 254, size=shape)
  p = ((k + 0.5) / 254).astype(np.float32)
  u = rng.random(shape)
  p[u < p_extreme / 2] = 0.0
  p[u > 1 - p_extreme / 2] = 1.0
  return p


def blobs(rng, shape, fill):
  """Random blob-like binary masks [..., H, W] covering about `fill` of the pixels."""
  noise = ndimage.uniform_filter(rng.random(shape), size=(1,) * (len(shape) - 2) + (5, 5))
  return noise > np.quantile(noise, 1 - fill)


def make_binary_split(rng, n_clips, h, w):
  """Clips [n_clips, T, H, W] of probabilities and targets with empty-GT frames and clips."""
  target = blobs(rng, (n_clips, T, h, w), 0.3).astype(np.uint8)
  target[1, 2:] = 0  # some empty frames in a clip
  target[4:8] = 0  # a whole official batch of empty ground truth (clips 4..7)
  prob = grid_probs(rng, (n_clips, T, h, w))
  # Predictions that follow the ground truth loosely, plus empty and full frames.
  prob = np.where(rng.random(prob.shape) < 0.6, np.where(target > 0, 0.9, 0.1) + 0.5 / 254,
                  prob).astype(np.float32)
  prob[0, 0] = 0.0
  prob[2, 1] = 1.0
  prob[5, 0] = 0.0  # empty prediction on empty GT
  return prob, target


# ------------------------------------------------------------------------------------------------
# AVSBench J and F (S4 / MS3)


def test_thresholds_match_torch_linspace_bitwise():
  torch = pytest.importorskip('torch')
  expected = torch.linspace(0, 1 - 1e-10, 255).numpy()
  np.testing.assert_array_equal(metrics.fscore_thresholds(255), expected)


def test_threshold_bins_exact_at_and_next_to_thresholds():
  """prob >= threshold decided exactly, also for values on a threshold or one float32 ulp away."""
  th = metrics.fscore_thresholds(255)
  rng = np.random.default_rng(9)
  probs = np.concatenate([
      th, np.nextafter(th, np.float32(2)), np.nextafter(th[1:], np.float32(-1)),
      rng.random(5000).astype(np.float32), np.float32([0.0, 1.0, 0.5])]).astype(np.float32)
  got = np.asarray(jax.jit(metrics.threshold_bins)(probs))
  expected = np.array([np.sum(p >= th) for p in probs])  # number of thresholds <= p
  np.testing.assert_array_equal(got, expected)


def test_public_iou_and_fscore_match_official_batch():
  rng = np.random.default_rng(0)
  n, h, w = 12, 16, 16
  target = blobs(rng, (n, h, w), 0.25).astype(np.uint8)
  target[3] = 0
  target[7] = 0
  p = grid_probs(rng, (n, h, w), p_extreme=0.0)
  logits = np.log(p / (1 - p)).astype(np.float32)
  logits[0] = -30.0  # empty prediction on a non-empty GT
  logits[3] = -30.0  # empty prediction on an empty GT: IoU 1
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  assert abs(metrics.avsbench_iou(logits, target) - ref_mask_iou(p, target)) < TOL
  assert abs(metrics.avsbench_fscore(logits, target) - ref_eval_fmeasure(p, target)) < TOL
  # All frames with empty ground truth: the official F of the batch is 0.
  assert metrics.avsbench_fscore(logits[[3, 7]], target[[3, 7]]) == 0.0


def _official_binary_split(prob, target, keep):
  """The official S4/MS3 test loop over clips in batches of 4 (frames with keep=False removed),
  plus the dataset-level references."""
  js, fs = [], []
  for start in range(0, prob.shape[0], OFFICIAL_BATCH):
    p = prob[start:start + OFFICIAL_BATCH].reshape(-1, *prob.shape[2:])
    t = target[start:start + OFFICIAL_BATCH].reshape(-1, *prob.shape[2:])
    k = keep[start:start + OFFICIAL_BATCH].reshape(-1)
    if not k.any():
      continue
    js.append(ref_mask_iou(p[k], t[k]))
    fs.append(ref_eval_fmeasure(p[k], t[k]))
  frames_p = prob.reshape(-1, *prob.shape[2:])[keep.reshape(-1)]
  frames_t = target.reshape(-1, *prob.shape[2:])[keep.reshape(-1)]
  ious, curves, precs, recs, dj, df = [], [], [], [], [], []
  for p, t in zip(frames_p, frames_t):
    ious.append(ref_mask_iou(p[None], t[None]))
    dj.append(ref_davis_j(p > 0.5, t > 0))
    df.append(ref_davis_f(p > 0.5, t > 0))
    if t.sum() > 0:
      curves.append(ref_f_curve(p, t))
      prec, rec = ref_eval_pr(p, t.astype(np.float64))
      precs.append(prec)
      recs.append(rec)
  mp, mr = np.mean(precs, axis=0), np.mean(recs, axis=0)
  with np.errstate(invalid='ignore', divide='ignore'):
    f_mean_pr = np.nan_to_num((1 + 0.3) * mp * mr / (0.3 * mp + mr), nan=0.0)
  return {
      'J': np.mean(ious), 'J_official_per_batch': np.mean(js), 'F_official_per_batch': np.mean(fs),
      'F_dataset': np.max(np.mean(curves, axis=0)), 'F_dataset_mean_pr': np.max(f_mean_pr),
      'davis_J': np.mean(dj), 'davis_F': np.mean(df),
      'davis_JF': (np.mean(dj) + np.mean(df)) / 2, 'num_frames': float(keep.sum()),
  }


@pytest.mark.parametrize('drop_frames', [False, True])
def test_binary_accumulators_match_official_test_loop(drop_frames):
  """10 clips (official batches 4, 4, 2) evaluated in eval batches of 8 clips, the last one
  padded with 6 garbage clips that must count nowhere; optionally some frames marked invalid."""
  rng = np.random.default_rng(1 + drop_frames)
  n_clips, h, w, eval_batch = 10, 16, 16, 8
  prob, target = make_binary_split(rng, n_clips, h, w)
  keep = np.ones((n_clips, T), bool)
  if drop_frames:
    keep[0, 1] = keep[3, 4] = keep[9, 0] = False
  expected = _official_binary_split(prob, target, keep)

  total = None
  for start in range(0, n_clips, eval_batch):
    p = grid_probs(rng, (eval_batch, T, h, w))  # padding clips hold garbage
    t = rng.integers(0, 2, (eval_batch, T, h, w)).astype(np.uint8)
    v = np.zeros((eval_batch, T), bool)
    m = min(eval_batch, n_clips - start)
    p[:m], t[:m], v[:m] = prob[start:start + m], target[start:start + m], keep[start:start + m]
    sums = BINARY_STEP(p, t, v, group_size=OFFICIAL_BATCH * T)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  got = metrics.finalize(total)
  assert set(got) == set(expected)
  for name, value in expected.items():
    assert abs(got[name] - value) < TOL, (name, got[name], value)
  # The padded last batch must not have changed the per-batch counts: 3 official batches.
  assert int(total['j_group_count']) == 3 and int(total['f_group_count']) == 3


def test_group_size_must_divide_batch_and_shapes_must_match():
  prob = np.zeros((6, 8, 8), np.float32)
  with pytest.raises(ValueError, match='group_size'):
    metrics.avsbench_f_accumulate(prob, prob, group_size=4)
  with pytest.raises(ValueError, match='shape'):
    metrics.avsbench_j_accumulate(prob, prob[:, :4])
  with pytest.raises(ValueError, match='valid'):
    metrics.binary_accumulate(prob, prob, np.ones((5,), bool))
  with pytest.raises(ValueError, match='pred_logits'):
    metrics.avsbench_iou(prob[0], prob[0])


# ------------------------------------------------------------------------------------------------
# AVSS


def _avss_split(rng, h, w, num_classes):
  """7 clips of T=10: v1 clips (5 real frames) and v2 clips (10); labels from a few classes, with
  a class only predicted (60) and one only in the ground truth (65)."""
  kinds = ['v1', 'v2', 'v1', 'v2', 'v2', 'v1', 'v2']
  classes = np.array([0, 0, 0, 3, 5, 12, num_classes - 1])
  target = classes[rng.integers(0, len(classes), (len(kinds), 10, h, w))]
  pred = np.where(rng.random(target.shape) < 0.5, target,
                  classes[rng.integers(0, len(classes), target.shape)])
  pred[0, 0, :3, :3] = 60
  target[1, 2, -3:, -3:] = 65
  target[3, 4] = 0  # an all-background frame
  pred[3, 4] = 0
  real = np.ones((len(kinds), 10), bool)
  for i, kind in enumerate(kinds):
    if kind == 'v1':
      real[i, 5:] = False
  return pred.astype(np.int32), target.astype(np.uint8), real


@pytest.mark.parametrize('keep_padded', [True, False])
def test_avss_accumulator_matches_official_test_loop(keep_padded):
  rng = np.random.default_rng(3)
  h, w, c, eval_batch = 10, 12, metrics.AVSS_NUM_CLASSES, 3
  pred, target, real = _avss_split(rng, h, w, c)
  n_clips = pred.shape[0]

  iou_sum, f_sum, count = np.zeros(c), np.zeros(c), np.zeros(c)
  for clip in range(n_clips):
    for t in range(10):
      if real[clip, t]:
        p, g = pred[clip, t], target[clip, t]
      elif keep_padded:  # the official padded frame: all background, predicted as such
        p, g = np.zeros((h, w), int), np.zeros((h, w), int)
      else:
        continue
      i, f, k = ref_avss_frame_stats(p, g, c)
      iou_sum, f_sum, count = iou_sum + i, f_sum + f, count + k
  exp_miou, exp_f = ref_avss_summary(iou_sum, f_sum, count)

  total = None
  for start in range(0, n_clips, eval_batch):  # 7 clips in batches of 3: the last has 2 fillers
    m = min(eval_batch, n_clips - start)
    p = rng.integers(0, c, (eval_batch, 10, h, w)).astype(np.int32)  # garbage everywhere else
    g = rng.integers(0, c, (eval_batch, 10, h, w)).astype(np.uint8)
    valid = np.zeros((eval_batch, 10), bool)
    padded = np.zeros((eval_batch, 10), bool)
    p[:m], g[:m] = pred[start:start + m], target[start:start + m]
    valid[:m] = real[start:start + m]
    padded[:m] = ~real[start:start + m]
    sums = SEMANTIC_STEP(p, g, valid, padded, num_classes=c, keep_padded=keep_padded)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)

  np.testing.assert_allclose(np.asarray(total['avss_iou_sum']), iou_sum, atol=TOL * 10)
  np.testing.assert_allclose(np.asarray(total['avss_f_sum']), f_sum, atol=TOL * 10)
  np.testing.assert_array_equal(np.asarray(total['avss_count']), count)
  got = metrics.finalize(total)
  assert abs(got['mIoU'] - exp_miou) < TOL and abs(got['F'] - exp_f) < TOL
  assert got['num_classes_seen'] == np.count_nonzero(count)
  assert count[60] > 0 and count[65] > 0 and count[1] == 0  # absent class 1 counts as 0


def test_avss_stats_and_summary_public():
  rng = np.random.default_rng(4)
  c = metrics.AVSS_NUM_CLASSES
  pred, target, _ = _avss_split(rng, 8, 8, c)
  pred, target = pred[:2].reshape(-1, 8, 8), target[:2].reshape(-1, 8, 8)
  iou_sum, f_sum, count = np.zeros(c), np.zeros(c), np.zeros(c)
  for p, g in zip(pred, target):
    i, f, k = ref_avss_frame_stats(p, g, c)
    iou_sum, f_sum, count = iou_sum + i, f_sum + f, count + k
  got = metrics.avss_stats(pred, target)
  np.testing.assert_allclose(got[0], iou_sum, atol=1e-5)
  np.testing.assert_allclose(got[1], f_sum, atol=1e-5)
  np.testing.assert_array_equal(got[2], count)
  miou, f = metrics.avss_summary(*got)
  exp = ref_avss_summary(iou_sum, f_sum, count)
  assert abs(miou - exp[0]) < TOL and abs(f - exp[1]) < TOL
  # Nothing seen at all: every class counts 0.
  assert metrics.avss_summary(np.zeros(c), np.zeros(c), np.zeros(c)) == (0.0, 0.0)
  with pytest.raises(ValueError, match='integer'):
    metrics.avss_stats(pred.astype(np.float32), target)


# ------------------------------------------------------------------------------------------------
# DAVIS


def square(size, top, left, side):
  m = np.zeros((size, size), bool)
  m[top:top + side, left:left + side] = True
  return m


def test_davis_hand_made_shapes():
  a = square(64, 20, 20, 20)
  assert metrics.davis_radius(64, 64) == 1  # ceil(0.008 * 90.5)
  assert metrics.davis_j(a, a) == 1.0 and metrics.davis_f(a, a) == 1.0
  empty = np.zeros((64, 64), bool)
  assert metrics.davis_j(empty, empty) == 1.0 and metrics.davis_f(empty, empty) == 1.0
  assert metrics.davis_j(empty, a) == 0.0 and metrics.davis_f(empty, a) == 0.0
  assert metrics.davis_f(a, empty) == 0.0
  # Shift by 1 px, within the tolerance: every boundary pixel is matched.
  assert metrics.davis_f(square(64, 20, 21, 20), a) == 1.0
  # Shift by d = 8 > tolerance 1 along x (side s = 20): each boundary is the 4s-pixel outline of
  # the box offset by half a pixel; matched are s - d + 2 pixels of the top and of the bottom row
  # and the 2 right-column pixels next to them: (2 (s - d) + 6) / 4s = 30 / 80 on both sides.
  b = square(64, 20, 28, 20)
  assert abs(metrics.davis_f(b, a) - 30 / 80) < TOL
  assert abs(metrics.davis_j(b, a) - (12 * 20) / (20 * 20 + 8 * 20)) < TOL
  # Far apart: nothing matches.
  assert metrics.davis_f(square(64, 0, 0, 10), square(64, 40, 40, 10)) == 0.0
  # Tolerance in pixels: a shift of 3 is matched with radius 3, not with the default radius 1.
  c = square(64, 20, 23, 20)
  assert metrics.davis_f(c, a, bound_th=3) == 1.0 and metrics.davis_f(c, a) < 1.0


@pytest.mark.parametrize('size,bound_th', [(40, 0.008), (40, 2), (40, 4), (224, 0.008)])
def test_davis_matches_reference_on_random_masks(size, bound_th):
  rng = np.random.default_rng(size + int(bound_th * 10))
  n = 2 if size == 224 else 8
  gt = blobs(rng, (n, size, size), 0.3)
  pred = np.where(rng.random((n, size, size)) < 0.05, ~gt, gt)  # noisy copy: many boundaries
  pred[0] = blobs(rng, (1, size, size), 0.2)[0]
  pred[1] = False  # empty prediction
  gt[-1] = False  # empty ground truth
  sums = jax.jit(metrics.davis_accumulate, static_argnames=('bound_th',))(
      pred, gt, bound_th=bound_th)
  exp_j = [ref_davis_j(p, g) for p, g in zip(pred, gt)]
  exp_f = [ref_davis_f(p, g, bound_th) for p, g in zip(pred, gt)]
  assert abs(float(sums['davis_j_sum']) - sum(exp_j)) < n * TOL
  assert abs(float(sums['davis_f_sum']) - sum(exp_f)) < n * TOL
  if size == 224:
    assert metrics.davis_radius(224, 224) == math.ceil(0.008 * math.hypot(224, 224)) == 3


def test_seg2bmap_matches_reference():
  rng = np.random.default_rng(7)
  seg = rng.random((3, 9, 7)) < 0.5
  seg[2] = True  # full mask: boundary on the last row/column only through the quirks
  got = np.asarray(jax.jit(metrics.seg2bmap)(seg))
  for i in range(3):
    np.testing.assert_array_equal(got[i], ref_seg2bmap(seg[i]))


# ------------------------------------------------------------------------------------------------
# Under jit, sums add across batches


def test_accumulators_jit_and_add_across_batches():
  rng = np.random.default_rng(8)
  prob = grid_probs(rng, (2, OFFICIAL_BATCH, T, 16, 16))
  target = blobs(rng, (2, OFFICIAL_BATCH, T, 16, 16), 0.3).astype(np.uint8)
  valid = rng.random((2, OFFICIAL_BATCH, T)) < 0.8
  group = OFFICIAL_BATCH * T
  a = BINARY_STEP(prob[0], target[0], valid[0], group_size=group)
  b = BINARY_STEP(prob[1], target[1], valid[1], group_size=group)
  both = BINARY_STEP(prob.reshape(-1, T, 16, 16), target.reshape(-1, T, 16, 16),
                     valid.reshape(-1, T), group_size=group)
  added = jax.tree.map(jnp.add, a, b)
  assert set(added) == set(both)
  for k in both:
    np.testing.assert_allclose(np.asarray(added[k]), np.asarray(both[k]), atol=1e-5, err_msg=k)
    assert added[k].dtype == both[k].dtype
  assert added['j_frame_count'].dtype == jnp.int32

  labels = rng.integers(0, 5, (2, T, 12, 12))
  sem = SEMANTIC_STEP(
      labels, labels, valid[0, :2], ~valid[0, :2], num_classes=5, keep_padded=True)
  assert sem['avss_iou_sum'].shape == (5,) and sem['avss_count'].dtype == jnp.int32
  # Prediction equal to the ground truth: every seen class has IoU and F 1.
  out = metrics.finalize(sem)
  assert abs(out['mIoU'] - 1.0) < TOL and abs(out['F'] - 1.0) < TOL
