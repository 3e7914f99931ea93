"""Dense multi-head attention, the transformer feed-forward block and a DETR decoder layer.

Layout is batch-major, `[B, length, d_model]`. Parameters are float32; `dtype` is the compute dtype
(float32 or bfloat16). Softmax is evaluated in float32. Masks follow the JAX convention:
`True` marks a key that may be attended.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype, kernel_init=xavier_uniform,
           bias_init=zeros) -> nnx.Linear:
  """An `nnx.Linear` with float32 parameters, compute dtype `dtype`, xavier kernel and zero bias."""
  return nnx.Linear(in_features, out_features, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)


def layer_norm(d_model: int, *, rngs: nnx.Rngs, dtype) -> nnx.LayerNorm:
  """`nnx.LayerNorm` with PyTorch's epsilon (1e-5) and float32 parameters."""
  return nnx.LayerNorm(d_model, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def with_pos(x: jnp.ndarray, pos: jnp.ndarray | None) -> jnp.ndarray:
  """`x + pos`, or `x` when `pos` is None."""
  return x if pos is None else x + pos.astype(x.dtype)


class MultiHeadAttention(nnx.Module):
  """Scaled dot-product attention with `n_heads` heads (as `torch.nn.MultiheadAttention`).

  Separate query/key/value projections `d_model -> d_model` and an output projection, xavier-uniform
  kernels and zero biases (DETR's initialisation); dropout on the attention probabilities.
  """

  def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    if d_model % n_heads != 0:
      raise ValueError(f"MultiHeadAttention: d_model={d_model} must be divisible by n_heads={n_heads}")
    self.d_model = d_model
    self.n_heads = n_heads
    self.dtype = dtype
    self.q_proj = linear(d_model, d_model, rngs=rngs, dtype=dtype)
    self.k_proj = linear(d_model, d_model, rngs=rngs, dtype=dtype)
    self.v_proj = linear(d_model, d_model, rngs=rngs, dtype=dtype)
    self.out_proj = linear(d_model, d_model, rngs=rngs, dtype=dtype)
    self.attn_drop = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray,
               key_mask: jnp.ndarray | None = None, deterministic: bool = True) -> jnp.ndarray:
    """Attend `query [B,Q,d]` to `key [B,S,d]` / `value [B,S,d]`; returns `[B,Q,d]`.

    `key_mask` bool `[B,S]`: False keys get zero attention weight. A query whose keys are all masked
    attends uniformly to them (the masked logit is a large finite negative, never -inf, so no NaN).
    """
    b, q_len, _ = query.shape
    s_len = key.shape[1]
    if key.shape[:2] != value.shape[:2]:
      raise ValueError(f"MultiHeadAttention: key {key.shape} and value {value.shape} lengths differ")
    dh = self.d_model // self.n_heads
    q = self.q_proj(query).reshape(b, q_len, self.n_heads, dh)
    k = self.k_proj(key).reshape(b, s_len, self.n_heads, dh)
    v = self.v_proj(value).reshape(b, s_len, self.n_heads, dh)
    logits = jnp.einsum("bqhc,bshc->bhqs", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(dh))
    if key_mask is not None:
      if key_mask.shape != (b, s_len):
        raise ValueError(f"MultiHeadAttention: key_mask shape {key_mask.shape} != (B, S) = {(b, s_len)}")
      logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = self.attn_drop(probs, deterministic=deterministic).astype(v.dtype)
    out = jnp.einsum("bhqs,bshc->bqhc", probs, v).reshape(b, q_len, self.d_model)
    return self.out_proj(out)


class FeedForward(nnx.Module):
  """`linear2(dropout(relu(linear1(x))))`, d_model -> ffn_dim -> d_model."""

  def __init__(self, d_model: int, ffn_dim: int, dropout: float = 0.0, *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.linear1 = linear(d_model, ffn_dim, rngs=rngs, dtype=dtype)
    self.linear2 = linear(ffn_dim, d_model, rngs=rngs, dtype=dtype)
    self.drop = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    return self.linear2(self.drop(jax.nn.relu(self.linear1(x)), deterministic=deterministic))


class TransformerDecoderLayer(nnx.Module):
  """DETR post-norm decoder layer: self-attention, cross-attention to `memory`, FFN.

  tgt = LN1(tgt + drop(SA(q=k=tgt+query_pos, v=tgt)))
  tgt = LN2(tgt + drop(CA(q=tgt+query_pos, k=memory+memory_pos, v=memory)))
  tgt = LN3(tgt + drop(FFN(tgt)))
  """

  def __init__(self, d_model: int, n_heads: int, ffn_dim: int = 2048, dropout: float = 0.1, *,
               rngs: nnx.Rngs, dtype=jnp.float32):
    self.self_attn = MultiHeadAttention(d_model, n_heads, dropout, rngs=rngs, dtype=dtype)
    self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout, rngs=rngs, dtype=dtype)
    self.ffn = FeedForward(d_model, ffn_dim, dropout, rngs=rngs, dtype=dtype)
    self.norm1 = layer_norm(d_model, rngs=rngs, dtype=dtype)
    self.norm2 = layer_norm(d_model, rngs=rngs, dtype=dtype)
    self.norm3 = layer_norm(d_model, rngs=rngs, dtype=dtype)
    self.drop1 = nnx.Dropout(dropout, rngs=rngs)
    self.drop2 = nnx.Dropout(dropout, rngs=rngs)
    self.drop3 = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, tgt: jnp.ndarray, memory: jnp.ndarray, query_pos: jnp.ndarray | None = None,
               memory_pos: jnp.ndarray | None = None, memory_mask: jnp.ndarray | None = None,
               deterministic: bool = True) -> jnp.ndarray:
    """`tgt [B,Q,d]`, `memory [B,S,d]`, optional positions of the same shapes and `memory_mask`
    bool `[B,S]` (True = memory token may be attended); returns the updated `tgt [B,Q,d]`."""
    q = with_pos(tgt, query_pos)
    tgt = self.norm1(tgt + self.drop1(self.self_attn(q, q, tgt, deterministic=deterministic),
                                      deterministic=deterministic))
    attended = self.cross_attn(with_pos(tgt, query_pos), with_pos(memory, memory_pos), memory,
                               key_mask=memory_mask, deterministic=deterministic)
    tgt = self.norm2(tgt + self.drop2(attended, deterministic=deterministic))
    tgt = self.norm3(tgt + self.drop3(self.ffn(tgt, deterministic=deterministic),
                                      deterministic=deterministic))
    return tgt
