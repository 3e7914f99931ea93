"""Multi-scale deformable attention (Deformable-DETR) in pure JAX, with its encoder and decoder layers.

Bilinear sampling is done by gathering the four neighbouring pixels of every sampling point from the
flattened value maps (one vectorised gather for all levels), with `grid_sample` semantics:
`align_corners=False` (pixel centres at `(i + 0.5) / size`) and zero padding outside the map.

Shapes: B batch, Q queries, S = sum_l h_l * w_l flattened tokens of all levels, M heads, Dh = d/M,
L levels, P sampling points per head and level. `spatial_shapes` is a static tuple of `(h, w)`.
Parameters are float32; `dtype` is the compute dtype. Sampling locations and attention weights are
always computed in float32 (a bfloat16 location is off by a noticeable fraction of a pixel).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qdformer_jax.models.attention import FeedForward, MultiHeadAttention, layer_norm, linear, with_pos
from qdformer_jax.models.layers import check_remat, remat
from qdformer_jax.models.position import sine_position_embedding

SpatialShapes = Sequence[tuple[int, int]]


def _check_spatial_shapes(spatial_shapes: SpatialShapes, where: str) -> tuple[tuple[int, int], ...]:
  """Return `spatial_shapes` as a tuple of int pairs, or raise if it is not static and positive."""
  try:
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError) as e:
    raise TypeError(f"{where}: spatial_shapes must be a static sequence of (h, w) int pairs, "
                    f"got {spatial_shapes!r}") from e
  if not shapes or any(h < 1 or w < 1 for h, w in shapes):
    raise ValueError(f"{where}: spatial_shapes must be non-empty with positive sizes, got {shapes}")
  return shapes


def ms_deform_attn_core(value: jnp.ndarray, spatial_shapes: SpatialShapes,
                        sampling_locations: jnp.ndarray, attention_weights: jnp.ndarray) -> jnp.ndarray:
  """Weighted sum of bilinearly sampled values: the core of multi-scale deformable attention.

  value `[B,S,M,Dh]` (levels flattened row-major and concatenated in `spatial_shapes` order),
  sampling_locations `[B,Q,M,L,P,2]` as normalised (x, y) in [0, 1] (points outside read zeros),
  attention_weights `[B,Q,M,L,P]`. Returns `[B,Q,M*Dh]` (head-major channels), equal to
  `sum_{l,p} a[b,q,m,l,p] * grid_sample(value_l[b,:,:,m], 2*loc - 1)` with bilinear mode,
  zero padding and align_corners=False. Differentiable in all three array inputs.
  """
  shapes = _check_spatial_shapes(spatial_shapes, "ms_deform_attn_core")
  if value.ndim != 4:
    raise ValueError(f"ms_deform_attn_core: value must be [B,S,M,Dh], got shape {value.shape}")
  b, s, m, dh = value.shape
  if sampling_locations.ndim != 6 or sampling_locations.shape[-1] != 2:
    raise ValueError("ms_deform_attn_core: sampling_locations must be [B,Q,M,L,P,2], "
                     f"got shape {sampling_locations.shape}")
  _, q, _, n_levels, n_points, _ = sampling_locations.shape
  if sum(h * w for h, w in shapes) != s:
    raise ValueError(f"ms_deform_attn_core: value has S={s} tokens but spatial_shapes {shapes} "
                     f"hold {sum(h * w for h, w in shapes)}")
  if len(shapes) != n_levels or sampling_locations.shape[:3] != (b, q, m):
    raise ValueError(f"ms_deform_attn_core: sampling_locations shape {sampling_locations.shape} does "
                     f"not match value {value.shape} and {len(shapes)} levels")
  if attention_weights.shape != (b, q, m, n_levels, n_points):
    raise ValueError(f"ms_deform_attn_core: attention_weights shape {attention_weights.shape} != "
                     f"{(b, q, m, n_levels, n_points)}")

  # Per-level constants, shaped to broadcast against [B,Q,M,L,P].
  widths = np.array([w for _, w in shapes], np.float32)[:, None]
  heights = np.array([h for h, _ in shapes], np.float32)[:, None]
  w_int = np.array([w for _, w in shapes], np.int32)[:, None]
  h_int = np.array([h for h, _ in shapes], np.int32)[:, None]
  starts = np.concatenate([[0], np.cumsum([h * w for h, w in shapes])[:-1]]).astype(np.int32)[:, None]

  loc = sampling_locations.astype(jnp.float32)
  # align_corners=False: normalised 0 / 1 are the outer edges, pixel i covers [i, i+1) - 0.5 offset.
  x = loc[..., 0] * widths - 0.5
  y = loc[..., 1] * heights - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx = x - x0
  fy = y - y0
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)
  # The four corners, stacked on a trailing axis: [B,Q,M,L,P,4].
  cx = jnp.stack([x0, x0 + 1, x0, x0 + 1], axis=-1)
  cy = jnp.stack([y0, y0, y0 + 1, y0 + 1], axis=-1)
  cw = jnp.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], axis=-1)
  w_b, h_b, start_b = w_int[..., None], h_int[..., None], starts[..., None]
  inside = (cx >= 0) & (cx < w_b) & (cy >= 0) & (cy < h_b)
  index = start_b + jnp.clip(cy, 0, h_b - 1) * w_b + jnp.clip(cx, 0, w_b - 1)
  weight = jnp.where(inside, cw, 0.0) * attention_weights.astype(jnp.float32)[..., None]

  # One gather per (batch, head) over all levels: values [B*M, S, Dh], index / weight [B*M, Q, K].
  k = n_levels * n_points * 4
  v_flat = jnp.transpose(value, (0, 2, 1, 3)).reshape(b * m, s, dh)
  index = jnp.transpose(index, (0, 2, 1, 3, 4, 5)).reshape(b * m, q, k)
  weight = jnp.transpose(weight, (0, 2, 1, 3, 4, 5)).reshape(b * m, q, k)
  out = _gather_weighted_sum(v_flat, index, weight)  # [B*M, Q, Dh]
  out = jnp.transpose(out.reshape(b, m, q, dh), (0, 2, 1, 3))
  return out.reshape(b, q, m * dh)


SAMPLES_PER_CHUNK = 8  # samples (2 points x 4 corners) gathered at once by _gather_weighted_sum


def _gather_weighted_sum(values: jnp.ndarray, index: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  """`out[n, q] = sum_k weight[n, q, k] * values[n, index[n, q, k]]` for values `[N,S,Dh]`, index
  and weight `[N,Q,K]`; returns `[N,Q,Dh]` in the dtype of `values` (accumulated in float32).

  The K samples are gathered SAMPLES_PER_CHUNK at a time in a `lax.scan` whose body is
  rematerialised (`jax.checkpoint`), so neither the forward nor the backward pass ever holds the
  `[N,Q,K,Dh]` samples: XLA does not fuse a gather into its consumer's reduction, and gathering all
  K at once stored them (at the paper's size, 4 encoder layers at B=4, T=10: 2.7 GB per array, several
  alive at once, which was most of the train step's memory). Chunked, the step's memory at that size
  fell ~8x for this op and it ran ~3x faster on CPU (benchmarks/memory.py, benchmarks/stages.py).
  """
  n, q, k = index.shape
  chunk = SAMPLES_PER_CHUNK if k % SAMPLES_PER_CHUNK == 0 else (4 if k % 4 == 0 else 1)
  index = jnp.moveaxis(index.reshape(n, q, k // chunk, chunk), 2, 0)     # [K/c, N, Q, c]
  weight = jnp.moveaxis(weight.reshape(n, q, k // chunk, chunk), 2, 0)

  @jax.checkpoint
  def body(acc, chunk_inputs):
    idx, w = chunk_inputs
    gathered = jax.vmap(lambda v, i: v.at[i].get(mode="promise_in_bounds"))(values, idx)  # [N,Q,c,Dh]
    return acc + jnp.sum(gathered.astype(jnp.float32) * w[..., None], axis=2), None

  out, _ = jax.lax.scan(body, jnp.zeros((n, q, values.shape[-1]), jnp.float32), (index, weight))
  return out.astype(values.dtype)


def _grid_offset_bias(n_heads: int, n_levels: int, n_points: int) -> np.ndarray:
  """Deformable-DETR's sampling-offset bias: head m points along angle 2*pi*m/M, scaled so the larger
  of |cos|, |sin| is 1, point p at distance p+1; flattened in (M, L, P, 2) order."""
  thetas = np.arange(n_heads, dtype=np.float64) * (2.0 * math.pi / n_heads)
  grid = np.stack([np.cos(thetas), np.sin(thetas)], axis=-1)
  grid = grid / np.abs(grid).max(axis=-1, keepdims=True)
  grid = np.broadcast_to(grid[:, None, None, :], (n_heads, n_levels, n_points, 2))
  grid = grid * np.arange(1, n_points + 1, dtype=np.float64)[None, None, :, None]
  return grid.reshape(-1).astype(np.float32)


class MSDeformAttn(nnx.Module):
  """Multi-scale deformable attention module (Deformable-DETR `MSDeformAttn`).

  Each query predicts, per head, level and point, a sampling offset (in pixels of that level,
  normalised by the level's (w, h)) around its reference point and an attention weight (softmax
  over the L*P samples of the head). Sampling offsets: zero kernel, bias = the grid initialisation;
  attention weights: zero kernel and bias (uniform at init); value/output projections: xavier
  kernels, zero bias. The offset and weight projections run in float32 regardless of `dtype`.
  """

  def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, *,
               rngs: nnx.Rngs, dtype=jnp.float32):
    if d_model % n_heads != 0:
      raise ValueError(f"MSDeformAttn: d_model={d_model} must be divisible by n_heads={n_heads}")
    self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
    self.dtype = dtype
    zeros = nnx.initializers.zeros_init()
    bias = jnp.asarray(_grid_offset_bias(n_heads, n_levels, n_points))
    self.sampling_offsets = linear(d_model, n_heads * n_levels * n_points * 2, rngs=rngs,
                                   dtype=jnp.float32, kernel_init=zeros,
                                   bias_init=lambda key, shape, dt=jnp.float32: bias.astype(dt))
    self.attention_weights = linear(d_model, n_heads * n_levels * n_points, rngs=rngs,
                                    dtype=jnp.float32, kernel_init=zeros)
    self.value_proj = linear(d_model, d_model, rngs=rngs, dtype=dtype)
    self.output_proj = linear(d_model, d_model, rngs=rngs, dtype=dtype)

  def __call__(self, query: jnp.ndarray, reference_points: jnp.ndarray, input_flatten: jnp.ndarray,
               spatial_shapes: SpatialShapes, input_padding_mask: jnp.ndarray | None = None
               ) -> jnp.ndarray:
    """query `[B,Q,d]`, reference_points `[B,Q,L,2]` normalised (x, y) (or `[B,Q,L,4]` boxes
    (cx, cy, w, h): offsets then scale with half the box size / n_points), input_flatten `[B,S,d]`,
    input_padding_mask bool `[B,S]` (True = padding, its value is zeroed). Returns `[B,Q,d]`."""
    shapes = _check_spatial_shapes(spatial_shapes, "MSDeformAttn")
    b, q, _ = query.shape
    s = input_flatten.shape[1]
    l, m, p = self.n_levels, self.n_heads, self.n_points
    if len(shapes) != l:
      raise ValueError(f"MSDeformAttn: spatial_shapes has {len(shapes)} levels, module has n_levels={l}")
    if reference_points.shape[:3] != (b, q, l) or reference_points.shape[-1] not in (2, 4):
      raise ValueError(f"MSDeformAttn: reference_points shape {reference_points.shape} must be "
                       f"[B,Q,L,2] or [B,Q,L,4] with (B,Q,L) = {(b, q, l)}")
    value = self.value_proj(input_flatten)
    if input_padding_mask is not None:
      if input_padding_mask.shape != (b, s):
        raise ValueError(f"MSDeformAttn: input_padding_mask shape {input_padding_mask.shape} != {(b, s)}")
      value = jnp.where(input_padding_mask[..., None], jnp.zeros((), value.dtype), value)
    value = value.reshape(b, s, m, self.d_model // m)

    query32 = query.astype(jnp.float32)
    offsets = self.sampling_offsets(query32).reshape(b, q, m, l, p, 2)
    weights = self.attention_weights(query32).reshape(b, q, m, l * p)
    weights = jax.nn.softmax(weights, axis=-1).reshape(b, q, m, l, p)
    ref = reference_points.astype(jnp.float32)[:, :, None, :, None, :]  # [B,Q,1,L,1,2|4]
    if reference_points.shape[-1] == 2:
      normalizer = jnp.asarray([[w, h] for h, w in shapes], jnp.float32)[:, None, :]  # [L,1,2]
      locations = ref + offsets / normalizer
    else:
      locations = ref[..., :2] + offsets / p * ref[..., 2:] * 0.5
    out = ms_deform_attn_core(value, shapes, locations, weights)
    return self.output_proj(out)


def encoder_reference_points(spatial_shapes: SpatialShapes) -> jnp.ndarray:
  """Pixel-centre reference points of all levels (valid ratios 1): `[S, 2]` normalised (x, y),
  level by level, row-major, `((j + 0.5) / w, (i + 0.5) / h)`."""
  shapes = _check_spatial_shapes(spatial_shapes, "encoder_reference_points")
  points = []
  for h, w in shapes:
    ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    points.append(np.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1))
  return jnp.asarray(np.concatenate(points, axis=0), jnp.float32)


class DeformableEncoderLayer(nnx.Module):
  """Post-norm encoder layer: src = LN(src + drop(MSDeformAttn(src + pos))); src = LN(src + drop(FFN(src)))."""

  def __init__(self, d_model: int = 256, n_heads: int = 8, n_points: int = 4, n_levels: int = 4,
               ffn_dim: int = 2048, dropout: float = 0.1, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, rngs=rngs, dtype=dtype)
    self.drop1 = nnx.Dropout(dropout, rngs=rngs)
    self.norm1 = layer_norm(d_model, rngs=rngs, dtype=dtype)
    self.ffn = FeedForward(d_model, ffn_dim, dropout, rngs=rngs, dtype=dtype)
    self.drop2 = nnx.Dropout(dropout, rngs=rngs)
    self.norm2 = layer_norm(d_model, rngs=rngs, dtype=dtype)

  def __call__(self, src: jnp.ndarray, pos: jnp.ndarray, reference_points: jnp.ndarray,
               spatial_shapes: SpatialShapes, padding_mask: jnp.ndarray | None = None,
               deterministic: bool = True) -> jnp.ndarray:
    """src, pos `[B,S,d]`, reference_points `[B,S,L,2]`; returns `[B,S,d]`."""
    attended = self.self_attn(with_pos(src, pos), reference_points, src, spatial_shapes, padding_mask)
    src = self.norm1(src + self.drop1(attended, deterministic=deterministic))
    src = self.norm2(src + self.drop2(self.ffn(src, deterministic=deterministic),
                                      deterministic=deterministic))
    return src


class DeformableEncoder(nnx.Module):
  """Deformable-DETR encoder over a list of feature maps already projected to `d_model` channels.

  Adds the sine position embedding of each map (DETR normalisation) plus a learnable per-level
  embedding (normal init, std 1), flattens all levels, runs `num_layers` deformable self-attention
  layers with pixel-centre reference points on every level, and splits the result back into maps.
  `remat` (a `layers.REMAT_POLICIES` key) rematerialises each layer in the backward pass.
  """

  def __init__(self, num_layers: int = 4, d_model: int = 256, n_heads: int = 8, n_points: int = 4,
               n_levels: int = 4, ffn_dim: int = 2048, dropout: float = 0.1, *, rngs: nnx.Rngs,
               dtype=jnp.float32, remat: str = 'none'):
    self.d_model, self.n_levels, self.dtype = d_model, n_levels, dtype
    self.remat = check_remat(remat)
    self.level_embed = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (n_levels, d_model),
                                                              jnp.float32))
    self.layers = nnx.List([
        DeformableEncoderLayer(d_model, n_heads, n_points, n_levels, ffn_dim, dropout, rngs=rngs,
                               dtype=dtype) for _ in range(num_layers)])

  def __call__(self, srcs: Sequence[jnp.ndarray], deterministic: bool = True) -> list[jnp.ndarray]:
    """srcs: L maps `[B,h_l,w_l,d]` -> L maps of the same shapes (dtype = the compute dtype)."""
    if len(srcs) != self.n_levels:
      raise ValueError(f"DeformableEncoder: got {len(srcs)} feature maps, expected n_levels={self.n_levels}")
    b = srcs[0].shape[0]
    for i, x in enumerate(srcs):
      if x.ndim != 4 or x.shape[0] != b or x.shape[-1] != self.d_model:
        raise ValueError(f"DeformableEncoder: srcs[{i}] has shape {x.shape}, expected [B={b},h,w,"
                         f"d={self.d_model}] (project backbone features to d_model first)")
    shapes = tuple((x.shape[1], x.shape[2]) for x in srcs)
    flat = jnp.concatenate([x.reshape(b, -1, self.d_model) for x in srcs], axis=1).astype(self.dtype)
    pos = jnp.concatenate([
        sine_position_embedding(h, w, self.d_model).reshape(h * w, self.d_model)
        + self.level_embed[...][i] for i, (h, w) in enumerate(shapes)], axis=0).astype(self.dtype)
    pos = jnp.broadcast_to(pos[None], flat.shape)
    ref = encoder_reference_points(shapes)
    ref = jnp.broadcast_to(ref[None, :, None, :], (b, ref.shape[0], self.n_levels, 2))
    def run_layer(layer, flat, pos, ref):
      return layer(flat, pos, ref, shapes, deterministic=deterministic)

    for layer in self.layers:
      flat = remat(run_layer, self.remat)(layer, flat, pos, ref)
    outs, start = [], 0
    for h, w in shapes:
      outs.append(flat[:, start:start + h * w].reshape(b, h, w, self.d_model))
      start += h * w
    return outs


class DeformableDecoderLayer(nnx.Module):
  """Post-norm Deformable-DETR decoder layer.

  tgt = LN(tgt + drop(MHA(q=k=tgt+query_pos, v=tgt)))
  tgt = LN(tgt + drop(MSDeformAttn(tgt+query_pos, reference_points, memory)))
  tgt = LN(tgt + drop(FFN(tgt)))
  """

  def __init__(self, d_model: int = 256, n_heads: int = 8, n_points: int = 4, n_levels: int = 4,
               ffn_dim: int = 2048, dropout: float = 0.1, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.self_attn = MultiHeadAttention(d_model, n_heads, dropout, rngs=rngs, dtype=dtype)
    self.drop1 = nnx.Dropout(dropout, rngs=rngs)
    self.norm1 = layer_norm(d_model, rngs=rngs, dtype=dtype)
    self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, rngs=rngs, dtype=dtype)
    self.drop2 = nnx.Dropout(dropout, rngs=rngs)
    self.norm2 = layer_norm(d_model, rngs=rngs, dtype=dtype)
    self.ffn = FeedForward(d_model, ffn_dim, dropout, rngs=rngs, dtype=dtype)
    self.drop3 = nnx.Dropout(dropout, rngs=rngs)
    self.norm3 = layer_norm(d_model, rngs=rngs, dtype=dtype)

  def __call__(self, tgt: jnp.ndarray, query_pos: jnp.ndarray | None, reference_points: jnp.ndarray,
               memory: jnp.ndarray, spatial_shapes: SpatialShapes, deterministic: bool = True, *,
               memory_padding_mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """tgt, query_pos `[B,Q,d]`, reference_points `[B,Q,L,2]` (or `[B,Q,L,4]` boxes), memory
    `[B,S,d]` (levels flattened in `spatial_shapes` order), memory_padding_mask bool `[B,S]`
    (True = padding). Returns the updated `tgt [B,Q,d]`."""
    q = with_pos(tgt, query_pos)
    tgt = self.norm1(tgt + self.drop1(self.self_attn(q, q, tgt, deterministic=deterministic),
                                      deterministic=deterministic))
    attended = self.cross_attn(with_pos(tgt, query_pos), reference_points, memory, spatial_shapes,
                               memory_padding_mask)
    tgt = self.norm2(tgt + self.drop2(attended, deterministic=deterministic))
    tgt = self.norm3(tgt + self.drop3(self.ffn(tgt, deterministic=deterministic),
                                      deterministic=deterministic))
    return tgt
