"""Set-prediction targets from semantic label maps (docs/DESIGN.md §2).

One jittable function with static output shapes turns a clip batch of semantic maps into the
per-clip object sets that the Hungarian matcher and the segmentation losses consume:

- the objects of a clip are the classes present in its ground-truth frames, one object per class
  (semantic id c in 1..C becomes class index c - 1); ids outside 1..C (0 = background, or an
  ignore value such as 255) never form an object;
- a clip has room for ``num_queries`` (N) objects; when more classes are present, the N with the
  largest total area over the clip's ground-truth frames are kept (ties: the lower class id wins)
  and the clip is flagged in ``overflow``; the kept objects are listed by ascending class id,
  followed by the padding slots (``valid`` False, label 0, empty masks and boxes);
- per frame and object: the mask subsampled to the mask stride s by taking pixel
  ``[s//2::s, s//2::s]`` (the ReferFormer/CondInst convention: [2::4, 2::4] for s = 4), the tight
  box of the full-resolution mask in normalised (cx, cy, w, h) with pixel edges as bounds (a
  full-image object has the box (0.5, 0.5, 1, 1)), and presence (the full-resolution mask is
  non-empty; an object smaller than the stride can be present with an empty subsampled mask);
- frames without ground truth (``gt_valid`` or ``frame_valid`` False) have no objects at all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def make_targets(semantic, gt_valid, frame_valid, num_classes: int, num_queries: int,
                 mask_stride: int = 4) -> dict[str, jax.Array]:
  """Builds the padded per-clip object targets of a batch of semantic label maps.

  Args:
    semantic: integer [B, T, H, W] class id per pixel (0 = background, 1..C the classes; binary
      datasets: 1 = sounding object).
    gt_valid: bool [B, T], the frame has a ground-truth annotation.
    frame_valid: bool [B, T], the frame is real (not padding).
    num_classes: C, the number of foreground classes (1 for binary datasets).
    num_queries: N, the number of prediction slots, the size of the padded object set.
    mask_stride: s, the stride of the predicted masks; H and W must be multiples of it.

  Returns:
    A dict of arrays:
      ``labels`` int32 [B, N] class index (semantic id - 1), 0 in padding slots;
      ``valid`` bool [B, N] the slot holds an object;
      ``masks`` float32 [B, T, N, H/s, W/s] the object's subsampled mask in {0, 1};
      ``boxes`` float32 [B, T, N, 4] normalised (cx, cy, w, h), zeros where absent;
      ``present`` bool [B, T, N] the object is visible in frame t (a frame with ground truth);
      ``frame_has_gt`` bool [B, T] = gt_valid & frame_valid;
      ``overflow`` bool [B] the clip had more than N classes (the smallest were dropped);
      ``num_present`` int32 [B] the number of classes present in the clip (before truncation).
  """
  semantic = jnp.asarray(semantic)
  gt_valid = jnp.asarray(gt_valid)
  frame_valid = jnp.asarray(frame_valid)
  if semantic.ndim != 4:
    raise ValueError(f'make_targets: `semantic` must be [B, T, H, W], got shape {semantic.shape}.')
  if not jnp.issubdtype(semantic.dtype, jnp.integer):
    raise ValueError(f'make_targets: `semantic` must hold integer class ids, got dtype '
                     f'{semantic.dtype}; pass the label map, not a probability map.')
  batch, frames, height, width = semantic.shape
  for name, value in (('gt_valid', gt_valid), ('frame_valid', frame_valid)):
    if value.shape != (batch, frames):
      raise ValueError(f'make_targets: `{name}` must be [B, T] = {(batch, frames)}, got '
                       f'{value.shape}.')
  if num_classes < 1 or num_queries < 1:
    raise ValueError(f'make_targets: num_classes ({num_classes}) and num_queries ({num_queries}) '
                     'must be >= 1.')
  if mask_stride < 1 or height % mask_stride or width % mask_stride:
    raise ValueError(f'make_targets: the image size {height}x{width} must be a multiple of '
                     f'mask_stride={mask_stride}; resize or pad the frames.')

  frame_has_gt = gt_valid.astype(bool) & frame_valid.astype(bool)  # [B, T]
  ids = semantic.astype(jnp.int32)
  in_range = (ids >= 1) & (ids <= num_classes)

  # Area of every class over the ground-truth frames of each clip: a per-clip histogram.
  counted = in_range & frame_has_gt[:, :, None, None]
  area = jax.vmap(lambda s, w: jnp.bincount(s, w, length=num_classes + 1))(
      jnp.where(counted, ids, 0).reshape(batch, -1),
      counted.reshape(batch, -1).astype(jnp.int32))[:, 1:]  # [B, C]
  num_present = jnp.sum(area > 0, axis=-1).astype(jnp.int32)
  overflow = num_present > num_queries

  # Keep the N largest classes (stable sort: among equal areas the lower id comes first),
  # then list the kept ones by ascending class id with the empty slots last.
  keep = min(num_queries, num_classes)
  by_area = jnp.argsort(-area, axis=-1, stable=True)[:, :keep]  # [B, keep]
  kept = jnp.take_along_axis(area, by_area, axis=-1) > 0
  order = jnp.argsort(jnp.where(kept, by_area, num_classes), axis=-1, stable=True)
  labels = jnp.take_along_axis(by_area, order, axis=-1)
  valid = jnp.take_along_axis(kept, order, axis=-1)
  pad = num_queries - keep
  labels = jnp.pad(jnp.where(valid, labels, 0), ((0, 0), (0, pad))).astype(jnp.int32)
  valid = jnp.pad(valid, ((0, 0), (0, pad)))
  object_ids = jnp.where(valid, labels + 1, -1)  # semantic id of each slot, -1 = none

  # Full-resolution extents and presence per frame and object.
  full = (ids[:, :, None] == object_ids[:, None, :, None, None]) & \
      frame_has_gt[:, :, None, None, None]  # [B, T, N, H, W]
  rows = jnp.any(full, axis=-1)  # [B, T, N, H]
  cols = jnp.any(full, axis=-2)  # [B, T, N, W]
  present = jnp.any(rows, axis=-1)
  y0 = jnp.argmax(rows, axis=-1)
  y1 = height - jnp.argmax(rows[..., ::-1], axis=-1)
  x0 = jnp.argmax(cols, axis=-1)
  x1 = width - jnp.argmax(cols[..., ::-1], axis=-1)
  boxes = jnp.stack([(x0 + x1) / (2.0 * width), (y0 + y1) / (2.0 * height),
                     (x1 - x0) / width, (y1 - y0) / height], axis=-1).astype(jnp.float32)
  boxes = jnp.where(present[..., None], boxes, 0.0)

  start = mask_stride // 2
  sub = ids[:, :, start::mask_stride, start::mask_stride]
  masks = (sub[:, :, None] == object_ids[:, None, :, None, None]) & \
      frame_has_gt[:, :, None, None, None]

  return {
      'labels': labels,
      'valid': valid,
      'masks': masks.astype(jnp.float32),
      'boxes': boxes,
      'present': present,
      'frame_has_gt': frame_has_gt,
      'overflow': overflow,
      'num_present': num_present,
  }
