"""Small layers shared by the backbones: frozen BatchNorm, its variable types, parameter counting.

Variable types
--------------
- `Frozen` (base, an `nnx.Variable` that is NOT an `nnx.Param`): values loaded from a checkpoint and
  never trained. An optimizer built with `wrt=nnx.Param` never sees them, and `nnx.grad` over
  `nnx.Param` never differentiates them.
- `FrozenAffine(Frozen)`: the affine weight/bias of a frozen BatchNorm. PyTorch counts these as
  parameters (`model.parameters()`), so `count_params` counts them too.
- `FrozenStat(Frozen)`: BatchNorm running mean/variance (PyTorch buffers, not counted).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

# model.remat -> the jax.checkpoint policy of each rematerialised block (backbone blocks, encoder and
# decoder layers): 'none' keeps every activation for the backward pass; 'blocks' keeps only each
# block's inputs and recomputes the block in the backward pass (least memory, one more forward);
# 'dots_saveable' also keeps the outputs of its matmuls and convolutions and recomputes only the
# cheap elementwise ops between them (norms, activations, residual adds); 'dots_no_batch' keeps only
# the matmuls without batch dimensions (the linear layers, not the attention einsums or convolutions).
REMAT_POLICIES = {
    'none': None,
    'blocks': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(policy: str, field: str = 'model.remat') -> str:
  """``policy`` if it names a REMAT_POLICIES entry, else a ValueError naming the config ``field``."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f'{field} must be one of {list(REMAT_POLICIES)}, got {policy!r}.')
  return policy


def remat(fn: Callable, policy: str) -> Callable:
  """``fn(module, *arrays)`` rematerialised in the backward pass with ``policy`` (a REMAT_POLICIES key).

  The values are those of ``fn``: rematerialisation recomputes the same operations on the same
  inputs (dropout draws included, their keys are inputs), it only trades memory for compute. Python
  values the block needs (shapes, flags) must be closed over by ``fn``, not passed as arguments.
  """
  if check_remat(policy) == 'none':
    return fn
  return nnx.remat(fn, policy=REMAT_POLICIES[policy], prevent_cse=True)


def resolve_dtype(dtype: Any, field: str = 'dtype') -> Any:
  """'float32' | 'bfloat16' | 'float16' | a jnp dtype -> the jnp dtype; an unknown name raises,
  naming the config ``field`` it came from."""
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f'{field} must be one of {sorted(DTYPES)}, got {dtype!r}.')
    return DTYPES[dtype]
  return dtype


class Frozen(nnx.Variable):
  """Base type of values that are loaded, stored and never updated by training."""


class FrozenAffine(Frozen):
  """Affine weight/bias of a frozen BatchNorm (counted as parameters, as PyTorch does)."""


class FrozenStat(Frozen):
  """Running statistics of a frozen BatchNorm (buffers in PyTorch, not counted as parameters)."""


class FrozenBatchNorm(nnx.Module):
  """BatchNorm with fixed statistics and affine: y = (x - mean) / sqrt(var + eps) * weight + bias.

  Names follow `torch.nn.BatchNorm2d` (`weight`, `bias`, `running_mean`, `running_var`) so a
  converted state_dict maps one to one. Normalises the last axis (NHWC). The folded scale/shift are
  computed in float32 and the result is cast to `dtype` (the compute dtype).
  """

  def __init__(self, num_features: int, *, eps: float = 1e-5, dtype: Any = jnp.float32):
    self.num_features = num_features
    self.eps = eps
    self.dtype = dtype
    self.weight = FrozenAffine(jnp.ones((num_features,), jnp.float32))
    self.bias = FrozenAffine(jnp.zeros((num_features,), jnp.float32))
    self.running_mean = FrozenStat(jnp.zeros((num_features,), jnp.float32))
    self.running_var = FrozenStat(jnp.ones((num_features,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + self.eps)
    shift = self.bias[...] - self.running_mean[...] * scale
    scale = jax.lax.stop_gradient(scale).astype(self.dtype)
    shift = jax.lax.stop_gradient(shift).astype(self.dtype)
    return x.astype(self.dtype) * scale + shift


def conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, *, padding: int | None = None,
         use_bias: bool = False, dtype: Any = jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
  """A 2-D NHWC convolution with PyTorch-style symmetric padding (default kernel // 2).

  Explicit symmetric padding reproduces `torch.nn.Conv2d(padding=k//2)` exactly for every stride
  (JAX's 'SAME' pads asymmetrically for stride 2). Kernel init is He-normal (fan_out), as torchvision.
  """
  pad = kernel // 2 if padding is None else padding
  return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=dtype,
                  param_dtype=jnp.float32,
                  kernel_init=nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal'), rngs=rngs)


def max_pool(x: jax.Array, kernel: int, stride: int, padding: int = 0) -> jax.Array:
  """NHWC max pooling with -inf padding, as `torch.nn.MaxPool2d(kernel, stride, padding)`."""
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, kernel, kernel, 1), (1, stride, stride, 1),
      ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def count_params(module_or_state: Any) -> int:
  """Number of trainable-or-frozen parameters as PyTorch's `sum(p.numel() for p in parameters())`.

  Counts `nnx.Param` and `FrozenAffine` leaves (BatchNorm weight/bias), not `FrozenStat` (running
  statistics, PyTorch buffers). Works on an abstract module from `nnx.eval_shape` (no allocation).
  """
  counted = nnx.Any(nnx.Param, FrozenAffine)
  if isinstance(module_or_state, nnx.Module):
    state = nnx.state(module_or_state, counted)
  else:
    state = nnx.State(module_or_state).filter(counted)
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(state)))


def path_prefix_filter(prefixes: Sequence[tuple], *, of_type: Any = nnx.Param
                       ) -> Callable[[tuple, Any], bool]:
  """An NNX filter `(path, value) -> bool` true for `of_type` variables under any of `prefixes`.

  A prefix is a tuple of path elements (attribute names / list indices) from the root of the state
  the filter is applied to, e.g. `('backbone', 'layer1')`.
  """
  prefixes = tuple(tuple(p) for p in prefixes)
  type_filter = nnx.filterlib.to_predicate(of_type)

  def predicate(path: tuple, value: Any) -> bool:
    if not type_filter(path, value):
      return False
    path = tuple(path)
    return any(path[:len(p)] == p for p in prefixes)

  return predicate
