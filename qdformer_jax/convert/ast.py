"""Audio Spectrogram Transformer weights -> `AudioSpectrogramTransformer`.

Reads transformers' `ASTModel` / `ASTForAudioClassification` in the naming of transformers >= 5
(`layers.{i}.attention.q_proj`, `mlp.fc1`) and < 5 (`encoder.layer.{i}.attention.attention.query`,
`intermediate.dense`; the `pytorch_model.bin` / `model.safetensors` of
MIT/ast-finetuned-audioset-10-10-0.4593), and the official release (`audioset_10_10_0.4593.pth`:
`module.v.blocks.{i}.attn.qkv`, fused q/k/v, split here). Dropped: the classifier (`classifier.*`,
`mlp_head.*`, DeiT's `head` / `head_dist`). The size is read from the weights; the number of heads
is not in them and is hidden / 64 (12 for the released model, DeiT-B's head width 64).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
from flax import nnx

from qdformer_jax.convert.common import conv_kernel, fill_module, linear_kernel, rename_all
from qdformer_jax.models.ast import AST_SPECS, AudioSpectrogramTransformer, patch_grid

_DROPPED = re.compile(r'^(classifier|mlp_head|head|head_dist)\.|num_batches_tracked$')
_RENAMES = (  # (regex on a transformers / official key, our dotted name); applied in order
    (r'^embeddings\.cls_token$', 'cls_token'),
    (r'^embeddings\.distillation_token$', 'dist_token'),
    (r'^embeddings\.position_embeddings$', 'pos_embed'),
    (r'^embeddings\.patch_embeddings\.projection\.', 'patch_embed.'),
    (r'^encoder\.layer\.', 'layers.'),
    (r'^layernorm\.', 'norm.'),
    (r'\.layernorm_before\.', '.norm1.'),
    (r'\.layernorm_after\.', '.norm2.'),
    (r'\.attention\.attention\.query\.', '.attn.q.'),
    (r'\.attention\.attention\.key\.', '.attn.k.'),
    (r'\.attention\.attention\.value\.', '.attn.v.'),
    (r'\.attention\.output\.dense\.', '.attn.o.'),
    (r'\.attention\.([qkvo])_proj\.', r'.attn.\1.'),
    (r'\.intermediate\.dense\.', '.fc1.'),
    (r'\.output\.dense\.', '.fc2.'),
    (r'\.mlp\.(fc[12])\.', r'.\1.'),
    # official release (timm DeiT under `v.`)
    (r'^patch_embed\.proj\.', 'patch_embed.'),
    (r'^blocks\.', 'layers.'),
    (r'\.attn\.proj\.', '.attn.o.'),
)


def to_ours(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Any supported naming -> our dotted names (fused official qkv split into q, k, v)."""
  out = {}
  for key, value in state_dict.items():
    for prefix in ('module.', 'audio_spectrogram_transformer.', 'v.'):
      key = key[len(prefix):] if key.startswith(prefix) else key
    if _DROPPED.search(key):
      continue
    for pattern, repl in _RENAMES:
      key = re.sub(pattern, repl, key)
    m = re.fullmatch(r'(layers\.\d+\.attn)\.qkv\.(weight|bias)', key)
    if m:
      for name, part in zip('qkv', np.split(value, 3, axis=0)):
        out[f'{m[1]}.{name}.{m[2]}'] = part
      continue
    out[key] = value
  return out


def _rename(key: str, value: np.ndarray):
  """Our dotted key -> (NNX path key, array); KeyError when it is not an AST parameter."""
  if key in ('cls_token', 'dist_token', 'pos_embed'):
    return key, value
  if key == 'patch_embed.weight':
    return 'patch_embed/kernel', conv_kernel(value)
  parts = key.split('.')
  module, leaf = '.'.join(parts[:-1]), parts[-1]
  path = module.replace('.', '/')
  if re.fullmatch(r'layers\.\d+\.(attn\.[qkvo]|fc[12])', module) and leaf in ('weight', 'bias'):
    return f'{path}/{"kernel" if leaf == "weight" else "bias"}', linear_kernel(value) if leaf == 'weight' else value
  if (re.fullmatch(r'layers\.\d+\.norm[12]', module) or module == 'norm') and leaf in ('weight', 'bias'):
    return f'{path}/{"scale" if leaf == "weight" else "bias"}', value
  if key == 'patch_embed.bias':
    return 'patch_embed/bias', value
  raise KeyError('not an Audio Spectrogram Transformer parameter')


def infer_ast(ours: Mapping[str, np.ndarray], source: str = 'state_dict', heads: int | None = None) -> dict:
  """AudioSpectrogramTransformer kwargs of a state_dict in our naming (mel bins, patch and strides
  as the released model: 128, 16, 10 x 10)."""
  if 'cls_token' not in ours or 'pos_embed' not in ours or 'patch_embed.weight' not in ours:
    raise ValueError(f'{source}: no cls token / position / patch embedding (embeddings.cls_token, '
                     'embeddings.position_embeddings, ...): not an Audio Spectrogram Transformer state_dict.')
  base = AST_SPECS['base']
  hidden = int(ours['cls_token'].shape[-1])
  layers = 1 + max((int(m[1]) for k in ours if (m := re.match(r'layers\.(\d+)\.', k))), default=-1)
  mel, _ = patch_grid(base['max_frames'], base['num_mel_bins'], base['patch_size'], base['frequency_stride'],
                      base['time_stride'])
  positions = int(ours['pos_embed'].shape[1]) - 2
  if positions % mel:
    raise ValueError(f'{source}: {positions} patch positions are not a multiple of the {mel} mel patches of '
                     '128-bin filterbanks.')
  time = positions // mel
  return dict(base, hidden_size=hidden, layers=layers, heads=heads or max(1, hidden // 64),
              mlp_dim=int(ours['layers.0.fc1.weight'].shape[0]) if layers else 4 * hidden,
              max_frames=(time - 1) * base['time_stride'] + base['patch_size'])


def convert_ast(state_dict: Mapping[str, np.ndarray], *, heads: int | None = None,
                source: str = 'state_dict') -> tuple[AudioSpectrogramTransformer, dict]:
  """(an `AudioSpectrogramTransformer` holding a state_dict's weights, its constructor kwargs)."""
  ours = to_ours(state_dict)
  spec = infer_ast(ours, source, heads)
  arrays = rename_all(ours, _rename, source)
  abstract = nnx.eval_shape(lambda: AudioSpectrogramTransformer(**spec, rngs=nnx.Rngs(0)))
  return fill_module(abstract, arrays, source), spec
