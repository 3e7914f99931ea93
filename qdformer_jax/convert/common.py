"""Shared pieces of the weight converters: reading PyTorch files, filling NNX modules, the file format.

Converted-weight format (a directory):
  `weights.msgpack`  flat mapping 'a/b/0/kernel' -> float32 array, one entry per variable of the
                     module's NNX state (`nnx.Param` and the frozen BatchNorm variables), serialised
                     with `flax.serialization.msgpack_serialize`
  `meta.json`        {"arch": ..., "source": ..., "params": ..., "module_kwargs": {...}}
`load_converted(module, path)` checks every path and shape against the module and fills it in place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization, traverse_util

from qdformer_jax.models.layers import count_params

WEIGHTS_FILE = 'weights.msgpack'
META_FILE = 'meta.json'
# Containers under which PyTorch training scripts store the state_dict (official Swin: 'model').
_WRAPPER_KEYS = ('model', 'state_dict', 'model_state_dict', 'module')


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch checkpoint (`.pth`/`.pt`/`.bin` via torch, `.safetensors`) -> {key: ndarray}.

  Unwraps the usual containers ({'model': sd} of the official Swin release, {'state_dict': sd}, ...).
  Floating tensors become float32 NumPy arrays; others keep their dtype.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--src {path!r}: no such file (give the PyTorch weight file).')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    raw = load_file(path)
  else:
    try:
      import torch
    except ImportError as e:
      raise ImportError(f'Reading {path!r} needs PyTorch: pip install torch==2.13.0 '
                        '(CPU wheel), or give a .safetensors file.') from e
    raw = torch.load(path, map_location='cpu', weights_only=True)
  while isinstance(raw, Mapping) and not _looks_like_state_dict(raw):
    inner = next((raw[k] for k in _WRAPPER_KEYS if k in raw and isinstance(raw[k], Mapping)), None)
    if inner is None:
      raise ValueError(f'{path!r} holds a dict without tensors and without any of the keys '
                       f'{_WRAPPER_KEYS}: not a PyTorch state_dict (keys: {list(raw)[:10]}).')
    raw = inner
  if not isinstance(raw, Mapping):
    raise ValueError(f'{path!r} does not hold a state_dict (found {type(raw).__name__}); save '
                     'model.state_dict() rather than the whole model.')
  return {str(k): _to_numpy(v) for k, v in raw.items() if _is_array(v)}


def _is_array(v: Any) -> bool:
  return hasattr(v, 'shape') and hasattr(v, 'dtype')


def _looks_like_state_dict(d: Mapping) -> bool:
  return any(_is_array(v) for v in d.values())


def _to_numpy(v: Any) -> np.ndarray:
  if isinstance(v, np.ndarray):
    return v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
  if v.dtype.is_floating_point:
    return v.detach().cpu().float().numpy()
  return v.detach().cpu().numpy()


def strip_prefixes(state_dict: Mapping[str, np.ndarray], prefixes: Iterable[str]
                   ) -> dict[str, np.ndarray]:
  """Removes a leading prefix (e.g. 'module.', 'backbone.') when every key carries it, repeatedly."""
  out = dict(state_dict)
  changed = True
  while changed:
    changed = False
    for prefix in prefixes:
      if out and all(k.startswith(prefix) for k in out):
        out = {k[len(prefix):]: v for k, v in out.items()}
        changed = True
  return out


def conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [O,I,kh,kw] -> NNX Conv kernel [kh,kw,I,O]."""
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def linear_kernel(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out,in] -> NNX Linear kernel [in,out]."""
  return np.ascontiguousarray(w.T)


def path_key(path: Iterable[Any]) -> str:
  """NNX state path -> the flat string key used in the weight file ('layer1/0/conv1/kernel')."""
  return '/'.join(str(p) for p in path)


def module_shapes(module: nnx.Module) -> dict[str, tuple[tuple, Any]]:
  """{path_key: (shape, variable type)} for every variable in the module's state."""
  return {path_key(p): (tuple(v.shape), type(v)) for p, v in nnx.to_flat_state(nnx.state(module))}


def fill_module(module: nnx.Module, arrays: Mapping[str, np.ndarray], source: str) -> nnx.Module:
  """Returns `module` (abstract from `nnx.eval_shape` or concrete) with every variable set from `arrays`.

  `arrays` maps `path_key`s to arrays; every variable of the module must be present with its exact
  shape and no extra key may be left over, else ValueError naming `source` and the keys. Values
  become JAX arrays of the variable's dtype on the default device (re-shard them afterwards when
  the module lives on a mesh).
  """
  graphdef, state = nnx.split(module)
  flat = list(nnx.to_flat_state(state))
  expected = {path_key(p): tuple(v.shape) for p, v in flat}
  missing = sorted(set(expected) - set(arrays))
  extra = sorted(set(arrays) - set(expected))
  bad = sorted(k for k in set(expected) & set(arrays) if tuple(arrays[k].shape) != expected[k])
  if missing or extra or bad:
    lines = [f'{source}: weights do not fit the module {type(module).__name__}.']
    if missing:
      lines.append(f'  missing ({len(missing)}): {missing[:8]}')
    if extra:
      lines.append(f'  unexpected ({len(extra)}): {extra[:8]}')
    for k in bad[:8]:
      lines.append(f'  shape of {k}: file {tuple(arrays[k].shape)} vs module {expected[k]}')
    lines.append('  Check the architecture / size options match the converted checkpoint.')
    raise ValueError('\n'.join(lines))
  pure = {tuple(p): jnp.asarray(np.asarray(arrays[path_key(p)], dtype=np.dtype(v.dtype)))
          for p, v in flat}
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(pure))
  return nnx.merge(graphdef, state)


def save_converted(module: nnx.Module, out_dir: str, *, arch: str, source: str,
                   module_kwargs: Mapping[str, Any] | None = None,
                   notes: Iterable[str] = ()) -> dict[str, Any]:
  """Writes the module's state to `out_dir` (weights.msgpack + meta.json); returns the meta dict."""
  os.makedirs(out_dir, exist_ok=True)
  flat = {path_key(p): np.asarray(jax.device_get(v[...]))
          for p, v in nnx.to_flat_state(nnx.state(module))}
  tmp = os.path.join(out_dir, WEIGHTS_FILE + '.tmp')
  with open(tmp, 'wb') as f:
    f.write(serialization.msgpack_serialize(flat))
  os.replace(tmp, os.path.join(out_dir, WEIGHTS_FILE))
  meta = {'arch': arch, 'source': os.path.abspath(source), 'params': count_params(module),
          'module_kwargs': dict(module_kwargs or {}), 'notes': list(notes)}
  with open(os.path.join(out_dir, META_FILE), 'w') as f:
    json.dump(meta, f, indent=2)
  return meta


def read_converted(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads a converted directory (or its weights.msgpack) -> (flat arrays, meta dict or {})."""
  weights = os.path.join(path, WEIGHTS_FILE) if os.path.isdir(path) else path
  if not os.path.isfile(weights):
    raise FileNotFoundError(f'{path!r}: no converted weights there (expected {WEIGHTS_FILE}, '
                            'written by `python -m qdformer_jax.convert`).')
  with open(weights, 'rb') as f:
    arrays = serialization.msgpack_restore(f.read())
  meta_path = os.path.join(os.path.dirname(weights), META_FILE)
  meta = {}
  if os.path.isfile(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
  return arrays, meta


def load_converted(module: nnx.Module, path: str) -> nnx.Module:
  """Fills `module` in place from converted weights at `path` (directory or weights.msgpack).

  The module must have the architecture the weights were converted for (paths and shapes are
  checked; a mismatch raises ValueError listing them). Returns the module.
  """
  arrays, meta = read_converted(path)
  source = f'converted weights {path!r}' + (f' (arch {meta["arch"]})' if 'arch' in meta else '')
  filled = fill_module(module, arrays, source)
  nnx.update(module, nnx.state(filled))
  return module


def rename_all(state_dict: Mapping[str, np.ndarray],
               rename: Callable[[str, np.ndarray], tuple[str, np.ndarray] | None],
               source: str) -> dict[str, np.ndarray]:
  """Applies `rename(key, array) -> (path_key, array) | None (drop)` to every entry.

  A key `rename` does not understand should raise KeyError; it is reported with `source`.
  """
  out = {}
  for key, value in state_dict.items():
    try:
      mapped = rename(key, value)
    except KeyError as e:
      raise ValueError(f'{source}: unexpected key {key!r} ({e.args[0]}); is this the right '
                       'architecture for the file?') from None
    if mapped is None:
      continue
    new_key, new_value = mapped
    if new_key in out:
      raise ValueError(f'{source}: two keys map to {new_key!r} (second: {key!r}).')
    out[new_key] = new_value
  return out
