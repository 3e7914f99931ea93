"""VGGish weights: torchvggish `vggish-10086976.pth` (keys `features.N.*`, `embeddings.N.*`) -> `VGGish`.

torchvggish's `features` Sequential interleaves Conv2d/ReLU/MaxPool2d, so its convolutions sit at
indices 0, 3, 6, 8, 11, 13; `embeddings` holds Linear layers at 0, 2, 4. PCA parameters (`pproc.*`,
`_pca_*`) are not part of the network and are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import nnx

from qdformer_jax.convert.common import conv_kernel, fill_module, linear_kernel, rename_all, strip_prefixes
from qdformer_jax.models.vggish import VGGish

TORCH_CONV_INDEX = {0: 'conv1', 3: 'conv2', 6: 'conv3_1', 8: 'conv3_2', 11: 'conv4_1', 13: 'conv4_2'}
TORCH_FC_INDEX = {0: 'fc1_1', 2: 'fc1_2', 4: 'fc2'}


def _rename(key: str, value: np.ndarray):
  """torchvggish key -> (NNX path key, array); None for PCA entries; KeyError when unknown."""
  if key.startswith(('pproc.', '_pca', 'pca_')):
    return None
  parts = key.split('.')
  if len(parts) != 3 or parts[2] not in ('weight', 'bias') or not parts[1].isdigit():
    raise KeyError('not a torchvggish VGG parameter')
  group, index, leaf = parts[0], int(parts[1]), parts[2]
  table = {'features': TORCH_CONV_INDEX, 'embeddings': TORCH_FC_INDEX}.get(group)
  if table is None or index not in table:
    raise KeyError(f'no parameterised layer {group}[{index}] in VGGish')
  name = table[index]
  if leaf == 'bias':
    return f'{name}/bias', value
  return f'{name}/kernel', conv_kernel(value) if group == 'features' else linear_kernel(value)


def vggish_arrays(state_dict: Mapping[str, np.ndarray], source: str = 'state_dict'
                  ) -> dict[str, np.ndarray]:
  """torchvggish state_dict -> {NNX path key: array}."""
  return rename_all(strip_prefixes(state_dict, ('module.',)), _rename, source)


def convert_vggish(state_dict: Mapping[str, np.ndarray], *, source: str = 'state_dict') -> VGGish:
  """A `VGGish` holding the weights of a torchvggish state_dict."""
  abstract = nnx.eval_shape(lambda: VGGish(rngs=nnx.Rngs(0)))
  return fill_module(abstract, vggish_arrays(state_dict, source), source)
