"""The shared codebook (paper Eq. 2, 9) and its alternatives, with their gradient estimators.

One quantizer serves the N global semantic tokens and, frozen, the local ones: global tokens pull the
codebook towards themselves (the first term of Eq. 9, computed by the loss from ``codes``, or an EMA
of the assigned tokens with ``ema_decay``), local tokens only commit to it (their codes are gathered
from ``stop_gradient(codebook)``).

  VectorQuantizer  nearest codeword (L2 or cosine) of a learned [K, d] codebook; the gradient reaches
                   the tokens by the straight-through identity or by the rotation trick
  FSQ              finite scalar quantization (Mentzer et al., 2023): project to a few channels,
                   bound, round each to a fixed grid; no codebook to learn, nothing can collapse
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

sg = jax.lax.stop_gradient


class CodebookUsage(nnx.Variable):
  """EMA of how often each codeword is chosen (not trained; used to restart dead codewords)."""


class CodebookEMA(nnx.Variable):
  """EMA codebook statistics (VQ-VAE-2): assignment counts [K] and assigned-token sums [K, d]."""


class Codebook(nnx.Variable):
  """A codebook moved by its EMA statistics, not by the optimizer (``ema_decay`` > 0)."""


class BottleneckStep(nnx.Variable):
  """Train steps taken so far (``model.vq_warmup_steps``: the bottleneck opens when it reaches it)."""


def _unit(x, eps=1e-12):
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), -1, keepdims=True) + eps)


def rotation_trick(tokens: jax.Array, codes: jax.Array) -> jax.Array:
  """Fifty et al. (2024): forward value ``codes``; backward, the gradient reaching ``tokens`` is the
  output gradient carried through the (fixed) rotation-and-rescale that maps each token onto its code.

  With u = z/‖z‖, q = e/‖e‖, r = (u+q)/‖u+q‖: R = I − 2rrᵀ + 2quᵀ rotates u onto q, and the output is
  sg(‖e‖/‖z‖) · sg(R) z, so ∂out/∂z = (‖e‖/‖z‖) R. Unlike the identity straight-through gradient, it
  tells tokens on either side of a code apart (their gradients are rotated differently).
  """
  dtype = jnp.promote_types(tokens.dtype, jnp.float32)
  z = tokens.astype(dtype)
  e = sg(codes.astype(dtype))
  z_norm = jnp.sqrt(jnp.sum(jnp.square(sg(z)), -1, keepdims=True) + 1e-12)
  e_norm = jnp.sqrt(jnp.sum(jnp.square(e), -1, keepdims=True) + 1e-12)
  u, q = sg(z) / z_norm, e / e_norm
  r = _unit(u + q)
  rotated = z - 2.0 * r * jnp.sum(r * z, -1, keepdims=True) + 2.0 * q * jnp.sum(u * z, -1, keepdims=True)
  out = (e_norm / z_norm) * rotated
  return (out + sg(e - out)).astype(tokens.dtype)  # exact forward value despite rounding


class VectorQuantizer(nnx.Module):
  """Nearest-codeword quantization against a [K, d] codebook.

  normalize: cosine codebook (tokens and codewords on the sphere of radius √d, as in ViT-VQGAN).
  gradient: 'ste' (identity straight-through, the paper's) or 'rotation' (``rotation_trick``).
  ema_decay: > 0 moves the codebook by an EMA of the assigned global tokens (``ema_update``) instead
    of the optimizer; the codebook term of Eq. 9 then has no parameter to reach.
  """

  def __init__(self, num_codes: int, dim: int, *, normalize: bool = False, gradient: str = 'ste',
               ema_decay: float = 0.0, rngs: nnx.Rngs):
    if gradient not in ('ste', 'rotation'):
      raise ValueError(f"model.vq_gradient must be 'ste' or 'rotation', got {gradient!r}")
    if not 0.0 <= ema_decay < 1.0:
      raise ValueError(f'model.vq_ema_decay must be in [0, 1), got {ema_decay}')
    self.num_codes = num_codes
    self.normalize = normalize
    self.gradient = gradient
    self.ema_decay = float(ema_decay)
    # Tokens leave LayerNorm-ed decoders at unit scale per channel, so unit-variance codewords are on
    # the tokens' scale. They are not where the tokens are: measured at init on the synthetic task, a
    # slot's local tokens agree to cosine 0.994 across clips, so each slot starts on one fixed
    # codeword; dead-code restarts (model.vq_restart_dead) move codewords into those clusters.
    init = jax.random.normal(rngs.params(), (num_codes, dim), jnp.float32)
    if self.ema_decay > 0:
      self.codebook = Codebook(init)
      self.ema_counts = CodebookEMA(jnp.ones((num_codes,), jnp.float32))
      self.ema_sums = CodebookEMA(init)
    else:
      self.codebook = nnx.Param(init)
    self.usage = CodebookUsage(jnp.full((num_codes,), 1.0 / num_codes, jnp.float32))

  def lookup_space(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(tokens, codebook) as the lookup compares them (on the √d sphere with ``normalize``)."""
    codebook = self.codebook[...]
    if self.normalize:
      scale = jnp.sqrt(jnp.float32(tokens.shape[-1]))
      tokens = scale * tokens * jax.lax.rsqrt(jnp.sum(jnp.square(tokens), -1, keepdims=True) + 1e-12)
      codebook = scale * codebook * jax.lax.rsqrt(jnp.sum(jnp.square(codebook), -1, keepdims=True) + 1e-12)
    return tokens, codebook

  def __call__(self, tokens: jax.Array, *, update_codebook: bool = True) -> dict:
    """tokens [..., d] -> dict(quantized, codes, indices, tokens, sqdist).

    ``codes`` = codebook[indices], differentiable w.r.t. the codebook when ``update_codebook`` (for the
    codebook term of Eq. 9); with ``update_codebook=False`` they come from the stop-gradient codebook.
    ``quantized`` has the forward value of ``codes`` and the gradient of ``gradient`` w.r.t. the tokens.
    ``tokens`` are the tokens the lookup compared (projected onto the sphere with ``normalize``), to
    which the commitment terms of Eq. 9 apply; ``sqdist`` [..., K] their squared distances to every
    codeword (stop-gradient codebook), for soft assignments.
    """
    tokens, codebook = self.lookup_space(tokens)
    if not update_codebook or self.ema_decay > 0:
      codebook = sg(codebook)
    flat = tokens.reshape(-1, tokens.shape[-1]).astype(jnp.float32)
    book = sg(codebook)
    sqdist = jnp.sum(flat ** 2, -1, keepdims=True) - 2.0 * flat @ book.T + jnp.sum(book ** 2, -1)[None, :]
    indices = jnp.argmin(sqdist, axis=-1).reshape(tokens.shape[:-1]).astype(jnp.int32)
    codes = jnp.take(codebook, indices, axis=0).astype(tokens.dtype)
    if self.gradient == 'rotation':
      quantized = rotation_trick(tokens, codes)
    else:
      quantized = tokens + sg(codes - tokens)
    return {'quantized': quantized, 'codes': codes, 'indices': indices, 'tokens': tokens,
            'sqdist': sqdist.reshape(*tokens.shape[:-1], self.num_codes)}

  def ema_update(self, tokens: jax.Array, indices: jax.Array) -> None:
    """counts ← γ·counts + (1−γ)·n_k, sums ← γ·sums + (1−γ)·Σ_{idx=k} z, codeword k ← sums_k / counts_k
    (counts Laplace-smoothed), over the (global-batch) ``tokens`` [..., d] assigned ``indices`` [...]."""
    decay = self.ema_decay
    flat = sg(tokens).reshape(-1, tokens.shape[-1]).astype(jnp.float32)
    one_hot = jax.nn.one_hot(indices.reshape(-1), self.num_codes, dtype=jnp.float32)
    counts = decay * self.ema_counts[...] + (1.0 - decay) * one_hot.sum(0)
    sums = decay * self.ema_sums[...] + (1.0 - decay) * one_hot.T @ flat
    total = jnp.sum(counts)
    smoothed = (counts + 1e-5) / (total + self.num_codes * 1e-5) * total
    self.ema_counts[...] = counts
    self.ema_sums[...] = sums
    self.codebook[...] = sums / smoothed[:, None]

  def restart_dead_codes(self, tokens: jax.Array, indices: jax.Array, key: jax.Array, *,
                         decay: float = 0.95, threshold: float = 0.1) -> jax.Array:
    """Updates the usage EMA with this batch and moves dead codewords onto random batch tokens.

    A codeword is dead when its usage EMA falls below ``threshold`` times the uniform rate 1/K. A
    codeword far from every token never wins the nearest-neighbour lookup, so neither Eq. 9 nor the
    task loss ever moves it; restarting it on a real token (as Jukebox and SoundStream do) puts it
    back where the tokens are. Runs on the device, inside the train step, after the optimizer update.
    Returns the number of restarted codewords.
    """
    flat = sg(tokens).reshape(-1, tokens.shape[-1]).astype(jnp.float32)
    counts = jax.nn.one_hot(indices.reshape(-1), self.num_codes, dtype=jnp.float32).mean(0)
    usage = decay * self.usage[...] + (1.0 - decay) * counts
    dead = usage < threshold / self.num_codes
    picks = jax.random.randint(key, (self.num_codes,), 0, flat.shape[0])
    self.codebook[...] = jnp.where(dead[:, None], flat[picks], self.codebook[...])
    if self.ema_decay > 0:  # the restarted codeword's statistics start from its one token
      self.ema_counts[...] = jnp.where(dead, 1.0, self.ema_counts[...])
      self.ema_sums[...] = jnp.where(dead[:, None], flat[picks], self.ema_sums[...])
    self.usage[...] = jnp.where(dead, 1.0 / self.num_codes, usage)
    return jnp.sum(dead).astype(jnp.float32)

  def kmeans_init(self, tokens: jax.Array, key: jax.Array) -> None:
    """Every codeword onto a k-means centre of ``tokens`` (cosine k-means for a cosine codebook, then
    scaled to the √d sphere); usage statistics restart uniform, EMA statistics from the centres."""
    flat = tokens.reshape(-1, tokens.shape[-1])
    centres = kmeans(flat, self.num_codes, key, spherical=self.normalize)
    if self.normalize:
      centres = centres * jnp.sqrt(jnp.float32(flat.shape[-1]))
    self.codebook[...] = centres.astype(self.codebook[...].dtype)
    self.usage[...] = jnp.full((self.num_codes,), 1.0 / self.num_codes, jnp.float32)
    if self.ema_decay > 0:
      self.ema_counts[...] = jnp.ones((self.num_codes,), jnp.float32)
      self.ema_sums[...] = centres


def kmeans(tokens: jax.Array, num_codes: int, key: jax.Array, *, iterations: int = 10,
           spherical: bool = False) -> jax.Array:
  """Lloyd's k-means of ``tokens`` [M, d] into ``num_codes`` centres, started on distinct random
  tokens (with replacement when M < K); an empty cluster keeps its centre. With ``spherical`` the
  tokens and centres are compared by cosine (centres re-normalised each iteration). -> [K, d]."""
  x = sg(tokens).astype(jnp.float32)
  if spherical:
    x = _unit(x)
  m = x.shape[0]
  picks = jax.random.choice(key, m, (num_codes,), replace=m < num_codes)
  centres = x[picks]

  def step(_, centres):
    d2 = jnp.sum(x ** 2, -1, keepdims=True) - 2.0 * x @ centres.T + jnp.sum(centres ** 2, -1)[None]
    one_hot = jax.nn.one_hot(jnp.argmin(d2, -1), num_codes, dtype=jnp.float32)
    counts = one_hot.sum(0)
    means = (one_hot.T @ x) / jnp.maximum(counts, 1.0)[:, None]
    if spherical:
      means = _unit(means)
    return jnp.where(counts[:, None] > 0, means, centres)

  return jax.lax.fori_loop(0, iterations, step, centres)


def round_ste(x: jax.Array) -> jax.Array:
  """round(x) forward, identity backward."""
  return x + sg(jnp.round(x) - x)


class FSQ(nnx.Module):
  """Finite scalar quantization (Mentzer et al., 2023) of d-wide tokens.

  z = W_in·token (len(levels) channels); each channel is bounded to L_j values by
  ⌊L_j/2⌋·tanh (with a half-step offset for even L_j) and rounded (straight-through); the grid point,
  scaled to [-1, 1], is mapped back to d channels by W_out. The implicit codebook is the grid: K = Π L_j
  codes, every one reachable, none to learn or restart. ``codes`` = ``quantized`` (no Eq. 9 term applies;
  the FSQ configs set the quantization loss weights to 0).
  """

  def __init__(self, dim: int, levels, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.levels = tuple(int(x) for x in levels)
    if not self.levels or min(self.levels) < 2:
      raise ValueError(f'model.fsq_levels must be integers >= 2, got {levels!r}')
    self.num_codes = math.prod(self.levels)
    self.project_in = nnx.Linear(dim, len(self.levels), dtype=dtype, rngs=rngs)
    self.project_out = nnx.Linear(len(self.levels), dim, dtype=dtype, rngs=rngs)

  def bound(self, z: jax.Array) -> jax.Array:
    """Each channel squashed to (−⌊L/2⌋ − offset, ⌊L/2⌋ − offset) so its rounding takes L values."""
    levels = jnp.asarray(self.levels, jnp.float32)
    half = (levels - 1.0) * (1.0 + 1e-3) / 2.0
    offset = jnp.where(levels % 2 == 0, 0.5, 0.0)
    shift = jnp.arctanh(offset / half)
    return jnp.tanh(z + shift) * half - offset

  def __call__(self, tokens: jax.Array, *, update_codebook: bool = True) -> dict:
    del update_codebook  # nothing to freeze: the grid is fixed and W_in / W_out are shared
    levels = jnp.asarray(self.levels, jnp.float32)
    z = self.project_in(tokens).astype(jnp.float32)
    rounded = round_ste(self.bound(z))
    half_width = jnp.floor(levels / 2.0)
    quantized = self.project_out((rounded / half_width).astype(tokens.dtype))
    digits = (jnp.round(sg(rounded)) + half_width).astype(jnp.int32)  # 0 .. L_j - 1
    radix = jnp.asarray([math.prod(self.levels[:j]) for j in range(len(self.levels))], jnp.int32)
    indices = jnp.sum(digits * radix, -1)
    return {'quantized': quantized, 'codes': quantized, 'indices': indices, 'tokens': tokens}


def codebook_usage(indices: jax.Array, num_codes: int, valid: jax.Array | None = None) -> dict:
  """Perplexity of the code histogram and the number of codes unused in ``indices`` (any shape)."""
  one_hot = jax.nn.one_hot(indices.reshape(-1), num_codes, dtype=jnp.float32)
  if valid is not None:
    one_hot = one_hot * valid.reshape(-1, 1).astype(jnp.float32)
  counts = one_hot.sum(0)
  probs = counts / jnp.maximum(counts.sum(), 1.0)
  perplexity = jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10)))
  return {'perplexity': perplexity, 'dead_codes': jnp.sum(counts == 0).astype(jnp.float32)}


def per_slot_perplexity(indices: jax.Array, num_codes: int, valid: jax.Array) -> jax.Array:
  """Mean over slots of the perplexity of each slot's code histogram; ``indices`` [..., N], ``valid``
  [...] (the leading axes). Slot identity alone gives 1 here (N for a histogram pooled over slots)."""
  n = indices.shape[-1]
  one_hot = jax.nn.one_hot(indices.reshape(-1, n), num_codes, dtype=jnp.float32)  # [M, N, K]
  one_hot = one_hot * valid.reshape(-1, 1, 1).astype(jnp.float32)
  counts = one_hot.sum(0)
  probs = counts / jnp.maximum(counts.sum(-1, keepdims=True), 1.0)
  return jnp.mean(jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10), -1)))
