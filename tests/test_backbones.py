"""Backbones: parameter counts (against torchvision / transformers / timm / torchvggish), output shapes,
frozen BatchNorm variables, stage freezing (zero gradients + optimizer filter), the Swin attention
mask (against a transcription of the reference's slice construction), `build_backbone`.

Numerical parity with the PyTorch references is in tests/test_convert.py (it needs the converters).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qdformer_jax.models.backbones import build_backbone, frozen_param_filter
from qdformer_jax.models.layers import FrozenAffine, FrozenStat, count_params
from qdformer_jax.models.pvt import PVT_V2_SPECS, PyramidVisionTransformerV2
from qdformer_jax.models.resnet import ResNet
from qdformer_jax.models.swin import SWIN_SPECS, SwinTransformer, shifted_window_mask
from qdformer_jax.models.vggish import VGGish


def _random_module(factory, seed=0):
  """The module `factory` builds, with NumPy-drawn weights (no per-shape JAX RNG compilations).

  Kernels ~ N(0, 1/fan_in); BatchNorm variances in [0.5, 1.5), other vectors ~ N(0, 0.1).
  """
  from qdformer_jax.convert.common import fill_module, path_key
  abstract = nnx.eval_shape(factory)
  rng = np.random.default_rng(seed)
  arrays = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract)):
    shape = tuple(var.shape)
    if path[-1] == 'running_var':
      value = rng.uniform(0.5, 1.5, shape)
    elif len(shape) == 1:
      value = rng.normal(0, 0.1, shape) + (1.0 if path[-1] in ('weight', 'scale') else 0.0)
    else:
      value = rng.normal(0, (1.0 / np.prod(shape[:-1])) ** 0.5, shape)
    arrays[path_key(path)] = value.astype(np.float32)
  return fill_module(abstract, arrays, 'random test weights')


# ---------------------------------------------------------------- parameter counts (no allocation)

@pytest.mark.parametrize('depth,expected', [(18, 11_176_512), (50, 23_508_032)])
def test_resnet_param_count_matches_torchvision(depth, expected):
  # torchvision resnet18/50 without fc: 11,689,512 - 513,000 and 25,557,032 - 2,049,000.
  model = nnx.eval_shape(lambda: ResNet(depth, rngs=nnx.Rngs(0)))
  n = count_params(model)
  print(f'ResNet-{depth} trunk params: {n:,}')
  assert n == expected
  assert model.out_channels == ((64, 128, 256, 512) if depth == 18 else (256, 512, 1024, 2048))


def test_vggish_param_count_matches_torchvggish():
  model = nnx.eval_shape(lambda: VGGish(rngs=nnx.Rngs(0)))
  n = count_params(model)
  print(f'VGGish params: {n:,}')
  assert n == 72_141_184
  torchvggish = pytest.importorskip('torchvggish')
  torch = pytest.importorskip('torch')
  with torch.device('meta'):
    ref = torchvggish.VGG(torchvggish.make_layers(), False)
  assert n == sum(p.numel() for p in ref.parameters())


def test_swin_t_param_count_matches_transformers():
  # Trunk = patch_embed + 4 stages (blocks + 3 patch mergings) + 4 output LayerNorms (norm0..3):
  # transformers SwinModel(add_pooling_layer=False) 27,519,354 - its final LayerNorm (1,536)
  # + output norms 2*(96+192+384+768) = 27,520,698 (= SwinBackbone minus its unused final norm).
  model = nnx.eval_shape(lambda: SwinTransformer(**SWIN_SPECS['swin_t'], rngs=nnx.Rngs(0)))
  n = count_params(model)
  print(f'Swin-T trunk params: {n:,}')
  assert n == 27_520_698
  assert model.out_channels == (96, 192, 384, 768)
  transformers = pytest.importorskip('transformers')
  torch = pytest.importorskip('torch')
  config = transformers.SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                                   window_size=7)
  with torch.device('meta'):
    ref = transformers.SwinModel(config, add_pooling_layer=False)
  assert sum(p.numel() for p in ref.parameters()) == n - 2 * (96 + 192 + 384 + 768) + 2 * 768


def test_ast_param_count_matches_transformers():
  # The released AudioSet AST (MIT/ast-finetuned-audioset-10-10-0.4593) without its classifier:
  # transformers ASTModel at the default config (768 wide, 12 layers, 1024 frames: 12 x 101 patches).
  from qdformer_jax.models.ast import AST_SPECS, AudioSpectrogramTransformer
  model = nnx.eval_shape(lambda: AudioSpectrogramTransformer(**AST_SPECS['base'], rngs=nnx.Rngs(0)))
  n = count_params(model)
  print(f'AST params: {n:,}')
  assert n == 86_187_264 and model.out_dim == 768
  transformers = pytest.importorskip('transformers')
  torch = pytest.importorskip('torch')
  with torch.device('meta'):
    ref = transformers.ASTModel(transformers.ASTConfig())
  assert n == sum(p.numel() for p in ref.parameters())


# ---------------------------------------------------------------- ResNet behaviour

def test_resnet_shapes_and_frozen_stats_are_not_params():
  model = _random_module(lambda: ResNet(50, width=8, rngs=nnx.Rngs(0)))
  feats = nnx.jit(lambda m, x: m(x))(model, jnp.zeros((1, 64, 96, 3)))
  assert [f.shape for f in feats] == [(1, 16, 24, 32), (1, 8, 12, 64), (1, 4, 6, 128),
                                     (1, 2, 3, 256)]
  assert model.out_channels == (32, 64, 128, 256)
  params = nnx.state(model, nnx.Param)
  names = {p[-1] for p, _ in nnx.to_flat_state(params)}
  assert names == {'kernel'}  # BN variables are never nnx.Param
  n_affine = len(jax.tree.leaves(nnx.state(model, FrozenAffine)))
  n_stat = len(jax.tree.leaves(nnx.state(model, FrozenStat)))
  assert n_affine == n_stat == 2 * (1 + 16 * 3 + 4)  # stem, 16 bottlenecks x 3, 4 downsamples


def test_resnet_frozen_stages_get_no_gradient_and_filter_matches_them():
  class Wrapper(nnx.Module):
    def __init__(self):
      self.backbone = _random_module(
          lambda: ResNet(18, width=8, frozen_stages=1, rngs=nnx.Rngs(0)))

  model = Wrapper()
  x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))

  def loss(m):
    return sum(jnp.sum(f ** 2) for f in m.backbone(x))

  grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param)))(model)
  flat = {p: v[...] for p, v in nnx.to_flat_state(grads)}
  frozen = frozen_param_filter(model.backbone, ('backbone',))
  frozen_paths = {p for p, _ in nnx.to_flat_state(nnx.state(model, frozen))}
  assert frozen_paths and all(p[1] in ('conv1', 'layer1') for p in frozen_paths)
  assert frozen_paths == {p for p in flat if p[1] in ('conv1', 'layer1')}
  for path, g in flat.items():
    if path in frozen_paths:
      assert not np.any(np.asarray(g)), path
    else:
      assert np.any(np.asarray(g)), path
  trainable = nnx.All(nnx.Param, nnx.Not(frozen))
  n_trainable = len(jax.tree.leaves(nnx.state(model, trainable)))
  assert n_trainable == len(flat) - len(frozen_paths)


def test_build_backbone_dispatch_and_dtype():
  config = {'name': 'resnet34', 'width': 8, 'frozen_stages': 2, 'dtype': 'bfloat16'}
  model = _random_module(lambda: build_backbone(config, nnx.Rngs(0)))
  assert isinstance(model, ResNet) and model.depth == 34 and model.frozen_stages == 2
  feats = nnx.jit(lambda m, x: m(x))(model, jnp.zeros((1, 32, 32, 3)))
  assert all(f.dtype == jnp.bfloat16 for f in feats)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model)))
  with pytest.raises(ValueError, match='backbone name'):
    build_backbone({'name': 'resnet42'}, nnx.Rngs(0))


# ---------------------------------------------------------------- Swin behaviour

def _reference_swin_mask(hp, wp, window, shift):
  """The official code's construction: label 9 slice regions, partition, compare labels."""
  img = np.zeros((hp, wp))
  count = 0
  for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
    for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
      img[hs, ws] = count
      count += 1
  win = img.reshape(hp // window, window, wp // window, window).transpose(0, 2, 1, 3)
  win = win.reshape(-1, window * window)
  diff = win[:, None, :] - win[:, :, None]
  return np.where(diff != 0, -100.0, 0.0)


@pytest.mark.parametrize('hp,wp,window', [(14, 14, 7), (7, 14, 7), (8, 6, 2)])
def test_shifted_window_mask_matches_reference_construction(hp, wp, window):
  np.testing.assert_array_equal(shifted_window_mask(hp, wp, window, window // 2),
                                _reference_swin_mask(hp, wp, window, window // 2))


def _tiny_swin_config(**over):
  config = {'name': 'swin_t', 'embed_dim': 8, 'depths': (2, 2, 2, 2), 'num_heads': (1, 1, 2, 2),
            'window_size': 7, 'frozen_stages': 1}
  config.update(over)
  return config


def test_swin_shapes_any_size_and_freezing():
  config = _tiny_swin_config(depths=(2, 1, 1, 1))
  model = _random_module(lambda: build_backbone(config, nnx.Rngs(0)))
  assert isinstance(model, SwinTransformer) and model.out_channels == (8, 16, 32, 64)
  x = jax.random.normal(jax.random.key(0), (1, 64, 100, 3))  # 100 is not a multiple of 32

  def loss(m):
    feats = m(x)
    return sum(jnp.sum(f ** 2) for f in feats), feats

  grads, feats = nnx.jit(nnx.grad(loss, has_aux=True))(model)
  assert [f.shape for f in feats] == [(1, 16, 25, 8), (1, 8, 13, 16), (1, 4, 7, 32), (1, 2, 4, 64)]
  assert all(np.isfinite(np.asarray(f)).all() for f in feats)
  flat = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
  frozen = {p for p, _ in nnx.to_flat_state(nnx.state(model, frozen_param_filter(model)))}
  assert frozen == {p for p in flat if p[0] == 'patch_embed' or p[:2] == ('layers', 0)}
  for path, g in flat.items():
    assert np.any(g) != (path in frozen), path


# ---------------------------------------------------------------- PVT-v2

# timm `pvt_v2_b*` with num_classes=0 (no head), printed by the test below.
PVT_V2_PARAMS = {'pvt_v2_b0': 3_409_760, 'pvt_v2_b1': 13_496_000, 'pvt_v2_b2': 24_849_856,
                 'pvt_v2_b3': 44_725_696, 'pvt_v2_b4': 62_043_072, 'pvt_v2_b5': 81_443_008}


def _timm_param_count(name):
  timm = pytest.importorskip('timm')  # built on the meta device: no allocation, no download
  torch = pytest.importorskip('torch')
  with torch.device('meta'):
    ref = timm.create_model(name, pretrained=False, num_classes=0)
  return sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize('name', ['pvt_v2_b0', 'pvt_v2_b1', 'pvt_v2_b2'])  # B5: next test; B3, B4: 25 s more
def test_pvt_v2_param_counts_match_timm(name):
  model = nnx.eval_shape(lambda: build_backbone({'name': name}, nnx.Rngs(0)))
  n = count_params(model)
  print(f'{name} trunk params: {n:,}')
  assert isinstance(model, PyramidVisionTransformerV2) and n == PVT_V2_PARAMS[name]
  assert model.out_channels == PVT_V2_SPECS[name]['embed_dims']
  assert n == _timm_param_count(name)


@pytest.mark.slow  # compiles and runs a train step end to end: not in the quick command
def test_pvt_v2_b5_avss_config_backbone_equals_timm():
  from configs import avss
  from qdformer_jax.models import build_model
  c = avss.get_config('pvt_v2_b5')
  model = nnx.eval_shape(lambda: build_model(c, nnx.Rngs(0)))
  n = count_params(model.backbone)
  print(f'AVSS pvt_v2_b5: backbone {n:,} of {count_params(model):,} model params')
  assert n == PVT_V2_PARAMS['pvt_v2_b5']
  assert n == _timm_param_count('pvt_v2_b5')


def _tiny_pvt_config(**over):
  config = {'name': 'pvt_v2_b0', 'embed_dims': (8, 16, 24, 32), 'depths': (1, 2, 1, 1),
            'num_heads': (1, 2, 3, 4), 'mlp_ratios': (2, 2, 2, 2), 'frozen_stages': 1}
  config.update(over)
  return config


def test_pvt_v2_shapes_any_size_and_freezing():
  model = _random_module(lambda: build_backbone(_tiny_pvt_config(), nnx.Rngs(0)))
  assert isinstance(model, PyramidVisionTransformerV2) and model.out_channels == (8, 16, 24, 32)
  x = jax.random.normal(jax.random.key(0), (1, 70, 100, 3))  # neither side a multiple of 32

  def loss(m):
    feats = m(x)
    return sum(jnp.sum(f ** 2) for f in feats), feats

  grads, feats = nnx.jit(nnx.grad(loss, has_aux=True))(model)
  assert [f.shape for f in feats] == [(1, 18, 25, 8), (1, 9, 13, 16), (1, 5, 7, 24), (1, 3, 4, 32)]
  assert all(np.isfinite(np.asarray(f)).all() for f in feats)
  flat = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
  frozen = {p for p, _ in nnx.to_flat_state(nnx.state(model, frozen_param_filter(model)))}
  assert frozen == {p for p in flat if p[:2] == ('stages', 0)}
  for path, g in flat.items():
    assert np.any(g) != (path in frozen), path


def test_pvt_v2_remat_and_bfloat16():
  config = _tiny_pvt_config(frozen_stages=-1)
  plain = _random_module(lambda: build_backbone(config, nnx.Rngs(0)))
  remat = _random_module(lambda: build_backbone(config, nnx.Rngs(0), remat='blocks'))
  x = jax.random.normal(jax.random.key(1), (1, 40, 56, 3))

  def loss(m):
    return sum(jnp.sum(f ** 2) for f in m(x))

  g_plain = nnx.jit(nnx.grad(loss))(plain)
  g_remat = nnx.jit(nnx.grad(loss))(remat)
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):  # same ops, other fusion
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
  half = _random_module(lambda: build_backbone(dict(config, dtype='bfloat16'), nnx.Rngs(0)))
  feats = nnx.jit(lambda m, x: m(x))(half, x)
  assert all(f.dtype == jnp.bfloat16 for f in feats)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(half)))
