"""The train state: the model and its optimizer, created already sharded over the mesh (or only
described, for restores), and converted pretrained weights loaded into it."""
from __future__ import annotations

import functools
import json
import logging

import jax
from flax import nnx

from qdformer_jax import sharding
from qdformer_jax.models.qdformer import build_model
from qdformer_jax.training import optim


def model_and_optimizer(config, drop_steps):
  """The model and its optimizer as ``config`` describes them (initialised; trace under
  ``nnx.eval_shape`` for shapes only)."""
  model = build_model(config, config.seed)
  return model, optim.make_optimizer(model, config.optim, drop_steps)


def abstract_train_state(config, mesh, drop_steps):
  """(graphdef, abstract state with shardings): shapes only, nothing is initialised (restores)."""
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: model_and_optimizer(config, drop_steps)))
  return graphdef, sharding.shard_abstract(mesh, abstract_state)


def create_train_state(config, mesh, drop_steps):
  """(graphdef, state, abstract state with shardings); the state is created already sharded."""
  graphdef, abstract_state = abstract_train_state(config, mesh, drop_steps)
  return graphdef, init_train_state(config, abstract_state, drop_steps), abstract_state


def load_pretrained(config, state, graphdef):
  """Loads converted backbone / VGGish weights named by the config into ``state``."""
  paths = {'backbone': config.model.backbone.get('pretrained'), 'audio_encoder': config.model.audio.get('pretrained')}
  if not any(paths.values()):
    return state
  from qdformer_jax.convert import load_converted
  model, optimizer = nnx.merge(graphdef, state)
  for attr, path in paths.items():
    if path:
      load_converted(getattr(model, attr), path)
      logging.info('loaded converted %s weights from %s', attr, path)
  return nnx.state((model, optimizer))


def init_train_state(config, abstract_state, drop_steps):
  """A freshly initialised train state, created already sharded as ``abstract_state`` says."""

  @functools.partial(jax.jit, out_shardings=jax.tree.map(lambda x: x.sharding, abstract_state))
  def init():
    return nnx.split(model_and_optimizer(config, drop_steps))[1]

  return init()


_ABSTRACT_MODELS: dict[str, tuple] = {}  # what build_model reads, as JSON -> (graphdef, abstract state)


def abstract_model(config):
  """(graphdef, abstract ``nnx.state(model)``) of ``build_model(config)`` by ``nnx.eval_shape``
  (nothing is initialised): what eval mode and inference restore a checkpoint's model into. Cached
  by the fields build_model reads, so loading several checkpoints of one run traces the model once."""
  key = json.dumps({'model': config.model.to_dict(), 'num_classes': config.data.num_classes,
                    'seed': config.seed}, sort_keys=True, default=str)
  if key not in _ABSTRACT_MODELS:
    if len(_ABSTRACT_MODELS) >= 4:
      _ABSTRACT_MODELS.pop(next(iter(_ABSTRACT_MODELS)))
    _ABSTRACT_MODELS[key] = nnx.split(nnx.eval_shape(lambda: build_model(config, int(config.seed))))
  return _ABSTRACT_MODELS[key]


def model_part(graphdef, state):
  """(model graphdef, model state) of a train state's (graphdef, ``nnx.state((model, optimizer))``):
  what the evaluators run (the state's arrays, not copies)."""
  model, _ = nnx.merge(graphdef, state)
  return nnx.split(model)
