"""The shared vector-quantization codebook (paper Eq. 2, 9) with a straight-through estimator.

One codebook serves the N global semantic tokens and, frozen, the local ones: global tokens pull the
codebook towards themselves (the first term of Eq. 9, computed by the loss from ``codes``), local tokens
only commit to it (their codes are gathered from ``stop_gradient(codebook)``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class CodebookUsage(nnx.Variable):
  """EMA of how often each codeword is chosen (not trained; used to restart dead codewords)."""


class VectorQuantizer(nnx.Module):
  """Nearest-codeword (L2) quantization against a [K, d] codebook."""

  def __init__(self, num_codes: int, dim: int, *, normalize: bool = False, rngs: nnx.Rngs):
    self.num_codes = num_codes
    self.normalize = normalize
    # Tokens leave LayerNorm-ed decoders at unit scale per channel, so unit-variance codewords are on
    # the tokens' scale. They are not where the tokens are: measured at init on the synthetic task, a
    # slot's local tokens agree to cosine 0.994 across clips, so each slot starts on one fixed
    # codeword; dead-code restarts (model.vq_restart_dead) move codewords into those clusters.
    self.codebook = nnx.Param(jax.random.normal(rngs.params(), (num_codes, dim), jnp.float32))
    self.usage = CodebookUsage(jnp.full((num_codes,), 1.0 / num_codes, jnp.float32))

  def __call__(self, tokens: jax.Array, *, update_codebook: bool = True) -> dict:
    """tokens [..., d] -> dict(quantized (straight-through), codes, indices, tokens).

    ``codes`` = codebook[indices], differentiable w.r.t. the codebook when ``update_codebook`` (for the
    codebook term of Eq. 9); with ``update_codebook=False`` they come from the stop-gradient codebook.
    ``quantized`` = tokens + sg(codes - tokens): forward value the codeword, gradient the identity.

    With ``normalize`` (cosine codebook, as in ViT-VQGAN) tokens and codewords are projected onto
    the sphere of radius sqrt(d) before the lookup, so no codeword can win every token by shrinking
    towards their mean (the collapse mode of the plain L2 codebook); ``tokens`` in the result are the
    projected tokens that the commitment terms of Eq. 9 then apply to.
    """
    codebook = self.codebook[...]
    if not update_codebook:
      codebook = jax.lax.stop_gradient(codebook)
    if self.normalize:
      scale = jnp.sqrt(jnp.float32(tokens.shape[-1]))
      tokens = scale * tokens * jax.lax.rsqrt(jnp.sum(jnp.square(tokens), -1, keepdims=True) + 1e-12)
      codebook = scale * codebook * jax.lax.rsqrt(jnp.sum(jnp.square(codebook), -1, keepdims=True) + 1e-12)
    flat = tokens.reshape(-1, tokens.shape[-1]).astype(jnp.float32)
    distances = (jnp.sum(flat ** 2, -1, keepdims=True) - 2.0 * flat @ jax.lax.stop_gradient(codebook).T
                 + jnp.sum(jax.lax.stop_gradient(codebook) ** 2, -1)[None, :])
    indices = jnp.argmin(distances, axis=-1).reshape(tokens.shape[:-1]).astype(jnp.int32)
    codes = jnp.take(codebook, indices, axis=0).astype(tokens.dtype)
    quantized = tokens + jax.lax.stop_gradient(codes - tokens)
    return {'quantized': quantized, 'codes': codes, 'indices': indices, 'tokens': tokens}


  def restart_dead_codes(self, tokens: jax.Array, indices: jax.Array, key: jax.Array, *,
                         decay: float = 0.95, threshold: float = 0.1) -> jax.Array:
    """Updates the usage EMA with this batch and moves dead codewords onto random batch tokens.

    A codeword is dead when its usage EMA falls below ``threshold`` times the uniform rate 1/K. A
    codeword far from every token never wins the nearest-neighbour lookup, so neither Eq. 9 nor the
    task loss ever moves it; restarting it on a real token (as Jukebox and SoundStream do) puts it
    back where the tokens are. Runs on the device, inside the train step, after the optimizer update.
    Returns the number of restarted codewords.
    """
    flat = jax.lax.stop_gradient(tokens).reshape(-1, tokens.shape[-1]).astype(jnp.float32)
    counts = jax.nn.one_hot(indices.reshape(-1), self.num_codes, dtype=jnp.float32).mean(0)
    usage = decay * self.usage[...] + (1.0 - decay) * counts
    dead = usage < threshold / self.num_codes
    picks = jax.random.randint(key, (self.num_codes,), 0, flat.shape[0])
    self.codebook[...] = jnp.where(dead[:, None], flat[picks], self.codebook[...])
    self.usage[...] = jnp.where(dead, 1.0 / self.num_codes, usage)
    return jnp.sum(dead).astype(jnp.float32)


def codebook_usage(indices: jax.Array, num_codes: int, valid: jax.Array | None = None) -> dict:
  """Perplexity of the code histogram and the number of codes unused in ``indices`` (any shape)."""
  one_hot = jax.nn.one_hot(indices.reshape(-1), num_codes, dtype=jnp.float32)
  if valid is not None:
    one_hot = one_hot * valid.reshape(-1, 1).astype(jnp.float32)
  counts = one_hot.sum(0)
  probs = counts / jnp.maximum(counts.sum(), 1.0)
  perplexity = jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10)))
  return {'perplexity': perplexity, 'dead_codes': jnp.sum(counts == 0).astype(jnp.float32)}
