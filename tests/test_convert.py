"""Weight converters: PyTorch files -> converted directory -> our modules, against PyTorch outputs.

Random-weight torch models (no downloads) are saved to tmp files in the namings users have
(torchvision `resnet50.pth`, transformers `ResNetModel` / `SwinBackbone` / old-style HF Swin keys,
the official Swin release `{'model': sd}` with fused qkv and buffers, torchvggish), converted with
`python -m qdformer_jax.convert` (its `main`), reloaded, and compared weight by weight or output by
output (max |jax - torch| <= 1e-4 * max |torch|, float32).
"""

from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qdformer_jax.convert import load_converted, module_from_converted
from qdformer_jax.convert.__main__ import main as convert_main
from qdformer_jax.models.resnet import ResNet
from qdformer_jax.models.swin import SwinTransformer

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

REL_TOL = 1e-4


def _assert_close(ours, ref, what):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
  print(f'{what}: max abs err {err:.2e}, relative to max |ref| {err / scale:.2e}')
  assert err <= REL_TOL * scale, f'{what}: max abs err {err:.3g} vs max |ref| {scale:.3g}'


def _randomize(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if not t.dtype.is_floating_point:
        continue
      if name.endswith('running_var'):
        t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
      elif t.ndim == 1:
        t.copy_(torch.randn(t.shape, generator=gen) * 0.1 + (1.0 if name.endswith('weight') else 0.0))
      elif 'relative_position_bias_table' in name:
        t.copy_(torch.randn(t.shape, generator=gen))
      else:
        t.copy_(torch.randn(t.shape, generator=gen) * (1.0 / t[0].numel()) ** 0.5)
  return model.eval()


def _nhwc(t):
  return t.permute(0, 2, 3, 1).numpy()


def _run(module, x_nchw):
  return nnx.jit(lambda m, x: m(x))(module, jnp.asarray(_nhwc(x_nchw)))


def _convert(tmp_path, arch, state, name='weights.pth'):
  os.makedirs(tmp_path, exist_ok=True)
  src = str(tmp_path / name)
  if name.endswith('.safetensors'):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, src)
  else:
    torch.save(state, src)
  out = str(tmp_path / f'{arch}_converted')
  assert convert_main([arch, '--src', src, '--out', out]) == 0
  return out


# ---------------------------------------------------------------- ResNet

def _torchvision_keys(hf_state):
  """Hand-written HF -> torchvision renaming (independent of the converter's regexes)."""
  out = {}
  for key, value in hf_state.items():
    key = key.replace('embedder.embedder.convolution', 'conv1')
    key = key.replace('embedder.embedder.normalization', 'bn1')
    m = re.match(r'encoder\.stages\.(\d)\.layers\.(\d+)\.(.*)', key)
    if m:
      rest = m[3]
      for k in range(3):
        rest = rest.replace(f'layer.{k}.convolution', f'conv{k + 1}')
        rest = rest.replace(f'layer.{k}.normalization', f'bn{k + 1}')
      rest = rest.replace('shortcut.convolution', 'downsample.0')
      rest = rest.replace('shortcut.normalization', 'downsample.1')
      key = f'layer{int(m[1]) + 1}.{m[2]}.{rest}'
    out[key] = value
  return out


def test_resnet50_torchvision_pth_full_size(tmp_path):
  ref = transformers.ResNetModel(transformers.ResNetConfig(layer_type='bottleneck',
                                                           depths=[3, 4, 6, 3])).eval()
  state = _torchvision_keys(ref.state_dict())
  state['fc.weight'] = torch.zeros(1000, 2048)  # a classifier as in torchvision files: dropped
  state['fc.bias'] = torch.zeros(1000)
  out = _convert(tmp_path, 'resnet50', state)
  meta = json.load(open(os.path.join(out, 'meta.json')))
  assert meta['params'] == 23_508_032 and meta['module_kwargs'] == {'kind': 'resnet', 'depth': 50,
                                                                    'width': 64}
  module = load_converted(nnx.eval_shape(lambda: ResNet(50, rngs=nnx.Rngs(0))), out)
  np.testing.assert_array_equal(module.layer3[2].conv2.kernel[...],
                                state['layer3.2.conv2.weight'].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(module.layer2[0].downsample[1].running_var[...],
                                state['layer2.0.downsample.1.running_var'].numpy())
  np.testing.assert_array_equal(module.bn1.weight[...], state['bn1.weight'].numpy())
  # The wrong depth and a module of another size are refused with a clear message.
  assert convert_main(['resnet101', '--src', str(tmp_path / 'weights.pth'),
                       '--out', str(tmp_path / 'x')]) == 2
  with pytest.raises(ValueError, match=r'(?s)do not fit.*unexpected.*shape of'):
    load_converted(nnx.eval_shape(lambda: ResNet(34, rngs=nnx.Rngs(0))), out)


def _tiny_hf_resnet(depth, width=8):
  kind, depths = ('basic', [2, 2, 2, 2]) if depth == 18 else ('bottleneck', [3, 4, 6, 3])
  expansion = 1 if depth == 18 else 4
  config = transformers.ResNetConfig(embedding_size=width, layer_type=kind, depths=depths,
                                     hidden_sizes=[width * expansion * 2 ** i for i in range(4)])
  return _randomize(transformers.ResNetModel(config), seed=depth)


@pytest.mark.parametrize('depth,naming', [(18, 'hf'), (50, 'torchvision')])
def test_resnet_parity_through_files(tmp_path, depth, naming):
  ref = _tiny_hf_resnet(depth)
  state = ref.state_dict() if naming == 'hf' else _torchvision_keys(ref.state_dict())
  out = _convert(tmp_path, 'resnet', state)
  module = module_from_converted(out)
  assert (module.depth, module.width) == (depth, 8)
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    expected = ref(x, output_hidden_states=True).hidden_states[1:]
  for level, (ours, theirs) in enumerate(zip(_run(module, x), expected)):
    _assert_close(ours, _nhwc(theirs), f'ResNet-{depth} ({naming}) C{level + 2}')


def _converted_arrays(out):
  from qdformer_jax.convert.common import read_converted
  return read_converted(out)[0]


def test_resnet_hf_safetensors_equals_torchvision_pth(tmp_path):
  pytest.importorskip('safetensors')
  ref = _tiny_hf_resnet(50)
  # A transformers ResNetForImageClassification file: `resnet.` prefix, classifier, safetensors.
  hf_state = {f'resnet.{k}': v for k, v in ref.state_dict().items()}
  hf_state['classifier.1.weight'] = torch.zeros(10, 256)
  hf = _converted_arrays(_convert(tmp_path / 'a', 'resnet50', hf_state, 'model.safetensors'))
  tv = _converted_arrays(_convert(tmp_path / 'b', 'resnet50', _torchvision_keys(ref.state_dict())))
  assert hf.keys() == tv.keys() and len(tv) == 3 * 53 + 53 + 53  # 53 convs, 53 BNs x 4
  for key in tv:
    np.testing.assert_array_equal(hf[key], tv[key], err_msg=key)


# ---------------------------------------------------------------- Swin

def _hf_swin(window, embed_dim=16, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4), seed=0):
  config = transformers.SwinConfig(embed_dim=embed_dim, depths=list(depths), num_heads=list(heads),
                                   window_size=window,
                                   out_features=['stage1', 'stage2', 'stage3', 'stage4'])
  return _randomize(transformers.SwinBackbone(config), seed)


def _official_swin_keys(hf_state, depths):
  """Hand-written HF -> official Swin naming, as the release's {'model': sd} classification file."""
  out = {}
  for key, value in hf_state.items():
    if key.startswith('hidden_states_norms.'):
      continue  # classification checkpoints have no output norms
    key = key.replace('swin.', '', 1)
    key = key.replace('embeddings.patch_embeddings.projection', 'patch_embed.proj')
    key = key.replace('embeddings.norm', 'patch_embed.norm').replace('encoder.layers', 'layers')
    key = key.replace('layernorm_before', 'norm1').replace('layernorm_after', 'norm2')
    key = key.replace('attention.o_proj', 'attn.proj')
    key = key.replace('attention.relative_position_bias.', 'attn.')
    key = key.replace('layernorm.', 'norm.')
    out[key] = value
  for i, depth in enumerate(depths):
    for j in range(depth):
      p = f'layers.{i}.blocks.{j}.'
      for leaf in ('weight', 'bias'):
        out[p + f'attn.qkv.{leaf}'] = torch.cat(
            [out.pop(p + f'attention.{n}_proj.{leaf}') for n in 'qkv'], 0)
      out[p + 'attn.relative_position_index'] = torch.zeros(4, 4, dtype=torch.long)
      if j % 2:
        out[p + 'attn_mask'] = torch.zeros(1, 4, 4)
  out['head.weight'] = torch.zeros(1000, 8 * 16)
  out['head.bias'] = torch.zeros(1000)
  return {'model': out}


def _old_hf_swin_keys(hf_state):
  """transformers < 5 naming (attention.self.query, attention.output.dense, intermediate.dense)."""
  out = {}
  for key, value in hf_state.items():
    key = key.replace('attention.q_proj', 'attention.self.query')
    key = key.replace('attention.k_proj', 'attention.self.key')
    key = key.replace('attention.v_proj', 'attention.self.value')
    key = key.replace('attention.o_proj', 'attention.output.dense')
    key = key.replace('attention.relative_position_bias.', 'attention.self.')
    key = key.replace('mlp.fc1', 'intermediate.dense').replace('mlp.fc2', 'output.dense')
    out[key] = value
  return out


@pytest.mark.parametrize('window,size,naming', [(7, 224, 'hf'), (2, 80, 'official')])
def test_swin_parity_through_files(tmp_path, window, size, naming):
  # 224 / window 7: the standard geometry (stride-32 map = one 7x7 window, still shifted; one
  # block in stages 1-3 to keep the compilation small);
  # 80 / window 2: shifted windows in every stage, padding to the window (5x5, 3x3 maps) and odd
  # patch merging, read from an official-release file (fused qkv, buffers, head, no output norms).
  depths = (1, 1, 1, 2) if size == 224 else (2, 2, 2, 2)
  ref = _hf_swin(window, depths=depths, seed=window)
  if naming == 'official':
    with torch.no_grad():
      for norm in ref.hidden_states_norms.values():  # what the converter sets when they are absent
        norm.weight.fill_(1.0)
        norm.bias.zero_()
    state = _official_swin_keys(ref.state_dict(), depths)
  else:
    state = ref.state_dict()
  out = _convert(tmp_path, 'swin', state)
  meta = json.load(open(os.path.join(out, 'meta.json')))
  assert bool(meta['notes']) == (naming == 'official')
  module = load_converted(nnx.eval_shape(lambda: SwinTransformer(
      embed_dim=16, depths=depths, num_heads=(1, 2, 2, 4), window_size=window,
      rngs=nnx.Rngs(0))), out)
  x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    expected = ref(x).feature_maps
  for level, (ours, theirs) in enumerate(zip(_run(module, x), expected)):
    _assert_close(ours, _nhwc(theirs), f'Swin w{window} {size}px ({naming}) C{level + 2}')


def test_swin_old_hf_naming_equals_new(tmp_path):
  state = _hf_swin(7, seed=1).state_dict()
  new = _converted_arrays(_convert(tmp_path / 'new', 'swin', state))
  old = _converted_arrays(_convert(tmp_path / 'old', 'swin', _old_hf_swin_keys(state)))
  assert new.keys() == old.keys()
  for key in new:
    np.testing.assert_array_equal(new[key], old[key], err_msg=key)
  qkv = new['layers/1/blocks/1/attn/qkv/kernel']  # [in, 3*out] = [W_q; W_k; W_v]^T
  p = 'swin.encoder.layers.1.blocks.1.attention.'
  np.testing.assert_array_equal(qkv[:, 32:64], state[p + 'k_proj.weight'].numpy().T)


def test_swin_name_must_match_file(tmp_path):
  state = _hf_swin(7).state_dict()
  src = str(tmp_path / 'tiny.pth')
  torch.save(state, src)
  assert convert_main(['swin_t', '--src', src, '--out', str(tmp_path / 'out')]) == 2


# ---------------------------------------------------------------- VGGish

def test_vggish_pth_parity(tmp_path):
  torchvggish = pytest.importorskip('torchvggish')
  ref = _randomize(torchvggish.VGG(torchvggish.make_layers(), False), seed=5)
  out = _convert(tmp_path, 'vggish', ref.state_dict(), 'vggish-10086976.pth')
  module = module_from_converted(out)
  x = torch.randn(2, 1, 96, 64, generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    expected = ref(x).numpy()
  ours = nnx.jit(lambda m, x: m(x))(module, jnp.asarray(x[:, 0].numpy()))
  _assert_close(ours, expected, 'VGGish embedding')


def test_clear_errors_for_bad_input(tmp_path, capsys):
  assert convert_main(['vggish', '--src', str(tmp_path / 'missing.pth'),
                       '--out', str(tmp_path / 'o')]) == 2
  assert 'no such file' in capsys.readouterr().err
  torch.save({'features.0.weight': torch.zeros(64, 1, 3, 3), 'foo.bar': torch.zeros(3)},
             str(tmp_path / 'bad.pth'))
  assert convert_main(['vggish', '--src', str(tmp_path / 'bad.pth'),
                       '--out', str(tmp_path / 'o')]) == 2
  assert "'foo.bar'" in capsys.readouterr().err
  with pytest.raises(FileNotFoundError, match='weights.msgpack'):
    load_converted(nnx.eval_shape(lambda: ResNet(18, rngs=nnx.Rngs(0))), str(tmp_path))


# ---------------------------------------------------------------- PVT-v2

def _timm_pvt(name='pvt_v2_b0', seed=0):
  timm = pytest.importorskip('timm')  # needs a torchvision that imports (see README, test requirements)
  return _randomize(timm.create_model(name, pretrained=False, num_classes=0), seed)


def _official_pvt_keys(timm_state):
  """Hand-written timm -> official release naming (patch_embed1.., block1.., norm1.., dwconv.dwconv)."""
  out = {}
  for key, value in timm_state.items():
    key = key.replace('patch_embed.', 'patch_embed1.', 1) if key.startswith('patch_embed.') else key
    m = re.match(r'stages\.(\d)\.(downsample|blocks|norm)\.?(.*)', key)
    if m:
      n = int(m[1]) + 1
      key = {'downsample': f'patch_embed{n}.{m[3]}', 'blocks': f'block{n}.{m[3]}', 'norm': f'norm{n}.{m[3]}'}[m[2]]
    out[key.replace('mlp.dwconv.', 'mlp.dwconv.dwconv.')] = value
  out['head.weight'] = torch.zeros(1000, 8)  # the release's classifier: dropped
  out['head.bias'] = torch.zeros(1000)
  return out


@pytest.mark.parametrize('naming', ['timm', 'official'])
def test_pvt_v2_b0_parity_through_files(tmp_path, naming):
  # B0 with every parameter perturbed; a square input and a non-square one whose sides are not
  # multiples of 32 (stage maps 18x25 -> 9x13 -> 5x7 -> 3x4; the stride-8 / stride-2 spatial
  # reductions floor 18x25 -> 2x3 and 5x7 -> 2x3, as torch's conv does).
  ref = _timm_pvt('pvt_v2_b0', seed=7)
  state = ref.state_dict() if naming == 'timm' else _official_pvt_keys(ref.state_dict())
  out = _convert(tmp_path, 'pvt_v2_b0', state)
  meta = json.load(open(os.path.join(out, 'meta.json')))
  assert meta['params'] == 3_409_760 and meta['module_kwargs']['kind'] == 'pvt_v2'
  module = module_from_converted(out)
  for size in ((64, 64), (72, 100)):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[1]))
    with torch.no_grad():
      expected = ref.forward_intermediates(x, intermediates_only=True)
    for level, (ours, theirs) in enumerate(zip(_run(module, x), expected)):
      _assert_close(ours, _nhwc(theirs), f'PVT-v2-B0 {size[0]}x{size[1]} ({naming}) C{level + 2}')


def test_pvt_v2_wrong_size_is_one_line_naming_the_first_key(tmp_path, capsys):
  # A B1 file given as B0 (same depths, wider) and as B2 (same widths, deeper): one line each.
  pytest.importorskip('timm')
  import timm
  with torch.device('meta'):
    b1 = timm.create_model('pvt_v2_b1', pretrained=False, num_classes=0)
  b1_state = {k: torch.zeros(v.shape) for k, v in b1.state_dict().items()}
  torch.save(b1_state, str(tmp_path / 'b1.pth'))
  assert convert_main(['pvt_v2_b0', '--src', str(tmp_path / 'b1.pth'), '--out', str(tmp_path / 'o')]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0 and "first mismatch, file key 'patch_embed.proj.weight' (64, 3, 7, 7)" in err, err
  torch.save(_official_pvt_keys(b1_state), str(tmp_path / 'b1_official.pth'))
  assert convert_main(['pvt_v2_b2', '--src', str(tmp_path / 'b1_official.pth'), '--out', str(tmp_path / 'o')]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0 and "first mismatch, 'stages/0/blocks/2/" in err and 'is missing' in err, err
  torch.save({'features.0.weight': torch.zeros(64, 1, 3, 3)}, str(tmp_path / 'vgg.pth'))
  assert convert_main(['pvt_v2_b0', '--src', str(tmp_path / 'vgg.pth'), '--out', str(tmp_path / 'o')]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0 and "'features.0.weight'" in err, err


# ---------------------------------------------------------------- Audio Spectrogram Transformer

def _hf_ast(max_length, seed=0):
  # 128 wide, 2 heads of 64 (the converter reads heads as hidden / 64, as the released model's 12),
  # 2 layers; the released model's mel bins, patch and strides.
  config = transformers.ASTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=256, max_length=max_length, num_mel_bins=128)
  return _randomize(transformers.ASTModel(config), seed)


def _old_hf_ast_keys(state):
  """transformers < 5 `ASTForAudioClassification` naming (the hub's model.safetensors), with its head."""
  out = {}
  for key, value in state.items():
    key = re.sub(r'^layers\.', 'encoder.layer.', key)
    for new, old in (('attention.q_proj', 'attention.attention.query'), ('attention.k_proj', 'attention.attention.key'),
                     ('attention.v_proj', 'attention.attention.value'), ('attention.o_proj', 'attention.output.dense'),
                     ('mlp.fc1', 'intermediate.dense'), ('mlp.fc2', 'output.dense')):
      key = key.replace(new, old)
    out['audio_spectrogram_transformer.' + key] = value
  out['classifier.layernorm.weight'] = torch.ones(128)
  out['classifier.dense.weight'] = torch.zeros(527, 128)
  return out


def _official_ast_keys(state):
  """The official release's naming (`module.v.` DeiT: fused qkv, patch_embed.proj, blocks, mlp_head)."""
  out = {}
  for key, value in state.items():
    key = key.replace('embeddings.cls_token', 'cls_token').replace('embeddings.distillation_token', 'dist_token')
    key = key.replace('embeddings.position_embeddings', 'pos_embed')
    key = key.replace('embeddings.patch_embeddings.projection', 'patch_embed.proj')
    key = re.sub(r'^layers\.', 'blocks.', key).replace('layernorm_before', 'norm1').replace('layernorm_after', 'norm2')
    key = key.replace('attention.o_proj', 'attn.proj').replace('layernorm.', 'norm.')
    out['module.v.' + key] = value
  for i in range(2):
    p = f'module.v.blocks.{i}.'
    for leaf in ('weight', 'bias'):
      out[p + f'attn.qkv.{leaf}'] = torch.cat([out.pop(p + f'attention.{n}_proj.{leaf}') for n in 'qkv'], 0)
  out['module.mlp_head.1.weight'] = torch.zeros(527, 128)
  return out


def _ast_input(seed):
  return torch.randn(2, 98, 128, generator=torch.Generator().manual_seed(seed))  # one second each


@pytest.mark.parametrize('naming', ['hf', 'old_hf', 'official'])
def test_ast_parity_through_files(tmp_path, naming):
  ref = _hf_ast(98, seed=11)
  state = {'hf': lambda s: s, 'old_hf': _old_hf_ast_keys, 'official': _official_ast_keys}[naming](ref.state_dict())
  out = _convert(tmp_path, 'ast', state)
  meta = json.load(open(os.path.join(out, 'meta.json')))
  assert meta['params'] == sum(p.numel() for p in ref.parameters())
  assert meta['module_kwargs']['heads'] == 2 and meta['module_kwargs']['layers'] == 2
  module = module_from_converted(out)
  x = _ast_input(4)
  with torch.no_grad():
    expected = ref(x).pooler_output.numpy()
  ours = nnx.jit(lambda m, x: m(x))(module, jnp.asarray(x.numpy()))
  _assert_close(ours, expected, f'AST embedding ({naming})')


def test_ast_one_second_uses_the_middle_of_a_longer_position_table(tmp_path):
  # Trained on 300 frames (29 time patches), run on one second (9): the middle columns 10..18 of each
  # of the 12 mel rows, as the official code cuts the AudioSet table for shorter inputs.
  long = _hf_ast(300, seed=12)
  module = module_from_converted(_convert(tmp_path, 'ast', long.state_dict()))
  short = _hf_ast(98, seed=0)
  state = dict(long.state_dict())
  table = state['embeddings.position_embeddings']
  grid = table[:, 2:].reshape(1, 12, 29, 128)[:, :, 10:19].reshape(1, 12 * 9, 128)
  state['embeddings.position_embeddings'] = torch.cat([table[:, :2], grid], 1)
  short.load_state_dict(state)
  x = _ast_input(5)
  with torch.no_grad():
    expected = short(x).pooler_output.numpy()
  _assert_close(nnx.jit(lambda m, x: m(x))(module, jnp.asarray(x.numpy())), expected, 'AST 1 s from a 3 s table')
