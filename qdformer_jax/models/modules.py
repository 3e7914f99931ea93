"""Small building blocks shared by the QDFormer head: MLPs, conv+GroupNorm, sine embeddings."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def group_count(channels: int, preferred: int = 32) -> int:
  """The largest group count <= ``preferred`` that divides ``channels`` (GroupNorm(32) at d=256)."""
  return math.gcd(channels, preferred)


class MLP(nnx.Module):
  """``num_layers`` Linear layers with ReLU between them (DETR's MLP)."""

  def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, *,
               dtype=jnp.float32, rngs: nnx.Rngs, last_init=None):
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
      kwargs = {}
      if last_init is not None and i == num_layers - 1:
        kwargs['kernel_init'] = last_init
      layers.append(nnx.Linear(a, b, dtype=dtype, rngs=rngs, **kwargs))
    self.layers = nnx.List(layers)

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x


class ConvGN(nnx.Module):
  """Conv (k×k, stride s) + GroupNorm, optionally followed by ReLU."""

  def __init__(self, in_dim: int, out_dim: int, kernel: int = 1, stride: int = 1, *, relu: bool = False,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.conv = nnx.Conv(in_dim, out_dim, (kernel, kernel), strides=stride, padding='SAME' if kernel > 1 else 'VALID',
                         dtype=dtype, kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs)
    self.norm = nnx.GroupNorm(out_dim, num_groups=group_count(out_dim), epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.relu = relu

  def __call__(self, x):
    x = self.norm(self.conv(x))
    return jax.nn.relu(x) if self.relu else x


def sine_embedding_1d(length: int, dim: int, temperature: float = 10000.0) -> jax.Array:
  """Fixed sinusoidal embedding [length, dim] for the temporal position of audio tokens."""
  pos = jnp.arange(length, dtype=jnp.float32)[:, None]
  freq = temperature ** (2 * (jnp.arange(dim // 2, dtype=jnp.float32)) / dim)
  angles = pos / freq[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def inverse_sigmoid(x, eps: float = 1e-5):
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.log(jnp.clip(x, eps) / jnp.clip(1.0 - x, eps))
