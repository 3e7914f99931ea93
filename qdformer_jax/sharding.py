"""The device mesh and the shardings of parameters and batches (the bottom layer: imports only JAX).

Every program of the project runs over one ``(data, fsdp)`` mesh from ``jax.make_mesh``: the batch
is split over both axes; parameters and their optimizer moments are replicated, or split over
``fsdp`` along their largest divisible axis when ``config.mesh_fsdp`` > 1. The axes are Auto:
GSPMD propagates these shardings through the model, which carries no per-op annotation.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')
FSDP_MIN_SIZE = 2 ** 14  # smaller arrays stay replicated: splitting them costs more than it saves


def make_mesh(config) -> jax.sharding.Mesh:
  """All devices as a (data, fsdp) mesh; ``config.mesh_fsdp`` (default 1) devices share parameters."""
  fsdp = int(config.get('mesh_fsdp', 1))
  n = jax.device_count()
  if fsdp < 1 or n % fsdp:
    raise ValueError(f'config.mesh_fsdp={fsdp} does not divide the {n} devices; set --config.mesh_fsdp to a divisor of it')
  return jax.make_mesh((n // fsdp, fsdp), BATCH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def param_sharding(mesh, x) -> NamedSharding:
  """Replicated, or split over 'fsdp' along the largest divisible axis when the mesh has one."""
  fsdp = mesh.shape['fsdp']
  shape = getattr(x, 'shape', ())
  if fsdp > 1 and len(shape) >= 1 and np.prod(shape) >= FSDP_MIN_SIZE:
    for axis in np.argsort(shape)[::-1]:
      if shape[axis] % fsdp == 0:
        spec = [None] * len(shape)
        spec[axis] = 'fsdp'
        return NamedSharding(mesh, P(*spec))
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_abstract(mesh, abstract_tree):
  """ShapeDtypeStructs of ``abstract_tree`` carrying the parameter sharding of each leaf."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=param_sharding(mesh, x)),
                      abstract_tree)
