"""Evaluation metrics, exact to the official definitions (docs/DESIGN.md §5 and §8).

Metrics
-------
* **AVSBench J** (S4/MS3 "mIoU", official ``mask_iou``): foreground where the probability is
  > 0.5; per-frame IoU ``inter / (union + 1e-7)``; a frame with empty ground truth scores the
  fraction of pixels the prediction also leaves empty; mean over frames. The official test script
  averages the per-batch means (``J_official_per_batch``); over full batches that equals the frame
  mean (``J``).
* **AVSBench F** (S4/MS3 "F-score", official ``Eval_Fmeasure``): β² = 0.3, precision
  ``tp / (#pred + 1e-20)`` and recall ``tp / (#gt + 1e-20)`` at 255 thresholds
  ``torch.linspace(0, 1 - 1e-10, 255)`` (``prob >= threshold``); per-frame F curve, NaN -> 0;
  frames with empty ground truth skipped. Modes:
  ``F_official_per_batch``: the official one, max over thresholds of the mean curve of one test
  batch (4 clips), averaged over batches (a batch whose frames all have empty ground truth scores
  0 and still counts, as in the official code);
  ``F_dataset``: max over thresholds of the mean curve over all frames of the split;
  ``F_dataset_mean_pr``: max over thresholds of F(mean precision curve, mean recall curve).
* **AVSS mIoU / F** (official ``_batch_miou_fscore`` + test loop): per frame and class (71 ids,
  background 0), intersection / prediction / ground-truth areas; IoU = inter / (union + eps),
  F = (1 + β²) P R / (β² P + R) with NaN -> 0 (β² = 0.3); a class is counted in a frame when its
  union is non-empty; per class sum / count with never-seen classes 0; mean over all classes.
* **DAVIS J&F** (davis2017-evaluation ``db_eval_iou`` / ``f_measure``): J = IoU, 1 when both masks
  are empty; F = boundary F-measure, boundaries by ``seg2bmap``, matched within a disk of radius
  ``ceil(bound_th * image diagonal)`` (``bound_th`` >= 1 is a radius in pixels).

Device accumulation
-------------------
The ``*_accumulate`` functions are pure and jittable (pass ``group_size``, ``num_classes``,
``keep_padded``, ``bound_th``, ``with_davis`` as static arguments): one eval batch in, a dict of
sums out (fixed shapes, float32 sums, int32 counts). Sums of several batches add leaf by leaf,
``jax.tree.map(jnp.add, a, b)``, and under ``jax.jit`` over a sharded global batch they are
global by construction. The host divides once, in ``finalize`` (or ``finalize_binary`` /
``finalize_semantic``). Frames are taken in row-major order of the leading axes
(``[B, T, H, W]`` -> frame ``b * T + t``, the official ``view(B * T, H, W)``), and a per-frame
``valid`` mask (frames without ground truth, padding) removes frames from every sum. Probabilities
are expected in [0, 1]. The public §8 functions (``avsbench_iou`` ... ``davis_f``) run these same
accumulators on one batch and finalize. DAVIS J and F are averaged over frames.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qdformer_jax.data import classes

BETA2 = 0.3  # β² of the AVSBench and AVSS F-measures
NUM_THRESHOLDS = 255  # AVSBench F: thresholds of the precision/recall curve
AVSS_NUM_CLASSES = classes.NUM_AVSS_CLASSES  # AVSS: 70 sounding classes + background (id 0)
DAVIS_BOUND_TH = 0.008  # DAVIS F: boundary tolerance, fraction of the image diagonal

_IOU_EPS = 1e-7  # official mask_iou
_PR_EPS = 1e-20  # official _eval_pr
_AVSS_EPS = 2.220446049250313e-16  # official _batch_miou_fscore


# ------------------------------------------------------------------------------------------------
# Shapes and masks


def _prepare(pred: Any, target: Any, valid: Any, pred_name: str, target_name: str,
             pred_dtype=None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Check shapes, then flatten `pred` and `target` [..., H, W] to [N, H, W] and `valid` [...] to
  bool [N] (None -> all True)."""
  shape = tuple(np.shape(pred))
  if len(shape) < 3:
    raise ValueError(
        f"{pred_name}: expected frames of shape [..., H, W] with at least one leading axis, got "
        f"shape {shape}; add a frame axis, e.g. x[None]")
  if tuple(np.shape(target)) != shape:
    raise ValueError(f"{pred_name} has shape {shape} but {target_name} has shape "
                     f"{tuple(np.shape(target))}; they must match frame for frame and pixel "
                     "for pixel")
  lead = shape[:-2]
  frames = (-1,) + shape[-2:]
  pred = jnp.asarray(pred) if pred_dtype is None else jnp.asarray(pred, pred_dtype)
  target = jnp.asarray(target).reshape(frames)
  return pred.reshape(frames), target, _frame_mask(valid, lead, 'valid')


def _frame_mask(mask: Any, lead_shape: tuple[int, ...], name: str) -> jax.Array:
  """A per-frame bool mask [N] from `mask` of shape `lead_shape` (None -> all True)."""
  n = math.prod(lead_shape)
  if mask is None:
    return jnp.ones((n,), bool)
  if tuple(np.shape(mask)) != tuple(lead_shape):
    raise ValueError(f"{name}: expected one flag per frame, shape {tuple(lead_shape)}, got "
                     f"{tuple(np.shape(mask))}")
  return jnp.asarray(mask).reshape((n,)).astype(bool)


def _groups(n: int, group_size: int | None) -> int:
  """The frame count of one official test batch; `None` makes the whole input one batch."""
  if group_size is None:
    return max(n, 1)
  if group_size < 1 or n % group_size:
    raise ValueError(
        f"group_size={group_size} (frames per official test batch) must be positive and divide the "
        f"{n} frames of the batch: use an eval batch of a whole number of official test batches "
        "(4 clips in the official S4/MS3 test scripts), padded at the end with invalid clips")
  return group_size


# ------------------------------------------------------------------------------------------------
# AVSBench J (S4 / MS3)


def avsbench_j_accumulate(prob: Any, target: Any, valid: Any = None, *,
                          group_size: int | None = None, threshold: Any = 0.5) -> dict[str, jax.Array]:
  """Sums for AVSBench J over one batch of frames.

  Args:
    prob: foreground probability [..., H, W] (the official code thresholds sigmoid(logits) > 0.5).
    target: ground truth [..., H, W], foreground where > 0.
    valid: bool [...] frames to score (default all).
    group_size: frames per official test batch for ``J_official_per_batch``; ``None`` makes the
      whole input one batch.
    threshold: the prediction is ``prob > threshold`` (official 0.5; may be traced).

  Returns:
    ``j_iou_sum`` (sum of per-frame IoU), ``j_frame_count``; ``j_group_sum`` (sum over groups
    with at least one valid frame of the group's mean IoU) and ``j_group_count``.
  """
  p, t, v = _prepare(prob, target, valid, 'prob', 'target', jnp.float32)
  n, h, w = p.shape
  g = _groups(n, group_size)
  pred = p > threshold
  gt = t > 0
  inter = jnp.sum(pred & gt, axis=(1, 2))
  union = jnp.sum(pred | gt, axis=(1, 2))
  no_obj = ~jnp.any(gt, axis=(1, 2))
  inter = jnp.where(no_obj, jnp.sum(~pred, axis=(1, 2)), inter)
  union = jnp.where(no_obj, h * w, union)
  iou = inter.astype(jnp.float32) / (union.astype(jnp.float32) + jnp.float32(_IOU_EPS))
  iou = jnp.where(v, iou, 0.0)

  group_iou = iou.reshape(-1, g).sum(axis=1)
  group_n = v.reshape(-1, g).sum(axis=1)
  group_mean = jnp.where(group_n > 0, group_iou / jnp.maximum(group_n, 1), 0.0)
  return {
      'j_iou_sum': jnp.sum(iou),
      'j_frame_count': jnp.sum(v, dtype=jnp.int32),
      'j_group_sum': jnp.sum(group_mean),
      'j_group_count': jnp.sum(group_n > 0, dtype=jnp.int32),
  }


# ------------------------------------------------------------------------------------------------
# AVSBench F (S4 / MS3)


def fscore_thresholds(num: int = NUM_THRESHOLDS) -> np.ndarray:
  """float32 [num], bit-identical to the official ``torch.linspace(0, 1 - 1e-10, num)`` (CPU).

  PyTorch computes ``start + step * i`` for the first half and ``end - step * (num - 1 - i)`` for
  the second, each with one rounding (fused multiply-add), ``step`` and ``end`` in float32.
  """
  if num < 2:
    raise ValueError(f"fscore_thresholds: num={num} must be at least 2")
  end = np.float32(1 - 1e-10)
  step = np.float64(end / np.float32(num - 1))
  i = np.arange(num, dtype=np.float64)
  first = step * i
  second = np.float64(end) - step * (num - 1 - i)
  return np.where(i < num // 2, first, second).astype(np.float32)


def threshold_bins(prob: jax.Array, num: int = NUM_THRESHOLDS) -> jax.Array:
  """int32, the number of ``fscore_thresholds(num)`` that are <= prob, elementwise.

  Equal to ``searchsorted(thresholds, prob, side='right')`` but without a binary search: the
  thresholds are within an ulp of i / (num - 1), so c = floor(prob * (num - 1)) has every threshold
  below index c - 1 <= prob and every one above c + 1 > prob, and only th[c - 1 .. c + 1] are
  compared exactly.
  """
  th = np.concatenate([[-np.inf], fscore_thresholds(num), [np.inf]]).astype(np.float32)
  th = jnp.asarray(th)  # th[j + 1] is threshold j; th[0] = -inf, th[num + 1] = inf
  prob = prob.astype(jnp.float32)
  c = jnp.clip(jnp.floor(prob * (num - 1)), 0, num - 1).astype(jnp.int32)
  hits = sum((th[c + d] <= prob).astype(jnp.int32) for d in range(3))  # thresholds c-1, c, c+1
  return c - 1 + hits


def _f_curves(prob: jax.Array, gt: jax.Array, num_thresholds: int):
  """Per-frame precision, recall and F curves [N, K] of the official ``_eval_pr``."""
  n = prob.shape[0]
  k = num_thresholds
  # bins[n, p] = number of thresholds <= prob, so prob >= th[i] iff bins > i.
  bins = threshold_bins(prob.reshape(n, -1), k)
  ids = (jnp.arange(n, dtype=jnp.int32)[:, None] * (k + 1) + bins).reshape(-1)
  gt_flat = gt.reshape(-1).astype(jnp.int32)
  hist_all = jax.ops.segment_sum(jnp.ones_like(gt_flat), ids, num_segments=n * (k + 1))
  hist_tp = jax.ops.segment_sum(gt_flat, ids, num_segments=n * (k + 1))
  # Count of pixels with bins >= i + 1, i = 0 .. k - 1 (reverse cumulative sum).
  n_pred = jnp.cumsum(hist_all.reshape(n, k + 1)[:, ::-1], axis=1)[:, ::-1][:, 1:]
  tp = jnp.cumsum(hist_tp.reshape(n, k + 1)[:, ::-1], axis=1)[:, ::-1][:, 1:]
  n_gt = jnp.sum(gt_flat.reshape(n, -1), axis=1)
  tp = tp.astype(jnp.float32)
  precision = tp / (n_pred.astype(jnp.float32) + jnp.float32(_PR_EPS))
  recall = tp / (n_gt.astype(jnp.float32)[:, None] + jnp.float32(_PR_EPS))
  f = (1 + BETA2) * precision * recall / (BETA2 * precision + recall)
  f = jnp.where(jnp.isnan(f), 0.0, f)
  return precision, recall, f, n_gt


def avsbench_f_accumulate(prob: Any, target: Any, valid: Any = None, *,
                          group_size: int | None = None,
                          num_thresholds: int = NUM_THRESHOLDS) -> dict[str, jax.Array]:
  """Sums for the AVSBench F-measure over one batch of frames, in both modes.

  Args:
    prob: foreground probability [..., H, W] (official: sigmoid of the logits).
    target: ground truth [..., H, W], foreground where > 0.
    valid: bool [...] frames to score (default all). Valid frames with empty ground truth are
      skipped by the F-measure itself, as in the official code.
    group_size: frames per official test batch (official S4/MS3: 4 clips x 5 frames = 20);
      ``None`` makes the whole input one batch.
    num_thresholds: points of the precision/recall curve (official 255).

  Returns:
    ``f_group_sum`` (sum over groups of max over thresholds of the group's mean F curve; a group
    with valid frames but none with ground truth scores 0) and ``f_group_count`` (groups with at
    least one valid frame); ``f_curve_sum``, ``f_precision_sum``, ``f_recall_sum`` [K] summed over
    the scored frames and ``f_frame_count``, for the dataset-level modes.
  """
  p, t, v = _prepare(prob, target, valid, 'prob', 'target', jnp.float32)
  g = _groups(p.shape[0], group_size)
  precision, recall, f, n_gt = _f_curves(p, t > 0, num_thresholds)
  scored = v & (n_gt > 0)
  w = scored.astype(jnp.float32)[:, None]

  group_curve = (f * w).reshape(-1, g, num_thresholds).sum(axis=1)
  group_scored = scored.reshape(-1, g).sum(axis=1)
  group_mean = group_curve / jnp.maximum(group_scored, 1).astype(jnp.float32)[:, None]
  group_max = jnp.where(group_scored > 0, jnp.max(group_mean, axis=1), 0.0)
  group_valid = jnp.any(v.reshape(-1, g), axis=1)
  return {
      'f_group_sum': jnp.sum(jnp.where(group_valid, group_max, 0.0)),
      'f_group_count': jnp.sum(group_valid, dtype=jnp.int32),
      'f_curve_sum': jnp.sum(f * w, axis=0),
      'f_precision_sum': jnp.sum(precision * w, axis=0),
      'f_recall_sum': jnp.sum(recall * w, axis=0),
      'f_frame_count': jnp.sum(scored, dtype=jnp.int32),
  }


# ------------------------------------------------------------------------------------------------
# DAVIS J&F


def davis_radius(height: int, width: int, bound_th: float = DAVIS_BOUND_TH) -> int:
  """Boundary tolerance in pixels: ``bound_th`` if >= 1, else ceil(bound_th * image diagonal)."""
  if bound_th >= 1:
    if bound_th != int(bound_th):
      raise ValueError(f"bound_th={bound_th}: a tolerance >= 1 is a radius in pixels and must be a "
                       "whole number")
    return int(bound_th)
  if bound_th <= 0:
    raise ValueError(f"bound_th={bound_th} must be positive")
  return int(math.ceil(bound_th * math.sqrt(height * height + width * width)))


def disk(radius: int) -> np.ndarray:
  """bool [2r+1, 2r+1] disk footprint, dy² + dx² <= r² (skimage.morphology.disk)."""
  r = np.arange(-radius, radius + 1)
  return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius


def seg2bmap(seg: jax.Array) -> jax.Array:
  """DAVIS one-pixel-wide boundary map of binary masks [N, H, W] (bool), as ``_seg2bmap``.

  A pixel is a boundary pixel when it differs from its east, south or south-east neighbour; the
  last row compares with the east neighbour only, the last column with the south neighbour only,
  and the bottom-right pixel is never a boundary.
  """
  seg = seg.astype(bool)
  e = jnp.zeros_like(seg).at[:, :, :-1].set(seg[:, :, 1:])
  s = jnp.zeros_like(seg).at[:, :-1, :].set(seg[:, 1:, :])
  se = jnp.zeros_like(seg).at[:, :-1, :-1].set(seg[:, 1:, 1:])
  b = (seg ^ e) | (seg ^ s) | (seg ^ se)
  b = b.at[:, -1, :].set(seg[:, -1, :] ^ e[:, -1, :])
  b = b.at[:, :, -1].set(seg[:, :, -1] ^ s[:, :, -1])
  return b.at[:, -1, -1].set(False)


def _dilate(mask: jax.Array, radius: int) -> jax.Array:
  """Binary dilation of masks [N, H, W] by a disk (pixels outside the image are empty)."""
  # The disk is a stack of horizontal segments: row dy spans |dx| <= half_width(dy). Dilate each
  # distinct segment width once along x (a max-pool), then shift along y and take the union.
  if radius == 0:
    return mask
  x = mask.astype(jnp.float32)
  h = mask.shape[1]
  half_widths = {dy: int(np.max(np.nonzero(disk(radius)[dy + radius])[0])) - radius
                 for dy in range(-radius, radius + 1)}
  along_x = {
      hw: jax.lax.reduce_window(x, 0.0, jax.lax.max, (1, 1, 2 * hw + 1), (1, 1, 1),
                                ((0, 0), (0, 0), (hw, hw)))
      for hw in sorted(set(half_widths.values()))
  }
  out = jnp.zeros_like(x)
  for dy, hw in half_widths.items():
    if abs(dy) >= h:
      continue
    rows = jnp.pad(along_x[hw], ((0, 0), (radius, radius), (0, 0)))
    out = jnp.maximum(out, rows[:, radius + dy:radius + dy + h])
  return out > 0.5


def _davis_frames(pred: jax.Array, gt: jax.Array, bound_th: float):
  """Per-frame DAVIS J and F [N] of binary masks [N, H, W]."""
  inter = jnp.sum(pred & gt, axis=(1, 2))
  union = jnp.sum(pred | gt, axis=(1, 2))
  j = jnp.where(union == 0, 1.0, inter.astype(jnp.float32) / jnp.maximum(union, 1))

  radius = davis_radius(pred.shape[1], pred.shape[2], bound_th)
  fg_b = seg2bmap(pred)
  gt_b = seg2bmap(gt)
  fg_match = jnp.sum(fg_b & _dilate(gt_b, radius), axis=(1, 2)).astype(jnp.float32)
  gt_match = jnp.sum(gt_b & _dilate(fg_b, radius), axis=(1, 2)).astype(jnp.float32)
  n_fg = jnp.sum(fg_b, axis=(1, 2))
  n_gt = jnp.sum(gt_b, axis=(1, 2))
  # Empty boundary maps: precision 1 when the prediction has none, recall 1 when the GT has none.
  precision = jnp.where(n_fg == 0, 1.0, fg_match / jnp.maximum(n_fg, 1))
  recall = jnp.where(n_gt == 0, 1.0, gt_match / jnp.maximum(n_gt, 1))
  precision = jnp.where((n_fg > 0) & (n_gt == 0), 0.0, precision)
  recall = jnp.where((n_fg == 0) & (n_gt > 0), 0.0, recall)
  denom = precision + recall
  f = jnp.where(denom == 0, 0.0, 2 * precision * recall / jnp.where(denom == 0, 1.0, denom))
  return j, f


def davis_accumulate(pred: Any, gt: Any, valid: Any = None, *,
                     bound_th: float = DAVIS_BOUND_TH) -> dict[str, jax.Array]:
  """Sums of DAVIS J and F over binary frames.

  Args:
    pred, gt: masks [..., H, W], foreground where nonzero.
    valid: bool [...] frames to score (default all).
    bound_th: boundary tolerance (fraction of the diagonal, or pixels when >= 1).

  Returns:
    ``davis_j_sum``, ``davis_f_sum`` and ``davis_frame_count``.
  """
  pr, g, v = _prepare(pred, gt, valid, 'pred', 'gt')
  j, f = _davis_frames(pr != 0, g != 0, bound_th)
  return {
      'davis_j_sum': jnp.sum(jnp.where(v, j, 0.0)),
      'davis_f_sum': jnp.sum(jnp.where(v, f, 0.0)),
      'davis_frame_count': jnp.sum(v, dtype=jnp.int32),
  }


# ------------------------------------------------------------------------------------------------
# Binary tasks: everything at once


def binary_accumulate(prob: Any, target: Any, valid: Any = None, *,
                      group_size: int | None = None, bound_th: float = DAVIS_BOUND_TH,
                      with_davis: bool = True, threshold: Any = 0.5) -> dict[str, jax.Array]:
  """All binary-task sums (S4/MS3) of one eval batch: AVSBench J and F, DAVIS J and F.

  Args:
    prob: foreground probability [..., H, W], e.g. [B, T, H, W]; the binary prediction is
      ``prob > threshold`` (official 0.5; F is threshold-free: the max over its 255 thresholds).
    target: ground truth [..., H, W], foreground where > 0 (the batch's ``semantic``).
    valid: bool [...] frames to score, e.g. ``gt_valid & frame_valid``.
    group_size: frames per official test batch (S4/MS3: 4 clips x T = 5 -> 20), for the official
      per-batch J and F; ``None`` makes this whole batch one official batch.
    bound_th: DAVIS boundary tolerance.
    with_davis: also accumulate DAVIS J and F.

  Returns:
    the union of the dicts of ``avsbench_j_accumulate``, ``avsbench_f_accumulate`` and (with
    ``with_davis``) ``davis_accumulate``.
  """
  prob = jnp.asarray(prob, jnp.float32)
  sums = avsbench_j_accumulate(prob, target, valid, group_size=group_size, threshold=threshold)
  sums.update(avsbench_f_accumulate(prob, target, valid, group_size=group_size))
  if with_davis:
    sums.update(davis_accumulate(prob > threshold, jnp.asarray(target) > 0, valid, bound_th=bound_th))
  return sums


# ------------------------------------------------------------------------------------------------
# AVSS (semantic)


def semantic_accumulate(pred_labels: Any, target: Any, valid: Any = None, padded: Any = None, *,
                        num_classes: int = AVSS_NUM_CLASSES,
                        keep_padded: bool = False) -> dict[str, jax.Array]:
  """Per-class AVSS sums over one batch of label maps (official ``_batch_miou_fscore``).

  Args:
    pred_labels: predicted class ids [..., H, W] (0 = background).
    target: ground-truth class ids [..., H, W]. Ids outside [0, num_classes) are ignored (they
      fall outside the official histogram range).
    valid: bool [...] frames scored normally (frames with ground truth; default all).
    padded: bool [...] padding frames appended to short clips (v1s/v1m clips padded from 5 to
      10 frames), i.e. ``~frame_valid`` of real clips. Do not mark frames of clips that only pad
      the last eval batch: those must count nowhere.
    num_classes: number of ids including background (AVSS 71).
    keep_padded: score padded frames that are not ``valid`` as frames where prediction and ground
      truth are both all background, as the official AVSS test does; otherwise drop them.

  Returns:
    ``avss_iou_sum`` and ``avss_f_sum`` float32 [C] (per-frame IoU and F, β² = 0.3, summed over
    the frames where the class is in the prediction or the ground truth) and ``avss_count``
    int32 [C] (that number of frames).
  """
  pr, t, v = _prepare(pred_labels, target, valid, 'pred_labels', 'target')
  lead = tuple(np.shape(pred_labels))[:-2]
  pad = _frame_mask(padded, lead, 'padded') if padded is not None else jnp.zeros_like(v)
  as_background = pad & ~v & keep_padded
  use = v | as_background
  n = pr.shape[0]
  c = num_classes
  pr = jnp.where(as_background[:, None, None], 0, pr.astype(jnp.int32)).reshape(n, -1)
  t = jnp.where(as_background[:, None, None], 0, t.astype(jnp.int32)).reshape(n, -1)

  frame = jnp.arange(n, dtype=jnp.int32)[:, None]

  def histogram(labels, keep):
    keep = keep & (labels >= 0) & (labels < c)
    ids = jnp.where(keep, frame * c + labels, n * c).reshape(-1)  # n * c: dropped
    counts = jax.ops.segment_sum(jnp.ones_like(ids), ids, num_segments=n * c + 1)
    return counts[:-1].reshape(n, c).astype(jnp.float32)

  everything = jnp.ones_like(pr, bool)
  area_pred = histogram(pr, everything)
  area_lab = histogram(t, everything)
  area_inter = histogram(t, pr == t)
  area_union = area_pred + area_lab - area_inter
  iou = area_inter / (jnp.float32(_AVSS_EPS) + area_union)
  precision = area_inter / area_pred
  recall = area_inter / area_lab
  f = (1 + BETA2) * precision * recall / (BETA2 * precision + recall)
  f = jnp.where(jnp.isnan(f), 0.0, f)
  w = use[:, None]
  return {
      'avss_iou_sum': jnp.sum(jnp.where(w, iou, 0.0), axis=0),
      'avss_f_sum': jnp.sum(jnp.where(w, f, 0.0), axis=0),
      'avss_count': jnp.sum(w & (area_union > 0), axis=0, dtype=jnp.int32),
  }


# ------------------------------------------------------------------------------------------------
# Host side: sums -> numbers


def _host(sums: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return {k: np.asarray(jax.device_get(v), np.float64) for k, v in sums.items()}


def _ratio(num: np.ndarray, den: np.ndarray) -> float:
  """num / den, NaN when nothing was accumulated (den == 0)."""
  return float(num / den) if den > 0 else float('nan')


def finalize_binary(sums: Mapping[str, Any]) -> dict[str, float]:
  """Accumulated binary-task sums -> ``J``, ``J_official_per_batch``, ``F_official_per_batch``,
  ``F_dataset``, ``F_dataset_mean_pr``, ``davis_J``, ``davis_F``, ``davis_JF``, ``num_frames``
  (whichever parts were accumulated). A metric whose denominator is 0 is NaN."""
  s = _host(sums)
  out: dict[str, float] = {}
  if 'j_iou_sum' in s:
    out['J'] = _ratio(s['j_iou_sum'], s['j_frame_count'])
    out['J_official_per_batch'] = _ratio(s['j_group_sum'], s['j_group_count'])
    out['num_frames'] = float(s['j_frame_count'])
  if 'f_group_sum' in s:
    out['F_official_per_batch'] = _ratio(s['f_group_sum'], s['f_group_count'])
    count = s['f_frame_count']
    if count > 0:
      out['F_dataset'] = float(np.max(s['f_curve_sum'] / count))
      p = s['f_precision_sum'] / count
      r = s['f_recall_sum'] / count
      with np.errstate(invalid='ignore', divide='ignore'):
        f = (1 + BETA2) * p * r / (BETA2 * p + r)
      out['F_dataset_mean_pr'] = float(np.max(np.nan_to_num(f, nan=0.0)))
    else:
      out['F_dataset'] = out['F_dataset_mean_pr'] = float('nan')
  if 'davis_j_sum' in s:
    out['davis_J'] = _ratio(s['davis_j_sum'], s['davis_frame_count'])
    out['davis_F'] = _ratio(s['davis_f_sum'], s['davis_frame_count'])
    out['davis_JF'] = (out['davis_J'] + out['davis_F']) / 2
    out.setdefault('num_frames', float(s['davis_frame_count']))
  return out


def avss_summary(iou_sum: Any, f_sum: Any, count: Any) -> tuple[float, float]:
  """Per-class sums -> (mIoU, F): per class sum / count, never-seen classes 0, mean over all."""
  iou_sum = np.asarray(jax.device_get(iou_sum), np.float64)
  f_sum = np.asarray(jax.device_get(f_sum), np.float64)
  count = np.asarray(jax.device_get(count), np.float64)
  if not (iou_sum.shape == f_sum.shape == count.shape) or iou_sum.ndim != 1:
    raise ValueError(f"avss_summary: iou_sum, f_sum and count must be per-class vectors of one "
                     f"length, got shapes {iou_sum.shape}, {f_sum.shape}, {count.shape}")
  seen = count > 0
  safe = np.where(seen, count, 1.0)
  miou = np.where(seen, iou_sum / safe, 0.0).mean()
  f = np.where(seen, f_sum / safe, 0.0).mean()
  return float(miou), float(f)


def finalize_semantic(sums: Mapping[str, Any]) -> dict[str, float]:
  """Accumulated AVSS sums -> ``mIoU``, ``F`` (official AVSS) and ``num_classes_seen``."""
  miou, f = avss_summary(sums['avss_iou_sum'], sums['avss_f_sum'], sums['avss_count'])
  seen = int(np.count_nonzero(np.asarray(jax.device_get(sums['avss_count']))))
  return {'mIoU': miou, 'F': f, 'num_classes_seen': float(seen)}


def finalize(sums: Mapping[str, Any]) -> dict[str, float]:
  """Any accumulated sums (binary and/or semantic parts) -> flat dict of named floats."""
  out: dict[str, float] = {}
  if any(k.startswith(('j_', 'f_', 'davis_')) for k in sums):
    out.update(finalize_binary(sums))
  if 'avss_iou_sum' in sums:
    out.update(finalize_semantic(sums))
  if not out:
    raise ValueError(f"finalize: no known metric sums among the keys {sorted(sums)}; pass the "
                     "(added-up) dicts returned by the *_accumulate functions")
  return out


# ------------------------------------------------------------------------------------------------
# Public entry points (docs/DESIGN.md §8): one batch in, numbers out, via the accumulators above.

_jit_j = jax.jit(lambda logits, target: avsbench_j_accumulate(jax.nn.sigmoid(logits), target))
_jit_f = jax.jit(lambda logits, target: avsbench_f_accumulate(jax.nn.sigmoid(logits), target))
_jit_davis = jax.jit(davis_accumulate, static_argnames=('bound_th',))
_jit_semantic = jax.jit(semantic_accumulate, static_argnames=('num_classes', 'keep_padded'))


def _batch_args(pred: Any, target: Any, pred_name: str, ndim: int, pred_dtype=None):
  """Inputs of a public function as jnp arrays (device arrays stay there), shapes checked."""
  pred = jnp.asarray(pred) if pred_dtype is None else jnp.asarray(pred, pred_dtype)
  target = jnp.asarray(target)
  if pred.ndim != ndim or pred.shape != target.shape:
    shape = '[N, H, W]' if ndim == 3 else '[H, W]'
    raise ValueError(f"{pred_name} and target must both have shape {shape}, got "
                     f"{pred.shape} and {target.shape}")
  if pred.size == 0:
    raise ValueError(f"{pred_name}: empty input, shape {pred.shape}")
  return pred, target


def avsbench_iou(pred_logits: Any, target: Any) -> float:
  """AVSBench J of one batch: logits [N, H, W], target [N, H, W] in {0, 1} -> mean frame IoU."""
  logits, target = _batch_args(pred_logits, target, 'pred_logits', 3, np.float32)
  return finalize_binary(_jit_j(logits, target))['J']


def avsbench_fscore(pred_logits: Any, target: Any) -> float:
  """AVSBench F of one batch (official per-batch mode): max over thresholds of the batch-mean
  F curve over frames with non-empty ground truth (0 when there are none)."""
  logits, target = _batch_args(pred_logits, target, 'pred_logits', 3, np.float32)
  return finalize_binary(_jit_f(logits, target))['F_official_per_batch']


def avss_stats(pred_labels: Any, target: Any,
               num_classes: int = AVSS_NUM_CLASSES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """AVSS per-class (iou_sum, f_sum, count) of frames [N, H, W] of class ids, as NumPy arrays."""
  pred_labels, target = _batch_args(pred_labels, target, 'pred_labels', 3)
  for name, x in (('pred_labels', pred_labels), ('target', target)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"avss_stats: {name} must hold integer class ids, got dtype {x.dtype}")
  sums = _jit_semantic(pred_labels, target, num_classes=num_classes)
  return (np.asarray(sums['avss_iou_sum']), np.asarray(sums['avss_f_sum']),
          np.asarray(sums['avss_count']))


def davis_j(pred: Any, gt: Any) -> float:
  """DAVIS region similarity J of one binary frame [H, W] (1 when both masks are empty)."""
  pred, gt = _batch_args(pred, gt, 'pred', 2)
  return finalize_binary(_jit_davis(pred[None], gt[None]))['davis_J']


def davis_f(pred: Any, gt: Any, bound_th: float = DAVIS_BOUND_TH) -> float:
  """DAVIS boundary F-measure of one binary frame [H, W] (1 when both masks are empty)."""
  pred, gt = _batch_args(pred, gt, 'pred', 2)
  return finalize_binary(_jit_davis(pred[None], gt[None], bound_th=bound_th))['davis_F']
