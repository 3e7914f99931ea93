"""Tests of multi-scale deformable attention, its encoder/decoder layers, dense attention and the sine
position embedding, against NumPy loop transcriptions and PyTorch references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qdformer_jax.models.attention import MultiHeadAttention, TransformerDecoderLayer
from qdformer_jax.models.deformable import (
  DeformableDecoderLayer,
  DeformableEncoder,
  MSDeformAttn,
  encoder_reference_points,
  ms_deform_attn_core,
)
from qdformer_jax.models.position import sine_position_embedding

SHAPES = ((7, 9), (4, 5), (2, 3), (1, 1))
REL_TOL = 1e-5  # float32 JAX vs float64 references; measured max relative error ~1e-7.


def random_core_inputs(seed: int, b=2, q=5, m=3, dh=4, p=3, shapes=SHAPES):
  """Random value / locations (in [-0.3, 1.3], some exactly on the borders 0 and 1) / weights."""
  rng = np.random.default_rng(seed)
  s = sum(h * w for h, w in shapes)
  value = rng.standard_normal((b, s, m, dh)).astype(np.float32)
  loc = rng.uniform(-0.3, 1.3, (b, q, m, len(shapes), p, 2)).astype(np.float32)
  loc[0, 0, 0, :, 0] = 0.0
  loc[0, 0, 1, :, 0] = 1.0
  attn = rng.uniform(0.0, 1.0, (b, q, m, len(shapes), p)).astype(np.float32)
  return value, loc, attn


def rel_err(a, ref) -> float:
  a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def numpy_core_loop(value, shapes, loc, attn):
  """Plain loop transcription: bilinear sampling with pixel centres at (i + 0.5) / size and zeros
  outside each map, weighted by the attention weights, summed over levels and points."""
  b_n, _, m_n, dh = value.shape
  _, q_n, _, l_n, p_n, _ = loc.shape
  out = np.zeros((b_n, q_n, m_n, dh), np.float64)
  starts = np.concatenate([[0], np.cumsum([h * w for h, w in shapes])])
  for b in range(b_n):
    for l, (h, w) in enumerate(shapes):
      fmap = value[b, starts[l]:starts[l + 1]].reshape(h, w, m_n, dh).astype(np.float64)
      for q in range(q_n):
        for m in range(m_n):
          for p in range(p_n):
            x = float(loc[b, q, m, l, p, 0]) * w - 0.5
            y = float(loc[b, q, m, l, p, 1]) * h - 0.5
            xl, yl = math.floor(x), math.floor(y)
            sample = np.zeros(dh)
            for yy in (yl, yl + 1):
              for xx in (xl, xl + 1):
                if 0 <= yy < h and 0 <= xx < w:
                  sample += (1 - abs(x - xx)) * (1 - abs(y - yy)) * fmap[yy, xx, m]
            out[b, q, m] += attn[b, q, m, l, p] * sample
  return out.reshape(b_n, q_n, m_n * dh)


def torch_core(value, shapes, loc, attn):
  """Deformable-DETR's PyTorch formulation: per level, grid_sample on [B*M, Dh, h, w] maps."""
  import torch
  import torch.nn.functional as F
  b, _, m, dh = value.shape
  _, q, _, l, p, _ = loc.shape
  levels = value.split([h * w for h, w in shapes], dim=1)
  grids = 2 * loc - 1
  samples = []
  for i, (h, w) in enumerate(shapes):
    v = levels[i].flatten(2).transpose(1, 2).reshape(b * m, dh, h, w)
    g = grids[:, :, :, i].transpose(1, 2).flatten(0, 1)  # [B*M, Q, P, 2]
    samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
  a = attn.transpose(1, 2).reshape(b * m, 1, q, l * p)
  out = (torch.stack(samples, dim=-2).flatten(-2) * a).sum(-1).view(b, m * dh, q)
  return out.transpose(1, 2)


def test_core_matches_numpy_loop():
  value, loc, attn = random_core_inputs(0)
  out = jax.jit(ms_deform_attn_core, static_argnums=1)(jnp.asarray(value), SHAPES, jnp.asarray(loc),
                                                     jnp.asarray(attn))
  assert out.shape == (2, 5, 12) and out.dtype == jnp.float32
  ref = numpy_core_loop(value, SHAPES, loc, attn)
  assert rel_err(out, ref) <= REL_TOL
  # bfloat16 values: same sampling (float32 locations), error of bfloat16 rounding only.
  out16 = jax.jit(ms_deform_attn_core, static_argnums=1)(jnp.asarray(value, jnp.bfloat16), SHAPES,
                                                       jnp.asarray(loc), jnp.asarray(attn))
  assert out16.dtype == jnp.bfloat16 and rel_err(out16.astype(jnp.float32), ref) <= 2e-2


def test_core_reads_pixels_exactly_and_zero_outside():
  # At a pixel centre the sample is that pixel; beyond half a pixel outside the map it is zero.
  h, w = 3, 4
  value = np.arange(h * w * 2, dtype=np.float32).reshape(1, h * w, 1, 2)
  centres = [((1 + 0.5) / w, (2 + 0.5) / h), (-0.5 / w - 1e-3, 0.5), (0.5, 1 + 0.5 / h + 1e-3)]
  loc = np.array(centres, np.float32).reshape(1, 3, 1, 1, 1, 2)
  out = ms_deform_attn_core(jnp.asarray(value), ((h, w),), jnp.asarray(loc), jnp.ones((1, 3, 1, 1, 1)))
  np.testing.assert_allclose(np.asarray(out[0, 0]), value[0, 2 * w + 1, 0], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out[0, 1:]), 0.0)


def test_core_matches_torch_grid_sample_and_gradients():
  torch = pytest.importorskip("torch")
  value, loc, attn = random_core_inputs(1)
  cot = np.random.default_rng(2).standard_normal((2, 5, 12))
  tv, tl, ta = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (value, loc, attn))
  ref = torch_core(tv, SHAPES, tl, ta)
  (ref * torch.tensor(cot)).sum().backward()

  out = jax.jit(ms_deform_attn_core, static_argnums=1)(jnp.asarray(value), SHAPES, jnp.asarray(loc),
                                                     jnp.asarray(attn))
  err = rel_err(out, ref.detach().numpy())
  assert err <= REL_TOL, err
  out32 = torch_core(*(torch.tensor(x) for x in (value,)), SHAPES, torch.tensor(loc), torch.tensor(attn))
  assert rel_err(out, out32.numpy()) <= REL_TOL

  def loss(v, l, a):
    return jnp.sum(ms_deform_attn_core(v, SHAPES, l, a) * cot.astype(np.float32))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(jnp.asarray(value), jnp.asarray(loc),
                                                      jnp.asarray(attn))
  for g, t, name in zip(grads, (tv, tl, ta), ("value", "sampling_locations", "attention_weights")):
    assert np.all(np.isfinite(np.asarray(g))), name
    assert rel_err(g, t.grad.numpy()) <= 1e-5, (name, rel_err(g, t.grad.numpy()))  # measured <5e-7


def torch_linear(x, lin):
  import torch
  return x @ torch.tensor(np.asarray(lin.kernel[...])) + torch.tensor(np.asarray(lin.bias[...]))


def randomize(module: nnx.Module, seed: int, scale: float = 0.3):
  """Overwrite every parameter with random normal values (the zero inits would hide bugs)."""
  rng = np.random.default_rng(seed)
  state = nnx.state(module, nnx.Param)
  nnx.update(module, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, scale, x.shape), x.dtype), state))


def test_msdeformattn_init_and_matches_torch():
  torch = pytest.importorskip("torch")
  d, levels, heads, points = 16, 3, 4, 2
  shapes = ((5, 6), (3, 3), (1, 2))
  attn = MSDeformAttn(d, levels, heads, points, rngs=nnx.Rngs(0))
  # Deformable-DETR init: zero kernels, head m points along angle 2*pi*m/M, point p at distance p+1.
  assert np.all(np.asarray(attn.sampling_offsets.kernel[...]) == 0)
  bias = np.asarray(attn.sampling_offsets.bias[...]).reshape(heads, levels, points, 2)
  np.testing.assert_allclose(bias[1, 2, 1], [0.0, 2.0], atol=1e-6)   # 90 degrees, point 2
  np.testing.assert_allclose(bias[2, 0, 0], [-1.0, 0.0], atol=1e-6)  # 180 degrees, point 1
  assert np.all(np.asarray(attn.attention_weights.kernel[...]) == 0)

  randomize(attn, 3)
  rng = np.random.default_rng(4)
  s = sum(h * w for h, w in shapes)
  query = rng.standard_normal((2, 7, d)).astype(np.float32)
  ref_pts = rng.uniform(0, 1, (2, 7, levels, 2)).astype(np.float32)
  ref_boxes = np.concatenate([ref_pts, rng.uniform(0.1, 0.5, (2, 7, levels, 2))], -1).astype(np.float32)
  src = rng.standard_normal((2, s, d)).astype(np.float32)
  pad = rng.uniform(size=(2, s)) < 0.2
  run = nnx.jit(lambda a, *x: a(*x[:3], shapes, x[3]))

  tq, ts = torch.tensor(query), torch.tensor(src)
  value = torch_linear(ts, attn.value_proj).masked_fill(torch.tensor(pad)[..., None], 0.0)
  value = value.view(2, s, heads, d // heads)
  offsets = torch_linear(tq, attn.sampling_offsets).view(2, 7, heads, levels, points, 2)
  weights = torch_linear(tq, attn.attention_weights).view(2, 7, heads, levels * points)
  weights = weights.softmax(-1).view(2, 7, heads, levels, points)
  normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
  tr = torch.tensor(ref_pts)[:, :, None, :, None, :]
  tb = torch.tensor(ref_boxes)[:, :, None, :, None, :]
  for refs, loc in ((ref_pts, tr + offsets / normalizer[None, None, None, :, None, :]),
                    (ref_boxes, tb[..., :2] + offsets / points * tb[..., 2:] * 0.5)):
    out = run(attn, jnp.asarray(query), jnp.asarray(refs), jnp.asarray(src), jnp.asarray(pad))
    ref = torch_linear(torch_core(value, shapes, loc, weights), attn.output_proj)
    err = rel_err(out, ref.detach().numpy())
    assert err <= 1e-5, err  # measured ~2e-7


def test_multihead_attention_matches_torch():
  torch = pytest.importorskip("torch")
  d, heads = 16, 4
  mha = MultiHeadAttention(d, heads, rngs=nnx.Rngs(0))
  randomize(mha, 5)
  rng = np.random.default_rng(6)
  q, k, v = (rng.standard_normal((2, n, d)).astype(np.float32) for n in (3, 6, 6))
  mask = np.ones((2, 6), bool)
  mask[1, 4:] = False
  out = nnx.jit(lambda mha, *x: mha(*x[:3], key_mask=x[3]))(
      mha, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))

  ref_mha = torch.nn.MultiheadAttention(d, heads, batch_first=True)
  p = lambda x: torch.tensor(np.asarray(x[...]))
  with torch.no_grad():
    ref_mha.in_proj_weight.copy_(torch.cat([p(mha.q_proj.kernel).T, p(mha.k_proj.kernel).T,
                                            p(mha.v_proj.kernel).T]))
    ref_mha.in_proj_bias.copy_(torch.cat([p(mha.q_proj.bias), p(mha.k_proj.bias), p(mha.v_proj.bias)]))
    ref_mha.out_proj.weight.copy_(p(mha.out_proj.kernel).T)
    ref_mha.out_proj.bias.copy_(p(mha.out_proj.bias))
    ref, _ = ref_mha(torch.tensor(q), torch.tensor(k), torch.tensor(v),
                     key_padding_mask=torch.tensor(~mask))
  assert rel_err(out, ref.numpy()) <= 1e-5


def numpy_detr_sine(h, w, d, offset=0.0, scale=2 * math.pi, temperature=10000.0):
  """DETR's PositionEmbeddingSine on an all-valid mask: cumsum coordinates, sin/cos interleaved."""
  not_mask = np.ones((1, h, w))
  y_embed = not_mask.cumsum(1)
  x_embed = not_mask.cumsum(2)
  y_embed = (y_embed + offset) / (y_embed[:, -1:, :] + 1e-6) * scale
  x_embed = (x_embed + offset) / (x_embed[:, :, -1:] + 1e-6) * scale
  n = d // 2
  dim_t = temperature ** (2 * (np.arange(n) // 2) / n)
  px = x_embed[..., None] / dim_t
  py = y_embed[..., None] / dim_t
  px = np.stack([np.sin(px[..., 0::2]), np.cos(px[..., 1::2])], axis=4).reshape(1, h, w, n)
  py = np.stack([np.sin(py[..., 0::2]), np.cos(py[..., 1::2])], axis=4).reshape(1, h, w, n)
  return np.concatenate([py, px], axis=3)[0]


def test_sine_position_embedding_matches_detr():
  for offset in (0.0, -0.5):
    pos = sine_position_embedding(5, 7, 32, offset=offset)
    assert pos.shape == (5, 7, 32)
    np.testing.assert_allclose(np.asarray(pos), numpy_detr_sine(5, 7, 32, offset), atol=2e-6)
  with pytest.raises(ValueError, match="multiple of 4"):
    sine_position_embedding(2, 2, 30)


def test_encoder_reference_points():
  ref = np.asarray(encoder_reference_points(((2, 3), (1, 1))))
  np.testing.assert_allclose(ref[:6], [[1 / 6, .25], [.5, .25], [5 / 6, .25],
                                       [1 / 6, .75], [.5, .75], [5 / 6, .75]], atol=1e-7)
  np.testing.assert_allclose(ref[6], [.5, .5])


def build_encoder_decoder(dtype, d, levels, dropout, seed=0):
  # The 'unsafe_rbg' dropout key compiles several times faster on CPU than the default threefry.
  rngs = nnx.Rngs(params=seed, dropout=jax.random.key(seed + 1, impl="unsafe_rbg"))
  enc = DeformableEncoder(1, d, n_heads=2, n_points=2, n_levels=levels, ffn_dim=16, dropout=dropout,
                          rngs=rngs, dtype=dtype)
  dec = DeformableDecoderLayer(d, 2, 2, levels, 16, dropout, rngs=rngs, dtype=dtype)
  return enc, dec


ENC_SHAPES = ((5, 6), (3, 4), (1, 2))


def encoder_decoder_inputs(d, levels, seed):
  rng = np.random.default_rng(seed)
  srcs = [jnp.asarray(rng.standard_normal((2, h, w, d)), jnp.float32) for h, w in ENC_SHAPES]
  tgt = jnp.asarray(rng.standard_normal((2, 4, d)), jnp.float32)
  qpos = jnp.asarray(rng.standard_normal((2, 4, d)), jnp.float32)
  ref = jnp.asarray(rng.uniform(0, 1, (2, 4, levels, 2)), jnp.float32)
  return srcs, tgt, qpos, ref


def run_encoder_decoder(enc, dec, srcs, tgt, qpos, ref, deterministic):
  outs = enc(srcs, deterministic=deterministic)
  memory = jnp.concatenate([o.reshape(o.shape[0], -1, o.shape[-1]) for o in outs], axis=1)
  return outs, dec(tgt, qpos, ref, memory, ENC_SHAPES, deterministic)


def test_encoder_decoder_bfloat16_jit():
  d, levels = 16, 3
  enc, dec = build_encoder_decoder(jnp.bfloat16, d, levels, 0.1)
  srcs, tgt, qpos, ref = encoder_decoder_inputs(d, levels, 7)
  run = nnx.jit(run_encoder_decoder, static_argnums=6)
  outs, out_tgt = run(enc, dec, srcs, tgt, qpos, ref, True)
  # deterministic=True disables dropout (rate 0.1 here): a second call gives identical outputs.
  _, out_tgt2 = run(enc, dec, srcs, tgt, qpos, ref, True)
  np.testing.assert_array_equal(np.asarray(out_tgt, np.float32), np.asarray(out_tgt2, np.float32))
  assert [o.shape for o in outs] == [(2, h, w, d) for h, w in ENC_SHAPES]
  assert out_tgt.shape == (2, 4, d)
  assert all(o.dtype == jnp.bfloat16 for o in outs) and out_tgt.dtype == jnp.bfloat16
  assert all(np.all(np.isfinite(np.asarray(o, np.float32))) for o in outs + [out_tgt])
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state((enc, dec), nnx.Param)))


def test_encoder_decoder_float32_training_step_gradients():
  d, levels = 16, 3
  enc, dec = build_encoder_decoder(jnp.float32, d, levels, 0.1)
  # The zero-initialised offset / weight kernels would stop the gradient into the queries (and so
  # into the level embedding), so start from random parameters.
  randomize(enc, 10, scale=0.1)
  randomize(dec, 11, scale=0.1)
  srcs, tgt, qpos, ref = encoder_decoder_inputs(d, levels, 8)

  @nnx.jit
  def step(enc, dec):
    def loss(models):
      outs, out_tgt = run_encoder_decoder(*models, srcs, tgt, qpos, ref, False)
      return jnp.sum(out_tgt ** 2) + sum(jnp.sum(o[..., 0]) for o in outs), (outs, out_tgt)
    grads, (outs, out_tgt) = nnx.grad(loss, has_aux=True)((enc, dec))
    return grads, outs, out_tgt

  grads, outs, out_tgt = step(enc, dec)
  # Training mode (deterministic=False): the dropout stream advances, a second call draws other masks.
  _, _, out_tgt2 = step(enc, dec)
  assert not np.allclose(np.asarray(out_tgt), np.asarray(out_tgt2))
  assert [o.shape for o in outs] == [(2, h, w, d) for h, w in ENC_SHAPES]
  assert out_tgt.shape == (2, 4, d) and out_tgt.dtype == jnp.float32
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), path


def test_transformer_decoder_layer_masking():
  d = 16
  layer = TransformerDecoderLayer(d, 4, 32, 0.1, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(9)
  tgt = jnp.asarray(rng.standard_normal((2, 3, d)), jnp.float32)
  memory = jnp.asarray(rng.standard_normal((2, 6, d)), jnp.float32)
  mask = jnp.asarray(np.array([[1, 1, 1, 1, 0, 0]] * 2, bool))
  run = nnx.jit(lambda layer, memory: layer(tgt, memory, memory_mask=mask))
  out = run(layer, memory)
  assert out.shape == (2, 3, d)
  # Masked memory tokens must not influence the output.
  changed = memory.at[:, 4:].set(100.0)
  np.testing.assert_allclose(np.asarray(run(layer, changed)), np.asarray(out),
                             atol=1e-6)


def test_bad_inputs_raise():
  value, loc, attn = random_core_inputs(0)
  with pytest.raises(ValueError, match="spatial_shapes"):
    ms_deform_attn_core(jnp.asarray(value), SHAPES[:3] + ((2, 2),), jnp.asarray(loc), jnp.asarray(attn))
  with pytest.raises(ValueError, match="attention_weights"):
    ms_deform_attn_core(jnp.asarray(value), SHAPES, jnp.asarray(loc), jnp.asarray(attn[..., :1]))
  enc = DeformableEncoder(1, 16, 2, 2, 2, 16, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="n_levels"):
    enc([jnp.zeros((1, 2, 2, 16))])
