"""The shared vector-quantization codebook (paper Eq. 2, 9) with a straight-through estimator.

One codebook serves the N global semantic tokens and, frozen, the local ones: global tokens pull the
codebook towards themselves (the first term of Eq. 9, computed by the loss from ``codes``), local tokens
only commit to it (their codes are gathered from ``stop_gradient(codebook)``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class VectorQuantizer(nnx.Module):
  """Nearest-codeword (L2) quantization against a [K, d] codebook."""

  def __init__(self, num_codes: int, dim: int, *, rngs: nnx.Rngs):
    self.num_codes = num_codes
    # Tokens leave LayerNorm-ed decoders at unit scale per channel: a unit-variance init starts the
    # codewords where the tokens are, which keeps early assignments spread over the codebook.
    self.codebook = nnx.Param(jax.random.normal(rngs.params(), (num_codes, dim), jnp.float32))

  def __call__(self, tokens: jax.Array, *, update_codebook: bool = True) -> dict:
    """tokens [..., d] -> dict(quantized (straight-through), codes, indices).

    ``codes`` = codebook[indices], differentiable w.r.t. the codebook when ``update_codebook`` (for the
    codebook term of Eq. 9); with ``update_codebook=False`` they come from the stop-gradient codebook.
    ``quantized`` = tokens + sg(codes - tokens): forward value the codeword, gradient the identity.
    """
    codebook = self.codebook[...]
    if not update_codebook:
      codebook = jax.lax.stop_gradient(codebook)
    flat = tokens.reshape(-1, tokens.shape[-1]).astype(jnp.float32)
    distances = (jnp.sum(flat ** 2, -1, keepdims=True) - 2.0 * flat @ jax.lax.stop_gradient(codebook).T
                 + jnp.sum(jax.lax.stop_gradient(codebook) ** 2, -1)[None, :])
    indices = jnp.argmin(distances, axis=-1).reshape(tokens.shape[:-1]).astype(jnp.int32)
    codes = jnp.take(codebook, indices, axis=0).astype(tokens.dtype)
    quantized = tokens + jax.lax.stop_gradient(codes - tokens)
    return {'quantized': quantized, 'codes': codes, 'indices': indices}


def codebook_usage(indices: jax.Array, num_codes: int, valid: jax.Array | None = None) -> dict:
  """Perplexity of the code histogram and the number of codes unused in ``indices`` (any shape)."""
  one_hot = jax.nn.one_hot(indices.reshape(-1), num_codes, dtype=jnp.float32)
  if valid is not None:
    one_hot = one_hot * valid.reshape(-1, 1).astype(jnp.float32)
  counts = one_hot.sum(0)
  probs = counts / jnp.maximum(counts.sum(), 1.0)
  perplexity = jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10)))
  return {'perplexity': perplexity, 'dead_codes': jnp.sum(counts == 0).astype(jnp.float32)}
