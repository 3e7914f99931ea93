"""ResNet weights: torchvision `resnet*.pth` state_dicts and Hugging Face `ResNetModel` naming -> `ResNet`.

torchvision keys map one to one onto the NNX paths (`layer1.0.downsample.1.running_var` ->
`layer1/0/downsample/1/running_var`; conv `weight` -> `kernel`, OIHW -> HWIO). Hugging Face keys
(`embedder.embedder.convolution.weight`, `encoder.stages.{s}.layers.{b}.layer.{k}...`,
`...shortcut.{convolution,normalization}`, optionally under `resnet.`) are first renamed to
torchvision's. The classifier (`fc.*` / `classifier.*`) and `num_batches_tracked` are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
from flax import nnx

from qdformer_jax.convert.common import conv_kernel, fill_module, rename_all, strip_prefixes
from qdformer_jax.models.resnet import RESNET_SPECS, ResNet

_HF_STEM = re.compile(r'^embedder\.embedder\.(convolution|normalization)\.(\w+)$')
_HF_LAYER = re.compile(
    r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.(convolution|normalization)\.(\w+)$')
_HF_SHORTCUT = re.compile(
    r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.(convolution|normalization)\.(\w+)$')
_BN_LEAVES = ('weight', 'bias', 'running_mean', 'running_var')


def is_hf_naming(state_dict: Mapping[str, np.ndarray]) -> bool:
  """True when the keys follow transformers' ResNet naming (embedder./encoder.stages.)."""
  return any(k.startswith(('embedder.', 'encoder.stages.')) for k in state_dict)


def hf_to_torchvision(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames transformers ResNet keys to torchvision's; unknown keys are kept (and rejected later)."""
  out = {}
  for key, value in state_dict.items():
    m = _HF_STEM.match(key)
    if m:
      out[('conv1.' if m[1] == 'convolution' else 'bn1.') + m[2]] = value
      continue
    m = _HF_LAYER.match(key)
    if m:
      stage, block, k, kind, leaf = int(m[1]), m[2], int(m[3]), m[4], m[5]
      name = f'conv{k + 1}' if kind == 'convolution' else f'bn{k + 1}'
      out[f'layer{stage + 1}.{block}.{name}.{leaf}'] = value
      continue
    m = _HF_SHORTCUT.match(key)
    if m:
      stage, block, kind, leaf = int(m[1]), m[2], m[3], m[4]
      out[f'layer{stage + 1}.{block}.downsample.{0 if kind == "convolution" else 1}.{leaf}'] = value
      continue
    out[key] = value
  return out


def _torchvision_rename(key: str, value: np.ndarray):
  """torchvision key -> (NNX path key, array), None for dropped entries, KeyError when unknown."""
  if key.endswith('num_batches_tracked') or key.startswith(('fc.', 'classifier.')):
    return None
  parts = key.split('.')
  leaf = parts[-1]
  if not re.fullmatch(r'(conv1|bn1|layer[1-4]\.\d+\.(conv[1-3]|bn[1-3]|downsample\.[01]))',
                      '.'.join(parts[:-1])):
    raise KeyError('not a torchvision ResNet module name')
  if leaf == 'weight' and value.ndim == 4:
    return '/'.join(parts[:-1] + ['kernel']), conv_kernel(value)
  if leaf in _BN_LEAVES and value.ndim == 1:
    return '/'.join(parts), value
  raise KeyError(f'unexpected leaf {leaf!r} with shape {value.shape}')


def torchvision_arrays(state_dict: Mapping[str, np.ndarray], source: str = 'state_dict'
                       ) -> dict[str, np.ndarray]:
  """Any supported ResNet state_dict (torchvision or HF naming, wrapped or not) -> NNX path arrays."""
  sd = {k: v for k, v in state_dict.items() if not k.startswith(('fc.', 'classifier.'))}
  sd = strip_prefixes(sd, ('module.', 'backbone.body.', 'backbone.'))
  sd = {(k[len('resnet.'):] if k.startswith('resnet.') else k): v for k, v in sd.items()}
  if is_hf_naming(sd):
    sd = hf_to_torchvision(sd)
  return rename_all(sd, _torchvision_rename, source)


def infer_resnet(state_dict: Mapping[str, np.ndarray], source: str = 'state_dict'
                 ) -> tuple[int, int]:
  """(depth, width) of the ResNet a state_dict describes (width = stem channels)."""
  arrays = torchvision_arrays(state_dict, source)
  if 'conv1/kernel' not in arrays:
    raise ValueError(f'{source}: no stem convolution (conv1.weight / '
                     'embedder.embedder.convolution.weight) found: not a ResNet state_dict.')
  width = int(arrays['conv1/kernel'].shape[-1])
  blocks = tuple(len({k.split('/')[1] for k in arrays if k.startswith(f'layer{i}/')})
                 for i in range(1, 5))
  bottleneck = any(k.endswith('conv3/kernel') for k in arrays)
  for depth, (kind, spec_blocks) in RESNET_SPECS.items():
    if spec_blocks == blocks and (kind == 'bottleneck') == bottleneck:
      return depth, width
  raise ValueError(f'{source}: blocks per stage {blocks} (bottleneck={bottleneck}) match none of '
                   f'ResNet-{sorted(RESNET_SPECS)}.')


def convert_resnet(state_dict: Mapping[str, np.ndarray], depth: int | None = None, *,
                   width: int | None = None, frozen_stages: int = 1,
                   source: str = 'state_dict') -> ResNet:
  """A `ResNet` holding the weights of a torchvision / HF ResNet state_dict.

  depth/width default to what the state_dict holds; when given they must agree with it.
  """
  found_depth, found_width = infer_resnet(state_dict, source)
  if depth is not None and depth != found_depth:
    raise ValueError(f'{source}: holds a ResNet-{found_depth}, not the requested ResNet-{depth}.')
  if width is not None and width != found_width:
    raise ValueError(f'{source}: base width is {found_width}, not the requested {width}.')
  abstract = nnx.eval_shape(lambda: ResNet(found_depth, width=found_width,
                                           frozen_stages=frozen_stages, rngs=nnx.Rngs(0)))
  return fill_module(abstract, torchvision_arrays(state_dict, source), source)
