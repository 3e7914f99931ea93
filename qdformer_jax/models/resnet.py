"""ResNet-18/34/50/101 trunk (torchvision layout) returning [C2, C3, C4, C5] NHWC.

Layout and names follow torchvision's `ResNet` so a state_dict maps one to one:
`conv1`, `bn1`, `layer1..layer4` (lists of blocks), each block `conv1, bn1, conv2, bn2[, conv3, bn3]`
and `downsample = [conv 1x1, bn]` when the shape changes. Bottleneck blocks put the stride on the
3x3 conv (torchvision >= 0.3, "ResNet v1.5"). Convolution kernels are HWIO (torch OIHW transposed).

BatchNorm is frozen everywhere (`FrozenBatchNorm`, eps 1e-5): stored statistics, never updated,
and not `nnx.Param`.

Freezing stages (`frozen_stages`, the mmdet/Swin convention):
  -1: nothing frozen (besides BatchNorm); 0: the stem (conv1+bn1); k >= 1: the stem and layer1..layerk.
The default 1 freezes stem+layer1 as Deformable-DETR/ReferFormer. Freezing is applied twice:
  1. `jax.lax.stop_gradient` on the output of the last frozen stage, so no gradient reaches the
     frozen weights (their gradient is exactly zero);
  2. `ResNet.frozen_param_filter(prefix)` gives an NNX filter matching the frozen `nnx.Param`s, so the
     optimizer can leave them out entirely, e.g.
     `nnx.Optimizer(model, tx, wrt=nnx.All(nnx.Param, nnx.Not(model.backbone.frozen_param_filter(('backbone',)))))`
     (then AdamW's decoupled weight decay never shrinks them either).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qdformer_jax.models.layers import FrozenBatchNorm, check_remat, conv, max_pool, path_prefix_filter, remat

# depth -> (block kind, blocks per stage)
RESNET_SPECS = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
}
_EXPANSION = {'basic': 1, 'bottleneck': 4}


class BasicBlock(nnx.Module):
  """Two 3x3 convs with a residual: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))."""

  def __init__(self, in_ch: int, planes: int, stride: int, *, dtype: Any, rngs: nnx.Rngs):
    out_ch = planes
    self.conv1 = conv(in_ch, planes, 3, stride, dtype=dtype, rngs=rngs)
    self.bn1 = FrozenBatchNorm(planes, dtype=dtype)
    self.conv2 = conv(planes, out_ch, 3, 1, dtype=dtype, rngs=rngs)
    self.bn2 = FrozenBatchNorm(out_ch, dtype=dtype)
    self.downsample = _downsample(in_ch, out_ch, stride, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return jax.nn.relu(y + _shortcut(self.downsample, x))


class Bottleneck(nnx.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand (x4), residual; torchvision v1.5 layout."""

  def __init__(self, in_ch: int, planes: int, stride: int, *, dtype: Any, rngs: nnx.Rngs):
    out_ch = planes * _EXPANSION['bottleneck']
    self.conv1 = conv(in_ch, planes, 1, 1, dtype=dtype, rngs=rngs)
    self.bn1 = FrozenBatchNorm(planes, dtype=dtype)
    self.conv2 = conv(planes, planes, 3, stride, dtype=dtype, rngs=rngs)
    self.bn2 = FrozenBatchNorm(planes, dtype=dtype)
    self.conv3 = conv(planes, out_ch, 1, 1, dtype=dtype, rngs=rngs)
    self.bn3 = FrozenBatchNorm(out_ch, dtype=dtype)
    self.downsample = _downsample(in_ch, out_ch, stride, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return jax.nn.relu(y + _shortcut(self.downsample, x))


def _downsample(in_ch: int, out_ch: int, stride: int, dtype: Any, rngs: nnx.Rngs):
  """`[conv1x1(stride), bn]` when the residual changes shape (torchvision `downsample`), else None."""
  if stride == 1 and in_ch == out_ch:
    return None
  return nnx.List([conv(in_ch, out_ch, 1, stride, dtype=dtype, rngs=rngs),
                   FrozenBatchNorm(out_ch, dtype=dtype)])


def _call_block(block, x):
  return block(x)


def _shortcut(downsample, x: jax.Array) -> jax.Array:
  if downsample is None:
    return x
  return downsample[1](downsample[0](x))


class ResNet(nnx.Module):
  """ResNet trunk: `__call__(x [B,H,W,3] float, ImageNet-normalised) -> [C2, C3, C4, C5]` NHWC.

  C2..C5 have strides 4, 8, 16, 32 and `self.out_channels` channels. `width` is the base width
  (64 for the standard nets; stage widths width*(1,2,4,8), times 4 for bottlenecks) so tiny models
  can be built for tests. Parameters are float32; `dtype` is the compute dtype. `remat` (a
  `layers.REMAT_POLICIES` key) rematerialises each residual block in the backward pass.
  """

  def __init__(self, depth: int, *, width: int = 64, frozen_stages: int = 1,
               dtype: Any = jnp.float32, remat: str = 'none', rngs: nnx.Rngs):
    if depth not in RESNET_SPECS:
      raise ValueError(f'ResNet depth must be one of {sorted(RESNET_SPECS)}, got depth={depth}.')
    if not -1 <= frozen_stages <= 4:
      raise ValueError(f'frozen_stages must be in -1..4 (-1 none, 0 stem, k stem+layer1..k), '
                       f'got {frozen_stages}.')
    if width < 1:
      raise ValueError(f'ResNet width must be a positive channel count, got width={width}.')
    kind, blocks = RESNET_SPECS[depth]
    block_cls = BasicBlock if kind == 'basic' else Bottleneck
    expansion = _EXPANSION[kind]
    self.depth = depth
    self.width = width
    self.frozen_stages = frozen_stages
    self.dtype = dtype
    self.remat = check_remat(remat)
    self.conv1 = conv(3, width, 7, 2, dtype=dtype, rngs=rngs)
    self.bn1 = FrozenBatchNorm(width, dtype=dtype)
    in_ch = width
    out_channels = []
    for stage, n_blocks in enumerate(blocks):
      planes = width * 2 ** stage
      stride = 1 if stage == 0 else 2
      layer = []
      for b in range(n_blocks):
        layer.append(block_cls(in_ch, planes, stride if b == 0 else 1, dtype=dtype, rngs=rngs))
        in_ch = planes * expansion
      setattr(self, f'layer{stage + 1}', nnx.List(layer))
      out_channels.append(in_ch)
    self.out_channels = tuple(out_channels)

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'ResNet expects images [B,H,W,3] (NHWC), got shape {x.shape}.')
    x = jax.nn.relu(self.bn1(self.conv1(x.astype(self.dtype))))
    x = max_pool(x, 3, 2, 1)
    if self.frozen_stages >= 0:
      x = jax.lax.stop_gradient(x)
    features = []
    for stage in range(1, 5):
      # A frozen stage has no backward pass: nothing to rematerialise.
      policy = 'none' if stage <= self.frozen_stages else self.remat
      for block in getattr(self, f'layer{stage}'):
        x = remat(_call_block, policy)(block, x)
      if stage <= self.frozen_stages:
        x = jax.lax.stop_gradient(x)
      features.append(x)
    return features

  def frozen_module_names(self) -> tuple[str, ...]:
    """Top-level attribute names of the frozen stages (empty when frozen_stages == -1)."""
    if self.frozen_stages < 0:
      return ()
    return ('conv1', 'bn1') + tuple(f'layer{i}' for i in range(1, self.frozen_stages + 1))

  def frozen_param_filter(self, prefix: tuple = ()) -> Callable[[tuple, Any], bool]:
    """NNX filter matching the `nnx.Param`s of the frozen stages.

    `prefix` is the path of this backbone inside the state the filter is applied to (e.g.
    `('backbone',)` when it is `model.backbone`). Use `nnx.Not(...)` of it to keep those params out
    of the optimizer (no update, no weight decay).
    """
    return path_prefix_filter([tuple(prefix) + (name,) for name in self.frozen_module_names()])
