"""Helpers for tests and benchmarks: tiny synthetic configs and train states drawn without compiling
the initialiser. An entry-point layer module (it imports training); nothing in the library uses it.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from qdformer_jax import sharding
from qdformer_jax.training import state as state_lib


def tiny_synthetic_config(data_dir: str, *, image_size: int = 32, num_frames: int = 3,
                          clips: tuple[int, ...] | None = (2, 3, 2), arg: str = 'smoke',
                          overrides: dict | None = None, **changes):
  """The one home of the tests' tiny configs: ``configs/synthetic.py:<arg>`` (default ``smoke``) at
  ``image_size`` px and T = ``num_frames``, with (train, val, test[, each negative split]) ``clips``
  built under ``data_dir`` (no negative splits unless a fourth count is given; None: the config's own
  counts); ``overrides`` set dotted fields ('model.dec_layers': 1), ``changes`` top-level ones."""
  from configs import synthetic
  c = synthetic.get_config(arg)
  c.data.data_dir = data_dir
  c.data.image_size = image_size
  c.data.num_frames = num_frames
  if clips is not None:
    c.data.synthetic = {'train_clips': clips[0], 'validation_clips': clips[1], 'test_clips': clips[2],
                        'negative_clips': clips[3] if len(clips) > 3 else 0}
  for name, value in {**(overrides or {}), **changes}.items():
    *parents, leaf = name.split('.')
    node = c
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return c


def random_train_state(config, mesh, drop_steps=(), seed: int = 0):
  """(graphdef, state, abstract state) like ``state_lib.create_train_state``, replicated over ``mesh``,
  with parameters drawn in NumPy (weights scaled by fan-in; norm variances and scales 1, other
  vectors 0): the initialiser's XLA compile is the slowest part of a tiny test or a cost benchmark."""
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: state_lib.model_and_optimizer(config, drop_steps)))
  replicated = sharding.replicated(mesh)
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)

  def fill(path, x):
    name = jax.tree_util.keystr(path)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.device_put(key, replicated)
    if not jax.dtypes.issubdtype(x.dtype, np.floating):
      value = np.zeros(x.shape)
    elif x.ndim >= 2:
      value = rng.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[:-1]))
    elif any(f"'{k}'" in name for k in ('var', 'running_var', 'scale', 'weight')):
      value = np.ones(x.shape)
    else:
      value = np.zeros(x.shape)
    return jax.device_put(np.asarray(value, x.dtype), replicated)

  state = jax.tree_util.tree_map_with_path(fill, abstract_state)
  abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                                abstract_state)
  return graphdef, state, abstract_state
