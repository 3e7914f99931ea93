"""Weight converters: PyTorch backbone checkpoints -> NNX state of our backbones.

Command line (docs/DESIGN.md §8):
  python -m qdformer_jax.convert {resnet50,swin_t,vggish,...} --src FILE --out DIR

Readable inputs:
  resnet18/34/50/101  torchvision `resnet50-*.pth` state_dicts, transformers `ResNetModel` /
                      `ResNetForImageClassification` (`.bin`, `.safetensors` or a saved state_dict)
  swin_t/s/b          official Swin `.pth` ({'model': sd}), mmdet detection checkpoints
                      (`backbone.*`), transformers `SwinModel` / `SwinBackbone` / classification
  pvt_v2_b0..b5       the official PVT-v2 release `pvt_v2_b5.pth` (the file AVSegFormer / COMBO ship; also
                      inside detection / segmentation checkpoints as `backbone.*`), timm `pvt_v2_*`
                      (`pytorch_model.bin` / `model.safetensors`)
  vggish              torchvggish `vggish-10086976.pth`
  ast                 the Audio Spectrogram Transformer: transformers `ASTModel` / `ASTForAudioClassification`
                      (MIT/ast-finetuned-audioset-10-10-0.4593 `model.safetensors`), or the official
                      release `audioset_10_10_0.4593.pth`; size read from the file
  resnet, swin        whatever size the file holds (inferred; e.g. small test models)

The output directory holds `weights.msgpack` + `meta.json` (see `convert.common`). Load it with
`load_converted(module, DIR)` into a module of the same architecture, e.g. `model.backbone` or the
audio encoder's VGGish, or build a fresh one with `module_from_converted(DIR)`.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from qdformer_jax.convert.ast import convert_ast
from qdformer_jax.convert.common import fill_module, load_converted, load_state_dict, read_converted, save_converted
from qdformer_jax.convert.pvt import convert_pvt
from qdformer_jax.convert.resnet import convert_resnet
from qdformer_jax.convert.swin import check_swin_name, convert_swin, swin_arrays
from qdformer_jax.convert.vggish import convert_vggish
from qdformer_jax.models.ast import AudioSpectrogramTransformer
from qdformer_jax.models.pvt import PVT_V2_SPECS, PyramidVisionTransformerV2
from qdformer_jax.models.resnet import ResNet
from qdformer_jax.models.swin import SwinTransformer
from qdformer_jax.models.vggish import VGGish

RESNET_ARCHS = {'resnet18': 18, 'resnet34': 34, 'resnet50': 50, 'resnet101': 101, 'resnet': None}
SWIN_ARCHS = ('swin_t', 'swin_s', 'swin_b', 'swin')
PVT_ARCHS = tuple(PVT_V2_SPECS)
ARCHS = tuple(RESNET_ARCHS) + SWIN_ARCHS + PVT_ARCHS + ('vggish', 'ast')

__all__ = ['ARCHS', 'convert_ast', 'convert_file', 'convert_pvt', 'convert_resnet', 'convert_swin', 'convert_vggish',
           'load_converted', 'load_state_dict', 'module_from_converted', 'save_converted']


def convert_file(arch: str, src: str, out: str) -> dict[str, Any]:
  """Converts the PyTorch file `src` for `arch` into the directory `out`; returns its meta dict."""
  if arch not in ARCHS:
    raise ValueError(f'arch must be one of {list(ARCHS)}, got {arch!r}.')
  state_dict = load_state_dict(src)
  source = f'--src {src!r}'
  notes: list[str] = []
  if arch in RESNET_ARCHS:
    module = convert_resnet(state_dict, RESNET_ARCHS[arch], source=source)
    kwargs = {'kind': 'resnet', 'depth': module.depth, 'width': module.width}
  elif arch in SWIN_ARCHS:
    arrays, spec, identity = swin_arrays(state_dict, source)
    check_swin_name(spec, None if arch == 'swin' else arch, source)
    module = fill_module(nnx.eval_shape(lambda: SwinTransformer(**spec, rngs=nnx.Rngs(0))), arrays,
                         source)
    kwargs = {'kind': 'swin', **{k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}}
    if identity:
      notes.append(f'output norms {identity} not in the file: set to identity (weight 1, bias 0)')
  elif arch in PVT_ARCHS:
    module = convert_pvt(state_dict, arch, source=source)
    kwargs = {'kind': 'pvt_v2', **{k: list(v) for k, v in PVT_V2_SPECS[arch].items()}}
  elif arch == 'ast':
    module, spec = convert_ast(state_dict, source=source)
    kwargs = {'kind': 'ast', **spec}
  else:
    module = convert_vggish(state_dict, source=source)
    kwargs = {'kind': 'vggish'}
  return save_converted(module, out, arch=arch, source=src, module_kwargs=kwargs, notes=notes)


def module_from_converted(path: str, *, frozen_stages: int | None = None, dtype: Any = jnp.float32
                          ) -> nnx.Module:
  """A new backbone built from `meta.json` of a converted directory and filled with its weights."""
  arrays, meta = read_converted(path)
  kwargs = dict(meta.get('module_kwargs', {}))
  kind = kwargs.pop('kind', None)
  extra = {} if frozen_stages is None else {'frozen_stages': frozen_stages}
  if kind == 'resnet':
    factory = lambda: ResNet(kwargs['depth'], width=kwargs['width'], dtype=dtype, rngs=nnx.Rngs(0),
                             **extra)
  elif kind == 'swin':
    factory = lambda: SwinTransformer(**kwargs, dtype=dtype, rngs=nnx.Rngs(0), **extra)
  elif kind == 'pvt_v2':
    factory = lambda: PyramidVisionTransformerV2(**kwargs, dtype=dtype, rngs=nnx.Rngs(0), **extra)
  elif kind == 'ast':
    factory = lambda: AudioSpectrogramTransformer(**kwargs, dtype=dtype, rngs=nnx.Rngs(0))
  elif kind == 'vggish':
    factory = lambda: VGGish(dtype=dtype, rngs=nnx.Rngs(0))
  else:
    raise ValueError(f'{path!r}: meta.json names no known module kind (found {kind!r}); '
                     'use load_converted(module, path) with a module you build.')
  return fill_module(nnx.eval_shape(factory), arrays, f'converted weights {path!r}')
