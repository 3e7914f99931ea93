"""model.remat (jax.checkpoint of backbone blocks, encoder and decoder layers) changes memory, not numbers.

A tiny model (configs/synthetic.py:smoke sizes, two encoder layers, ResNet-18 width 8 with no frozen
stage so every block is differentiated) in train mode with dropout 0.1 everywhere, so the
rematerialised blocks must also redraw the same dropout masks. Loss, every output and every
parameter gradient with each policy must equal the values without remat. Tolerance: relative 1e-5
with an absolute floor of 1e-6 x the largest magnitude of the compared array: rematerialisation runs
the same operations on the same inputs, but XLA fuses the recomputed forward differently, so float32
results may differ in the last bits (measured: <= ~1e-6 relative).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import synthetic
from qdformer_jax.losses.criterion import compute_loss
from qdformer_jax.models import build_model
from qdformer_jax.models.layers import REMAT_POLICIES, check_remat

B, T, H, W = 2, 2, 32, 32
RTOL, ATOL_FRACTION = 1e-5, 1e-6


def config(remat: str):
  c = synthetic.get_config('smoke')
  c.model.remat = remat
  c.model.backbone.frozen_stages = -1
  c.model.encoder.update(layers=2, dropout=0.1)
  c.model.dropout = 0.1
  return c


def batch(num_classes: int) -> dict:
  rng = np.random.default_rng(0)
  semantic = np.zeros((B, T, H, W), np.uint8)
  semantic[0, 0, 4:20, 8:24] = 1
  semantic[1, 1, 8:28, 4:20] = min(2, num_classes)
  return {'frames': jnp.asarray(rng.integers(0, 256, (B, T, H, W, 3), dtype=np.uint8)),
          'log_mel': jnp.asarray(rng.normal(size=(B, T, 96, 64)), jnp.float32),
          'semantic': jnp.asarray(semantic), 'gt_valid': jnp.ones((B, T), bool),
          'frame_valid': jnp.asarray([[True, True], [True, False]])}


def loss_and_grads(remat: str):
  c = config(remat)
  with jax.threefry_partitionable(False):
    model = build_model(c, 0)
  graphdef, state = nnx.split(model)
  data = batch(c.data.num_classes)

  @jax.jit
  def step(state):
    model = nnx.merge(graphdef, state)

    def loss_fn(model):
      outputs = model(data['frames'], data['log_mel'], data['frame_valid'], train=True)
      loss, _ = compute_loss(outputs, data, c.loss, c.data.num_classes)
      return loss, (outputs['pred_masks'], outputs['pred_logits'])

    (loss, outputs), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return loss, outputs, grads

  return jax.device_get(step(state))


@pytest.fixture(scope='module')
def reference():
  return loss_and_grads('none')


def close(a, b) -> bool:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  atol = ATOL_FRACTION * max(float(np.max(np.abs(a))) if a.size else 0.0, 1e-30)
  return a.shape == b.shape and bool(np.allclose(a, b, rtol=RTOL, atol=atol))


@pytest.mark.parametrize('policy', ['blocks', 'dots_saveable'])
def test_remat_keeps_loss_outputs_and_gradients(policy, reference):
  loss, outputs, grads = loss_and_grads(policy)
  ref_loss, ref_outputs, ref_grads = reference
  assert np.isfinite(ref_loss) and close(loss, ref_loss), (loss, ref_loss)
  for got, want in zip(outputs, ref_outputs):
    assert close(got, want)
  got = jax.tree_util.tree_leaves_with_path(grads)
  want = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
  assert len(got) == len(want) > 0
  differing = [jax.tree_util.keystr(path) for path, g in got if not close(g, want[path])]
  assert not differing, f'{policy}: gradients differ from remat=none for {differing[:5]}'
  # The backbone blocks were differentiated (nothing frozen), so their remat path was exercised.
  assert any('backbone' in jax.tree_util.keystr(p) and np.abs(g).sum() > 0 for p, g in got)


def test_unknown_policy_names_the_field():
  assert set(REMAT_POLICIES) >= {'none', 'blocks', 'dots_saveable'}
  with pytest.raises(ValueError, match='model.remat'):
    check_remat('everything')
