"""Sine position embedding of a 2-D feature map (DETR's `PositionEmbeddingSine`, no padding mask)."""

from __future__ import annotations

import math

import jax.numpy as jnp


def sine_position_embedding(
    h: int,
    w: int,
    d: int,
    normalize: bool = True,
    scale: float = 2 * math.pi,
    temperature: float = 10000.0,
    offset: float = 0.0,
    dtype=jnp.float32,
) -> jnp.ndarray:
  """Fixed sine/cosine embedding of the pixel grid of an `h` x `w` map, shape [h, w, d].

  Row index y and column index x are counted from 1 (the cumulative sum of an all-valid mask, as in
  DETR). With `normalize`, they become `(y + offset) / (h + 1e-6) * scale` (and likewise x with w);
  DETR uses offset 0, Deformable-DETR offset -0.5. Each coordinate is embedded with `d // 2`
  features: feature k uses frequency `temperature ** (2 * (k // 2) / (d // 2))`, even k the sine,
  odd k the cosine (interleaved). The output concatenates the y embedding (first d/2 channels) and
  the x embedding (last d/2 channels).
  """
  if h < 1 or w < 1:
    raise ValueError(f"sine_position_embedding: map size (h, w) = ({h}, {w}) must be positive")
  if d % 4 != 0:
    raise ValueError(
        f"sine_position_embedding: d = {d} must be a multiple of 4 (d/2 features per axis, "
        "interleaved sine/cosine pairs)")
  num_feats = d // 2
  y = jnp.arange(1, h + 1, dtype=jnp.float32)
  x = jnp.arange(1, w + 1, dtype=jnp.float32)
  if normalize:
    eps = 1e-6
    y = (y + offset) / (h + eps) * scale
    x = (x + offset) / (w + eps) * scale
  k = jnp.arange(num_feats, dtype=jnp.float32)
  dim_t = temperature ** (2.0 * jnp.floor(k / 2.0) / num_feats)

  def embed(coord: jnp.ndarray) -> jnp.ndarray:
    phase = coord[:, None] / dim_t  # [n, num_feats]
    pairs = jnp.stack([jnp.sin(phase[:, 0::2]), jnp.cos(phase[:, 1::2])], axis=-1)
    return pairs.reshape(coord.shape[0], num_feats)

  pos_y = jnp.broadcast_to(embed(y)[:, None, :], (h, w, num_feats))
  pos_x = jnp.broadcast_to(embed(x)[None, :, :], (h, w, num_feats))
  return jnp.concatenate([pos_y, pos_x], axis=-1).astype(dtype)
