"""Clip-level set matching of prediction slots to ground-truth objects (docs/DESIGN.md §2).

Prediction slot i (over all T frames) is matched to ground-truth object j (over all T frames) by a
minimum-cost assignment computed on the device, inside the jitted step, by
``optax.assignment.hungarian_algorithm`` (no host callback). The cost of a pair is

  w_cls * mean_{t with GT} cls(i, j, t)
  + mean_{t : j present} [w_L1 L1 + w_GIoU (1 - GIoU) + w_mask mask + w_dice (1 - dice)](i, j, t)

The class term follows the ReferFormer / Deformable-DETR focal cost in the multi-class sigmoid
formulation (class targets one-hot over C, "no object" = all zeros): where object j is present at
frame t, cls = FL(p_{t,i,c_j}, 1) - FL(p_{t,i,c_j}, 0), the change of slot i's focal class loss when
it takes class c_j instead of "no object"; where j is absent at t both alternatives are "no object"
and cls = 0. The mask terms are the per-frame losses of the criterion (mean binary cross-entropy or
focal loss over the stride-4 pixels, dice with +1 smoothing). Padding columns (no object) cost 0,
so the square N x N problem has the optimum of the rectangular N x M one.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

# Stand-in for non-finite costs: keeps the Hungarian loops finite (NaN outputs would otherwise make
# every comparison false); the resulting matching is arbitrary but the step does not hang.
_NONFINITE_COST = 1e8


def hungarian(cost) -> tuple[jax.Array, jax.Array]:
  """Minimum-cost assignment of the rows to the columns of cost matrices.

  Args:
    cost: [..., n, m] real costs; leading axes are batch axes (solved independently). The cost is
      under stop_gradient: the assignment carries no gradient. Non-finite entries are replaced by a
      large finite cost.

  Returns:
    (rows, cols), int32 [..., k] with k = min(n, m): row rows[..., a] is assigned to column
    cols[..., a], rows ascending (rows = arange(n) when n <= m). The total cost is
    ``cost[..., rows, cols].sum(-1)``, the minimum over all assignments of k pairs. Jittable and
    vmappable.
  """
  cost = jnp.asarray(cost)
  if cost.ndim < 2:
    raise ValueError(f'hungarian: cost must have shape [..., n, m], got {cost.shape}.')
  cost = jax.lax.stop_gradient(cost.astype(jnp.promote_types(cost.dtype, jnp.float32)))
  cost = jnp.nan_to_num(cost, nan=_NONFINITE_COST, posinf=_NONFINITE_COST,
                        neginf=-_NONFINITE_COST)
  *batch, n, m = cost.shape
  k = min(n, m)
  if k == 0 or math.prod(batch) == 0:
    empty = jnp.zeros((*batch, k), jnp.int32)
    return empty, empty

  def solve(matrix):
    rows, cols = optax.assignment.hungarian_algorithm(matrix)
    order = jnp.argsort(rows)
    return rows[order].astype(jnp.int32), cols[order].astype(jnp.int32)

  # A cost sharded over explicit mesh axes (sharding in types, the jax.make_mesh default) is
  # gathered first: the solver's loop state is created unsharded, and mixing it with sharded
  # operands is ambiguous. The matrices are tiny; the assignment is resharded like the batch.
  sharding = _explicit_sharding(cost)
  if sharding is not None:
    cost = jax.sharding.reshard(cost, NamedSharding(sharding.mesh, PartitionSpec()))
  rows, cols = jax.vmap(solve)(cost.reshape(-1, n, m))
  rows, cols = rows.reshape(*batch, k), cols.reshape(*batch, k)
  if sharding is not None:
    spec = (tuple(sharding.spec) + (None,) * cost.ndim)[:len(batch)]
    target = NamedSharding(sharding.mesh, PartitionSpec(*spec, None))
    rows, cols = jax.sharding.reshard(rows, target), jax.sharding.reshard(cols, target)
  return rows, cols


def _explicit_sharding(x: jax.Array) -> NamedSharding | None:
  """The sharding in x's type when some axis is sharded over an explicit mesh axis, else None."""
  sharding = getattr(jax.typeof(x), 'sharding', None)
  if not isinstance(sharding, NamedSharding) or sharding.mesh.empty:
    return None
  if all(axis is None for axis in sharding.spec):
    return None
  return sharding


def box_cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  """(cx, cy, w, h) -> (x0, y0, x1, y1) on the last axis."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def _safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den where den > 0, else 0 (with finite gradients on both branches)."""
  positive = den > 0
  return jnp.where(positive, num / jnp.where(positive, den, 1.0), 0.0)


def generalized_box_iou(boxes_a: jax.Array, boxes_b: jax.Array) -> jax.Array:
  """Generalised IoU of (cx, cy, w, h) boxes, elementwise over broadcast leading axes.

  GIoU = IoU - (|E| - |A u B|) / |E| with E the smallest enclosing box (Rezatofighi et al. 2019).
  Degenerate cases with a zero union or enclosure count as 0 for that ratio. For pairwise values
  pass boxes_a[..., :, None, :] and boxes_b[..., None, :, :].
  """
  a = box_cxcywh_to_xyxy(boxes_a)
  b = box_cxcywh_to_xyxy(boxes_b)
  area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
  area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  inter_wh = jnp.clip(jnp.minimum(a[..., 2:], b[..., 2:]) - jnp.maximum(a[..., :2], b[..., :2]),
                      min=0.0)
  inter = inter_wh[..., 0] * inter_wh[..., 1]
  union = area_a + area_b - inter
  hull_wh = jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2])
  hull = hull_wh[..., 0] * hull_wh[..., 1]
  return _safe_divide(inter, union) - _safe_divide(hull - union, hull)


def focal_pos_neg(logits: jax.Array, alpha: float, gamma: float) -> tuple[jax.Array, jax.Array]:
  """Sigmoid focal loss of every logit against target 1 and against target 0 (elementwise).

  For binary targets y the focal loss is y * pos + (1 - y) * neg, which makes pairwise costs
  matrix products.
  """
  pos = optax.sigmoid_focal_loss(logits, jnp.ones((), logits.dtype), alpha=alpha, gamma=gamma)
  neg = optax.sigmoid_focal_loss(logits, jnp.zeros((), logits.dtype), alpha=alpha, gamma=gamma)
  return pos, neg


def mask_pos_neg(logits: jax.Array, mask_loss: str, alpha: float,
                 gamma: float) -> tuple[jax.Array, jax.Array]:
  """Per-pixel mask loss against target 1 and against target 0: 'bce' or 'focal'."""
  if mask_loss == 'bce':
    return jax.nn.softplus(-logits), jax.nn.softplus(logits)
  if mask_loss == 'focal':
    return focal_pos_neg(logits, alpha, gamma)
  raise ValueError(f"mask_loss must be 'bce' or 'focal', got {mask_loss!r}.")


def _masked_mean(values: jax.Array, weights: jax.Array, axis: int) -> jax.Array:
  """Mean of values over `axis` where weights (bool) hold; 0 where none does."""
  count = jnp.sum(weights, axis=axis)
  total = jnp.sum(jnp.where(weights, values, 0.0), axis=axis)
  return total / jnp.maximum(count, 1)


def clip_cost_matrix(pred_logits: jax.Array, pred_boxes: jax.Array, pred_masks: jax.Array,
                     targets: dict[str, jax.Array], config: Any) -> jax.Array:
  """Clip-level matching cost [B, N, N] (rows: prediction slots, columns: target objects).

  Args:
    pred_logits: [B, T, N, C] class logits.
    pred_boxes: [B, T, N, 4] normalised (cx, cy, w, h).
    pred_masks: [B, T, N, h, w] mask logits at the mask stride.
    targets: the dict of ``targets.make_targets`` (N target slots).
    config: a resolved ``criterion.LossConfig`` (weights, focal alpha/gamma, mask_loss).

  Returns:
    float32 [B, N, N]; columns of padding slots are 0.
  """
  logits = pred_logits.astype(jnp.float32)
  boxes = pred_boxes.astype(jnp.float32)
  masks = pred_masks.astype(jnp.float32)
  batch, frames, slots = logits.shape[:3]
  labels = targets['labels']  # [B, N]
  present = targets['present']  # [B, T, N]
  has_gt = targets['frame_has_gt']  # [B, T]
  hi = jax.lax.Precision.HIGHEST

  # Class: FL(target c_j) - FL("no object") of slot i at frame t where j is present.
  pos, neg = focal_pos_neg(logits, config.focal_alpha, config.focal_gamma)
  index = jnp.broadcast_to(labels[:, None, None, :], (batch, frames, slots, labels.shape[-1]))
  cost_class = jnp.take_along_axis(pos - neg, index, axis=-1)  # [B, T, i, j]
  cost_class = jnp.where(present[:, :, None, :], cost_class, 0.0)
  cost_class = _masked_mean(cost_class, jnp.broadcast_to(has_gt[:, :, None, None],
                                                         cost_class.shape), axis=1)

  # Boxes and masks per frame, averaged over the frames where object j is present.
  cost_l1 = jnp.sum(jnp.abs(boxes[:, :, :, None, :] - targets['boxes'][:, :, None, :, :]), -1)
  cost_giou = 1.0 - generalized_box_iou(boxes[:, :, :, None, :], targets['boxes'][:, :, None])
  flat_logits = masks.reshape(batch, frames, slots, -1)
  flat_targets = targets['masks'].reshape(batch, frames, labels.shape[-1], -1)
  pixels = flat_logits.shape[-1]
  mpos, mneg = mask_pos_neg(flat_logits, config.mask_loss, config.focal_alpha, config.focal_gamma)
  cost_mask = (jnp.einsum('btip,btjp->btij', mpos - mneg, flat_targets, precision=hi)
               + jnp.sum(mneg, -1)[..., None]) / pixels
  probs = jax.nn.sigmoid(flat_logits)
  numerator = 2.0 * jnp.einsum('btip,btjp->btij', probs, flat_targets, precision=hi) + 1.0
  denominator = jnp.sum(probs, -1)[..., :, None] + jnp.sum(flat_targets, -1)[..., None, :] + 1.0
  cost_dice = 1.0 - numerator / denominator
  per_frame = (config.l1_weight * cost_l1 + config.giou_weight * cost_giou
               + config.mask_weight * cost_mask + config.dice_weight * cost_dice)
  cost_geometry = _masked_mean(per_frame, jnp.broadcast_to(present[:, :, None, :],
                                                           per_frame.shape), axis=1)

  cost = config.cls_weight * cost_class + cost_geometry
  return jnp.where(targets['valid'][:, None, :], cost, 0.0)


def match(layer_outputs: dict[str, jax.Array], targets: dict[str, jax.Array],
          config: Any) -> jax.Array:
  """Target slot matched to each prediction slot: int32 [B, N] (a permutation per clip).

  Computed from the stop-gradient of the layer's outputs: the matching carries no gradient.
  Prediction slots matched to padding columns are unmatched ("no object").
  """
  outputs = jax.lax.stop_gradient({k: layer_outputs[k] for k in
                                   ('pred_logits', 'pred_boxes', 'pred_masks')})
  cost = clip_cost_matrix(outputs['pred_logits'], outputs['pred_boxes'], outputs['pred_masks'],
                          targets, config)
  _, cols = hungarian(cost)
  return cols
