"""Noise robustness: SNR mixing, noise sources, the stored waveform, and the sweep report end to end."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.io.wavfile
import scipy.signal
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from qdformer_jax import sharding, testing
from qdformer_jax.data import audio, noise, pipeline, records, registry, synthetic
from qdformer_jax.training import checkpoint, eval_mode


def tiny_config(data_dir: str):
  c = testing.tiny_synthetic_config(data_dir)
  c.model.dec_layers = 1
  c.eval_batch_size = 2
  c.eval.limit = 3
  c.eval.num_overlays = 2
  return c


def measured_snr_db(signal, mixed) -> float:
  signal = np.asarray(signal, np.float64)
  added = np.asarray(mixed, np.float64) - signal
  return 10 * np.log10(np.mean(signal ** 2) / np.mean(added ** 2))


# -- mixing and sources ----------------------------------------------------------------------------

@pytest.mark.parametrize('snr_db', [30.0, 10.0, 0.0, -7.5])
def test_mix_at_snr_achieves_the_snr(snr_db):
  rng = np.random.default_rng(1)
  t = np.arange(16000) / 16000
  signal = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
  for noise_len in (16000, 7000):  # a shorter noise is repeated to the signal's length
    mixed = audio.mix_at_snr(signal, noise.pink_noise(noise_len, rng), snr_db)
    assert mixed.shape == signal.shape
    assert abs(measured_snr_db(signal, mixed) - snr_db) < 1e-9


def test_pink_noise_has_a_1_over_f_spectrum():
  x = noise.pink_noise(2 ** 17, np.random.default_rng(0))
  assert abs(np.sqrt(np.mean(x ** 2)) - 1) < 1e-12 and abs(np.mean(x)) < 1e-3
  f, psd = scipy.signal.welch(x, fs=16000, nperseg=4096)
  band = (f >= 50) & (f <= 6000)
  slope = np.polyfit(np.log10(f[band]), np.log10(psd[band]), 1)[0]
  assert abs(slope + 1) < 0.05, slope  # PSD ∝ f^-1 (white noise would give 0)
  np.testing.assert_array_equal(x, noise.pink_noise(2 ** 17, np.random.default_rng(0)))


def test_noise_directory_source(tmp_path):
  rng = np.random.default_rng(0)
  long = (rng.standard_normal((44100 * 2, 2)) * 3000).astype(np.int16)   # 2 s stereo 44.1 kHz
  short = rng.standard_normal(4000).astype(np.float32) * 0.1             # 0.25 s mono 16 kHz
  os.makedirs(tmp_path / 'noise' / 'sub')
  scipy.io.wavfile.write(tmp_path / 'noise' / 'a.wav', 44100, long)
  scipy.io.wavfile.write(tmp_path / 'noise' / 'sub' / 'b.WAV', 16000, short)
  source = noise.NoiseSource(str(tmp_path / 'noise'))
  assert [os.path.basename(f) for f in source.files] == ['a.wav', 'b.WAV']
  seen = set()
  for seed in range(8):
    x = source.sample(16000, np.random.default_rng(seed))
    assert x.shape == (16000,) and np.all(np.isfinite(x)) and np.any(x)
    np.testing.assert_array_equal(x, source.sample(16000, np.random.default_rng(seed)))
    if np.allclose(x[:4000], x[4000:8000]):  # only the short file repeats with period 4000
      seen.add('b')
      np.testing.assert_allclose(x[:4000], short.astype(np.float64), rtol=0, atol=1e-7)
    else:
      seen.add('a')
  assert seen == {'a', 'b'}
  with pytest.raises(FileNotFoundError, match='noise_dir'):
    noise.NoiseSource(str(tmp_path / 'missing'))
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='no .wav'):
    noise.NoiseSource(str(tmp_path / 'empty'))


def test_audio_record_round_trip():
  wave = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 1e-6], np.float64)
  pcm, length = records.encode_audio(wave, num_frames=1)
  assert pcm.dtype == np.int16 and pcm.shape == (16000,) and int(length) == 6
  np.testing.assert_array_equal(pcm[:6], [0, 16384, -16384, 32767, -32768, 0])
  assert not pcm[6:].any()
  back = records.decode_audio({'audio': pcm, 'audio_length': length})
  np.testing.assert_allclose(back, wave, rtol=0, atol=1 / 32768)
  long, length = records.encode_audio(np.full(20000, 0.25), num_frames=1)  # cut to 1 s
  assert int(length) == 16000 and np.all(long == 8192)
  with pytest.raises(KeyError, match='rebuild'):
    records.decode_audio({'clip_id': b'x', 'log_mel': np.zeros((1, 96, 64))})


# -- the stored waveform and the noisy log-mel through the input pipeline --------------------------

@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))




def test_synthetic_records_hold_their_waveform(data_dir):
  config = tiny_config(data_dir)
  source = registry.open_source(config.data, 'val')
  record = source[1]
  index = int(record['clip_id'].decode().rsplit('_', 1)[1])  # TFDS stores clips in hashed-key order
  from tfds_builders.synthetic_avs import synthetic_avs_dataset_builder as builder
  clip_config = builder.make_config('semantic', image_size=32, num_frames=3, train_clips=2,
                                    validation_clips=3, test_clips=2, negative_clips=0)
  clip = synthetic.make_clip(clip_config.clip_config(),
                             np.random.default_rng(builder.clip_seed(0, 'val', index)))
  assert int(record['audio_length']) == 3 * 16000
  np.testing.assert_allclose(records.decode_audio(record), clip.waveform, rtol=0, atol=0.5 / 32768)
  # Recomputed from the int16 waveform, the clean log-mel matches the stored one (measured 9e-4).
  clean = audio.pad_examples(audio.waveform_to_log_mel(records.decode_audio(record), 16000), 3, 'repeat')
  np.testing.assert_allclose(clean, record['log_mel'], rtol=0, atol=5e-3)


def test_noisy_log_mel_in_the_eval_pipeline(data_dir):
  config = tiny_config(data_dir)
  clean = next(pipeline.make_eval_iterator(config.data, 'val', global_batch_size=2, limit=3)[0])
  distance = {}
  for snr in (20.0, 0.0, -10.0):
    batch = next(pipeline.make_eval_iterator(config.data, 'val', noise_condition=noise.Condition(snr), global_batch_size=2,
                                             limit=3)[0])
    again = next(pipeline.make_eval_iterator(config.data, 'val', noise_condition=noise.Condition(snr), global_batch_size=2,
                                             limit=3)[0])
    np.testing.assert_array_equal(batch['log_mel'], again['log_mel'])  # deterministic
    for key in ('frames', 'semantic', 'gt_valid', 'frame_valid'):
      np.testing.assert_array_equal(batch[key], clean[key])
    distance[snr] = float(np.mean(np.abs(batch['log_mel'] - clean['log_mel'])))
    # Independent reference for clip 0: pink noise of generator (seed, index), mixed by hand.
    record = registry.open_source(config.data, 'val')[0]
    wave = records.decode_audio(record)
    n = noise.pink_noise(wave.size, np.random.default_rng([0, 0]))
    mixed = wave + n * np.sqrt(np.mean(wave ** 2) / np.mean(n ** 2) / 10 ** (snr / 10))
    np.testing.assert_allclose(batch['log_mel'][0], audio.waveform_to_log_mel(mixed, 16000)[:3],
                               rtol=0, atol=1e-4)
  assert 0 < distance[20.0] < distance[0.0] < distance[-10.0], distance
  other_seed = next(pipeline.make_eval_iterator(config.data, 'val', noise_condition=noise.Condition(0.0, 1),
                                                global_batch_size=2, limit=3)[0])
  assert not np.allclose(other_seed['log_mel'], batch['log_mel'])


def test_ast_filterbanks_in_the_pipeline_clean_and_noisy(data_dir):
  """model.audio.encoder='ast': the pipeline computes AST filterbanks from the stored waveform, clean
  and, in the noise sweep, from the same mixture as the log-mel path."""
  config = tiny_config(data_dir)
  config.model.audio.encoder = 'ast'  # data.audio_encoder follows (a reference)
  assert config.data.audio_encoder == 'ast'
  record = registry.open_source(config.data, 'val')[0]
  wave = records.decode_audio(record)
  clean = next(pipeline.make_eval_iterator(config.data, 'val', global_batch_size=2, limit=3)[0])
  assert clean['log_mel'].shape == (2, 3, 98, 128)
  np.testing.assert_array_equal(clean['log_mel'][0], audio.waveform_to_ast_fbank(wave, 16000)[:3])
  noisy = next(pipeline.make_eval_iterator(config.data, 'val', noise_condition=noise.Condition(0.0), global_batch_size=2, limit=3)[0])
  n = noise.pink_noise(wave.size, np.random.default_rng([0, 0]))
  mixed = wave + n * np.sqrt(np.mean(wave ** 2) / np.mean(n ** 2))
  np.testing.assert_allclose(noisy['log_mel'][0], audio.waveform_to_ast_fbank(mixed, 16000)[:3], rtol=0, atol=1e-4)


def test_avsbench_records_hold_their_waveform(tmp_path):
  from tfds_builders import fixtures
  from tfds_builders.avs_object import AvsObject
  from tfds_builders.avs_semantic import AvsSemantic
  raw = fixtures.write_fixtures(tmp_path / 'raw')
  for cls, name, cfg, key, pad in ((AvsObject, 'avs_object', 's4', 'avs_object', 'repeat'),
                                   (AvsSemantic, 'avs_semantic', 'all', 'avs_semantic', 'zeros')):
    builder = cls(config=cfg, data_dir=str(tmp_path / 'data'), file_format='array_record',
                  raw_dir=raw[key])
    builder.download_and_prepare()
    source = builder.as_data_source('val')
    for i in range(len(source)):
      record = source[i]
      t = record['frame_valid'].shape[0]
      real = int(record['frame_valid'].sum())
      wav = _wav_path(raw[key], name, record)
      samples, rate = audio.read_wav(wav)
      expected = audio.resample(audio.to_mono_float(samples), rate)[:t * 16000]
      assert int(record['audio_length']) == expected.size
      np.testing.assert_allclose(records.decode_audio(record), expected, rtol=0, atol=0.5 / 32768 + 1e-12)
      assert not record['audio'][expected.size:].any()
      clean = audio.pad_examples(audio.waveform_to_log_mel(records.decode_audio(record), 16000)[:real],
                                 real, pad)
      # int16 rounding of the waveform moves quiet mel bins a little (measured: max 0.015, mean 5e-4).
      error = np.abs(clean - record['log_mel'][:real])
      assert error.max() < 0.05 and error.mean() < 1e-3, (error.max(), error.mean())
      data_config = tiny_config(str(tmp_path)).data
      data_config.update(name=name, builder_config=cfg)
      noisy = pipeline.record_log_mel(dict(record, _index=i), data_config, noise.Condition(0.0))
      assert noisy.shape == (t, 96, 64)
      assert not np.allclose(noisy[:real], record['log_mel'][:real])
      assert not noisy[real:].any()  # AVSS v1 clips: the padded frames stay silent


def _wav_path(raw_dir, name, record):
  from qdformer_jax.data import avsbench
  clip_id = record['clip_id'].decode()
  specs = (avsbench.list_s4(raw_dir, 'val') if name == 'avs_object'
           else avsbench.list_avss(raw_dir, 'val'))
  return next(s.wav for s in specs if s.clip_id == clip_id)


# -- the sweep, end to end through config.mode = 'eval' ---------------------------------------------

class AudioDrivenModel(nnx.Module):
  """A stand-in for QDFormer in the eval path: class logits are a fixed linear map of each frame's
  mean log-mel, masks follow frame brightness. Its predictions move with the audio (so noise must
  change the metrics) and it compiles in seconds; the real model's eval step is exercised in
  tests/test_eval_outputs.py."""

  def __init__(self, num_classes: int, num_queries: int = 2):
    rng = np.random.default_rng(0)
    self.num_classes, self.num_queries = num_classes, num_queries
    self.proj = nnx.Param(jnp.asarray(rng.standard_normal((64, num_queries * num_classes)), jnp.float32))

  def __call__(self, frames, log_mel, frame_valid, *, train: bool):
    del frame_valid, train
    b, t = log_mel.shape[:2]
    feature = log_mel.mean(axis=2)                                               # [B,T,64]
    feature = (feature - feature.mean(-1, keepdims=True)) / (feature.std(-1, keepdims=True) + 1e-6)
    logits = (feature @ self.proj[...]).reshape(b, t, self.num_queries, self.num_classes)
    grey = frames.astype(jnp.float32).mean(-1)[:, :, ::4, ::4]                  # [B,T,H/4,W/4]
    masks = jnp.stack([(grey - 100.0) / 10.0, (100.0 - grey) / 10.0][:self.num_queries], axis=2)
    return {'pred_logits': logits, 'pred_masks': masks}


def test_noise_sweep_report_end_to_end(data_dir, tmp_path, monkeypatch):
  config = tiny_config(data_dir)
  workdir = str(tmp_path / 'run')
  mesh = sharding.make_mesh(config)
  replicated = NamedSharding(mesh, P())

  def stub_train_state(config, mesh, drop_steps):
    graphdef, state = nnx.split((AudioDrivenModel(config.data.num_classes), nnx.Dict()))
    state = jax.device_put(state, replicated)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
    return graphdef, state, abstract

  _, state, _ = stub_train_state(config, mesh, ())
  ckpt = checkpoint.Checkpoints(workdir, keep=1)
  ckpt.save(3, state, None, {'step': 3})
  ckpt.wait()
  ckpt.close()

  def stub_abstract_model(config):
    return nnx.split(nnx.eval_shape(lambda: AudioDrivenModel(config.data.num_classes)))

  monkeypatch.setattr(eval_mode, 'abstract_model', stub_abstract_model)
  config.mode = 'eval'
  config.eval.noise_snrs = (10.0, -20.0)
  clean = eval_mode.evaluate_checkpoint(config, workdir)
  reports = os.path.join(workdir, 'reports')
  assert json.load(open(os.path.join(reports, 'eval_val_3.json')))['metrics']['num_clips'] == 3
  overlays = sorted(os.listdir(os.path.join(reports, 'overlays', 'val_3')))
  assert overlays == ['clip_00000.png', 'clip_00001.png']

  report = json.load(open(os.path.join(reports, 'noise_val_3.json')))
  assert report['metrics'] == ['mIoU', 'F'] and report['noise']['source'].startswith('pink')
  assert [row['snr_db'] for row in report['table']] == ['clean', 10.0, -20.0]
  assert report['table'][0]['mIoU'] == clean['mIoU']
  for snr in ('10.0', '-20.0'):
    results = report['sweep'][snr]
    assert results['noise_snr_db'] == float(snr) and results['num_clips'] == 3
    assert 0.0 <= results['mIoU'] <= 1.0 and 0.0 <= results['F'] <= 1.0
  # The model hears the audio: at -20 dB the predictions, hence the metrics, change.
  assert report['sweep']['-20.0']['mIoU'] != clean['mIoU']
  markdown = open(os.path.join(reports, 'noise_val_3.md')).read().splitlines()
  assert '| SNR (dB) | mIoU | F |' in markdown
  rows = [line for line in markdown if line.startswith('| ') and 'SNR' not in line]
  assert [r.split(' | ')[0] for r in rows] == ['| clean', '| 10', '| -20']
  assert f"{report['sweep']['-20.0']['mIoU']:.4f}" in rows[2]
  with Image.open(os.path.join(reports, 'noise_val_3.png')) as im:
    assert im.size[0] > 100 and im.size[1] > 100
