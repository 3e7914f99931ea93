"""QDFormer model: straight-through VQ, output contract, ablation switches, Eq. 5 / Eq. 7 references.

Tiny models (configs/synthetic.py:smoke sizes: ResNet-18 width 8, d = 32, K = 16) on a batch of
B = 2 clips, T = 3 frames of 32x64 (H != W and B, T, N, C all different, so a swapped axis shows),
one padded frame and one frame without ground truth. Each model variant costs one XLA compile of
its forward + backward; the parameter counts of the paper-sized model are checked under
``nnx.eval_shape`` (no compute) against the formulas of the reference architectures.

Models are initialised with ``jax.threefry_partitionable(False)``: with the default (True) the XLA
CPU compile of ``jax.random`` draws of 4-D shapes (conv kernels) takes 10-20 s each here; the
values drawn do not matter to these tests.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import avss, synthetic
from qdformer_jax.losses.criterion import compute_loss
from qdformer_jax.models import build_model
from qdformer_jax.models.qdformer import AVSR, dynamic_mask
from qdformer_jax.models.quantizer import VectorQuantizer
from qdformer_jax.training import optim

B, T, H, W = 2, 3, 32, 64
NUM_QUERIES = 4


def tiny_config(**model_changes):
  c = synthetic.get_config('smoke')  # semantic, C = 8
  c.model.num_queries = NUM_QUERIES
  c.model.dropout = 0.0
  c.model.vq_normalize = False  # the paper's plain L2 codebook (the cosine one: quantizer tests)
  c.model.vq_warmup_fraction = 0.0  # the paper's bottleneck from step 0 (the warm-up: quantizer tests)
  c.loss.commit_weight = 0.25  # the paper's λ_com (the shipped configs use 0): Eq. 9's gradients are checked
  c.model.update(model_changes)
  return c


def make_batch(num_classes: int) -> dict:
  """Two clips: rectangles of a few classes; clip 0 frame 1 has no GT, clip 1 frame 2 is padding."""
  rng = np.random.default_rng(0)
  semantic = np.zeros((B, T, H, W), np.uint8)
  semantic[0, 0, 4:20, 8:40] = 3
  semantic[0, 0, 20:30, 40:60] = 5
  semantic[0, 2, 6:22, 12:44] = 3
  semantic[1, 0, 8:24, 16:48] = 1
  semantic[1, 1, 10:26, 20:52] = 1
  assert semantic.max() <= num_classes
  gt_valid = np.array([[True, False, True], [True, True, False]])
  frame_valid = np.array([[True, True, True], [True, True, False]])
  frames = rng.integers(0, 256, (B, T, H, W, 3), dtype=np.uint8)
  frames[1, 2] = 0
  return {'frames': jnp.asarray(frames), 'log_mel': jnp.asarray(rng.normal(size=(B, T, 96, 64)), jnp.float32),
          'semantic': jnp.asarray(semantic), 'gt_valid': jnp.asarray(gt_valid),
          'frame_valid': jnp.asarray(frame_valid)}


def build(config, seed: int = 0):
  with jax.threefry_partitionable(False):
    return build_model(config, seed)


# Modules before the switches; the ablation runs leave their gradients out (a smaller backward to
# compile), the default run covers them.
ENCODERS = ('backbone', 'input_proj', 'encoder', 'audio_encoder')


def run(model, config, batch, *, all_grads: bool = True):
  """One jitted forward + compute_loss + backward; numpy (loss, terms, outputs, grads by path)."""
  graphdef, state = nnx.split(model)
  wrt = nnx.Param if all_grads else nnx.All(nnx.Param, nnx.Not(nnx.Any(*map(nnx.PathContains, ENCODERS))))

  @jax.jit
  def step(state, batch):
    model = nnx.merge(graphdef, state)

    def loss_fn(model):
      outputs = model(batch['frames'], batch['log_mel'], batch['frame_valid'], train=True)
      loss, terms = compute_loss(outputs, batch, config.loss, config.data.num_classes)
      return loss, (terms, outputs)

    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)
    (loss, (terms, outputs)), grads = grad_fn(model)
    return loss, terms, outputs, grads

  loss, terms, outputs, grads = jax.device_get(step(state, batch))
  flat = {'/'.join(str(getattr(k, 'key', getattr(k, 'idx', ''))) for k in path
                   if not isinstance(k, jax.tree_util.GetAttrKey)): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(grads)}
  return float(loss), terms, outputs, flat


def module_grad_mass(grads: dict) -> dict:
  """Top-level module name -> sum of |gradient| over its parameters."""
  mass = {}
  for path, g in grads.items():
    top = path.split('/')[0]
    mass[top] = mass.get(top, 0.0) + float(np.abs(g.astype(np.float64)).sum())
  return mass


def check_contract(outputs, config, *, with_vq: bool, with_local: bool = True):
  n, c, d = config.model.num_queries, config.data.num_classes, config.model.hidden_dim
  shapes = {'pred_logits': (B, T, n, c), 'pred_boxes': (B, T, n, 4), 'pred_masks': (B, T, n, H // 4, W // 4)}
  layers = [outputs] + list(outputs['aux_outputs'])
  assert len(outputs['aux_outputs']) == config.model.dec_layers - 1
  for layer in layers:
    for key, shape in shapes.items():
      assert layer[key].shape == shape, key
      assert layer[key].dtype == np.float32, key
      assert np.all(np.isfinite(layer[key])), key
    assert np.all((layer['pred_boxes'] >= 0) & (layer['pred_boxes'] <= 1))
  vq = outputs['vq']
  # The bottleneck output (docs/DESIGN.md §1.3): the per-frame tokens the queries come from, and their
  # codes when quantized.
  assert outputs['bottleneck']['tokens'].shape == (B, T, n, d)
  assert ('indices' in outputs['bottleneck']) == with_vq
  if not with_vq:
    assert vq is None
    return
  assert outputs['bottleneck']['indices'].shape == (B, T, n)
  k = config.model.codebook_size
  expected = {'global_tokens': (B, n, d), 'global_codes': (B, n, d), 'global_indices': (B, n),
              'global_sqdist': (B, n, k), 'local_valid': (B, T)}
  if with_local:
    expected.update(local_tokens=(B, T, n, d), local_codes=(B, T, n, d), local_indices=(B, T, n),
                    local_sqdist=(B, T, n, k))
  assert set(vq) == set(expected)
  for key, shape in expected.items():
    assert vq[key].shape == shape, key
  for key in ('global_indices', 'local_indices'):
    if key in vq:
      assert vq[key].dtype == np.int32 and vq[key].min() >= 0 and vq[key].max() < k, key
  assert vq['local_valid'].dtype == np.bool_


# -- the shared codebook (Eq. 2, 9) ------------------------------------------------------------------

K, D = 5, 4


def quantizer_case(normalize: bool):
  vq = VectorQuantizer(K, D, normalize=normalize, rngs=nnx.Rngs(1))
  tokens = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, D)), jnp.float32)
  cotangent = np.random.default_rng(3).normal(size=(2, 3, D)).astype(np.float32)
  return vq, tokens, cotangent


def project(x):
  """NumPy: rows onto the sphere of radius sqrt(d) (the cosine codebook)."""
  return math.sqrt(x.shape[-1]) * x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize('normalize', [False, True])
def test_quantizer_picks_nearest_codeword(normalize):
  vq, tokens, _ = quantizer_case(normalize)
  out = vq(tokens)
  codebook = np.asarray(vq.codebook[...], np.float64)
  x = np.asarray(tokens, np.float64)
  if normalize:
    codebook, x = project(codebook), project(x)
  dist = ((x[..., None, :] - codebook) ** 2).sum(-1)
  np.testing.assert_array_equal(out['indices'], dist.argmin(-1))
  np.testing.assert_allclose(out['codes'], codebook[dist.argmin(-1)], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out['quantized'], codebook[dist.argmin(-1)], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out['tokens'], x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('normalize', [False, True])
@pytest.mark.parametrize('update_codebook', [True, False])
def test_straight_through_jacobian_is_identity(update_codebook, normalize):
  """d quantized / d tokens = d tokens' / d tokens: the identity through the (optional) projection."""
  vq, tokens, _ = quantizer_case(normalize)
  n = tokens.size
  jac = np.asarray(jax.jacrev(lambda t: vq(t, update_codebook=update_codebook)['quantized'])(tokens)).reshape(n, n)
  if normalize:  # d(s x/|x|)/dx = s/|x| (I - x x^T/|x|^2), block diagonal over the tokens
    want = np.zeros((n, n))
    for i, x in enumerate(np.asarray(tokens, np.float64).reshape(-1, D)):
      r = np.linalg.norm(x)
      want[i * D:(i + 1) * D, i * D:(i + 1) * D] = math.sqrt(D) / r * (np.eye(D) - np.outer(x, x) / r ** 2)
    np.testing.assert_allclose(jac, want, rtol=1e-5, atol=1e-6)
  else:
    np.testing.assert_array_equal(jac, np.eye(n))
  # The codes themselves carry no gradient to the tokens (the index is a discrete choice).
  jac_codes = jax.jacrev(lambda t: vq(t, update_codebook=update_codebook)['codes'])(tokens)
  np.testing.assert_array_equal(np.asarray(jac_codes), 0.0)


@pytest.mark.parametrize('normalize', [False, True])
@pytest.mark.parametrize('update_codebook', [True, False])
def test_codebook_gradient_paths(update_codebook, normalize):
  """Global path: d sum(codes * r) / d codebook scatters r into the chosen rows (through the
  projection's Jacobian when normalized); local path (update_codebook=False): zero. The
  straight-through output never reaches the codebook."""
  vq, tokens, r = quantizer_case(normalize)

  def through(key):
    return nnx.grad(lambda m: jnp.sum(m(tokens, update_codebook=update_codebook)[key] * r))(vq)['codebook'][...]

  expected = np.zeros((K, D))
  np.add.at(expected, np.asarray(vq(tokens)['indices']).reshape(-1), r.reshape(-1, D))
  if normalize:
    c = np.asarray(vq.codebook[...], np.float64)
    norm = np.linalg.norm(c, axis=-1, keepdims=True)
    expected = math.sqrt(D) / norm * (expected - c * (c * expected).sum(-1, keepdims=True) / norm ** 2)
  np.testing.assert_allclose(through('codes'), expected if update_codebook else 0.0, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(through('quantized'), 0.0)


# -- the default tiny model --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def default_case():
  config = tiny_config()
  model = build(config)
  batch = make_batch(config.data.num_classes)
  return config, model, batch, run(model, config, batch)


def test_default_outputs_follow_contract(default_case):
  config, model, batch, (loss, terms, outputs, grads) = default_case
  check_contract(outputs, config, with_vq=True)
  vq = outputs['vq']
  codebook = np.asarray(model.quantizer.codebook[...])
  np.testing.assert_array_equal(vq['global_codes'], codebook[vq['global_indices']])
  np.testing.assert_array_equal(vq['local_codes'], codebook[vq['local_indices']])
  np.testing.assert_array_equal(vq['local_valid'], batch['frame_valid'])
  assert np.isfinite(loss)
  assert {'loss_quant', 'loss_mask', 'loss_dice_aux_0'} <= set(terms)
  np.testing.assert_allclose(loss, sum(float(v) for k, v in terms.items() if k.startswith('loss_')), rtol=1e-5)


def test_default_gradients(default_case):
  config, model, batch, (loss, terms, outputs, grads) = default_case
  assert all(np.all(np.isfinite(g)) for g in grads.values())
  mass = module_grad_mass(grads)
  # Every module on the path of the loss trains; the baseline's audio query is unused here.
  assert mass['baseline_audio_query'] == 0.0
  for name in ('backbone', 'input_proj', 'encoder', 'audio_encoder', 'audio_proj', 'fusion', 'prototypes',
               'global_asd', 'local_asd', 'quantizer', 'avsr', 'avsr_weights', 'fpn', 'query_pos',
               'reference_points', 'decoder', 'decoder_norm', 'class_head', 'box_head', 'filter_head'):
    assert mass[name] > 0.0, name
  # The codebook learns only from the codebook term of Eq. 9 (global codes): the straight-through
  # outputs and the stop-gradient local codes add nothing. With reduction 'mean' (synthetic config):
  # dL/dC_k = λ_quant · (1/d) · (2/B) Σ_{b,i: idx = k} (e_bi − g_bi).
  vq = outputs['vq']
  d = config.model.hidden_dim
  diff = (vq['global_codes'] - vq['global_tokens']).astype(np.float64).reshape(-1, d)
  expected = np.zeros((config.model.codebook_size, d))
  np.add.at(expected, vq['global_indices'].reshape(-1), diff)
  expected *= config.loss.quant_weight * 2.0 / (d * B)
  assert config.loss.quant_reduction == 'mean'
  np.testing.assert_allclose(grads['quantizer/codebook'], expected, rtol=1e-4, atol=1e-7)


# -- ablation switches (paper Table 2) ---------------------------------------------------------------

ABLATIONS = {
    'no_decomposition': (dict(decomposition=False),
                         ('fusion', 'global_asd', 'local_asd', 'quantizer', 'avsr', 'avsr_weights')),
    'no_quantize': (dict(quantize=False), ('quantizer', 'baseline_audio_query')),
    'no_avsr': (dict(avsr=False), ('avsr', 'avsr_weights', 'baseline_audio_query')),
    # With local calibration the decoder reads the local tokens; the global ones reach the loss through
    # AVSR and the commitment term only. Without both (λ_com = 0, as shipped), the global branch learns
    # nothing: the codebook still follows it (Eq. 9's first term), the rest of the model does not.
    'no_avsr_no_commitment': (dict(avsr=False), ('avsr', 'avsr_weights', 'baseline_audio_query', 'fusion',
                                                  'global_asd'), {'commit_weight': 0.0}),
    'no_local_calibration': (dict(local_calibration=False), ('local_asd', 'baseline_audio_query')),
    'avsr_continuous': (dict(avsr_input='continuous'), ('baseline_audio_query',)),
    'bfloat16': (dict(dtype='bfloat16'), ('baseline_audio_query',)),
}


@pytest.mark.parametrize('name', list(ABLATIONS))
def test_ablation_switch(name, default_case):
  changes, unused, *loss_changes = ABLATIONS[name]
  config = tiny_config(**changes)
  config.loss.update(*loss_changes)
  model = build(config)
  _, default_model, batch, (_, _, default_outputs, _) = default_case
  # Same parameters as the default model, so that the switch alone explains any difference.
  nnx.update(model, nnx.state(default_model))
  loss, terms, outputs, grads = run(model, config, batch, all_grads=False)
  quantize = config.model.decomposition and config.model.quantize
  check_contract(outputs, config, with_vq=quantize, with_local=config.model.local_calibration)
  assert np.isfinite(loss)
  assert ('loss_quant' in terms) == quantize
  assert all(np.all(np.isfinite(g)) for g in grads.values())
  assert all(g.dtype == np.float32 for g in grads.values())
  mass = module_grad_mass(grads)
  for module, value in mass.items():
    if module in unused:
      assert value == 0.0, module
    else:
      assert value > 0.0, module
  if name == 'avsr_continuous':
    # Same indices (the AVSR input does not feed the global tokens), different AVSR weights.
    np.testing.assert_array_equal(outputs['vq']['global_indices'], default_outputs['vq']['global_indices'])
    assert not np.allclose(outputs['pred_masks'], default_outputs['pred_masks'], atol=1e-4)
  if name == 'bfloat16':
    # bfloat16 compute, float32 parameters: close to the float32 model at bfloat16 precision.
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # With box refinement each layer samples around the previous layer's (bfloat16-rounded) box, so
    # rounding compounds over the layers: bound the typical and the worst class probability error.
    error = np.abs(np.asarray(jax.nn.sigmoid(outputs['pred_logits'])) -
                   np.asarray(jax.nn.sigmoid(default_outputs['pred_logits'])))
    print(f'bfloat16 vs float32 class probabilities: mean abs error {error.mean():.4f}, max {error.max():.4f}')
    assert error.mean() < 0.02 and error.max() < 0.25


# -- iterative box refinement ------------------------------------------------------------------------

def test_box_refinement_feeds_each_layers_box_to_the_next(default_case):
  """With ``box_refine`` (the tiny config's default) layer l+1 samples around layer l's box; without
  it every layer uses the one learned point per slot. The refine heads are created last, so both
  models share every other initial value: the first decoder layer, which has no previous box, agrees
  exactly and the later layers differ."""
  config, model, batch, (_, _, outputs, grads) = default_case
  assert config.model.box_refine
  assert len(model.refine_box_heads) == config.model.dec_layers - 1
  assert module_grad_mass(grads)['refine_box_heads'] > 0.0
  plain = build(tiny_config(box_refine=False))
  assert len(plain.refine_box_heads) == 0
  refined_params = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0])
  plain_params = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(plain, nnx.Param)))[0])
  assert set(plain_params) < set(refined_params)
  for path, value in plain_params.items():
    np.testing.assert_array_equal(value, refined_params[path])
  graphdef, state = nnx.split(plain)
  plain_outputs = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b['frames'], b['log_mel'], b['frame_valid'],
                                                                 train=False))(state, batch)
  graphdef, state = nnx.split(model)
  refined = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b['frames'], b['log_mel'], b['frame_valid'],
                                                           train=False))(state, batch)
  first, first_plain = refined['aux_outputs'][0], plain_outputs['aux_outputs'][0]
  for key in ('pred_logits', 'pred_boxes', 'pred_masks'):
    np.testing.assert_allclose(first[key], first_plain[key], rtol=1e-5, atol=1e-6)
  # Later layers sample around the first layer's box instead of the learned point (at init the box
  # heads output zero deltas, so the boxes agree but the sampled features, hence the logits, do not).
  assert not np.allclose(refined['pred_logits'], plain_outputs['pred_logits'], atol=1e-4)


# -- Eq. 7: dynamic mask head ------------------------------------------------------------------------

def dynamic_mask_reference(features, params, centers, c):
  """Per query: X = [f(x, y), x - cx, y - cy] at pixel centres ((j + .5)/w, (i + .5)/h); then
  relu(X W1 + b1) -> relu(· W2 + b2) -> · w3 + b3, the parameters read in that order."""
  m, h, w, d = features.shape
  n = params.shape[1]
  out = np.zeros((m, n, h, w))
  xs = (np.arange(w) + 0.5) / w
  ys = (np.arange(h) + 0.5) / h
  for a in range(m):
    for q in range(n):
      p = params[a, q].astype(np.float64)
      sizes = [(d + 2) * c, c, c * c, c, c, 1]
      w1, b1, w2, b2, w3, b3 = np.split(p, np.cumsum(sizes)[:-1])
      rel_x = np.broadcast_to(xs[None, :] - centers[a, q, 0], (h, w))
      rel_y = np.broadcast_to(ys[:, None] - centers[a, q, 1], (h, w))
      x = np.concatenate([features[a].astype(np.float64), rel_x[..., None], rel_y[..., None]], axis=-1)
      x = np.maximum(x.reshape(h * w, d + 2) @ w1.reshape(d + 2, c) + b1, 0.0)
      x = np.maximum(x @ w2.reshape(c, c) + b2, 0.0)
      out[a, q] = (x @ w3 + b3[0]).reshape(h, w)
  return out


def test_dynamic_mask_matches_numpy_condinst():
  rng = np.random.default_rng(4)
  m, n, h, w, d, c = 2, 3, 5, 7, 6, 4
  num_params = (d + 2) * c + c + c * c + c + c + 1
  features = rng.normal(size=(m, h, w, d)).astype(np.float32)
  params = rng.normal(size=(m, n, num_params)).astype(np.float32)
  centers = rng.uniform(size=(m, n, 2)).astype(np.float32)
  got = jax.jit(dynamic_mask, static_argnums=3)(features, params, centers, c)
  want = dynamic_mask_reference(features, params, centers, c)
  assert got.shape == (m, n, h, w)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  # The relative coordinates matter: moving a centre changes that query's mask only.
  moved = centers.copy()
  moved[0, 1] = [0.9, 0.1]
  got2 = np.asarray(dynamic_mask(features, params, moved, c))
  np.testing.assert_allclose(got2, dynamic_mask_reference(features, params, moved, c), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(got2[0, 0], np.asarray(got)[0, 0])


# -- Eq. 5: AVSR ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('train', [False, True])
def test_avsr_equals_concat_then_conv(train):
  """F' = BN(φ(w_1⊙F ⊕ … ⊕ w_N⊙F) + F) with φ a 1×1 conv N·d -> d, literally, in NumPy."""
  rng = np.random.default_rng(5)
  b, t, h, w, d, n = 2, 2, 3, 4, 8, 3
  avsr = AVSR(d, n, dtype=jnp.float32, rngs=nnx.Rngs(6))
  avsr.phi_bias[...] = jnp.asarray(rng.normal(size=d), jnp.float32)
  mean, var = rng.normal(size=d), rng.uniform(0.5, 2.0, size=d)
  scale, bias = rng.normal(size=d), rng.normal(size=d)
  avsr.norm.mean[...] = jnp.asarray(mean, jnp.float32)
  avsr.norm.var[...] = jnp.asarray(var, jnp.float32)
  avsr.norm.scale[...] = jnp.asarray(scale, jnp.float32)
  avsr.norm.bias[...] = jnp.asarray(bias, jnp.float32)
  feature = rng.normal(size=(b, t, h, w, d)).astype(np.float32)
  weights = rng.normal(size=(b, n, d)).astype(np.float32)
  got = np.asarray(avsr(jnp.asarray(feature), jnp.asarray(weights), train=train))

  kernel = np.asarray(avsr.phi[...], np.float64).reshape(n * d, d)   # the 1×1 conv, N·d -> d
  f64 = feature.astype(np.float64)
  concat = np.concatenate([weights[:, i, None, None, None, :] * f64 for i in range(n)], axis=-1)
  z = concat @ kernel + np.asarray(avsr.phi_bias[...], np.float64) + f64
  if train:
    mean, var = z.mean(axis=(0, 1, 2, 3)), z.var(axis=(0, 1, 2, 3))
  want = (z - mean) / np.sqrt(var + 1e-5) * scale + bias
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# -- the paper-sized model: parameter counts, no compute ------------------------------------------------

def linear(i, o):
  return i * o + o


def test_full_avss_parameter_counts():
  """configs/avss.py (ResNet-50, VGGish, d=256, N=5, K=128, C=70) module by module, each against the
  formula of its reference architecture (frozen BatchNorm values are not parameters)."""
  config = avss.get_config()
  model = nnx.eval_shape(lambda: build_model(config, 0))
  params = nnx.state(model, nnx.Param)
  counts = {k: sum(math.prod(x.shape) for x in jax.tree.leaves(v)) for k, v in params.items()}
  d, n, k, c, ffn, levels, heads, points = 256, 5, 128, 70, 2048, 4, 8, 4
  assert (config.model.hidden_dim, config.model.num_queries, config.model.codebook_size,
          config.data.num_classes) == (d, n, k, c)
  ln = 2 * d
  mha = 4 * linear(d, d)                                               # q, k, v, out projections
  ffn_params = linear(d, ffn) + linear(ffn, d)
  deform = linear(d, heads * levels * points * 2) + linear(d, heads * levels * points) + 2 * linear(d, d)
  conv_gn = lambda i, o, kk: kk * kk * i * o + o + 2 * o               # conv + bias, GroupNorm affine
  dyn = 8
  filters = (d + 2) * dyn + dyn + dyn * dyn + dyn + dyn + 1
  expected = {
      # torchvision ResNet-50 without fc (23,508,032) minus its 53 BatchNorm affines (53,120).
      'backbone': 23_508_032 - 53_120,
      # torchvggish VGGish: 6 convs + 3 fully connected layers.
      'audio_encoder': 72_141_184,
      'input_proj': conv_gn(512, d, 1) + conv_gn(1024, d, 1) + conv_gn(2048, d, 1) + conv_gn(2048, d, 3),
      'encoder': 4 * (deform + ffn_params + 2 * ln) + levels * d,       # + level embedding
      'audio_proj': linear(128, d),
      'fusion': mha + ffn_params + 2 * ln,
      'prototypes': n * d,
      'global_asd': 2 * (2 * mha + ffn_params + 3 * ln),
      'local_asd': 2 * (2 * mha + ffn_params + 3 * ln),
      'quantizer': k * d,
      'avsr_weights': 2 * linear(d, d),
      'avsr': levels * (n * d * d + d + 2 * d),                          # φ, its bias, BatchNorm affine
      'baseline_audio_query': linear(d, d),
      'fpn': 2 * conv_gn(d, d, 1) + conv_gn(256, d, 1) + 3 * conv_gn(d, d, 3) + linear(d, d),
      'query_pos': n * d,
      'reference_points': linear(d, 2),
      'decoder': 4 * (mha + deform + ffn_params + 3 * ln),
      'decoder_norm': ln,
      'class_head': linear(d, d) + linear(d, c),
      'box_head': linear(d, d) + linear(d, 4),
      'filter_head': linear(d, d) + linear(d, filters),
      'refine_box_heads': 3 * (linear(d, d) + linear(d, 4)),           # decoder layers 2..4 (box refine)
  }
  assert counts == expected
  assert sum(counts.values()) == 124_765_697
  # What the optimizer holds: all but the frozen stem + layer1 convolutions of the backbone and the
  # frozen VGGish (config.model.audio.trainable is False: no update, no weight decay).
  assert not config.model.audio.trainable
  trainable = nnx.state(model, optim.trainable_filter(model))
  assert 'audio_encoder' not in trainable
  frozen = 7 * 7 * 3 * 64 + (64 * 64 + 9 * 64 * 64 + 64 * 256 + 64 * 256) + 2 * (256 * 64 + 9 * 64 * 64 + 64 * 256)
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(trainable)) == 124_765_697 - frozen - 72_141_184


def test_small_audio_net_keeps_pitch():
  """The small audio encoder pools over time only, so the same spectral pattern at two pitches gives
  two embeddings (pooling over frequency as well made them equal: the class of a synthetic sound is
  mostly its fundamental). The shift is a multiple of the net's stride 8, so a frequency-pooled net
  would give bit-equal outputs."""
  from qdformer_jax.models.audio import SmallAudioNet
  net = SmallAudioNet(8, rngs=nnx.Rngs(0))
  low = np.full((1, 96, 64), -4.0, np.float32)
  high = low.copy()
  low[:, 16:48, 8:12] = 2.0
  high[:, 16:48, 40:44] = 2.0
  a, b = np.asarray(net(jnp.asarray(low))), np.asarray(net(jnp.asarray(high)))
  assert a.shape == (1, 128)
  assert np.abs(a - b).max() > 1e-3 * max(np.abs(a).max(), 1e-6)
  # Time is pooled: shifting the pattern in time by the stride leaves the embedding unchanged.
  later = np.roll(low, 8, axis=1)
  np.testing.assert_allclose(np.asarray(net(jnp.asarray(later))), a, rtol=1e-5, atol=1e-6)
