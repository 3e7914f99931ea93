"""Swin Transformer T/S/B trunk (detection variant) returning [C2, C3, C4, C5] NHWC.

The backbone of Swin-Transformer-Object-Detection / ReferFormer (and of transformers'
`SwinBackbone`): patch embedding (4x4 conv, stride 4, LayerNorm), four stages of Swin blocks
(window multi-head self-attention with a learned relative position bias; every second block uses
windows shifted by window_size // 2 with the attention mask of the cyclic shift), patch merging
between stages, and one LayerNorm per output stage (`norm0..norm3`), applied to the stage output
before patch merging. There is no final classification LayerNorm and no head.

Feature maps whose sides are not multiples of the window size are zero-padded on the bottom/right
before window partitioning and cropped afterwards (the padded tokens are not masked, as in the
reference code); odd sides are padded before patch merging. The window is never shrunk to the
input: at 224x224 the 7x7 stride-32 map is one window and its odd blocks still shift (this is the
detection code's behaviour, not the classification code's, which disables the shift there).

Names follow the official Swin release (`patch_embed.proj`, `layers.{i}.blocks.{j}.attn.qkv`, ...)
so its `.pth` maps one to one; `qdformer_jax.convert.swin` also reads transformers' naming.
LayerNorm eps 1e-5 as `torch.nn.LayerNorm`. Stage freezing (`frozen_stages`, official semantics:
-1 none, 0 patch_embed, k: patch_embed + stages 1..k including their patch merging) uses
`jax.lax.stop_gradient` and `frozen_param_filter` exactly as `qdformer_jax.models.resnet` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qdformer_jax.models.layers import check_remat, path_prefix_filter, remat

SWIN_SPECS = {
    'swin_t': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    'swin_s': dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    'swin_b': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7),
}
LN_EPS = 1e-5
MASK_VALUE = -100.0  # the reference code's additive mask between different shift regions

_trunc02 = nnx.initializers.truncated_normal(stddev=0.02)


def _linear(fin: int, fout: int, *, use_bias: bool = True, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(fin, fout, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=_trunc02, rngs=rngs)


def _layer_norm(dim: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32,
                       use_fast_variance=False, rngs=rngs)


def relative_position_index(window: int) -> np.ndarray:
  """[w*w, w*w] index into the (2w-1)^2 bias table for each (query, key) pair of a window."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing='ij')).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
  return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """[num_windows, w*w, w*w] additive mask (0 / -100) for the cyclically shifted padded map.

  Positions are labelled by region (3 bands per axis: [0, H-w), [H-w, H-s), [H-s, H)); tokens of a
  window attend only to tokens with the same label.
  """
  def bands(n):
    return (np.arange(n) >= n - window).astype(np.int64) + (np.arange(n) >= n - shift)

  labels = bands(height)[:, None] * 3 + bands(width)[None, :]
  windows = labels.reshape(height // window, window, width // window, window)
  windows = windows.transpose(0, 2, 1, 3).reshape(-1, window * window)
  diff = windows[:, None, :] != windows[:, :, None]
  return np.where(diff, MASK_VALUE, 0.0).astype(np.float32)


def window_partition(x: jax.Array, window: int) -> jax.Array:
  """[B,H,W,C] -> [B*nH*nW, w*w, C] (row-major windows, row-major tokens inside)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window * window, c)


def window_reverse(windows: jax.Array, window: int, b: int, h: int, w: int) -> jax.Array:
  """Inverse of `window_partition`."""
  c = windows.shape[-1]
  x = windows.reshape(b, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


class PatchEmbed(nnx.Module):
  """Non-overlapping patch x patch conv (stride patch) + LayerNorm; pads H, W up to multiples."""

  def __init__(self, patch: int, embed_dim: int, *, dtype: Any, rngs: nnx.Rngs):
    self.patch = patch
    self.proj = nnx.Conv(3, embed_dim, (patch, patch), strides=(patch, patch), padding='VALID',
                         dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.norm = _layer_norm(embed_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    pad_h, pad_w = (-x.shape[1]) % self.patch, (-x.shape[2]) % self.patch
    if pad_h or pad_w:
      x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    return self.norm(self.proj(x))


class WindowAttention(nnx.Module):
  """Multi-head self-attention inside windows with a relative position bias table."""

  def __init__(self, dim: int, num_heads: int, window: int, *, dtype: Any, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f'Swin: channels {dim} not divisible by num_heads {num_heads}.')
    self.num_heads = num_heads
    self.window = window
    self.dtype = dtype
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = _linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = _linear(dim, dim, dtype=dtype, rngs=rngs)
    self.relative_position_bias_table = nnx.Param(
        _trunc02(rngs.params(), ((2 * window - 1) ** 2, num_heads), jnp.float32))

  def __call__(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
    """x [B*nW, N, C]; mask [nW, N, N] additive or None."""
    bw, n, c = x.shape
    heads = self.num_heads
    qkv = self.qkv(x).reshape(bw, n, 3, heads, c // heads).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
    logits = jnp.einsum('bhqd,bhkd->bhqk', q, k).astype(jnp.float32)
    index = relative_position_index(self.window).reshape(-1)
    bias = self.relative_position_bias_table[...][index].reshape(n, n, heads).transpose(2, 0, 1)
    logits = logits + bias[None]
    if mask is not None:
      nw = mask.shape[0]
      logits = logits.reshape(bw // nw, nw, heads, n, n) + jnp.asarray(mask)[None, :, None]
      logits = logits.reshape(bw, heads, n, n)
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bhkd->bqhd', attn, v).reshape(bw, n, c)
    return self.proj(out)


class Mlp(nnx.Module):
  """fc1 -> GELU (exact erf, as torch.nn.GELU) -> fc2."""

  def __init__(self, dim: int, hidden: int, *, dtype: Any, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = _linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class SwinBlock(nnx.Module):
  """x + DropPath(W-MSA / SW-MSA(LN x)); x + DropPath(MLP(LN x)), on [B,H,W,C] maps."""

  def __init__(self, dim: int, num_heads: int, window: int, shift: int, drop_path: float, *,
               mlp_ratio: float = 4.0, dtype: Any, rngs: nnx.Rngs):
    self.window = window
    self.shift = shift
    self.norm1 = _layer_norm(dim, dtype=dtype, rngs=rngs)
    self.attn = WindowAttention(dim, num_heads, window, dtype=dtype, rngs=rngs)
    self.norm2 = _layer_norm(dim, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    # Stochastic depth: dropping whole samples = dropout broadcast over all but the batch axis.
    self.drop_path = (nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=rngs)
                      if drop_path > 0 else None)

  def _drop_path(self, x: jax.Array) -> jax.Array:
    return x if self.drop_path is None else self.drop_path(x)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    ws, shift = self.window, self.shift
    y = self.norm1(x)
    pad_h, pad_w = (-h) % ws, (-w) % ws
    if pad_h or pad_w:
      y = jnp.pad(y, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    mask = None
    if shift > 0:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
      mask = shifted_window_mask(hp, wp, ws, shift)
    y = self.attn(window_partition(y, ws), mask)
    y = window_reverse(y, ws, b, hp, wp)
    if shift > 0:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    y = y[:, :h, :w]
    x = x + self._drop_path(y)
    return x + self._drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nnx.Module):
  """2x2 neighbourhood concat [x(0,0), x(1,0), x(0,1), x(1,1)] -> LayerNorm(4C) -> Linear 4C->2C."""

  def __init__(self, dim: int, *, dtype: Any, rngs: nnx.Rngs):
    self.norm = _layer_norm(4 * dim, dtype=dtype, rngs=rngs)
    self.reduction = _linear(4 * dim, 2 * dim, use_bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h, w = x.shape[1:3]
    if h % 2 or w % 2:
      x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    # (row, col) offsets in the order of the reference: rows vary fastest.
    x = jnp.concatenate([x[:, r::2, c::2] for c in range(2) for r in range(2)], axis=-1)
    return self.reduction(self.norm(x))


class SwinStage(nnx.Module):
  """`depth` Swin blocks (even: regular windows, odd: shifted) + optional patch merging."""

  def __init__(self, dim: int, depth: int, num_heads: int, window: int, drop_paths: Sequence[float],
               downsample: bool, *, dtype: Any, rngs: nnx.Rngs):
    self.blocks = nnx.List([
        SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else window // 2, drop_paths[i],
                  dtype=dtype, rngs=rngs) for i in range(depth)])
    self.downsample = PatchMerging(dim, dtype=dtype, rngs=rngs) if downsample else None


def _call_block(block, x):
  return block(x)


class SwinTransformer(nnx.Module):
  """Swin trunk: `__call__(x [B,H,W,3] float, ImageNet-normalised) -> [C2, C3, C4, C5]` NHWC.

  Output strides 4, 8, 16, 32 (ceil for sides that are not multiples of 32), channels
  `self.out_channels` = embed_dim * (1, 2, 4, 8). Parameters float32, `dtype` the compute dtype
  (softmax in float32). `drop_path_rate` is the stochastic-depth rate of the last block (linear
  ramp from 0, as the reference); it needs an 'dropout' RNG stream in `rngs` and is switched off
  by `model.eval()` like `nnx.Dropout`.
  """

  def __init__(self, *, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
               num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, patch_size: int = 4,
               drop_path_rate: float = 0.0, frozen_stages: int = -1, dtype: Any = jnp.float32,
               remat: str = 'none', rngs: nnx.Rngs):
    depths, num_heads = tuple(depths), tuple(num_heads)
    if len(depths) != 4 or len(num_heads) != 4:
      raise ValueError(f'Swin needs 4 stages: got depths={depths}, num_heads={num_heads}.')
    if not -1 <= frozen_stages <= 4:
      raise ValueError(f'frozen_stages must be in -1..4 (-1 none, 0 patch_embed, k: +stages 1..k), '
                       f'got {frozen_stages}.')
    if window_size < 1:
      raise ValueError(f'Swin window_size must be >= 1, got {window_size}.')
    self.embed_dim = embed_dim
    self.depths = depths
    self.num_heads = num_heads
    self.window_size = window_size
    self.frozen_stages = frozen_stages
    self.dtype = dtype
    self.remat = check_remat(remat)  # per Swin block, as ResNet's per residual block
    self.patch_embed = PatchEmbed(patch_size, embed_dim, dtype=dtype, rngs=rngs)
    total = sum(depths)
    ramp = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    stages, start = [], 0
    dims = tuple(embed_dim * 2 ** i for i in range(4))
    for i in range(4):
      stages.append(SwinStage(dims[i], depths[i], num_heads[i], window_size,
                              ramp[start:start + depths[i]], downsample=i < 3, dtype=dtype, rngs=rngs))
      start += depths[i]
    self.layers = nnx.List(stages)
    for i in range(4):
      setattr(self, f'norm{i}', _layer_norm(dims[i], dtype=dtype, rngs=rngs))
    self.out_channels = dims

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'Swin expects images [B,H,W,3] (NHWC), got shape {x.shape}.')
    x = self.patch_embed(x.astype(self.dtype))
    if self.frozen_stages >= 0:
      x = jax.lax.stop_gradient(x)
    features = []
    for i, stage in enumerate(self.layers):
      frozen = i < self.frozen_stages
      for block in stage.blocks:
        x = remat(_call_block, 'none' if frozen else self.remat)(block, x)
      if frozen:
        x = jax.lax.stop_gradient(x)
      features.append(getattr(self, f'norm{i}')(x))
      if stage.downsample is not None:
        x = stage.downsample(x)
        if frozen:
          x = jax.lax.stop_gradient(x)
    return features

  def frozen_module_prefixes(self) -> list[tuple]:
    """Path prefixes (from this module) of the frozen parts."""
    if self.frozen_stages < 0:
      return []
    return [('patch_embed',)] + [('layers', i) for i in range(self.frozen_stages)]

  def frozen_param_filter(self, prefix: tuple = ()) -> Callable[[tuple, Any], bool]:
    """NNX filter matching the frozen `nnx.Param`s; `prefix` = this module's path in the state."""
    return path_prefix_filter([tuple(prefix) + p for p in self.frozen_module_prefixes()])
