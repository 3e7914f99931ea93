"""Visual backbone factory: `build_backbone(config, rngs)`.

`config` is any object with attribute (or mapping) access, e.g. an `ml_collections.ConfigDict`:
  name           one of resnet18, resnet34, resnet50, resnet101, swin_t, swin_s, swin_b,
                 pvt_v2_b0 ... pvt_v2_b5
  width          ResNet base width (default 64); small values (16-32) build tiny test models
  frozen_stages  -1 none, 0 stem/patch-embed, k: stem + first k stages (default 1)
  dtype          compute dtype, 'float32' | 'bfloat16' or a jnp dtype (default float32);
                 parameters are always float32
Optional Swin fields: drop_path_rate (stochastic depth, default 0; needs a 'dropout' RNG stream)
and, for tiny synthetic models, embed_dim, depths, num_heads, window_size. Optional PVT-v2 fields:
drop_path_rate and, for tiny models, embed_dims, depths, num_heads, mlp_ratios, sr_ratios.

Every backbone returns [C2, C3, C4, C5] NHWC (strides 4..32), has `.out_channels` (4 ints) and
`.frozen_param_filter(prefix)` (see `qdformer_jax.models.resnet` for how to use it in an optimizer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import nnx

from qdformer_jax.models.layers import resolve_dtype
from qdformer_jax.models.resnet import ResNet

RESNET_NAMES = {'resnet18': 18, 'resnet34': 34, 'resnet50': 50, 'resnet101': 101}
SWIN_NAMES = ('swin_t', 'swin_s', 'swin_b')
PVT_NAMES = tuple(f'pvt_v2_b{i}' for i in range(6))
BACKBONE_NAMES = tuple(RESNET_NAMES) + SWIN_NAMES + PVT_NAMES


def _field(config: Any, name: str, default: Any = None) -> Any:
  """config.name or config[name], else default (None values also fall back to the default)."""
  if isinstance(config, dict):
    value = config.get(name, default)
  else:
    value = getattr(config, name, default)
  return default if value is None else value


def build_backbone(config: Any, rngs: nnx.Rngs, *, remat: str = 'none') -> nnx.Module:
  """The visual backbone `config.name` describes (see module docstring for the fields); `remat` (a
  `layers.REMAT_POLICIES` key, the model's `model.remat`) rematerialises each block in the backward pass."""
  name = _field(config, 'name')
  if name not in BACKBONE_NAMES:
    raise ValueError(f'backbone name must be one of {list(BACKBONE_NAMES)}, got {name!r} '
                     '(config field model.backbone.name).')
  dtype = resolve_dtype(_field(config, 'dtype', jnp.float32), 'model.backbone.dtype')
  frozen_stages = int(_field(config, 'frozen_stages', 1))
  if name in RESNET_NAMES:
    return ResNet(RESNET_NAMES[name], width=int(_field(config, 'width', 64)),
                  frozen_stages=frozen_stages, dtype=dtype, remat=remat, rngs=rngs)
  if name in PVT_NAMES:
    from qdformer_jax.models.pvt import PVT_V2_SPECS, PyramidVisionTransformerV2
    spec = dict(PVT_V2_SPECS[name])
    for key in ('embed_dims', 'depths', 'num_heads', 'mlp_ratios', 'sr_ratios'):
      value = _field(config, key)
      if value is not None:
        spec[key] = tuple(value)
    return PyramidVisionTransformerV2(**spec, drop_path_rate=float(_field(config, 'drop_path_rate', 0.0)),
                                      frozen_stages=frozen_stages, dtype=dtype, remat=remat, rngs=rngs)
  from qdformer_jax.models.swin import SWIN_SPECS, SwinTransformer
  spec = dict(SWIN_SPECS[name])
  for key in ('embed_dim', 'depths', 'num_heads', 'window_size'):
    value = _field(config, key)
    if value is not None:
      spec[key] = tuple(value) if key in ('depths', 'num_heads') else int(value)
  return SwinTransformer(**spec, drop_path_rate=float(_field(config, 'drop_path_rate', 0.0)),
                         frozen_stages=frozen_stages, dtype=dtype, remat=remat, rngs=rngs)


def frozen_param_filter(backbone: nnx.Module, prefix: tuple = ()) -> Callable[[tuple, Any], bool]:
  """NNX filter matching the backbone's frozen `nnx.Param`s, `prefix` = its path in the model state.

  Example: `trainable = nnx.All(nnx.Param, nnx.Not(frozen_param_filter(model.backbone, ('backbone',))))`
  and `nnx.Optimizer(model, tx, wrt=trainable)`.
  """
  return backbone.frozen_param_filter(prefix)
