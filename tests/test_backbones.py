"""Backbones: parameter counts, shapes, freezing, and numerical parity with PyTorch references.

References (random weights, no downloads): transformers' `ResNetModel` (torchvision layout:
stride on the 3x3 conv of bottlenecks), transformers' `SwinBackbone` (the detection variant: one
LayerNorm per output stage), torchvggish's `VGG(make_layers())`. The torch weights go through our
converters (`qdformer_jax.convert`), so these tests check converter and module together.
Tolerance: max |jax - torch| <= 1e-4 * max |torch| per output map (float32; measured ~1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from qdformer_jax.models.backbones import build_backbone, frozen_param_filter
from qdformer_jax.models.layers import FrozenAffine, FrozenStat, count_params
from qdformer_jax.models.resnet import ResNet
from qdformer_jax.models.vggish import VGGish

REL_TOL = 1e-4


def _assert_close(ours, ref, what):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  err = np.abs(ours - ref).max()
  scale = np.abs(ref).max()
  assert err <= REL_TOL * scale, f'{what}: max abs err {err:.3g} vs max |ref| {scale:.3g}'


def _randomize_torch(model, seed=0):
  """Random weights and BatchNorm statistics (positive variances) so every code path matters."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in model.state_dict().items():
      if not t.dtype.is_floating_point:
        continue
      if name.endswith('running_var'):
        t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
      elif t.ndim == 1 and name.endswith('weight'):
        t.copy_(torch.rand(t.shape, generator=gen) * 0.5 + 0.5)
      elif t.ndim == 1:
        t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
      else:
        fan_in = t[0].numel() if t.ndim > 1 else 1
        t.copy_(torch.randn(t.shape, generator=gen) * (1.0 / fan_in) ** 0.5)
  return model.eval()


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


def _state_dict_numpy(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


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


# ---------------------------------------------------------------- parity with PyTorch

@pytest.mark.parametrize('depth', [18, 50])
def test_resnet_parity_with_transformers(depth):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from qdformer_jax.convert.resnet import convert_resnet
  width, kind, depths = {18: (16, 'basic', [2, 2, 2, 2]), 50: (16, 'bottleneck', [3, 4, 6, 3])}[depth]
  expansion = 1 if kind == 'basic' else 4
  config = transformers.ResNetConfig(embedding_size=width, layer_type=kind, depths=depths,
                                     hidden_sizes=[width * expansion * 2 ** i for i in range(4)])
  ref = _randomize_torch(transformers.ResNetModel(config), seed=depth)
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    expected = ref(x, output_hidden_states=True).hidden_states[1:]
  model = convert_resnet(_state_dict_numpy(ref), depth)
  feats = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
  for level, (ours, theirs) in enumerate(zip(feats, expected)):
    _assert_close(ours, theirs.permute(0, 2, 3, 1).numpy(), f'ResNet-{depth} C{level + 2}')


def test_vggish_parity_with_torchvggish():
  torch = pytest.importorskip('torch')
  torchvggish = pytest.importorskip('torchvggish')
  from qdformer_jax.convert.vggish import convert_vggish
  ref = _randomize_torch(torchvggish.VGG(torchvggish.make_layers(), False), seed=3)
  x = torch.randn(2, 1, 96, 64, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    expected = ref(x).numpy()
  model = convert_vggish(_state_dict_numpy(ref))
  ours = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x[:, 0].numpy()))
  assert ours.shape == (2, 128)
  assert np.abs(expected).max() > 0  # the final ReLU leaves some positive outputs
  _assert_close(ours, expected, 'VGGish embedding')
