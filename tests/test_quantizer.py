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
