"""The audio front ends (qdformer_jax.data.audio) against their references and physics: VGGish
log-mel against torchvggish, resampling against resampy, the AST filterbank against transformers'
ASTFeatureExtractor (and torchaudio's kaldi.fbank where torchaudio is installed).

torchvggish / resampy / torch / transformers / torchaudio are only used here, through importorskip;
the library is torch-free. Tolerances: log-mel max abs error <= 1e-5 against torchvggish (measured
~2e-7, float32 output rounding); resampling <= 1e-9 against resampy (measured ~6e-11, the filter
table fit); AST filterbank <= 1e-5 (normalised units, |values| ~1) against the extractor.
"""
from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
import scipy.io.wavfile

from qdformer_jax.data import audio

RATES = (16000, 22050, 44100, 48000)


def _real_looking(rate: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
  """Voiced-speech-like signal: gliding harmonics under a syllable envelope, plus noise bursts."""
  t = np.arange(int(seconds * rate)) / rate
  f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
  phase = 2 * np.pi * np.cumsum(f0) / rate
  voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
  envelope = np.clip(np.sin(2 * np.pi * 2.5 * t), 0, None) ** 2
  noise = rng.standard_normal(t.size) * (np.sin(2 * np.pi * 0.9 * t) > 0.6)
  return 0.3 * voiced * envelope + 0.05 * noise


def _vggish_input():
  pytest.importorskip('torch')
  pytest.importorskip('resampy')
  return pytest.importorskip('torchvggish.vggish_input')


@pytest.mark.parametrize('rate', RATES)
def test_matches_torchvggish_float_waveforms(rate):
  vggish_input = _vggish_input()
  rng = np.random.default_rng(rate)
  for wave in (rng.uniform(-1, 1, int(2.2 * rate)), _real_looking(rate, 2.2, rng)):
    ours = audio.waveform_to_log_mel(wave, rate)
    ref = vggish_input.waveform_to_examples(wave, rate, return_tensor=False)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (2, 96, 64)
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize('rate', RATES)
def test_matches_torchvggish_int16_wav_files(tmp_path, rate):
  """int16 stereo WAV files through torchvggish's own reader (wavfile_to_examples)."""
  vggish_input = _vggish_input()
  rng = np.random.default_rng(rate + 1)
  left = _real_looking(rate, 3.1, rng)
  stereo = np.stack([left, 0.5 * left + 0.02 * rng.standard_normal(left.size)], axis=1)
  path = tmp_path / 'a.wav'
  scipy.io.wavfile.write(path, rate, (np.clip(stereo, -1, 1) * 32767).astype(np.int16))
  ours = audio.wav_to_log_mel(path)
  ref = vggish_input.wavfile_to_examples(str(path), return_tensor=False)
  assert ours.shape == ref.shape == (3, 96, 64)
  assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize('rate', (22050, 44100, 48000, 8000))
def test_resample_matches_resampy(rate):
  resampy = pytest.importorskip('resampy')
  x = np.random.default_rng(0).uniform(-1, 1, int(0.7 * rate))
  ours = audio.resample(x, rate, 16000)
  ref = resampy.resample(x, rate, 16000, filter='kaiser_best')
  assert ours.shape == ref.shape
  assert np.abs(ours - ref).max() <= 1e-9


def test_resample_filter_matches_resampy_table():
  resampy = pytest.importorskip('resampy')
  table, precision, rolloff = resampy.filters.get_filter('kaiser_best')
  ours = audio._resample_half_window()
  assert int(precision) == audio._RESAMPLE_TABLE and float(rolloff) == audio._RESAMPLE_ROLLOFF
  assert ours.shape == table.shape
  assert np.abs(ours - table).max() <= 1e-10


def test_resample_band_limited_sine():
  """A 1 kHz sine resampled from 44.1 kHz is the 1 kHz sine at 16 kHz (away from the edges)."""
  rate = 44100
  t = np.arange(rate) / rate
  y = audio.resample(np.sin(2 * np.pi * 1000 * t), rate, 16000)
  assert y.shape == (16000,)
  expected = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
  assert np.abs(y - expected)[400:-400].max() < 1e-3


def test_resample_edge_cases():
  x = np.ones(3)
  assert audio.resample(x, 16000, 16000) is x
  assert audio.resample(np.ones(2), 48000, 16000).shape == (0,)
  with pytest.raises(ValueError, match='sample_rate'):
    audio.resample(x, 0, 16000)


def test_tone_lands_in_its_mel_band():
  """Torch-free check of the mel path: a 1 kHz tone peaks in the band whose centre is nearest."""
  t = np.arange(16000 * 2) / 16000
  examples = audio.waveform_to_log_mel(0.5 * np.sin(2 * np.pi * 1000 * t), 16000)
  assert examples.shape == (2, 96, 64)
  edges = np.linspace(audio._hertz_to_mel(125.0), audio._hertz_to_mel(7500.0), 66)
  centres_hz = 700.0 * (np.exp(edges[1:-1] / 1127.0) - 1.0)
  expected_band = int(np.argmin(np.abs(centres_hz - 1000.0)))
  assert np.all(examples[0, 10:].argmax(axis=-1) == expected_band)
  silence = audio.waveform_to_log_mel(np.zeros(16000), 16000)
  np.testing.assert_allclose(silence, np.log(0.01), rtol=0, atol=1e-6)


def test_mel_matrix_is_triangular_htk():
  weights = audio.mel_matrix()
  assert weights.shape == (257, 64)
  assert np.all(weights[0] == 0) and np.all(weights >= 0) and weights.max() <= 1.0
  hz = np.linspace(0, 8000, 257)
  assert np.all(weights[hz < 125.0] == 0) and np.all(weights[hz > 7500.0] == 0)
  # Adjacent triangles overlap so that their sum is 1 between the first and last centre.
  centres = 700.0 * (np.exp(np.linspace(audio._hertz_to_mel(125.0), audio._hertz_to_mel(7500.0),
                                        66)[1:-1] / 1127.0) - 1.0)
  inside = (hz > centres[0]) & (hz < centres[-1])
  np.testing.assert_allclose(weights[inside].sum(axis=1), 1.0, atol=1e-9)


def test_example_count():
  for samples, expected in ((15599, 0), (15760, 1), (16000 * 5, 5), (77000, 4)):
    frames = 1 + (samples - 400) // 160
    assert expected == frames // 96
    assert audio.waveform_to_log_mel(np.zeros(samples), 16000).shape == (expected, 96, 64)
  assert audio.waveform_to_log_mel(np.zeros(100), 16000).shape == (0, 96, 64)


def test_to_mono_float():
  stereo = np.array([[16384, -16384], [32767, 32767]], np.int16)
  np.testing.assert_allclose(audio.to_mono_float(stereo), [0.0, 32767 / 32768])
  np.testing.assert_allclose(audio.to_mono_float(np.array([0, 255], np.uint8)),
                             [-1.0, 127 / 128])
  np.testing.assert_allclose(audio.to_mono_float(np.array([2 ** 30], np.int32)), [0.5])
  assert audio.to_mono_float(np.zeros(3, np.float32)).dtype == np.float64
  with pytest.raises(ValueError, match='dtype'):
    audio.to_mono_float(np.zeros(3, np.int64))
  with pytest.raises(ValueError, match='shape'):
    audio.to_mono_float(np.zeros((2, 2, 2)))
  with pytest.raises(ValueError, match='channels'):
    audio.to_mono_float(np.zeros((2, 16000)))


def test_pad_examples():
  ex = np.arange(3, dtype=np.float32)[:, None, None] * np.ones((3, 96, 64), np.float32)
  repeat = audio.pad_examples(ex, 5, 'repeat')
  assert repeat.shape == (5, 96, 64) and np.all(repeat[3:] == 2) and np.all(repeat[:3] == ex)
  zeros = audio.pad_examples(ex, 5, 'zeros')
  assert np.all(zeros[3:] == 0) and np.all(zeros[:3] == ex)
  assert audio.pad_examples(ex, 2, 'repeat').shape == (2, 96, 64)
  assert np.all(audio.pad_examples(ex[:0], 5, 'repeat') == 0)
  with pytest.raises(ValueError, match='pad mode'):
    audio.pad_examples(ex, 5, 'edge')


def test_read_wav(tmp_path):
  data = (np.random.default_rng(0).standard_normal((800, 2)) * 1000).astype(np.int16)
  scipy.io.wavfile.write(tmp_path / 'a.wav', 22050, data)
  samples, rate = audio.read_wav(tmp_path / 'a.wav')
  assert rate == 22050 and samples.dtype == np.int16 and np.array_equal(samples, data)
  buf = io.BytesIO()
  scipy.io.wavfile.write(buf, 16000, np.zeros(10, np.float32))
  samples, rate = audio.read_wav(buf.getvalue())
  assert rate == 16000 and samples.dtype == np.float32
  (tmp_path / 'bad.wav').write_bytes(b'RIFF\x00\x00garbage')
  with pytest.raises(ValueError, match='bad.wav'):
    audio.read_wav(tmp_path / 'bad.wav')


def test_read_wav_refuses_a_truncated_file(tmp_path):
  """A 5 s WAV cut inside its data (the header announces more than the file holds) is an error naming
  the file, not 2.5 s of audio (scipy only warns)."""
  scipy.io.wavfile.write(tmp_path / 'full.wav', 16000, np.ones(80000, np.int16))
  data = (tmp_path / 'full.wav').read_bytes()
  (tmp_path / 'cut.wav').write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r'cut.wav: truncated WAV file \(its header announces 160044 bytes, the file '
                                      r'holds 80022\)'):
    audio.read_wav(tmp_path / 'cut.wav')
  with pytest.raises(ValueError, match=r'<bytes>: truncated WAV file'):
    audio.read_wav(data[:len(data) // 2])
  assert audio.read_wav(tmp_path / 'full.wav')[0].shape == (80000,)


class _Evil:
  """Unpickles to a function call (harmless here) unless the loader refuses it."""

  def __reduce__(self):
    return (os.getcwd, ())


def test_load_released_log_mel_numpy_and_refusal(tmp_path):
  value = np.random.default_rng(0).standard_normal((5, 1, 96, 64)).astype(np.float32)
  (tmp_path / 'a.pkl').write_bytes(pickle.dumps(value))
  np.testing.assert_array_equal(audio.load_released_log_mel(tmp_path / 'a.pkl'), value[:, 0])
  (tmp_path / 'evil.pkl').write_bytes(pickle.dumps(_Evil()))
  with pytest.raises(ValueError, match='evil.pkl'):
    audio.load_released_log_mel(tmp_path / 'evil.pkl')
  (tmp_path / 'shape.pkl').write_bytes(pickle.dumps(np.zeros((5, 96, 63), np.float32)))
  with pytest.raises(ValueError, match='shape'):
    audio.load_released_log_mel(tmp_path / 'shape.pkl')


def test_load_released_log_mel_torch(tmp_path):
  """As AVSBench wrote them: pickle.dump of vggish_input's tensor (requires_grad, [5,1,96,64])."""
  torch = pytest.importorskip('torch')
  value = np.random.default_rng(1).standard_normal((5, 96, 64)).astype(np.float32)
  tensor = torch.tensor(value, requires_grad=True)[:, None, :, :].float()
  with open(tmp_path / 'a.pkl', 'wb') as f:
    pickle.dump(tensor, f)
  np.testing.assert_array_equal(audio.load_released_log_mel(tmp_path / 'a.pkl'), value)
  torch.save(tensor.detach(), tmp_path / 'b.pkl')
  np.testing.assert_array_equal(audio.load_released_log_mel(tmp_path / 'b.pkl'), value)


def test_mix_at_snr():
  rng = np.random.default_rng(0)
  signal, noise = rng.standard_normal(4000), rng.standard_normal(1000)
  mixed = audio.mix_at_snr(signal, noise, 6.0)
  residual = mixed - signal
  assert abs(10 * np.log10(np.mean(signal ** 2) / np.mean(residual ** 2)) - 6.0) < 1e-9


# ---------------------------------------------------------------- the AST front end

def _ast_extractor():
  pytest.importorskip('torch')  # the extractor returns torch-padded arrays
  transformers = pytest.importorskip('transformers')
  # max_length 98 = one second of frames: the extractor applied to each second is our contract.
  return transformers.ASTFeatureExtractor(max_length=audio.AST_EXAMPLE_FRAMES)


@pytest.mark.parametrize('rate', (16000, 44100))
def test_ast_fbank_matches_the_feature_extractor_per_second(rate):
  # 2.4 s: two whole seconds and a partial third (padded with zero frames, as the extractor pads).
  rng = np.random.default_rng(rate)
  waveform = _real_looking(rate, 2.4, rng)
  ours = audio.waveform_to_ast_fbank(waveform, rate)
  assert ours.shape == (3, 98, 128) and ours.dtype == np.float32
  extractor = _ast_extractor()
  resampled = audio.resample(audio.to_mono_float(waveform), rate)
  for k in range(3):
    second = resampled[k * 16000:(k + 1) * 16000]
    # Our example k is the front end of second k alone.
    np.testing.assert_array_equal(audio.waveform_to_ast_fbank(second, 16000)[0], ours[k])
    # The extractor rounds its input to float32 first; near-silent frames then differ by ~2e-5 from
    # the float64 path, so the comparison feeds both the same float32 samples.
    second = second.astype(np.float32)
    ref = extractor(second, sampling_rate=16000, return_tensors='np')['input_values'][0]
    err = np.abs(audio.waveform_to_ast_fbank(second, 16000)[0] - ref).max()
    print(f'AST fbank second {k} at {rate} Hz: max abs err {err:.2e} (max |ref| {np.abs(ref).max():.2f})')
    assert err <= 1e-5


def test_ast_fbank_matches_torchaudio_kaldi_when_installed():
  torch = pytest.importorskip('torch')
  kaldi = pytest.importorskip('torchaudio.compliance.kaldi')
  waveform = _real_looking(16000, 1.0, np.random.default_rng(3))
  ref = kaldi.fbank(torch.from_numpy(waveform.astype(np.float32))[None], sample_frequency=16000,
                    window_type='hanning', num_mel_bins=128, dither=0.0).numpy()
  ours = audio.kaldi_fbank(waveform)
  assert ours.shape == ref.shape == (98, 128)
  assert np.abs(ours - ref).max() <= 1e-3  # log units; float32 reference


def test_ast_examples_count_and_layout():
  assert audio.example_shape('ast') == (98, 128) and audio.example_shape('vggish') == (96, 64)
  assert audio.example_shape('small') == (96, 64)
  rate = 16000
  assert audio.waveform_to_ast_fbank(np.zeros(399), rate).shape == (0, 98, 128)  # under one frame
  assert audio.waveform_to_ast_fbank(np.zeros(16000 + 400), rate).shape == (2, 98, 128)
  # A tone lands in its band: 1 kHz peaks in the Kaldi-mel band whose centre is nearest.
  tone = np.sin(2 * np.pi * 1000 * np.arange(16000) / rate)
  band = int(audio.waveform_to_ast_fbank(tone, rate)[0].mean(axis=0).argmax())
  centres = np.linspace(1127 * np.log(1 + 20 / 700), 1127 * np.log(1 + 8000 / 700), 130)[1:-1]
  assert abs(band - np.abs(centres - 1127 * np.log(1 + 1000 / 700)).argmin()) <= 1
  # clip_examples: T = 5 frames, 3 real ones, 2.2 s of audio -> 3 examples (the third partial), zeros after.
  ex = audio.clip_examples(tone.repeat(3)[:35200], rate, num_frames=5, num_real=3, pad_mode='repeat',
                           encoder='ast')
  assert ex.shape == (5, 98, 128) and not ex[3:].any() and ex[2].any()
  vgg = audio.clip_examples(tone, rate, num_frames=4, num_real=2, pad_mode='repeat')
  np.testing.assert_array_equal(vgg[1], vgg[0])  # one 0.96 s example, repeated to the real count
