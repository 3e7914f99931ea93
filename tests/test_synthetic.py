"""Tests of the procedural dataset: qdformer_jax.data.synthetic and tfds_builders/synthetic_avs."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import scipy.signal

from qdformer_jax.data import audio, records, synthetic

tfds_builder = pytest.importorskip('tfds_builders.synthetic_avs')

SMALL = dict(image_size=32, num_frames=3)
TINY_BUILD = dict(image_size=32, num_frames=3, train_clips=6, validation_clips=3, test_clips=3, negative_clips=0)


def _assert_clips_equal(a: synthetic.Clip, b: synthetic.Clip):
  np.testing.assert_array_equal(a.frames, b.frames)
  np.testing.assert_array_equal(a.semantic, b.semantic)
  np.testing.assert_array_equal(a.waveform, b.waveform)
  assert a.metadata.keys() == b.metadata.keys()
  for key in a.metadata:
    np.testing.assert_array_equal(a.metadata[key], b.metadata[key], err_msg=key)


# ------------------------------------------------------------------------------------------ generator

@pytest.mark.parametrize('task', synthetic.TASKS)
def test_clip_shapes_dtypes_and_label_range(task):
  config = synthetic.ClipConfig(task=task, **SMALL)
  for seed in range(6):
    clip = synthetic.make_clip(config, seed)
    assert clip.frames.shape == (3, 32, 32, 3) and clip.frames.dtype == np.uint8
    assert clip.semantic.shape == (3, 32, 32) and clip.semantic.dtype == np.uint8
    assert clip.waveform.shape == (3 * 16000,) and clip.waveform.dtype == np.float32
    assert np.all(np.abs(clip.waveform) <= 0.99 + 1e-6)
    allowed = {0, 1} if task != 'semantic' else set(range(config.num_classes + 1))
    assert set(np.unique(clip.semantic)) <= allowed
    meta = clip.metadata
    n = len(meta['classes'])
    assert config.min_objects <= n <= config.max_objects
    assert len(set(meta['classes'])) == n and np.all(meta['classes'] < config.num_classes)
    assert meta['sounding'].shape == meta['visible'].shape == (3, n)
    assert meta['object_masks'].shape == (3, n, 32, 32)
    assert not set(meta['offscreen_classes']) & set(meta['classes'])
    log_mel = synthetic.clip_log_mel(clip.waveform, 3)
    assert log_mel.shape == (3, 96, 64) and log_mel.dtype == np.float32
    assert np.all(np.isfinite(log_mel))


def test_determinism_and_seed_sensitivity():
  config = synthetic.ClipConfig(**SMALL)
  _assert_clips_equal(synthetic.make_clip(config, 7), synthetic.make_clip(config, 7))
  _assert_clips_equal(synthetic.make_clip(config, 7),
                      synthetic.make_clip(config, np.random.default_rng(7)))
  a, b = synthetic.make_clip(config, 7), synthetic.make_clip(config, 8)
  assert not np.array_equal(a.frames, b.frames)
  assert not np.array_equal(a.waveform, b.waveform)


@pytest.mark.parametrize('task', synthetic.TASKS)
def test_masks_cover_exactly_the_sounding_objects(task):
  config = synthetic.ClipConfig(task=task, **SMALL)
  for seed in range(20):
    clip = synthetic.make_clip(config, seed)
    meta = clip.metadata
    masks, sounding = meta['object_masks'], meta['sounding']
    # Objects' visible pixels are disjoint (occlusion resolved).
    assert np.all(masks.sum(axis=1) <= 1)
    expected = np.zeros_like(clip.semantic)
    for i, c in enumerate(meta['classes']):
      label = 1 if task != 'semantic' else c + 1
      expected[masks[:, i] & sounding[:, i, None, None]] = label
    np.testing.assert_array_equal(clip.semantic, expected)
    # Pixels of silent objects are background in the label map.
    silent = (masks & ~sounding[:, :, None, None]).any(axis=1)
    assert np.all(clip.semantic[silent] == 0)
    if task == 'single':  # one source, sounding in every frame
      assert np.all(sounding.sum(axis=1) == 1)
      assert np.all(sounding == sounding[:1])


def test_objects_have_their_class_colour():
  """Independent of the masks' bookkeeping: inside an object the mean colour is its class colour."""
  config = synthetic.ClipConfig(image_size=64, num_frames=2)
  for seed in range(10):
    clip = synthetic.make_clip(config, seed)
    for i, c in enumerate(clip.metadata['classes']):
      pixels = clip.frames[clip.metadata['object_masks'][:, i]].astype(np.float64)
      if len(pixels) < 30:
        continue
      colour = np.asarray(synthetic.CLASSES[c].colour, np.float64)
      mean = pixels.mean(axis=0)
      # Brightness jitter 0.85-1.1 and textures (0.6 factor) only scale the colour: the direction
      # of the mean colour matches the class colour (cosine > 0.97) and no other class is closer.
      cosine = lambda u, v: u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
      assert cosine(mean, colour) > 0.97, (seed, synthetic.CLASSES[c].name, mean)


def test_rates_over_200_clips():
  """Visible-but-silent and off-screen rates lie in the intended ranges (docs/DESIGN.md §4.3)."""
  config = synthetic.ClipConfig(task='semantic', image_size=32, num_frames=5)
  silent, pairs, offscreen_clips, offscreen_frames, n_objects, empty_frames = 0, 0, 0, 0, [], 0
  for seed in range(200):
    meta = synthetic.make_clip(config, seed).metadata
    visible, sounding = meta['visible'], meta['sounding']
    pairs += visible.sum()
    silent += (visible & ~sounding).sum()
    offscreen_clips += len(meta['offscreen_classes']) > 0
    offscreen_frames += meta['offscreen_sounding'].any(axis=1).sum()
    n_objects.append(len(meta['classes']))
    empty_frames += (~(visible & sounding).any(axis=1)).sum()
  assert 0.3 <= silent / pairs <= 0.5, silent / pairs
  assert 0.35 <= offscreen_clips / 200 <= 0.65, offscreen_clips
  assert 0.2 <= offscreen_frames / 1000 <= 0.4, offscreen_frames
  assert set(n_objects) == {1, 2, 3}
  assert empty_frames / 1000 < 0.4, empty_frames  # most frames have something to segment


def test_single_task_silent_rate():
  config = synthetic.ClipConfig(task='single', image_size=32, num_frames=5)
  silent = pairs = 0
  for seed in range(100):
    meta = synthetic.make_clip(config, seed).metadata
    pairs += meta['visible'].sum()
    silent += (meta['visible'] & ~meta['sounding']).sum()
  assert 0.35 <= silent / pairs <= 0.6, silent / pairs


def test_class_tone_fundamental_matches_spec():
  """Welch PSD (scipy) of each class tone: the lowest strong peak sits at the class f0."""
  rng = np.random.default_rng(0)
  for c, spec in enumerate(synthetic.CLASSES):
    tone = synthetic.class_tone(c, 32000, rng)
    assert abs(np.sqrt(np.mean(tone ** 2)) - 1.0) < 1e-6
    freqs, psd = scipy.signal.welch(tone, fs=16000, nperseg=4096)
    peaks, _ = scipy.signal.find_peaks(psd, height=0.01 * psd.max())
    lowest = freqs[peaks[0]]
    # tolerance: half the Welch bin (~2 Hz) plus the vibrato depth plus 1 %
    assert abs(lowest - spec.f0) <= 2.0 + spec.f0 * (spec.fm_depth + 0.01), (spec.name, lowest, spec.f0)
    assert freqs[peaks[-1]] < 7200.0


def test_audio_segments_align_with_log_mel_examples():
  """A source sounding only in frame t puts energy in log-mel example t and nowhere else."""
  for t in range(4):
    sounding = np.zeros((4, 1), bool)
    sounding[t] = True
    wave = synthetic.class_waveform([3], 4, seed_or_rng=1, sounding=sounding)
    log_mel = synthetic.clip_log_mel(wave, 4)
    energy = np.exp(log_mel).mean(axis=(1, 2))  # mean mel energy (plus the 0.01 offset)
    assert np.argmax(energy) == t
    above_floor = energy - audio.LOG_OFFSET  # silence is log(0.01)
    leak = np.delete(above_floor, t) / above_floor[t]
    # Only the one STFT window at each boundary that overlaps the neighbour's segment sees the
    # 10 ms ramp: measured 0.3-0.4 % of the sounding example's energy.
    assert np.all(leak < 0.008), leak
  # Segment boundaries sit every 15360 samples (VGGish example length).
  assert synthetic.SEGMENT_SAMPLES == audio.EXAMPLE_FRAMES * 160


def test_classes_are_separable_in_log_mel():
  """A nearest-centroid classifier on mean log-mel spectra identifies every class in noise."""
  def feature(classes, seed):
    wave = synthetic.class_waveform(classes, 1, seed_or_rng=seed, snr_db=5.0)
    return synthetic.clip_log_mel(wave, 1)[0].mean(axis=0)

  num = synthetic.MAX_CLASSES
  centroids = np.stack([np.mean([feature([c], 100 + s) for s in range(2)], axis=0) for c in range(num)])
  correct = 0
  for c in range(num):
    for s in range(2):
      distances = np.linalg.norm(centroids - feature([c], 500 + s), axis=1)
      correct += np.argmin(distances) == c
  assert correct == 2 * num


def test_class_names_and_config_validation():
  assert len(synthetic.CLASS_NAMES) == synthetic.MAX_CLASSES == len(set(synthetic.CLASS_NAMES))
  assert synthetic.class_names(8) == synthetic.CLASS_NAMES[:8]
  assert len({c.colour for c in synthetic.CLASSES}) == synthetic.MAX_CLASSES
  assert len({c.shape for c in synthetic.CLASSES}) == synthetic.MAX_CLASSES
  f0 = np.array([synthetic.CLASSES[c].f0 for c in range(8)])
  assert f0.min() == pytest.approx(150.0) and f0.max() > 1800.0  # first 8 span the range
  assert synthetic.ClipConfig(task='multi').min_objects == 2
  assert synthetic.ClipConfig(task='semantic').num_labels == 8
  assert synthetic.ClipConfig(task='single').num_labels == 1
  with pytest.raises(ValueError, match='task'):
    synthetic.ClipConfig(task='pano')
  with pytest.raises(ValueError, match='num_classes'):
    synthetic.ClipConfig(num_classes=3)
  with pytest.raises(ValueError, match='sounding'):
    synthetic.class_waveform([0, 1], 2, 0, sounding=np.ones((2, 3), bool))
  with pytest.raises(TypeError):
    synthetic.make_clip({'task': 'semantic'}, 0)


# -------------------------------------------------------------------------------------------- builder

def _read_split(builder, split):
  source = builder.as_data_source(split)
  return sorted((source[i] for i in range(len(source))), key=lambda ex: ex['clip_id'])


def test_build_examples_and_determinism(tmp_path):
  first = tfds_builder.build('semantic', str(tmp_path / 'a'), **TINY_BUILD)
  second = tfds_builder.build('semantic', str(tmp_path / 'b'), **TINY_BUILD)
  assert first.builder_config.name == second.builder_config.name != 'semantic'
  for split, size in [('train', 6), ('val', 3), ('test', 3)]:
    a, b = _read_split(first, split), _read_split(second, split)
    assert len(a) == len(b) == size
    for ex_a, ex_b in zip(a, b):
      assert ex_a.keys() == ex_b.keys()
      for key in ex_a:
        if isinstance(ex_a[key], np.ndarray):
          np.testing.assert_array_equal(ex_a[key], ex_b[key], err_msg=key)
        else:
          assert ex_a[key] == ex_b[key], key
  # The array_record files themselves are byte-identical.
  dir_a, dir_b = first.data_path, second.data_path
  for name in sorted(os.listdir(dir_a)):
    if 'array_record' in name:
      assert (dir_a / name).read_bytes() == (dir_b / name).read_bytes(), name

  ex = _read_split(first, 'val')[0]
  assert ex['log_mel'].shape == (3, 96, 64) and ex['log_mel'].dtype == np.float32
  assert ex['gt_valid'].dtype == np.bool_ and ex['gt_valid'].all()
  assert ex['frame_valid'].dtype == np.bool_ and ex['frame_valid'].all()
  assert ex['category'] in ('semantic', b'semantic')
  assert len(ex['frames']) == len(ex['semantic']) == 3
  # The record holds exactly the generated clip (PNG is lossless).
  index = int(ex['clip_id'].decode().rsplit('_', 1)[1])
  config = first.builder_config
  clip = synthetic.make_clip(config.clip_config(), np.random.default_rng(
      tfds_builder.synthetic_avs_dataset_builder.clip_seed(config.seed, 'val', index)))
  for t in range(3):
    np.testing.assert_array_equal(records.decode_image(ex['frames'][t], 'RGB'), clip.frames[t])
    np.testing.assert_array_equal(records.decode_image(ex['semantic'][t], 'L'), clip.semantic[t])
  np.testing.assert_array_equal(ex['log_mel'], synthetic.clip_log_mel(clip.waveform, 3))
  assert first.info.metadata['class_names'] == list(synthetic.CLASS_NAMES[:8])
  assert first.info.metadata['num_labels'] == 8

  # Idempotent: a second build() of the same variant reuses the files.
  stamp = {name: os.path.getmtime(dir_a / name) for name in os.listdir(dir_a)}
  again = tfds_builder.build('semantic', str(tmp_path / 'a'), **TINY_BUILD)
  assert {name: os.path.getmtime(dir_a / name) for name in os.listdir(dir_a)} == stamp
  assert len(again.as_data_source('train')) == 6


def test_seed_override_changes_examples_and_binary_configs(tmp_path):
  base = tfds_builder.make_config('semantic', **TINY_BUILD)
  other = tfds_builder.make_config('semantic', seed=1, **TINY_BUILD)
  assert base.name != other.name
  ex_a = tfds_builder.make_example(base, 'train', 0)
  ex_b = tfds_builder.make_example(other, 'train', 0)
  assert ex_a['frames'] != ex_b['frames']
  assert not np.array_equal(ex_a['log_mel'], ex_b['log_mel'])
  # same seed -> same record bytes, regardless of generation order
  again = tfds_builder.make_example(base, 'train', 0)
  assert ex_a['frames'] == again['frames'] and ex_a['semantic'] == again['semantic']
  # distinct splits hold distinct clips
  assert ex_a['frames'] != tfds_builder.make_example(base, 'val', 0)['frames']

  single = tfds_builder.build('single', str(tmp_path), image_size=32, num_frames=2,
                              train_clips=3, validation_clips=1, test_clips=0, negative_clips=1)
  # No test clips: no negative test splits either.
  assert set(single.info.splits) == {'train', 'val', 'val_silence', 'val_noise', 'val_offscreen'}
  assert single.info.metadata['num_labels'] == 1
  for ex in _read_split(single, 'train'):
    labels = np.stack([records.decode_image(m, 'L') for m in ex['semantic']])
    assert set(np.unique(labels)) <= {0, 1} and labels.max() == 1


def test_registered_configs_and_bad_overrides():
  names = [c.name for c in tfds_builder.BUILDER_CONFIGS]
  assert names == ['single', 'multi', 'semantic', 'semantic_hard']
  assert tfds_builder.make_config('multi') is tfds_builder.BUILDER_CONFIGS[1]
  assert tfds_builder.make_config('multi', image_size=64) is tfds_builder.BUILDER_CONFIGS[1]
  with pytest.raises(ValueError, match='no config'):
    tfds_builder.make_config('panoptic')
  with pytest.raises(ValueError, match='not fields'):
    tfds_builder.make_config('semantic', imagesize=32)


def test_hard_variant_leaves_default_clips_unchanged_and_mixes_more_sources():
  cfg = tfds_builder.make_config('semantic_hard').clip_config()
  assert cfg.shared_partials and cfg.max_offscreen == 2
  assert synthetic.shared_f0(1) == synthetic.shared_f0(0) == synthetic.CLASSES[0].f0
  offscreen, sounding = [], []
  for seed in range(40):
    meta = synthetic.make_clip(dataclasses.replace(cfg, image_size=32, num_frames=3), seed).metadata
    offscreen.append(len(meta['offscreen_classes']))
    sounding.append(meta['sounding'].sum(1).min())
    assert not set(meta['offscreen_classes']) & set(meta['classes'])
    assert meta['frame_snr_db'].shape == (3,) and (meta['frame_snr_db'] <= meta['snr_db']).all()
  assert max(offscreen) == 2 and min(sounding) >= 1
  # The default variant keeps its random stream: no extra draws when the new fields are at default.
  meta = synthetic.make_clip(synthetic.ClipConfig(image_size=32, num_frames=3), 0).metadata
  assert (meta['frame_snr_db'] == meta['snr_db']).all()


def test_negative_splits_hold_clips_with_nothing_visible_sounding(tmp_path):
  with_negatives = dict(TINY_BUILD, negative_clips=2)
  built = tfds_builder.build('semantic_hard', str(tmp_path), **with_negatives)
  assert set(built.info.splits) == {'train', 'val', 'test', *tfds_builder.NEGATIVE_SPLITS}
  config = built.builder_config
  for split in tfds_builder.NEGATIVE_SPLITS:
    kind = tfds_builder.negative_kind(split)
    examples = _read_split(built, split)
    assert len(examples) == 2
    for ex in examples:
      assert ex['clip_id'].decode().startswith(f'synthetic_semantic_{split}_')
      assert all(not records.decode_image(m, 'L').any() for m in ex['semantic'])  # empty targets
      frames = np.stack([records.decode_image(f, 'RGB') for f in ex['frames']])
      index = int(ex['clip_id'].decode().rsplit('_', 1)[1])
      clip = synthetic.make_clip(config.clip_config(), np.random.default_rng(
          tfds_builder.synthetic_avs_dataset_builder.clip_seed(config.seed, split, index)), negative=kind)
      np.testing.assert_array_equal(frames, clip.frames)
      meta = clip.metadata
      assert meta['negative'] == kind and len(meta['classes']) >= 2 and not meta['sounding'].any()
      waveform = records.decode_audio(ex)
      if kind == 'silence':
        assert not waveform.any()
      elif kind == 'noise':
        assert len(meta['offscreen_classes']) == 0 and 0 < np.sqrt(np.mean(waveform ** 2)) < 0.2
      else:  # off-screen sources only: classes that are not visible, one or more in every frame
        assert not set(meta['offscreen_classes']) & set(meta['classes'])
        assert meta['offscreen_sounding'].any(axis=1).all()
  # The positive splits do not change when negative splits are added.
  plain = tfds_builder.build('semantic_hard', str(tmp_path / 'plain'), **TINY_BUILD)
  for split in ('train', 'val', 'test'):
    for a, b in zip(_read_split(built, split), _read_split(plain, split)):
      assert a['frames'] == b['frames'] and a['semantic'] == b['semantic']
      np.testing.assert_array_equal(a['audio'], b['audio'])
  with pytest.raises(ValueError, match='negative must be None or one of'):
    synthetic.make_clip(config.clip_config(), 0, negative='quiet')
