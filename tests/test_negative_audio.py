"""Negative audio (AVSBench-Robust): silence, noise and off-screen audio with empty targets, in the
data layer, the evaluator (kinds/negative_audio.py), eval mode and training with negatives."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from qdformer_jax import sharding, testing
from qdformer_jax.data import audio, negatives, pipeline, records, registry
from qdformer_jax.evaluation import evals
from qdformer_jax.evaluation.kinds import negative_audio
from qdformer_jax.training import state as state_lib


def tiny_config(data_dir: str):
  c = testing.tiny_synthetic_config(data_dir, clips=(4, 6, 2, 2))  # 2 clips in each negative split
  c.eval_batch_size = 2
  c.model.dec_layers = 1
  c.evals = {'neg': {'kind': 'negative_audio'}}
  return c


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  config = tiny_config(str(tmp_path_factory.mktemp('tfds')))
  mesh = sharding.make_mesh(config)
  graphdef, state = state_lib.model_part(*testing.random_train_state(config, mesh)[:2])
  return config, mesh, graphdef, state


# -- the data layer --------------------------------------------------------------------------------

def test_offscreen_donors_have_none_of_the_clips_classes(setup):
  config = setup[0]
  source = registry.open_source(config.data, 'val')
  donors, unmatched = negatives.offscreen_donors(source, len(source), config.data, seed=0)
  assert len(donors) == len(source) and all(d != i for i, d in enumerate(donors))
  matched = 0
  for i, j in enumerate(donors):
    mine, theirs = negatives.clip_classes(source[i]), negatives.clip_classes(source[j])
    if theirs and not mine & theirs:
      matched += 1
  assert matched == len(source) - unmatched and matched > 0
  assert donors == negatives.offscreen_donors(source, len(source), config.data, seed=0)[0]  # deterministic
  anyone, none_missing = negatives.offscreen_donors(source, len(source), config.data, seed=0, rule='any')
  assert none_missing == 0 and all(d != i for i, d in enumerate(anyone))
  with pytest.raises(ValueError, match='eval.offscreen'):
    negatives.offscreen_donors(source, len(source), config.data, rule='by_colour')


def test_binary_datasets_fall_back_to_another_category_with_one_line(setup, caplog):
  config = setup[0].copy_and_resolve_references()
  config.data.update(name='avs_object', builder_config='s4', binary=True)
  assert not negatives.class_aware(config.data)
  assert 'no class labels' in negatives.offscreen_rule(config.data)
  mine = {'category': b'dog', 'semantic': [], 'gt_valid': [], 'frame_valid': []}
  assert not negatives.compatible(config.data, mine, {'category': b'dog'})
  assert negatives.compatible(config.data, mine, {'category': b'cat'})
  assert negatives.compatible(config.data, {'category': b''}, {'category': b''})  # MS3: any other clip
  negative_audio._WARNED.clear()
  with caplog.at_level('WARNING'):
    negative_audio.check(config, 'neg')
    negative_audio.check(config, 'neg')  # once per dataset, not once per evaluation
  lines = [r.getMessage() for r in caplog.records if 'negative audio' in r.getMessage()]
  assert len(lines) == 1 and 'no class labels' in lines[0] and '\n' not in lines[0]
  config.eval.offscreen = 'nearby'
  with pytest.raises(ValueError, match='config.eval.offscreen'):
    negative_audio.check(config, 'neg')


def test_negative_clips_hear_silence_noise_or_another_clip_and_have_empty_targets(setup):
  config = setup[0]
  source = registry.open_source(config.data, 'val')
  record = source[0]
  t = int(np.asarray(record['frame_valid']).sum())
  silence = negatives.negative_audio(record, 'silence', config.data)
  expected = audio.clip_examples(np.zeros(t * audio.SAMPLE_RATE), audio.SAMPLE_RATE,
                                 num_frames=len(record['frame_valid']), num_real=t, pad_mode='repeat')
  np.testing.assert_array_equal(silence, expected)
  own = pipeline.record_log_mel(record, config.data)
  noise = negatives.negative_audio(record, 'noise', config.data, rng=np.random.default_rng(1))
  assert noise.shape == own.shape and not np.allclose(noise, own)
  donor = source[1]
  np.testing.assert_array_equal(pipeline.negative_log_mel(record, 'offscreen', config.data, None, donor),
                                pipeline.record_log_mel(donor, config.data))
  with pytest.raises(ValueError, match='donor'):
    negatives.negative_audio(record, 'offscreen', config.data)
  no_wave = dict(record, audio_length=np.int32(0))
  with pytest.raises(ValueError, match="negative_kinds"):
    negatives.negative_audio(no_wave, 'noise', config.data)
  # The noise is at the level of the clip's own audio.
  wave = records.decode_audio(record)
  assert np.sqrt(np.mean(wave ** 2)) > 0
  clip = pipeline.decode_clip(record, config.data, train=False, rng=None)
  negative = negatives.make_negative(clip, silence)
  assert not negative['semantic'].any() and clip['semantic'].any()
  np.testing.assert_array_equal(negative['frames'], clip['frames'])
  np.testing.assert_array_equal(negative['gt_valid'], clip['gt_valid'])


def test_eval_iterator_with_a_negative_empties_every_target(setup):
  config = setup[0]
  source = registry.open_source(config.data, 'val')
  donors, _ = negatives.offscreen_donors(source, len(source), config.data)
  for kind in negatives.KINDS:
    negative = negatives.Negative(kind, donors=donors if kind == 'offscreen' else None)
    it, total = pipeline.make_eval_iterator(config.data, 'val', global_batch_size=2, negative=negative)
    plain, _ = pipeline.make_eval_iterator(config.data, 'val', global_batch_size=2)
    for batch, clean in zip(it, plain, strict=True):
      assert not batch['semantic'].any()
      np.testing.assert_array_equal(batch['frames'], clean['frames'])
      assert not np.array_equal(batch['log_mel'], clean['log_mel'])
  with pytest.raises(ValueError, match='donors'):
    negatives.Negative('offscreen')


def test_training_negatives_replace_that_fraction_of_clips(setup):
  config = setup[0].copy_and_resolve_references()
  config.data.negative_fraction = 0.5
  source = registry.open_source(config.data, 'train')
  rng = np.random.default_rng(0)
  drawn = [negatives.draw_train_negative(source[i % len(source)], config.data, source, rng) for i in range(200)]
  kinds = [d[0] for d in drawn if d is not None]
  assert 70 < len(kinds) < 130 and set(kinds) == set(negatives.KINDS)
  donors = [d[1] for d in drawn if d is not None and d[0] == 'offscreen']
  assert donors and all(d is not None for d in donors)
  config.data.negative_kinds = ('silence',)
  assert {d[0] for d in (negatives.draw_train_negative(source[0], config.data, source, rng) for _ in range(20))
          if d} == {'silence'}
  # Off by default: the train iterator is the one without negatives, batch for batch.
  base = setup[0]
  with_zero = base.copy_and_resolve_references()
  with_zero.data.negative_fraction = 0.0
  a = next(pipeline.make_train_iterator(base.data, global_batch_size=2, seed=3))
  b = next(pipeline.make_train_iterator(with_zero.data, global_batch_size=2, seed=3))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  # With negatives, the positives keep their augmentation; some clips are negatives with empty targets.
  it = pipeline.make_train_iterator(config.data, global_batch_size=2, seed=3)
  plain = pipeline.make_train_iterator(with_zero.data, global_batch_size=2, seed=3)
  emptied = 0
  for _ in range(6):
    x, y = next(it), next(plain)
    np.testing.assert_array_equal(x['frames'], y['frames'])
    for i in range(2):
      if not np.array_equal(x['log_mel'][i], y['log_mel'][i]):
        emptied += 1
        assert not x['semantic'][i].any()
      else:
        np.testing.assert_array_equal(x['semantic'][i], y['semantic'][i])
  assert emptied > 0


# -- the evaluator ---------------------------------------------------------------------------------

def _zero_audio_path(state):
  """The model with the projections of its audio features set to zero: it hears nothing."""
  def zero(path, x):
    name = jax.tree_util.keystr(path)
    return jax.numpy.zeros_like(x) if ('audio_proj' in name or 'audio_token_proj' in name) else x
  return jax.tree_util.tree_map_with_path(zero, state)


def test_a_deaf_model_has_an_fpr_equal_to_its_positive_foreground_fraction(setup, tmp_path):
  config, mesh, graphdef, state = setup
  evaluations = evals.Evaluations(config, mesh, graphdef, str(tmp_path))
  deaf = evaluations.run(_zero_audio_path(state), 5)['neg']
  positive = deaf['positive']['foreground_fraction']
  assert 0.0 < positive < 1.0
  for kind, scenario in deaf['scenarios'].items():
    assert scenario['fpr'] == positive, kind
    assert scenario['frames_with_mask'] == deaf['positive']['frames_with_mask'], kind
  # The same model hearing its audio (random weights listen): the FPRs are not the positive fraction.
  hearing = evaluations.run(state, 6)['neg']
  assert any(s['fpr'] != hearing['positive']['foreground_fraction'] for s in hearing['scenarios'].values())
  # G-mIoU: the harmonic mean of the positive mIoU and 1 - mean FPR.
  mean_fpr = np.mean([s['fpr'] for s in deaf['scenarios'].values()])
  miou = deaf['positive']['mIoU']
  assert deaf['G-mIoU'] == pytest.approx(2 * miou * (1 - mean_fpr) / (miou + 1 - mean_fpr), rel=1e-12)
  report = json.load(open(tmp_path / 'reports' / 'negative_audio_val_5.json'))
  assert set(report['scenarios']) == set(negatives.KINDS) and report['step'] == 5
  markdown = (tmp_path / 'reports' / 'negative_audio_val_5.md').read_text()
  for word in ('silence', 'noise', 'offscreen', 'G-mIoU', 'class-aware'):
    assert word in markdown
  assert (tmp_path / 'reports' / 'eval_val_5.json').exists()  # the positive run's own report
  lines = evaluations.summary_lines()
  assert len(lines) == 1 and 'FPR silence' in lines[0] and 'G-mIoU' in lines[0]
  # The dataset's own negative clips (val_silence, ...) are scored too, apart from the protocol's means.
  assert set(report['stored']) == set(negatives.KINDS)
  for kind, scenario in report['stored'].items():
    direct = evaluations.evaluator.run(_zero_audio_path(state), f'val_{kind}', predicted=True)
    assert scenario['split'] == f'val_{kind}' and scenario['num_clips'] == 2
    assert scenario['fpr'] == direct['predicted']['foreground_fraction']
    assert direct['mIoU'] is not None
  assert '| val_offscreen |' in markdown and 'stored clips FPR silence' in lines[0]


def test_the_stored_negative_splits_are_listed_and_a_missing_split_is_named(setup):
  config = setup[0]
  assert {'val_silence', 'val_noise', 'val_offscreen', 'test_offscreen'} <= set(registry.splits(config.data))
  with pytest.raises(ValueError, match="has no split 'vall'; it has"):
    registry.open_source(config.data, 'vall')


def test_harmonic_mean():
  assert negative_audio.harmonic(0.5, 0.5) == 0.5
  assert negative_audio.harmonic(0.0, 1.0) == 0.0
  assert negative_audio.harmonic(1.0, 0.0) == 1.0


# -- training with negatives -----------------------------------------------------------------------

@pytest.mark.slow
def test_training_with_negatives_lowers_the_fpr(tmp_path):
  """The tiny config trained 60 steps without and with half of its clips negative (same seed, data and
  steps): the negative-audio FPR falls (printed with -s). Outside the test's compile settings, on AMD
  EPYC Zen 4 at threshold 0.3: mean FPR 0.151 -> 0.019 at seed 0 and 0.407 -> 0.091 at seed 2; at
  seed 1 both runs predict nothing (FPR 0 and 0), which is why the test uses seed 0."""
  from qdformer_jax.training import train

  def mean_fpr(fraction: float) -> float:
    c = testing.tiny_synthetic_config(str(tmp_path / 'tfds'), clips=(16, 6, 2), total_steps=60, lr_drop_steps=(),
                                      log_every=60, eval_every=60, checkpoint_every=60, seed=0)
    c.eval_batch_size = 2
    c.model.dec_layers = 1
    c.eval.threshold = '0.3'
    c.data.negative_fraction = fraction
    c.evals = {'neg': {'kind': 'negative_audio'}}
    workdir = tmp_path / f'run_{fraction}'
    train.train_and_evaluate(c, str(workdir))
    report = json.load(open(workdir / 'reports' / 'negative_audio_val_60.json'))
    return report['mean_fpr']

  without, with_negatives = mean_fpr(0.0), mean_fpr(0.5)
  print(f'negative-audio mean FPR after 60 steps: {without:.4f} without negatives, {with_negatives:.4f} with half')
  assert without > 0.05
  assert with_negatives < 0.5 * without
