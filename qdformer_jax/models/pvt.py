"""PVT-v2 B0-B5 trunk (Wang et al. 2022, "PVT v2: Improved Baselines with Pyramid Vision Transformer")
returning [C2, C3, C4, C5] NHWC, the backbone of the AVSegFormer / COMBO comparisons.

Each of the four stages is an overlapping patch embedding (stage 1: 7x7 conv, stride 4, padding 3;
stages 2-4: 3x3 conv, stride 2, padding 1; then LayerNorm), `depth` blocks and a LayerNorm whose
output is the stage's feature map (and the next stage's input). A block is
`x + Attn(LN x)`, `x + FFN(LN x)`:
- spatial-reduction attention: queries from every token; keys and values from the map reduced by a
  `sr x sr` conv of stride `sr` + LayerNorm (no reduction where sr = 1), fused `kv` projection;
- the FFN is fc1 -> 3x3 depth-wise conv over the token map (the "convolutional position encoding":
  there is no position embedding, so any input size works) -> GELU (exact erf) -> fc2.

Names follow timm's `pvt_v2` with one patch embedding per stage (`stages.{i}.patch_embed`, where
timm has `patch_embed` for stage 1 and `stages.{i}.downsample` for the others, and the official
release `patch_embed{i+1}`); `qdformer_jax.convert.pvt` reads both layouts. LayerNorm epsilons are
the reference's: 1e-5 in the patch embeddings and after the spatial reduction (`nn.LayerNorm`),
1e-6 in the blocks and the stage norms. Stage freezing follows `qdformer_jax.models.swin`: -1 none,
0 the first patch embedding, k: stages 1..k (patch embedding, blocks, norm), by stop-gradient and
`frozen_param_filter`. `remat` rematerialises each block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qdformer_jax.models.layers import check_remat, path_prefix_filter, remat

_COMMON = dict(num_heads=(1, 2, 5, 8), sr_ratios=(8, 4, 2, 1))
_WIDE = (64, 128, 320, 512)
PVT_V2_SPECS = {
    'pvt_v2_b0': dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), mlp_ratios=(8, 8, 4, 4), **_COMMON),
    'pvt_v2_b1': dict(embed_dims=_WIDE, depths=(2, 2, 2, 2), mlp_ratios=(8, 8, 4, 4), **_COMMON),
    'pvt_v2_b2': dict(embed_dims=_WIDE, depths=(3, 4, 6, 3), mlp_ratios=(8, 8, 4, 4), **_COMMON),
    'pvt_v2_b3': dict(embed_dims=_WIDE, depths=(3, 4, 18, 3), mlp_ratios=(8, 8, 4, 4), **_COMMON),
    'pvt_v2_b4': dict(embed_dims=_WIDE, depths=(3, 8, 27, 3), mlp_ratios=(8, 8, 4, 4), **_COMMON),
    'pvt_v2_b5': dict(embed_dims=_WIDE, depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4), **_COMMON),
}
EMBED_LN_EPS = 1e-5   # torch.nn.LayerNorm default: patch embeddings, attention's spatial reduction
BLOCK_LN_EPS = 1e-6   # the reference's norm_layer: block norms and the stage output norms

_trunc02 = nnx.initializers.truncated_normal(stddev=0.02)


def _linear(fin: int, fout: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(fin, fout, dtype=dtype, param_dtype=jnp.float32, kernel_init=_trunc02, rngs=rngs)


def _layer_norm(dim: int, eps: float, *, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
                       rngs=rngs)


def _conv(cin: int, cout: int, kernel: int, stride: int, pad: int, *, groups: int = 1, dtype: Any,
          rngs: nnx.Rngs) -> nnx.Conv:
  return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                  feature_group_count=groups, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class OverlapPatchEmbed(nnx.Module):
  """k x k conv (stride s, padding k // 2) + LayerNorm: [B,H,W,Cin] -> [B,H',W',C]."""

  def __init__(self, cin: int, dim: int, kernel: int, stride: int, *, dtype: Any, rngs: nnx.Rngs):
    self.proj = _conv(cin, dim, kernel, stride, kernel // 2, dtype=dtype, rngs=rngs)
    self.norm = _layer_norm(dim, EMBED_LN_EPS, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.proj(x))


class SpatialReductionAttention(nnx.Module):
  """Multi-head attention whose keys/values come from the map reduced `sr` times per side."""

  def __init__(self, dim: int, num_heads: int, sr_ratio: int, *, dtype: Any, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f'PVT-v2: channels {dim} not divisible by num_heads {num_heads}.')
    self.num_heads = num_heads
    self.sr_ratio = sr_ratio
    self.scale = (dim // num_heads) ** -0.5
    self.q = _linear(dim, dim, dtype=dtype, rngs=rngs)
    self.kv = _linear(dim, 2 * dim, dtype=dtype, rngs=rngs)
    self.proj = _linear(dim, dim, dtype=dtype, rngs=rngs)
    if sr_ratio > 1:
      self.sr = _conv(dim, dim, sr_ratio, sr_ratio, 0, dtype=dtype, rngs=rngs)
      self.norm = _layer_norm(dim, EMBED_LN_EPS, dtype=dtype, rngs=rngs)
    else:
      self.sr = None
      self.norm = None

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B,H,W,C] -> [B,H,W,C]."""
    b, h, w, c = x.shape
    heads = self.num_heads
    q = self.q(x).reshape(b, h * w, heads, c // heads)
    y = x if self.sr is None else self.norm(self.sr(x))  # 'VALID' conv: floor(H / sr), as torch
    kv = self.kv(y).reshape(b, -1, 2, heads, c // heads)
    k, v = kv[:, :, 0], kv[:, :, 1]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q * self.scale, k).astype(jnp.float32)
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', attn, v).reshape(b, h, w, c)
    return self.proj(out)


def depthwise_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """3x3 depth-wise conv (stride 1, zero padding 1) of [B,H,W,C] with kernel [3,3,1,C], as the sum of
  the nine shifted maps times their per-channel weights.

  The same values as `lax.conv_general_dilated(..., feature_group_count=C)` (bit for bit on CPU),
  but its gradient is nine elementwise products and sums: XLA expresses the grouped conv's kernel
  gradient as a dense conv over all C x C channel pairs, which XLA:CPU then computes and every
  backend's cost analysis counts (PVT-v2-B5 at 224²: 26 GFLOP instead of 0.1 GFLOP per stride-16
  layer, 9x the time; the backbone's forward + backward counted 12.8x its forward). Called through
  `jax.checkpoint` (`_depthwise`): the backward pass recomputes the nine products from the saved
  input instead of keeping them, so it saves what the conv saved (a stride-16 B5 layer: 33.5 MB
  saved, as the conv; 71.8 MB without the checkpoint; gradient 177 ms against the conv's 1680 ms).
  """
  h, w = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  kernel = kernel.astype(x.dtype)
  out = sum(padded[:, i:i + h, j:j + w] * kernel[i, j, 0] for i in range(3) for j in range(3))
  return out + bias.astype(x.dtype)


_depthwise = jax.checkpoint(depthwise_conv3x3)


class DWConvMlp(nnx.Module):
  """fc1 -> 3x3 depth-wise conv (with bias) -> GELU (exact erf) -> fc2, on [B,H,W,C] maps.

  `dwconv` holds the conv's parameters (an `nnx.Conv`, kernel [3,3,1,C]); it is applied by
  `depthwise_conv3x3` under `jax.checkpoint`.
  """

  def __init__(self, dim: int, hidden: int, *, dtype: Any, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.dwconv = _conv(hidden, hidden, 3, 1, 1, groups=hidden, dtype=dtype, rngs=rngs)
    self.fc2 = _linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = _depthwise(self.fc1(x), self.dwconv.kernel[...], self.dwconv.bias[...])
    return self.fc2(jax.nn.gelu(y, approximate=False))


class PVTBlock(nnx.Module):
  """x + DropPath(SRA(LN x)); x + DropPath(FFN(LN x))."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, drop_path: float, *,
               dtype: Any, rngs: nnx.Rngs):
    self.norm1 = _layer_norm(dim, BLOCK_LN_EPS, dtype=dtype, rngs=rngs)
    self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, dtype=dtype, rngs=rngs)
    self.norm2 = _layer_norm(dim, BLOCK_LN_EPS, dtype=dtype, rngs=rngs)
    self.mlp = DWConvMlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    self.drop_path = (nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=rngs)
                      if drop_path > 0 else None)

  def _drop_path(self, x: jax.Array) -> jax.Array:
    return x if self.drop_path is None else self.drop_path(x)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self._drop_path(self.attn(self.norm1(x)))
    return x + self._drop_path(self.mlp(self.norm2(x)))


class PVTStage(nnx.Module):
  """Overlapping patch embedding, `depth` blocks, output LayerNorm."""

  def __init__(self, cin: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, sr_ratio: int,
               first: bool, drop_paths: Sequence[float], *, dtype: Any, rngs: nnx.Rngs):
    kernel, stride = (7, 4) if first else (3, 2)
    self.patch_embed = OverlapPatchEmbed(cin, dim, kernel, stride, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([PVTBlock(dim, num_heads, mlp_ratio, sr_ratio, drop_paths[i], dtype=dtype,
                                     rngs=rngs) for i in range(depth)])
    self.norm = _layer_norm(dim, BLOCK_LN_EPS, dtype=dtype, rngs=rngs)


def _call_block(block, x):
  return block(x)


class PyramidVisionTransformerV2(nnx.Module):
  """PVT-v2 trunk: `__call__(x [B,H,W,3] float, ImageNet-normalised) -> [C2, C3, C4, C5]` NHWC.

  Any H, W: the overlapping convs give maps of ceil(H / 4), then ceil(h / 2) per stage (strides 4,
  8, 16, 32 for multiples of 32), channels `self.out_channels` = embed_dims. Parameters float32, `dtype` the compute dtype (softmax in
  float32). `drop_path_rate` is the stochastic-depth rate of the last block (linear ramp from 0
  over all blocks, as the official code); it needs a 'dropout' RNG stream.
  """

  def __init__(self, *, embed_dims: Sequence[int] = (64, 128, 320, 512), depths: Sequence[int] = (3, 4, 6, 3),
               num_heads: Sequence[int] = (1, 2, 5, 8), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
               sr_ratios: Sequence[int] = (8, 4, 2, 1), drop_path_rate: float = 0.0, frozen_stages: int = -1,
               dtype: Any = jnp.float32, remat: str = 'none', rngs: nnx.Rngs):
    embed_dims, depths, num_heads = tuple(embed_dims), tuple(depths), tuple(num_heads)
    mlp_ratios, sr_ratios = tuple(mlp_ratios), tuple(sr_ratios)
    if not all(len(v) == 4 for v in (embed_dims, depths, num_heads, mlp_ratios, sr_ratios)):
      raise ValueError(f'PVT-v2 needs 4 stages: got embed_dims={embed_dims}, depths={depths}, '
                       f'num_heads={num_heads}, mlp_ratios={mlp_ratios}, sr_ratios={sr_ratios}.')
    if not -1 <= frozen_stages <= 4:
      raise ValueError(f'frozen_stages must be in -1..4 (-1 none, 0 first patch embedding, k: stages 1..k), '
                       f'got {frozen_stages}.')
    self.embed_dims = embed_dims
    self.depths = depths
    self.num_heads = num_heads
    self.mlp_ratios = mlp_ratios
    self.sr_ratios = sr_ratios
    self.frozen_stages = frozen_stages
    self.dtype = dtype
    self.remat = check_remat(remat)
    total = sum(depths)
    ramp = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    stages, start, cin = [], 0, 3
    for i in range(4):
      stages.append(PVTStage(cin, embed_dims[i], depths[i], num_heads[i], mlp_ratios[i], sr_ratios[i],
                             i == 0, ramp[start:start + depths[i]], dtype=dtype, rngs=rngs))
      start += depths[i]
      cin = embed_dims[i]
    self.stages = nnx.List(stages)
    self.out_channels = embed_dims

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'PVT-v2 expects images [B,H,W,3] (NHWC), got shape {x.shape}.')
    x = x.astype(self.dtype)
    features = []
    for i, stage in enumerate(self.stages):
      frozen = i < self.frozen_stages
      x = stage.patch_embed(x)
      if i == 0 and self.frozen_stages >= 0:
        x = jax.lax.stop_gradient(x)
      for block in stage.blocks:
        x = remat(_call_block, 'none' if frozen else self.remat)(block, x)
      x = stage.norm(x)
      if frozen:
        x = jax.lax.stop_gradient(x)
      features.append(x)
    return features

  def frozen_module_prefixes(self) -> list[tuple]:
    """Path prefixes (from this module) of the frozen parts."""
    if self.frozen_stages < 0:
      return []
    if self.frozen_stages == 0:
      return [('stages', 0, 'patch_embed')]
    return [('stages', i) for i in range(self.frozen_stages)]

  def frozen_param_filter(self, prefix: tuple = ()) -> Callable[[tuple, Any], bool]:
    """NNX filter matching the frozen `nnx.Param`s; `prefix` = this module's path in the state."""
    return path_prefix_filter([tuple(prefix) + p for p in self.frozen_module_prefixes()])
