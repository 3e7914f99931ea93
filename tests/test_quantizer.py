"""The shared codebook: nearest codeword, cosine variant, dead-codeword restarts, usage statistics."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qdformer_jax.models.quantizer import VectorQuantizer, codebook_usage


def test_nearest_codeword_matches_numpy():
  vq = VectorQuantizer(16, 8, rngs=nnx.Rngs(0))
  tokens = jax.random.normal(jax.random.key(1), (3, 5, 8))
  out = vq(tokens)
  book = np.asarray(vq.codebook[...])
  dist = ((np.asarray(tokens)[..., None, :] - book) ** 2).sum(-1)
  np.testing.assert_array_equal(np.asarray(out['indices']), dist.argmin(-1))
  np.testing.assert_allclose(np.asarray(out['quantized']), book[dist.argmin(-1)], atol=1e-6)


def test_cosine_codebook_projects_to_sphere_and_keeps_straight_through():
  d = 8
  vq = VectorQuantizer(16, d, normalize=True, rngs=nnx.Rngs(0))
  tokens = 3.0 * jax.random.normal(jax.random.key(1), (4, d))
  out = vq(tokens)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out['quantized']), axis=-1), np.sqrt(d), rtol=1e-5)
  book = np.asarray(vq.codebook[...])
  cos = (np.asarray(tokens) / np.linalg.norm(tokens, axis=-1, keepdims=True)) @ (
      book / np.linalg.norm(book, axis=-1, keepdims=True)).T
  np.testing.assert_array_equal(np.asarray(out['indices']), cos.argmax(-1))
  # Straight-through: d quantized / d (projected token) is the identity.
  _, vjp = jax.vjp(lambda t: vq(t)['quantized'], tokens)
  _, vjp_tokens = jax.vjp(lambda t: vq(t)['tokens'], tokens)
  cot = jax.random.normal(jax.random.key(2), (4, d))
  np.testing.assert_allclose(np.asarray(vjp(cot)[0]), np.asarray(vjp_tokens(cot)[0]), atol=1e-6)


def test_restart_moves_only_dead_codewords_onto_tokens():
  k, d = 8, 4
  vq = VectorQuantizer(k, d, rngs=nnx.Rngs(0))
  before = np.asarray(vq.codebook[...]).copy()
  tokens = jax.random.normal(jax.random.key(3), (6, d))
  indices = jnp.zeros((6,), jnp.int32)  # every token chose codeword 0
  vq.usage[...] = jnp.full((k,), 1.0 / k).at[1].set(1e-4 / k)  # codeword 1 is already nearly dead
  restarted = vq.restart_dead_codes(tokens, indices, jax.random.key(4), decay=0.5, threshold=0.1)
  after = np.asarray(vq.codebook[...])
  usage = np.asarray(vq.usage[...])
  assert float(restarted) == 1.0
  np.testing.assert_array_equal(after[[0] + list(range(2, k))], before[[0] + list(range(2, k))])
  assert any(np.allclose(after[1], t) for t in np.asarray(tokens))
  assert usage[1] == np.float32(1.0 / k)
  np.testing.assert_allclose(usage[0], 0.5 / k + 0.5)


def test_codebook_usage_statistics():
  stats = codebook_usage(jnp.array([0, 0, 1, 1]), 4)
  np.testing.assert_allclose(float(stats['perplexity']), 2.0, rtol=1e-5)
  assert float(stats['dead_codes']) == 2.0


# -- remedies for a bottleneck that drops the audio (docs/DESIGN.md §1.6) ---------------------------

def _rotation_closed_form(z, e):
  """(‖e‖/‖z‖)·R with R = I − 2rrᵀ + 2quᵀ, u = z/‖z‖, q = e/‖e‖, r = (u+q)/‖u+q‖ (Fifty et al. 2024)."""
  u, q = z / np.linalg.norm(z), e / np.linalg.norm(e)
  r = (u + q) / np.linalg.norm(u + q)
  rot = np.eye(len(z)) - 2.0 * np.outer(r, r) + 2.0 * np.outer(q, u)
  return np.linalg.norm(e) / np.linalg.norm(z) * rot


def test_rotation_trick_forward_is_the_code_and_gradient_is_the_rotation():
  from qdformer_jax.models.quantizer import rotation_trick
  rng = np.random.default_rng(0)
  z, e = rng.standard_normal(6).astype(np.float64), rng.standard_normal(6).astype(np.float64)
  jax.config.update('jax_enable_x64', True)
  try:
    out, vjp = jax.vjp(lambda t: rotation_trick(t, jnp.asarray(e)), jnp.asarray(z))
    cot = rng.standard_normal(6)
    grad = np.asarray(vjp(jnp.asarray(cot))[0])
  finally:
    jax.config.update('jax_enable_x64', False)
  jac = _rotation_closed_form(z, e)
  np.testing.assert_allclose(np.asarray(out), e, rtol=1e-12)                 # forward value: the code
  np.testing.assert_allclose(jac @ z, e, rtol=1e-10)                          # R maps the token onto it
  np.testing.assert_allclose(grad, jac.T @ cot, rtol=1e-10, atol=1e-12)       # gradient: (‖e‖/‖z‖) Rᵀ g
  np.testing.assert_allclose(jac.T @ jac, (np.linalg.norm(e) / np.linalg.norm(z)) ** 2 * np.eye(6), atol=1e-10)


def test_rotation_gradient_differs_from_straight_through():
  vq_ste = VectorQuantizer(8, 4, normalize=True, rngs=nnx.Rngs(0))
  vq_rot = VectorQuantizer(8, 4, normalize=True, gradient='rotation', rngs=nnx.Rngs(0))
  tokens = jax.random.normal(jax.random.key(1), (5, 4))
  np.testing.assert_allclose(np.asarray(vq_rot(tokens)['quantized']), np.asarray(vq_ste(tokens)['quantized']),
                             atol=1e-5)
  g_ste = jax.grad(lambda t: jnp.sum(vq_ste(t)['quantized'][:, 0]))(tokens)
  g_rot = jax.grad(lambda t: jnp.sum(vq_rot(t)['quantized'][:, 0]))(tokens)
  assert np.all(np.isfinite(np.asarray(g_rot)))
  assert np.max(np.abs(np.asarray(g_ste) - np.asarray(g_rot))) > 1e-3


def test_ema_update_matches_its_formula():
  k, d, decay = 4, 3, 0.9
  vq = VectorQuantizer(k, d, ema_decay=decay, rngs=nnx.Rngs(0))
  assert not isinstance(vq.codebook, nnx.Param)  # the optimizer never sees an EMA codebook
  counts0, sums0 = np.asarray(vq.ema_counts[...]).copy(), np.asarray(vq.ema_sums[...]).copy()
  tokens = np.random.default_rng(1).standard_normal((6, d)).astype(np.float32)
  indices = np.array([0, 0, 1, 3, 3, 3])
  vq.ema_update(jnp.asarray(tokens), jnp.asarray(indices))
  n = np.bincount(indices, minlength=k)
  s = np.stack([tokens[indices == j].sum(0) for j in range(k)])
  counts = decay * counts0 + (1 - decay) * n
  sums = decay * sums0 + (1 - decay) * s
  smoothed = (counts + 1e-5) / (counts.sum() + k * 1e-5) * counts.sum()
  np.testing.assert_allclose(np.asarray(vq.ema_counts[...]), counts, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(vq.ema_sums[...]), sums, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(vq.codebook[...]), sums / smoothed[:, None], rtol=1e-5, atol=1e-6)


def test_ema_codebook_follows_a_fixed_cluster():
  vq = VectorQuantizer(1, 2, ema_decay=0.5, rngs=nnx.Rngs(0))
  target = jnp.asarray([[3.0, -1.0]] * 4)
  for _ in range(30):
    vq.ema_update(target, jnp.zeros((4,), jnp.int32))
  np.testing.assert_allclose(np.asarray(vq.codebook[0]), [3.0, -1.0], rtol=1e-4)


def test_fsq_rounds_to_its_grid_and_passes_the_gradient_straight_through():
  from qdformer_jax.models.quantizer import FSQ, round_ste
  levels = (4, 3, 2)
  fsq = FSQ(8, levels, rngs=nnx.Rngs(0))
  assert fsq.num_codes == 24
  z = 3.0 * jax.random.normal(jax.random.key(0), (500, 3))
  bounded = np.asarray(fsq.bound(z))
  rounded = np.round(bounded)
  for j, level in enumerate(levels):
    values = np.unique(rounded[:, j])
    assert len(values) <= level and values.max() - values.min() <= level - 1, (level, values)
  # Every grid point gets its own index in [0, K).
  tokens = 4.0 * jax.random.normal(jax.random.key(1), (2000, 8))
  out = fsq(tokens)
  idx = np.asarray(out['indices'])
  assert idx.min() >= 0 and idx.max() < 24 and len(np.unique(idx)) > 12
  # Same index <=> same quantized vector.
  q = np.asarray(out['quantized'])
  for i in np.unique(idx)[:5]:
    np.testing.assert_allclose(q[idx == i], np.broadcast_to(q[idx == i][0], q[idx == i].shape), atol=1e-6)
  # round_ste: forward rounds, backward is the identity.
  x = jnp.asarray([0.2, 1.7, -0.6])
  np.testing.assert_array_equal(np.asarray(round_ste(x)), [0.0, 2.0, -1.0])
  np.testing.assert_allclose(np.asarray(jax.grad(lambda v: jnp.sum(round_ste(v) * jnp.arange(3.0)))(x)), [0, 1, 2])


def test_per_slot_perplexity_against_numpy():
  from qdformer_jax.models.quantizer import per_slot_perplexity
  rng = np.random.default_rng(0)
  idx = rng.integers(0, 5, (7, 3, 2))   # [B, T, N]
  valid = rng.random((7, 3)) > 0.3
  want = []
  for n in range(2):
    counts = np.bincount(idx[..., n][valid], minlength=5)
    p = counts / counts.sum()
    want.append(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))))
  got = float(per_slot_perplexity(jnp.asarray(idx), 5, jnp.asarray(valid)))
  np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)
  # Slot identity alone (each slot one constant code) gives 1.
  constant = np.broadcast_to(np.arange(2), (7, 3, 2))
  np.testing.assert_allclose(float(per_slot_perplexity(jnp.asarray(constant), 5, jnp.asarray(valid))), 1.0, rtol=1e-6)


def test_kmeans_finds_separated_clusters():
  from qdformer_jax.models.quantizer import kmeans
  rng = np.random.default_rng(0)
  centres = np.array([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
  tokens = np.concatenate([c + 0.1 * rng.standard_normal((30, 2)) for c in centres]).astype(np.float32)
  found = np.asarray(kmeans(jnp.asarray(tokens), 3, jax.random.key(1), iterations=10))
  for c in centres:
    assert np.min(np.linalg.norm(found - c, axis=-1)) < 0.1
  spherical = np.asarray(kmeans(jnp.asarray(tokens), 3, jax.random.key(1), spherical=True))
  np.testing.assert_allclose(np.linalg.norm(spherical, axis=-1), 1.0, rtol=1e-5)


def test_continuous_warmup_then_kmeans_codebook():
  """model.vq_warmup_steps: the queries bypass the quantizer (and Eq. 9 is off) until the step
  counter reaches it; at that step the codebook moves onto a k-means of the step's tokens."""
  from configs import synthetic
  from qdformer_jax.models import build_model
  c = synthetic.get_config('smoke')
  c.model.vq_warmup_steps = 2
  model = build_model(c, 0)
  rng = np.random.default_rng(0)
  frames = jnp.asarray(rng.integers(0, 255, (1, 2, 32, 32, 3), np.uint8))
  log_mel = jnp.asarray(rng.standard_normal((1, 2, 96, 64)).astype(np.float32))
  book0 = np.asarray(model.quantizer.codebook[...]).copy()
  for step in range(1, 4):
    out = model(frames, log_mel, train=False)
    vq = out['vq']
    assert float(vq['active']) == (1.0 if step > 2 else 0.0)
    model.train_diagnostics(out, jax.random.key(step))
    book = np.asarray(model.quantizer.codebook[...])
    if step < 2:
      np.testing.assert_array_equal(book, book0)
    if step == 2:   # k-means on this step's tokens: every codeword is a (scaled) mean of tokens
      assert not np.allclose(book, book0)
      np.testing.assert_allclose(np.linalg.norm(book, axis=-1), np.sqrt(book.shape[-1]), rtol=1e-4)
  assert int(model.bottleneck_step[...]) == 3
  assert int(model.bottleneck_opens_at[...]) == 2   # state: restored with a checkpoint, as the counter
