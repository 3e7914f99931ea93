"""Audio Spectrogram Transformer (Gong et al. 2021, AudioSet-trained): one second of filterbanks
[B, 98, 128] -> embedding [B, 768], the stronger audio encoder beside VGGish (docs/DESIGN.md §1.1).

The architecture of transformers' `ASTModel` (and of the official release, a DeiT-B): the
[time, mel] filterbank is an image [mel, time]; 16x16 patches with stride 10 on both axes (a Conv,
1 -> hidden), tokens in mel-major order; a class and a distillation token in front; learned
position embeddings; pre-norm ViT layers (LN, multi-head self-attention with separate q/k/v,
residual; LN, MLP with exact GELU, residual); a final LayerNorm. The embedding is the mean of the
class and distillation tokens (`ASTModel`'s pooler output). LayerNorm eps 1e-12 as transformers.

Position embeddings are kept at the size the checkpoint was trained for (`max_frames` = 1024, 10.24 s:
12 x 101 patch positions + 2), so a released checkpoint maps one to one; an input of fewer frames
uses the middle columns of the time axis, as the official AST code does when it fine-tunes the
AudioSet model on shorter clips (`pos_embed[..., 50 - t // 2: 50 - t // 2 + t]`). One second
(98 frames) has 9 time columns: 12 x 9 = 108 patches.

Names: `patch_embed`, `cls_token`, `dist_token`, `pos_embed`, `layers.{i}.{norm1, attn.{q,k,v,o},
norm2, fc1, fc2}`, `norm`; `qdformer_jax.convert.ast` reads transformers' (new and old) and the
official release's naming. Freezing (the default, `model.audio.trainable=False`) is the caller's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

AST_SPECS = {  # the released AudioSet model (MIT/ast-finetuned-audioset-10-10-0.4593)
    'base': dict(hidden_size=768, layers=12, heads=12, mlp_dim=3072, max_frames=1024, num_mel_bins=128,
                 patch_size=16, frequency_stride=10, time_stride=10),
}
LN_EPS = 1e-12

_trunc02 = nnx.initializers.truncated_normal(stddev=0.02)


def _linear(fin: int, fout: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(fin, fout, dtype=dtype, param_dtype=jnp.float32, kernel_init=_trunc02, rngs=rngs)


def _layer_norm(dim: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
                       rngs=rngs)


def patch_grid(frames: int, num_mel_bins: int, patch: int, fstride: int, tstride: int) -> tuple[int, int]:
  """(mel, time) patch counts of a [frames, num_mel_bins] input."""
  return (num_mel_bins - patch) // fstride + 1, (frames - patch) // tstride + 1


class ASTAttention(nnx.Module):

  def __init__(self, dim: int, heads: int, *, dtype: Any, rngs: nnx.Rngs):
    if dim % heads:
      raise ValueError(f'AST: hidden size {dim} not divisible by heads {heads}.')
    self.heads = heads
    self.q = _linear(dim, dim, dtype=dtype, rngs=rngs)
    self.k = _linear(dim, dim, dtype=dtype, rngs=rngs)
    self.v = _linear(dim, dim, dtype=dtype, rngs=rngs)
    self.o = _linear(dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, c = x.shape
    split = lambda y: y.reshape(b, n, self.heads, c // self.heads)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q * (c // self.heads) ** -0.5, k).astype(jnp.float32)
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return self.o(jnp.einsum('bhqk,bkhd->bqhd', attn, v).reshape(b, n, c))


class ASTLayer(nnx.Module):
  """x + Attn(LN x); x + MLP(LN x)."""

  def __init__(self, dim: int, heads: int, mlp_dim: int, *, dtype: Any, rngs: nnx.Rngs):
    self.norm1 = _layer_norm(dim, dtype=dtype, rngs=rngs)
    self.attn = ASTAttention(dim, heads, dtype=dtype, rngs=rngs)
    self.norm2 = _layer_norm(dim, dtype=dtype, rngs=rngs)
    self.fc1 = _linear(dim, mlp_dim, dtype=dtype, rngs=rngs)
    self.fc2 = _linear(mlp_dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x))
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))


class AudioSpectrogramTransformer(nnx.Module):
  """`__call__(fbank [B, frames, num_mel_bins]) -> [B, hidden_size]` (mean of the two leading tokens).

  `frames` may be anything from `patch_size` to `max_frames` (98 per second in this model).
  `out_dim` = hidden_size (the model's audio projection reads it).
  """

  def __init__(self, *, hidden_size: int = 768, layers: int = 12, heads: int = 12, mlp_dim: int = 3072,
               max_frames: int = 1024, num_mel_bins: int = 128, patch_size: int = 16, frequency_stride: int = 10,
               time_stride: int = 10, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.hidden_size = hidden_size
    self.max_frames = max_frames
    self.num_mel_bins = num_mel_bins
    self.patch_size = patch_size
    self.strides = (frequency_stride, time_stride)
    self.dtype = dtype
    self.out_dim = hidden_size
    self.grid = patch_grid(max_frames, num_mel_bins, patch_size, frequency_stride, time_stride)
    self.patch_embed = nnx.Conv(1, hidden_size, (patch_size, patch_size), strides=self.strides, padding='VALID',
                                dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.cls_token = nnx.Param(_trunc02(rngs.params(), (1, 1, hidden_size), jnp.float32))
    self.dist_token = nnx.Param(_trunc02(rngs.params(), (1, 1, hidden_size), jnp.float32))
    self.pos_embed = nnx.Param(_trunc02(rngs.params(), (1, self.grid[0] * self.grid[1] + 2, hidden_size),
                                        jnp.float32))
    self.layers = nnx.List([ASTLayer(hidden_size, heads, mlp_dim, dtype=dtype, rngs=rngs) for _ in range(layers)])
    self.norm = _layer_norm(hidden_size, dtype=dtype, rngs=rngs)

  def position_embedding(self, time_patches: int) -> jax.Array:
    """[1, 2 + mel * time_patches, hidden]: the table's middle `time_patches` time columns."""
    mel, full = self.grid
    if time_patches > full:
      raise ValueError(f'AST: {time_patches} time patches exceed the {full} of its position table '
                       f'(max_frames {self.max_frames}).')
    table = self.pos_embed[...]
    start = full // 2 - time_patches // 2 if time_patches < full else 0
    grid = table[:, 2:].reshape(1, mel, full, self.hidden_size)[:, :, start:start + time_patches]
    return jnp.concatenate([table[:, :2], grid.reshape(1, mel * time_patches, self.hidden_size)], axis=1)

  def __call__(self, fbank: jax.Array) -> jax.Array:
    if fbank.ndim != 3 or fbank.shape[-1] != self.num_mel_bins or fbank.shape[1] < self.patch_size:
      raise ValueError(f'AST expects filterbanks [B, frames >= {self.patch_size}, {self.num_mel_bins}] '
                       f'(model.audio.encoder=ast; the pipeline computes them from the waveform), got shape '
                       f'{fbank.shape}.')
    b = fbank.shape[0]
    x = jnp.swapaxes(fbank.astype(self.dtype), 1, 2)[..., None]  # [B, mel, time, 1]
    x = self.patch_embed(x)                                      # [B, mel', time', C]
    time_patches = x.shape[2]
    x = x.reshape(b, -1, self.hidden_size)                       # mel-major tokens, as torch's flatten
    lead = jnp.concatenate([self.cls_token[...], self.dist_token[...]], axis=1).astype(x.dtype)
    x = jnp.concatenate([jnp.broadcast_to(lead, (b, 2, self.hidden_size)), x], axis=1)
    x = x + self.position_embedding(time_patches).astype(x.dtype)
    for layer in self.layers:
      x = layer(x)
    x = self.norm(x)
    return (x[:, 0] + x[:, 1]) / 2
