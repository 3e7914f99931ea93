"""PVT-v2 weights -> `PyramidVisionTransformerV2`: the official release layout (`patch_embed1..4`,
`block1..4`, `norm1..4`, `mlp.dwconv.dwconv`; the `pvt_v2_b*.pth` files AVSegFormer and COMBO ship,
also inside detection / segmentation checkpoints under `backbone.`) and timm's `pvt_v2_*` layout
(`patch_embed`, `stages.{i}.downsample`, `stages.{i}.blocks.{j}`, `stages.{i}.norm`).

Both are first renamed to our module paths (`stages/{i}/patch_embed`, `stages/{i}/blocks/{j}/...`,
`stages/{i}/norm`); torch Linear weight [out,in] -> kernel [in,out], Conv OIHW -> HWIO (the
depth-wise conv's [C,1,3,3] -> [3,3,1,C]), LayerNorm weight -> scale. Dropped: the classifier
(`head.*`). Anything else is refused. The architecture is the one the name asks for
(`pvt_v2_b0`..`b5`); a file of another size or architecture is refused in one line naming the
first key that does not fit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
from flax import nnx

from qdformer_jax.convert.common import conv_kernel, fill_module, linear_kernel, module_shapes, strip_prefixes
from qdformer_jax.models.pvt import PVT_V2_SPECS, PyramidVisionTransformerV2

_DROPPED = re.compile(r'^head\.|num_batches_tracked$')
_LINEARS = r'(attn\.(q|kv|proj)|mlp\.fc[12])'
_NORMS = r'(norm1|norm2|attn\.norm)'


def to_ours(key: str) -> str:
  """One official or timm key -> our dotted module path (leaf unchanged); unknown keys unchanged."""
  m = re.match(r'^patch_embed([1-4])\.(.*)$', key)  # official
  if m:
    return f'stages.{int(m[1]) - 1}.patch_embed.{m[2]}'
  m = re.match(r'^block([1-4])\.(\d+)\.(.*)$', key)
  if m:
    key = f'stages.{int(m[1]) - 1}.blocks.{m[2]}.{m[3]}'
  m = re.match(r'^norm([1-4])\.(weight|bias)$', key)
  if m:
    return f'stages.{int(m[1]) - 1}.norm.{m[2]}'
  if key.startswith('patch_embed.'):  # timm
    return 'stages.0.' + key
  key = re.sub(r'^stages\.(\d+)\.downsample\.', r'stages.\1.patch_embed.', key)
  return key.replace('.mlp.dwconv.dwconv.', '.mlp.dwconv.')


def _rename(key: str, value: np.ndarray):
  """Our dotted key -> (NNX path key, array); KeyError when it is not a PVT-v2 parameter."""
  parts = key.split('.')
  module, leaf = '.'.join(parts[:-1]), parts[-1]
  path = module.replace('.', '/')
  stage = r'stages\.[0-3]\.'
  if re.fullmatch(stage + r'patch_embed\.proj', module) or re.fullmatch(
      stage + r'blocks\.\d+\.(attn\.sr|mlp\.dwconv)', module):
    if leaf == 'weight' and value.ndim == 4:
      return f'{path}/kernel', conv_kernel(value)
    if leaf == 'bias':
      return f'{path}/bias', value
  if re.fullmatch(stage + r'blocks\.\d+\.' + _LINEARS, module):
    if leaf == 'weight' and value.ndim == 2:
      return f'{path}/kernel', linear_kernel(value)
    if leaf == 'bias':
      return f'{path}/bias', value
  is_norm = re.fullmatch(stage + r'(patch_embed\.norm|norm|blocks\.\d+\.' + _NORMS + ')', module)
  if is_norm and leaf in ('weight', 'bias') and value.ndim == 1:
    return f'{path}/{"scale" if leaf == "weight" else "bias"}', value
  raise KeyError('not a PVT-v2 parameter (the linear-attention "_li" variants are not supported)')


def pvt_arrays(state_dict: Mapping[str, np.ndarray], source: str = 'state_dict'
               ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """An official / timm PVT-v2 state_dict (wrapped or not) -> ({NNX path key: array} in the file's
  order, {NNX path key: the file's key and shape}).

  Raises a one-line ValueError naming the first key that is not a PVT-v2 parameter.
  """
  sd = dict(state_dict)
  if any(k.startswith('backbone.') for k in sd):  # a whole detector / segmenter: keep its backbone
    sd = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
  sd = strip_prefixes(sd, ('module.',))
  out, origin = {}, {}
  for key, value in sd.items():
    if _DROPPED.search(key):
      continue
    try:
      new_key, new_value = _rename(to_ours(key), value)
    except KeyError:
      raise ValueError(f'{source}: key {key!r} {tuple(value.shape)} is not a PVT-v2 parameter '
                       '(official patch_embed1../block1../norm1.. or timm patch_embed/stages.N naming).') from None
    out[new_key], origin[new_key] = new_value, f'{key!r} {tuple(value.shape)}'
  return out, origin


def check_fits(arrays: Mapping[str, np.ndarray], origin: Mapping[str, str], name: str, source: str) -> None:
  """One-line ValueError naming the first key, in the file's order, that `name`'s module does not
  have or has with another shape, else the first key of the module that the file lacks."""
  expected = module_shapes(nnx.eval_shape(lambda: PyramidVisionTransformerV2(**PVT_V2_SPECS[name],
                                                                             rngs=nnx.Rngs(0))))
  for key, value in arrays.items():
    if key not in expected:
      raise ValueError(f'{source}: not a {name}: first mismatch, file key {origin[key]} has no place in '
                       f'{name} (a deeper model?).')
    if tuple(value.shape) != expected[key][0]:
      raise ValueError(f'{source}: not a {name}: first mismatch, file key {origin[key]} does not fit '
                       f'{key} {expected[key][0]} of {name}.')
  missing = [k for k in expected if k not in arrays]
  if missing:
    raise ValueError(f'{source}: not a {name}: first mismatch, {missing[0]!r} is missing from the file '
                     f'({len(missing)} missing; a shallower model?).')


def convert_pvt(state_dict: Mapping[str, np.ndarray], name: str, *, frozen_stages: int = -1,
                source: str = 'state_dict') -> PyramidVisionTransformerV2:
  """A `PyramidVisionTransformerV2` of preset `name` (pvt_v2_b0..b5) holding a state_dict's weights."""
  if name not in PVT_V2_SPECS:
    raise ValueError(f'PVT-v2 name must be one of {sorted(PVT_V2_SPECS)}, got {name!r}.')
  arrays, origin = pvt_arrays(state_dict, source)
  check_fits(arrays, origin, name, source)
  abstract = nnx.eval_shape(lambda: PyramidVisionTransformerV2(**PVT_V2_SPECS[name], frozen_stages=frozen_stages,
                                                               rngs=nnx.Rngs(0)))
  return fill_module(abstract, arrays, source)
