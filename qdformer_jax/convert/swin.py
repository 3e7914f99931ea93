"""Swin weights -> `SwinTransformer`: official release `.pth` ({'model': sd}), detection (mmdet)
checkpoints (`backbone.*`), and transformers' naming (old: `attention.self.query`, new: `q_proj`;
`SwinModel`, `SwinForImageClassification` (`swin.`), `SwinBackbone` (`hidden_states_norms`)).

Everything is first renamed to the official naming, which maps one to one onto the NNX paths
(torch Linear weight [out,in] -> kernel [in,out]; Conv OIHW -> HWIO; LayerNorm weight -> scale).
transformers' separate q/k/v projections are concatenated into the official fused `qkv` (rows
q, k, v). Dropped: `relative_position_index` / `attn_mask` buffers (recomputed), the
classification `norm` / `layernorm`, `head` / `classifier`, other detector parts. Output norms
`norm0..norm3` absent from classification checkpoints are set to the identity (weight 1, bias 0),
which is what the detection code's init gives them before fine-tuning.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
from flax import nnx

from qdformer_jax.convert.common import conv_kernel, fill_module, linear_kernel, rename_all, strip_prefixes
from qdformer_jax.models.swin import SWIN_SPECS, SwinTransformer

_HF_RENAMES = (  # (regex on a transformers key, official replacement); applied in order
    (r'^embeddings\.patch_embeddings\.projection\.', 'patch_embed.proj.'),
    (r'^embeddings\.norm\.', 'patch_embed.norm.'),
    (r'^encoder\.layers\.', 'layers.'),
    (r'\.layernorm_before\.', '.norm1.'),
    (r'\.layernorm_after\.', '.norm2.'),
    (r'\.attention\.self\.relative_position_bias_table$', '.attn.relative_position_bias_table'),
    (r'\.attention\.relative_position_bias\.relative_position_bias_table$',
     '.attn.relative_position_bias_table'),
    (r'\.attention\.self\.relative_position_index$', '.attn.relative_position_index'),
    (r'\.attention\.self\.query\.', '.attn.q.'),
    (r'\.attention\.self\.key\.', '.attn.k.'),
    (r'\.attention\.self\.value\.', '.attn.v.'),
    (r'\.attention\.q_proj\.', '.attn.q.'),
    (r'\.attention\.k_proj\.', '.attn.k.'),
    (r'\.attention\.v_proj\.', '.attn.v.'),
    (r'\.attention\.output\.dense\.', '.attn.proj.'),
    (r'\.attention\.o_proj\.', '.attn.proj.'),
    (r'\.intermediate\.dense\.', '.mlp.fc1.'),
    (r'\.output\.dense\.', '.mlp.fc2.'),
)
_DROPPED = re.compile(r'(relative_position_index|attn_mask|num_batches_tracked)$|^(norm|layernorm|head|'
                      r'classifier|pooler)\.')


def _is_hf(state_dict: Mapping[str, np.ndarray]) -> bool:
  return any(k.startswith(('embeddings.', 'encoder.', 'hidden_states_norms.')) for k in state_dict)


def to_official(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Any supported Swin naming -> the official release's keys (q/k/v fused into qkv)."""
  sd = dict(state_dict)
  if any(k.startswith('backbone.') for k in sd):  # a whole detector: keep its backbone
    sd = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
  sd = strip_prefixes(sd, ('module.',))
  sd = {(k[len('swin.'):] if k.startswith('swin.') else k): v for k, v in sd.items()}
  if not _is_hf(sd):
    return sd
  out, qkv = {}, {}
  for key, value in sd.items():
    m = re.fullmatch(r'hidden_states_norms\.stage(\d)\.(\w+)', key)
    if m:
      out[f'norm{int(m[1]) - 1}.{m[2]}'] = value
      continue
    for pattern, repl in _HF_RENAMES:
      key = re.sub(pattern, repl, key)
    m = re.fullmatch(r'(.*\.attn)\.([qkv])\.(weight|bias)', key)
    if m:
      qkv.setdefault((m[1], m[3]), {})[m[2]] = value
      continue
    out[key] = value
  for (prefix, leaf), parts in qkv.items():
    if set(parts) != {'q', 'k', 'v'}:
      raise ValueError(f'{prefix}: query/key/value {leaf} incomplete (found {sorted(parts)}).')
    out[f'{prefix}.qkv.{leaf}'] = np.concatenate([parts['q'], parts['k'], parts['v']], axis=0)
  return out


def _rename(key: str, value: np.ndarray):
  """Official key -> (NNX path key, array); None when dropped; KeyError when unknown."""
  if _DROPPED.search(key):
    return None
  parts = key.split('.')
  module, leaf = parts[:-1], parts[-1]
  path = '/'.join(module)
  if key == 'patch_embed.proj.weight':
    return 'patch_embed/proj/kernel', conv_kernel(value)
  if re.fullmatch(r'layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table', key):
    return key.replace('.', '/'), value
  is_norm = re.fullmatch(r'(patch_embed\.norm|norm[0-3]|layers\.\d+\.blocks\.\d+\.norm[12]|'
                         r'layers\.\d+\.downsample\.norm)', '.'.join(module))
  is_linear = re.fullmatch(r'(layers\.\d+\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])|'
                           r'layers\.\d+\.downsample\.reduction)', '.'.join(module))
  if key == 'patch_embed.proj.bias' or (is_linear and leaf == 'bias') or (is_norm and leaf == 'bias'):
    return f'{path}/bias', value
  if is_norm and leaf == 'weight':
    return f'{path}/scale', value
  if is_linear and leaf == 'weight':
    return f'{path}/kernel', linear_kernel(value)
  raise KeyError('not a Swin backbone parameter (absolute position embeddings are not supported)')


def infer_swin(official: Mapping[str, np.ndarray], source: str = 'state_dict') -> dict:
  """SwinTransformer kwargs (embed_dim, depths, num_heads, window_size, patch_size) of a state_dict."""
  if 'patch_embed.proj.weight' not in official:
    raise ValueError(f'{source}: no patch embedding (patch_embed.proj.weight / embeddings.'
                     'patch_embeddings.projection.weight): not a Swin state_dict.')
  proj = official['patch_embed.proj.weight']
  depths, heads, window = [], [], None
  for i in range(4):
    blocks = {int(m[1]) for k in official
              if (m := re.match(rf'layers\.{i}\.blocks\.(\d+)\.', k))}
    table = official.get(f'layers.{i}.blocks.0.attn.relative_position_bias_table')
    if not blocks or table is None:
      raise ValueError(f'{source}: stage {i} has no blocks / bias table: not a 4-stage Swin.')
    depths.append(max(blocks) + 1)
    heads.append(int(table.shape[1]))
    window = (int(round(np.sqrt(table.shape[0]))) + 1) // 2
  return dict(embed_dim=int(proj.shape[0]), depths=tuple(depths), num_heads=tuple(heads),
              window_size=window, patch_size=int(proj.shape[-1]))


def swin_arrays(state_dict: Mapping[str, np.ndarray], source: str = 'state_dict'
                ) -> tuple[dict[str, np.ndarray], dict, list[str]]:
  """-> ({NNX path key: array}, inferred SwinTransformer kwargs, output norms set to identity)."""
  official = to_official(state_dict)
  spec = infer_swin(official, source)
  arrays = rename_all(official, _rename, source)
  identity = []
  for i in range(4):
    dim = spec['embed_dim'] * 2 ** i
    if f'norm{i}/scale' not in arrays and f'norm{i}/bias' not in arrays:
      arrays[f'norm{i}/scale'] = np.ones((dim,), np.float32)
      arrays[f'norm{i}/bias'] = np.zeros((dim,), np.float32)
      identity.append(f'norm{i}')
  return arrays, spec, identity


def check_swin_name(spec: dict, name: str | None, source: str) -> None:
  """Raises ValueError unless `name` is None or its preset (swin_t/s/b) equals the inferred `spec`."""
  if name is None:
    return
  if name not in SWIN_SPECS:
    raise ValueError(f'Swin name must be one of {sorted(SWIN_SPECS)}, got {name!r}.')
  want = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in SWIN_SPECS[name].items()}
  got = {k: spec[k] for k in want}
  if got != want:
    raise ValueError(f'{source}: holds a Swin with {got}, not {name} ({want}).')


def convert_swin(state_dict: Mapping[str, np.ndarray], name: str | None = None, *,
                 frozen_stages: int = -1, source: str = 'state_dict') -> SwinTransformer:
  """A `SwinTransformer` holding the weights of a Swin state_dict (any supported naming).

  The architecture is read from the weights; `name` (swin_t/s/b) when given must agree with it.
  """
  arrays, spec, _ = swin_arrays(state_dict, source)
  check_swin_name(spec, name, source)
  abstract = nnx.eval_shape(lambda: SwinTransformer(**spec, frozen_stages=frozen_stages,
                                                    rngs=nnx.Rngs(0)))
  return fill_module(abstract, arrays, source)
