"""The whole system on a tiny synthetic config: batch contract, one-program step, resume, reports."""
from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import pytest

from qdformer_jax import sharding, testing
from qdformer_jax.data import pipeline
from qdformer_jax.training import eval_mode, train
from qdformer_jax.training import state as state_lib
from qdformer_jax.training import step as step_lib


def tiny_config(data_dir: str, **changes):
  c = testing.tiny_synthetic_config(data_dir, clips=(8, 4, 4), total_steps=2, lr_drop_steps=(1,), log_every=1,
                                    eval_every=2, checkpoint_every=2)
  c.eval.limit = 3  # not a multiple of the eval batch: the padded clip must not count
  for k, v in changes.items():
    setattr(c, k, v)
  return c


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def test_batch_contract(data_dir):
  config = tiny_config(data_dir)
  it = pipeline.make_train_iterator(config.data, global_batch_size=2, seed=0)
  batch = next(it)
  b, t, s = 2, 3, 32
  expected = {'frames': (np.uint8, (b, t, s, s, 3)), 'log_mel': (np.float32, (b, t, 96, 64)),
              'semantic': (np.uint8, (b, t, s, s)), 'gt_valid': (np.bool_, (b, t)),
              'frame_valid': (np.bool_, (b, t))}
  for key, (dtype, shape) in expected.items():
    assert batch[key].dtype == dtype, key
    assert batch[key].shape == shape, key
  assert batch['semantic'].max() <= config.data.num_classes
  eval_it, total = pipeline.make_eval_iterator(config.data, 'val', global_batch_size=2, limit=3)
  batches = list(eval_it)
  assert total == 3 and len(batches) == 2
  assert [v.tolist() for v in (b['clip_valid'] for b in batches)] == [[True, True], [True, False]]


def test_train_iterator_state_restores_next_batch(data_dir):
  config = tiny_config(data_dir)
  it = pipeline.make_train_iterator(config.data, global_batch_size=2, seed=3)
  next(it)
  state = it.get_state()
  expected = next(it)
  again = pipeline.make_train_iterator(config.data, global_batch_size=2, seed=3)
  again.set_state(state)
  got = next(again)
  for key in pipeline.DEVICE_KEYS:
    np.testing.assert_array_equal(got[key], expected[key])


def test_train_step_is_one_program_compiled_once(data_dir):
  config = tiny_config(data_dir)
  mesh = sharding.make_mesh(config)
  graphdef, state, abstract = state_lib.create_train_state(config, mesh, (1,))
  step = step_lib.make_train_step(graphdef, config, jax.tree.map(lambda x: x.sharding, abstract), mesh)
  it = pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=0)
  batch = pipeline.to_global(pipeline.device_batch(next(it)), mesh)
  hlo = step.lower(state, batch).as_text()
  for marker in ('callback', 'host_compute', 'SendToHost', 'RecvFromHost', 'outfeed', 'infeed'):
    assert marker not in hlo, marker
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch)
    batch = pipeline.to_global(pipeline.device_batch(next(it)), mesh)
    losses.append(float(metrics['loss']))
  assert step._cache_size() == 1
  assert all(np.isfinite(losses))


@pytest.mark.slow  # compiles and runs a train step end to end: not in the quick command
def test_pvt_backbone_and_ast_audio_train_a_step(data_dir):
  """The two comparison choices together, small (configs/common.py's ':smoke' PVT-v2 and AST sizes):
  the pipeline computes AST filterbanks [B,T,98,128] from the stored waveform, and a train step runs
  (one compile for both; `main.py --config configs/synthetic.py:smoke,ast` and
  `--config.model.backbone.name=pvt_v2_b0` are the full smoke runs)."""
  from configs import common
  config = tiny_config(data_dir)
  config.model.backbone.update(name='pvt_v2_b0', embed_dims=(16, 16, 32, 32), depths=(1, 1, 1, 1),
                               num_heads=(1, 1, 2, 2), mlp_ratios=(2, 2, 2, 2))
  common.apply_audio(config, 'ast', smoke=True)
  config.model.audio.trainable = False
  assert config.data.audio_encoder == 'ast'
  mesh = sharding.make_mesh(config)
  graphdef, state, abstract = state_lib.create_train_state(config, mesh, (1,))
  step = step_lib.make_train_step(graphdef, config, jax.tree.map(lambda x: x.sharding, abstract), mesh)
  it = pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=0)
  host = next(it)
  assert host['log_mel'].shape == (2, 3, 98, 128) and np.isfinite(host['log_mel']).all()
  pipeline.check_batch(host, pipeline.batch_spec(config.data, config.batch_size, mesh), config.data)
  state, metrics = step(state, pipeline.to_global(pipeline.device_batch(host), mesh))
  assert np.isfinite(float(metrics['loss']))


def test_frozen_parameters_do_not_move_in_a_train_step(data_dir):
  """audio.trainable=False and frozen backbone stages: one train step leaves them bit-identical (not
  in the optimizer: no update and no AdamW weight decay), while the rest of the model moves.

  The weight decay is raised and the warm-up removed so that a decayed-but-frozen parameter would
  change by far more than a float32 ulp in one step (lr 5e-4 x wd 0.05 = 2.5e-5 relative)."""
  from flax import nnx

  from qdformer_jax.training import optim
  config = tiny_config(data_dir)
  config.model.audio.trainable = False
  config.model.backbone.frozen_stages = 1  # stem + layer1
  config.optim.update(weight_decay=0.05, warmup_steps=0)
  mesh = sharding.make_mesh(config)
  graphdef, state, abstract = state_lib.create_train_state(config, mesh, ())
  model = nnx.merge(graphdef, state)[0]
  in_optimizer = nnx.state(model, optim.trainable_filter(model))
  assert 'audio_encoder' not in in_optimizer and 'conv1' not in in_optimizer['backbone']
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))  # host copies (the step donates)
  step = step_lib.make_train_step(graphdef, config, jax.tree.map(lambda x: x.sharding, abstract), mesh)
  it = pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=0)
  state, metrics = step(state, pipeline.to_global(pipeline.device_batch(next(it)), mesh))
  assert np.isfinite(float(metrics['loss']))
  after = nnx.state(nnx.merge(graphdef, state)[0], nnx.Param)
  def changed(tree_a, tree_b):
    return [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b))]
  assert not any(changed(before['audio_encoder'], after['audio_encoder']))
  for frozen in ('conv1', 'layer1'):
    assert not any(changed(before['backbone'][frozen], after['backbone'][frozen])), frozen
  for trained in ('audio_proj', 'class_head'):
    assert all(changed(before[trained], after[trained])), trained
  assert all(changed(before['backbone']['layer2'], after['backbone']['layer2']))


@pytest.mark.slow  # compiles and runs a train step end to end: not in the quick command
def test_smoke_run_writes_report_then_resumes(data_dir, tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(data_dir), workdir)
  report = json.load(open(os.path.join(workdir, 'reports', 'eval_val_latest.json')))
  assert report['step'] == 2 and report['config'] == 'synthetic'
  assert report['metrics']['num_clips'] == 3
  assert 0.0 <= report['metrics']['mIoU'] <= 1.0
  assert os.path.exists(os.path.join(workdir, 'reports', 'eval_val_2.json'))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2']

  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(tiny_config(data_dir, total_steps=4, eval_every=4, checkpoint_every=4), workdir)
  assert any('resumed from step 2' in r.getMessage() for r in caplog.records)
  assert 'step 3/4' in caplog.text and 'step 1/4' not in caplog.text
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  report = json.load(open(os.path.join(workdir, 'reports', 'eval_val_latest.json')))
  assert report['step'] == 4

  # The audio-use check: eval mode with shuffle_audio writes the plain report, the shuffled one
  # beside it (not over it) and their difference.
  config = tiny_config(data_dir, total_steps=4)
  config.mode = 'eval'
  config.eval.shuffle_audio = True
  eval_mode.evaluate_checkpoint(config, workdir)
  reports = os.path.join(workdir, 'reports')
  plain = json.load(open(os.path.join(reports, 'eval_val_4.json')))['metrics']
  shuffled = json.load(open(os.path.join(reports, 'eval_val_shuffled_audio_4.json')))['metrics']
  assert plain['mIoU'] == report['metrics']['mIoU'] and plain['shuffle_audio'] is False
  assert shuffled['shuffle_audio'] is True and shuffled['num_clips'] == 3
  use = json.load(open(os.path.join(reports, 'audio_use_val_4.json')))['metrics']
  assert use['mIoU'] == {'matched_audio': plain['mIoU'], 'shuffled_audio': shuffled['mIoU'],
                         'drop': plain['mIoU'] - shuffled['mIoU']}


def test_shuffled_audio_index_stays_among_real_clips():
  from qdformer_jax.evaluation.evaluator import shifted_among_valid
  np.testing.assert_array_equal(shifted_among_valid(np.array([True] * 4)), [1, 2, 3, 0])
  # Padding copies at the end keep their own audio; no real clip hears one.
  np.testing.assert_array_equal(shifted_among_valid(np.array([True, True, True, False, False])),
                                [1, 2, 0, 3, 4])
  np.testing.assert_array_equal(shifted_among_valid(np.array([True, False])), [0, 1])


def test_learning_rate_drops_at_the_configured_step_with_warmup():
  """The drop steps count from the start of training, warm-up included (join_schedules restarts the
  step count of its second schedule at the boundary, which once moved every drop by warmup_steps)."""
  from qdformer_jax.training import optim
  schedule = optim.learning_rate_schedule(1.0, (100, 150), 0.1, warmup_steps=50)
  assert float(schedule(0)) == pytest.approx(1e-3, rel=1e-4)
  assert float(schedule(50)) == pytest.approx(1.0)
  assert float(schedule(99)) == pytest.approx(1.0) and float(schedule(100)) == pytest.approx(0.1)
  assert float(schedule(149)) == pytest.approx(0.1) and float(schedule(150)) == pytest.approx(0.01)
  plain = optim.learning_rate_schedule(1.0, (100,), 0.1)
  assert float(plain(99)) == 1.0 and float(plain(100)) == pytest.approx(0.1)


def test_warmup_fraction_resolves_to_steps_of_the_run():
  """model.vq_warmup_fraction is a share of the run's steps, turned into model.vq_warmup_steps for the
  state's initial values only; an explicit step count wins; the config itself is not changed."""
  from configs import synthetic
  from qdformer_jax.training import optim
  c = synthetic.get_config('smoke')
  c.model.vq_warmup_fraction = 0.25
  assert optim.resolve_warmup(c, 800).model.vq_warmup_steps == 200
  assert c.model.vq_warmup_steps == 0
  c.model.vq_warmup_steps = 7
  assert optim.resolve_warmup(c, 800).model.vq_warmup_steps == 7
  c.model.update(vq_warmup_steps=0, vq_warmup_fraction=0.0)
  assert optim.resolve_warmup(c, 800) is c
