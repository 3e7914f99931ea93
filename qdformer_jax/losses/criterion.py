"""QDFormer training loss L = λ_quant L_quant + L_segm (paper §3.5, docs/DESIGN.md §2).

``compute_loss`` is a pure function of the model outputs and the batch:

- targets from the semantic maps (``targets.make_targets``);
- for the last decoder layer and, with ``aux_loss``, every intermediate one (``aux_outputs``,
  terms suffixed ``_aux_{i}``): a clip-level Hungarian matching (``matching.match``) and, on it,
  the segmentation terms
    class  sigmoid focal loss of every slot, every frame with ground truth, every class, against
           the one-hot target of its matched object where that object is present and all zeros
           ("no object") elsewhere (unmatched slots, absent objects);
    bbox   L1 of (cx, cy, w, h), summed over the 4 coordinates;   giou  1 - GIoU;
    mask   mean per-pixel binary cross-entropy (``mask_loss='bce'``) or focal loss ('focal') at
           the mask stride;                                        dice  1 - dice (+1 smoothing);
  box and mask terms on the (matched slot, frame) pairs whose object is present; every term summed
  over the batch and divided by the number of target frames, n = the (object, frame) pairs with
  the object present in the global batch (the DETR/ReferFormer ``num_boxes``), at least 1. The sums
  run over the whole batch axis, so under jax.jit on a batch sharded over devices they are global
  and the loss does not depend on the device count;
- L_quant (Eq. 9) when the model's ``vq`` output is not None;
- with ``slot_entropy_weight`` > 0, the slot-conditioned code entropy term (``slot_entropy_loss``).

Each term is multiplied by its weight from a single table (``loss_weights``) and returned under
``loss_{name}[_aux_{i}]``; the total loss is their sum. Diagnostics (unweighted, not in the loss):
``num_target_frames``, ``num_gt_frames``, ``overflow_clips`` (clips with more classes than slots,
whose smallest classes were dropped from the targets), ``vq_global_sqerr`` and ``vq_local_sqerr``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from qdformer_jax.losses import matching
from qdformer_jax.losses.targets import make_targets


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Loss weights and options (docs/DESIGN.md §2). Their defaults live in ``configs/base.py``'s
  ``loss`` table only: :func:`resolve_loss_config` fills what a config leaves out from it."""
  cls_weight: float
  l1_weight: float
  giou_weight: float
  mask_weight: float
  dice_weight: float
  focal_alpha: float
  focal_gamma: float
  mask_loss: str
  quant_weight: float
  commit_weight: float
  quant_reduction: str
  slot_entropy_weight: float
  slot_entropy_temperature: float
  aux_loss: bool


def default_loss_table() -> dict:
  """``configs/base.py``'s loss table (the ReferFormer-lineage weights; the one place they live)."""
  from configs import base  # the repository's config package (installed with the library)
  return dict(base.get_base_config().loss)


def resolve_loss_config(loss_config: Any) -> LossConfig:
  """A ``LossConfig`` from a mapping, an attribute object (ml_collections) or None (defaults).

  Fields the config does not set take the defaults of ``configs/base.py`` (:func:`default_loss_table`);
  fields it sets that ``LossConfig`` does not know are ignored.
  """
  if isinstance(loss_config, LossConfig):
    resolved = loss_config
  else:
    defaults = default_loss_table()
    values = {}
    for field in dataclasses.fields(LossConfig):
      values[field.name] = defaults[field.name]
      if loss_config is None:
        continue
      if isinstance(loss_config, Mapping):
        if field.name in loss_config:
          values[field.name] = loss_config[field.name]
      elif hasattr(loss_config, field.name):
        values[field.name] = getattr(loss_config, field.name)
    resolved = LossConfig(**values)
  if resolved.quant_reduction not in ('sum', 'mean'):
    raise ValueError(f"loss_config.quant_reduction must be 'sum' or 'mean', got "
                     f'{resolved.quant_reduction!r}.')
  if resolved.mask_loss not in ('bce', 'focal'):
    raise ValueError(f"loss_config.mask_loss must be 'bce' or 'focal', got "
                     f'{resolved.mask_loss!r}.')
  return resolved


def loss_weights(config: LossConfig) -> dict[str, float]:
  """The single weight table: term name -> weight."""
  return {
      'class': config.cls_weight,
      'bbox': config.l1_weight,
      'giou': config.giou_weight,
      'mask': config.mask_weight,
      'dice': config.dice_weight,
      'quant': config.quant_weight,
      'slot_entropy': config.slot_entropy_weight,
  }


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float,
                       gamma: float) -> jax.Array:
  """Elementwise sigmoid focal loss -α_t (1 - p_t)^γ log p_t (Lin et al. 2017)."""
  return optax.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma)


def mask_loss(logits: jax.Array, targets: jax.Array, kind: str, alpha: float,
              gamma: float) -> jax.Array:
  """Per-mask mean over the last two (pixel) axes of the BCE or focal loss: [..., h, w] -> [...]."""
  if kind == 'bce':
    per_pixel = optax.sigmoid_binary_cross_entropy(logits, targets)
  elif kind == 'focal':
    per_pixel = sigmoid_focal_loss(logits, targets, alpha, gamma)
  else:
    raise ValueError(f"mask_loss must be 'bce' or 'focal', got {kind!r}.")
  return jnp.mean(per_pixel, axis=(-2, -1))


def dice_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-mask dice loss 1 - (2 Σ σ(x) y + 1) / (Σ σ(x) + Σ y + 1): [..., h, w] -> [...]."""
  probs = jax.nn.sigmoid(logits)
  numerator = 2.0 * jnp.sum(probs * targets, axis=(-2, -1)) + 1.0
  denominator = jnp.sum(probs, axis=(-2, -1)) + jnp.sum(targets, axis=(-2, -1)) + 1.0
  return 1.0 - numerator / denominator


def slot_entropy_loss(sqdist: jax.Array, valid: jax.Array, temperature: float, dim: int) -> jax.Array:
  """Slot-conditioned code entropy: mean over slots of E[H(p(k | token))] − H(E[p(k | token)]).

  sqdist [..., N, K]: squared distances of each slot's tokens to the K codewords (leading axes: the
  clips / frames, pooled per slot over ``valid`` [...]); p = softmax(−sqdist / (2·dim·τ)) (for tokens
  and codes on the √dim sphere sqdist / 2·dim = 1 − cos). Minimising it makes each token choose one code
  confidently and each slot spread its choices over the codebook across clips and frames. The
  unconditioned version (the entropy of the code histogram pooled over slots) is already high when
  every slot keeps one constant code, so it cannot ask the codes to follow the audio; this one can.
  """
  logp = jax.nn.log_softmax(-sqdist.astype(jnp.float32) / (2.0 * dim * temperature), axis=-1)
  p = jnp.exp(logp)
  n = sqdist.shape[-2]
  w = valid.reshape(-1, 1, 1).astype(jnp.float32)
  p, logp = p.reshape(-1, n, p.shape[-1]) * w, logp.reshape(-1, n, p.shape[-1])
  count = jnp.maximum(jnp.sum(w), 1.0)
  token_entropy = -jnp.sum(p * logp) / (count * n)
  marginal = jnp.sum(p, axis=0) / count                                    # [N, K]
  marginal_entropy = -jnp.mean(jnp.sum(marginal * jnp.log(marginal + 1e-10), -1))
  return token_entropy - marginal_entropy


def quantization_loss(vq: Mapping[str, jax.Array], commit_weight: float,
                      local_valid: jax.Array, reduction: str = 'sum') -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_quant of Eq. 9, averaged over the clips of the batch.

  Per clip: Σ_i ‖e_i - sg[g_i]‖² + λ_com ‖sg[e_i] - g_i‖² + λ_com Σ_{valid t} ‖sg[VQ(l_it)] - l_it‖²
  with squared L2 norms over the channel axis. The codebook receives gradient only through e_i in
  the first term (``global_codes`` = codebook[idx], differentiable w.r.t. the codebook); the other
  two terms move only the tokens g and l.

  Args:
    vq: the model's ``vq`` dict (``global_tokens``, ``global_codes`` [B, N, d], ``local_tokens``,
      ``local_codes`` [B, T, N, d]).
    commit_weight: λ_com.
    local_valid: bool [B, T], the frames whose local tokens count.
    reduction: 'sum' takes ‖·‖² literally (sum over the d channels); 'mean' divides it by d, as
      PyTorch VQ code does with ``F.mse_loss`` (the same loss with λ_quant / d), which keeps the term
      on the scale of the segmentation terms whatever d is. Without local tokens (no local
      calibration) the third term is absent.

  Returns:
    (L_quant, diagnostics) with the batch means of Σ_i ‖e_i - g_i‖² (``vq_global_sqerr``) and
    Σ_{valid t, i} ‖VQ(l_it) - l_it‖² (``vq_local_sqerr``).
  """
  sg = jax.lax.stop_gradient
  g = vq['global_tokens'].astype(jnp.float32)
  e = vq['global_codes'].astype(jnp.float32)
  has_local = vq.get('local_tokens') is not None
  l = vq['local_tokens'].astype(jnp.float32) if has_local else None
  lq = vq['local_codes'].astype(jnp.float32) if has_local else None
  if e.shape != g.shape or (has_local and (lq.shape != l.shape or l.shape[:2] != local_valid.shape)):
    raise ValueError(f'vq: inconsistent shapes global_tokens {g.shape}, global_codes {e.shape}, '
                     f'local_tokens {None if l is None else l.shape}, local_codes '
                     f'{None if lq is None else lq.shape}, local_valid {local_valid.shape}; '
                     'expected [B,N,d], [B,N,d], [B,T,N,d], [B,T,N,d], [B,T].')
  scale = 1.0 / g.shape[-1] if reduction == 'mean' else 1.0
  codebook_term = scale * jnp.sum(jnp.square(e - sg(g)), axis=(1, 2))
  global_commit = scale * jnp.sum(jnp.square(sg(e) - g), axis=(1, 2))
  if has_local:
    local_sq = scale * jnp.sum(jnp.square(sg(lq) - l), axis=(2, 3))  # [B, T]
    local_commit = jnp.sum(jnp.where(local_valid, local_sq, 0.0), axis=1)
  else:
    local_commit = jnp.zeros_like(global_commit)
  total = jnp.mean(codebook_term + commit_weight * (global_commit + local_commit))
  return total, {'vq_global_sqerr': sg(jnp.mean(global_commit)),
                 'vq_local_sqerr': sg(jnp.mean(local_commit))}


def segmentation_losses(layer_outputs: Mapping[str, jax.Array], targets: Mapping[str, jax.Array],
                        assignment: jax.Array, num_target_frames: jax.Array,
                        config: LossConfig) -> dict[str, jax.Array]:
  """Unweighted segmentation terms of one decoder layer for a given matching.

  Args:
    layer_outputs: ``pred_logits`` [B,T,N,C], ``pred_boxes`` [B,T,N,4], ``pred_masks``
      [B,T,N,h,w].
    targets: the dict of ``make_targets``.
    assignment: int32 [B, N], the target slot of each prediction slot (``matching.match``).
    num_target_frames: the normaliser n (>= 1).
    config: the resolved loss config.

  Returns:
    {'class', 'bbox', 'giou', 'mask', 'dice'} -> scalar, each a sum over the batch divided by n.
  """
  logits = layer_outputs['pred_logits'].astype(jnp.float32)
  boxes = layer_outputs['pred_boxes'].astype(jnp.float32)
  masks = layer_outputs['pred_masks'].astype(jnp.float32)
  num_classes = logits.shape[-1]
  has_gt = targets['frame_has_gt']

  labels = jnp.take_along_axis(targets['labels'], assignment, axis=1)  # [B, N]
  valid = jnp.take_along_axis(targets['valid'], assignment, axis=1)
  present = jnp.take_along_axis(targets['present'], assignment[:, None, :], axis=2)
  present = present & valid[:, None, :]  # [B, T, N]
  target_boxes = jnp.take_along_axis(targets['boxes'], assignment[:, None, :, None], axis=2)
  target_masks = jnp.take_along_axis(targets['masks'], assignment[:, None, :, None, None], axis=2)

  class_targets = jax.nn.one_hot(labels, num_classes)[:, None] * present[..., None]
  focal = sigmoid_focal_loss(logits, class_targets, config.focal_alpha, config.focal_gamma)
  loss_class = jnp.sum(jnp.where(has_gt[:, :, None, None], focal, 0.0))

  def over_present(values):
    return jnp.sum(jnp.where(present, values, 0.0))

  loss_bbox = over_present(jnp.sum(jnp.abs(boxes - target_boxes), axis=-1))
  loss_giou = over_present(1.0 - matching.generalized_box_iou(boxes, target_boxes))
  loss_mask = over_present(mask_loss(masks, target_masks, config.mask_loss, config.focal_alpha,
                                     config.focal_gamma))
  loss_dice = over_present(dice_loss(masks, target_masks))
  return {name: value / num_target_frames for name, value in (
      ('class', loss_class), ('bbox', loss_bbox), ('giou', loss_giou), ('mask', loss_mask),
      ('dice', loss_dice))}


def _check_layer(name: str, layer: Mapping[str, jax.Array], shape: tuple[int, ...]) -> None:
  """Raises a ValueError naming the field when a layer's outputs do not have the expected shapes."""
  batch, frames, slots, num_classes, height, width = shape
  expected = {'pred_logits': (batch, frames, slots, num_classes),
              'pred_boxes': (batch, frames, slots, 4),
              'pred_masks': (batch, frames, slots, height, width)}
  for key, want in expected.items():
    if key not in layer:
      raise ValueError(f'compute_loss: {name} has no {key!r}.')
    if tuple(layer[key].shape) != want:
      raise ValueError(f'compute_loss: {name}[{key!r}] has shape {tuple(layer[key].shape)}, '
                       f'expected {want} ([B,T,N,...] with C = num_classes = {num_classes} and '
                       'masks of the last layer).')


def compute_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], loss_config: Any,
                 num_classes: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training loss of a batch and its terms.

  Args:
    outputs: the model's output dict (docs/contracts.md "Model outputs"): ``pred_logits``,
      ``pred_boxes``, ``pred_masks``, optional ``aux_outputs`` (tuple of dicts with the same three
      keys) and ``vq`` (None when quantization is disabled).
    batch: needs ``semantic`` [B,T,H,W], ``gt_valid`` and ``frame_valid`` [B,T]. H and W must be
      the mask size times the mask stride.
    loss_config: a ``LossConfig``, mapping or ml_collections config with its fields (None:
      defaults).
    num_classes: C (1 for the binary datasets, semantic id 1 = sounding object).

  Returns:
    (loss, terms): the scalar loss and a flat dict of the weighted terms ``loss_*`` (their sum is
    the loss) and the unweighted diagnostics.
  """
  config = resolve_loss_config(loss_config)
  weights = loss_weights(config)
  for key in ('pred_logits', 'pred_boxes', 'pred_masks'):
    if key not in outputs:
      raise ValueError(f'compute_loss: outputs has no {key!r}; pass the model output dict.')
  for key in ('semantic', 'gt_valid', 'frame_valid'):
    if key not in batch:
      raise ValueError(f'compute_loss: batch has no {key!r} (see docs/DESIGN.md §4.2).')
  batch_size, frames, slots = outputs['pred_logits'].shape[:3]
  mask_h, mask_w = outputs['pred_masks'].shape[-2:]
  semantic = batch['semantic']
  if tuple(semantic.shape[:2]) != (batch_size, frames) or len(semantic.shape) != 4:
    raise ValueError(f"compute_loss: batch['semantic'] has shape {tuple(semantic.shape)}, "
                     f'expected [B, T, H, W] with B, T = {batch_size}, {frames}.')
  height, width = semantic.shape[2:]
  stride = height // mask_h if mask_h else 0
  if stride < 1 or height != stride * mask_h or width != stride * mask_w:
    raise ValueError(f'compute_loss: semantic maps {height}x{width} are not the mask size '
                     f'{mask_h}x{mask_w} times one integer stride.')
  layers = [('', outputs)]
  if config.aux_loss:
    layers += [(f'_aux_{i}', aux) for i, aux in enumerate(outputs.get('aux_outputs') or ())]
  for suffix, layer in layers:
    _check_layer(f'outputs{suffix}', layer,
                 (batch_size, frames, slots, num_classes, mask_h, mask_w))

  targets = make_targets(semantic, batch['gt_valid'], batch['frame_valid'], num_classes, slots,
                         mask_stride=stride)
  num_target_frames = jnp.sum(targets['present']).astype(jnp.float32)
  normaliser = jnp.maximum(num_target_frames, 1.0)

  # All decoder layers have the same shapes: stack them and match / score them under one vmap, so
  # the Hungarian solver is traced and compiled once for all layers.
  keys = ('pred_logits', 'pred_boxes', 'pred_masks')
  stacked = {k: jnp.stack([jnp.asarray(layer[k]) for _, layer in layers]) for k in keys}

  def layer_losses(layer):
    assignment = matching.match(layer, targets, config)
    return segmentation_losses(layer, targets, assignment, normaliser, config)

  per_layer = jax.vmap(layer_losses)(stacked)
  terms = {}
  for index, (suffix, _) in enumerate(layers):
    for name, values in per_layer.items():
      terms[f'loss_{name}{suffix}'] = weights[name] * values[index]

  vq = outputs.get('vq')
  if vq is not None:
    local_valid = vq.get('local_valid', batch['frame_valid'])
    quant, diagnostics = quantization_loss(vq, config.commit_weight,
                                           jnp.asarray(local_valid).astype(bool), config.quant_reduction)
    active = vq.get('active', 1.0)  # 0 during the continuous warm-up (model.vq_warmup_steps)
    terms['loss_quant'] = weights['quant'] * quant * active
    terms.update(diagnostics)
    if config.slot_entropy_weight > 0 and vq.get('global_sqdist') is not None:
      dim = vq['global_tokens'].shape[-1]
      entropy = slot_entropy_loss(vq['global_sqdist'], jnp.ones(vq['global_sqdist'].shape[:1], bool),
                                  config.slot_entropy_temperature, dim)
      if vq.get('local_sqdist') is not None:
        entropy = entropy + slot_entropy_loss(vq['local_sqdist'], jnp.asarray(local_valid).astype(bool),
                                              config.slot_entropy_temperature, dim)
      terms['loss_slot_entropy'] = weights['slot_entropy'] * entropy * active

  loss = sum(value for key, value in terms.items() if key.startswith('loss_'))
  terms['num_target_frames'] = num_target_frames
  terms['num_gt_frames'] = jnp.sum(targets['frame_has_gt']).astype(jnp.float32)
  terms['overflow_clips'] = jnp.sum(targets['overflow']).astype(jnp.float32)
  return loss, terms
