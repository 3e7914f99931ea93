"""Background noise for the noise-robustness evaluation (paper Fig. 7).

At evaluation time the input pipeline can replace a clip's stored log-mel by the log-mel of its
waveform (the record's ``audio`` feature, see ``qdformer_jax.data.records``) with background noise
mixed in at a given SNR, so that the noise passes through exactly the front end the clean sound
did (``audio.mix_at_snr``, then ``audio.clip_examples``: VGGish log-mel, or AST filterbanks when
the model's audio encoder is AST).

Noise sources (:class:`NoiseSource`):

* a directory of WAV files (``config.eval.noise_dir``; the paper draws its noise from AudioSet
  clips): for each clip one file is drawn at random, mixed down to mono and resampled to 16 kHz, a
  random excerpt of the clip's length is cut from it (files shorter than the clip are repeated);
* without a directory, built-in pink noise (power spectral density ∝ 1/f over 0 < f ≤ 8 kHz), a
  stationary broadband stand-in whose energy, like most environmental noise, is concentrated at
  low frequencies.

The draw is deterministic per (noise seed, clip index): every SNR of a sweep hears the same noise
excerpt, only its level changes, and two runs of a sweep see identical inputs.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import zlib
from pathlib import Path

import numpy as np

from qdformer_jax.data import audio, records

SAMPLE_RATE = audio.SAMPLE_RATE


def pink_noise(num_samples: int, rng: np.random.Generator) -> np.ndarray:
  """Pink noise: float64 [num_samples] with RMS 1 and power spectral density ∝ 1/f.

  White Gaussian noise shaped in the frequency domain: every rFFT bin above DC is scaled by
  1/sqrt(f), the DC bin is zeroed (no offset).
  """
  if num_samples < 2:
    raise ValueError(f'pink_noise needs at least 2 samples, got {num_samples}')
  spectrum = np.fft.rfft(rng.standard_normal(num_samples))
  frequencies = np.fft.rfftfreq(num_samples, d=1.0 / SAMPLE_RATE)
  spectrum[0] = 0.0
  spectrum[1:] /= np.sqrt(frequencies[1:])
  noise = np.fft.irfft(spectrum, n=num_samples)
  return noise / np.sqrt(np.mean(noise ** 2))


@functools.lru_cache(maxsize=64)
def _load_noise_file(path: str) -> np.ndarray:
  """A noise WAV -> float64 mono at 16 kHz (cached: a sweep reads each file once per SNR)."""
  samples, sample_rate = audio.read_wav(path)
  waveform = audio.resample(audio.to_mono_float(samples), sample_rate)
  if waveform.size == 0 or not np.any(waveform):
    raise ValueError(f'{path}: noise file is empty or silent; remove it from the noise directory')
  return waveform


class NoiseSource:
  """Background noise excerpts: WAV files of ``noise_dir`` (searched recursively), or pink noise.

  Raises FileNotFoundError when ``noise_dir`` is given but is not a directory holding ``.wav``
  files.
  """

  def __init__(self, noise_dir: str | None = None):
    self.noise_dir = noise_dir or None
    self.files: tuple[str, ...] = ()
    if self.noise_dir is not None:
      root = Path(self.noise_dir)
      if not root.is_dir():
        raise FileNotFoundError(f'eval.noise_dir={self.noise_dir!r} is not a directory; point it at a '
                                'folder of WAV files (e.g. AudioSet clips) or leave it unset for pink noise')
      self.files = tuple(sorted(os.fspath(p) for p in root.rglob('*') if p.suffix.lower() == '.wav'))
      if not self.files:
        raise FileNotFoundError(f'eval.noise_dir={self.noise_dir!r} holds no .wav file; add WAV noise '
                                'clips or leave it unset for pink noise')

  @property
  def description(self) -> str:
    if self.noise_dir is None:
      return 'pink noise (built-in, PSD ∝ 1/f)'
    return f'{len(self.files)} WAV files under {self.noise_dir}'

  def sample(self, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """float64 [num_samples] of noise at 16 kHz drawn with ``rng``."""
    if self.noise_dir is None:
      return pink_noise(num_samples, rng)
    path = self.files[int(rng.integers(len(self.files)))]
    waveform = _load_noise_file(path)
    if waveform.shape[0] > num_samples:
      start = int(rng.integers(waveform.shape[0] - num_samples + 1))
      return waveform[start:start + num_samples]
    return np.resize(waveform, num_samples)  # repeated to length


@dataclasses.dataclass(frozen=True)
class Condition:
  """Background noise for an evaluation: mixed into every clip's waveform at ``snr_db`` before the
  audio examples are computed, deterministic per (``seed``, clip index); from the WAV files under
  ``noise_dir``, else pink noise. An explicit argument of ``pipeline.make_eval_iterator``."""
  snr_db: float
  seed: int = 0
  noise_dir: str | None = None


@functools.lru_cache(maxsize=4)
def noise_source(noise_dir: str | None) -> NoiseSource:
  """The (cached) :class:`NoiseSource` of ``noise_dir``: the directory is listed once per process."""
  return NoiseSource(noise_dir)


def clip_rng(seed: int, clip_index: int, clip_id: str = '') -> np.random.Generator:
  """The noise generator of one clip: keyed by (seed, clip index), or by a hash of the clip id
  when the record has no index (index < 0)."""
  key = clip_index if clip_index >= 0 else zlib.crc32(clip_id.encode()) + (1 << 32)
  return np.random.default_rng([int(seed), int(key)])


def noisy_log_mel(waveform: np.ndarray, noise: np.ndarray, snr_db: float, *, num_frames: int,
                  num_real: int, pad_mode: str, encoder: str = 'vggish') -> np.ndarray:
  """float32 [num_frames, *audio.example_shape(encoder)]: the audio examples (VGGish log-mel, or AST
  filterbanks for encoder 'ast') of ``waveform`` (16 kHz) with ``noise`` mixed in at ``snr_db``, laid
  out as the builders lay out the clean ones (``audio.clip_examples``)."""
  mixed = audio.mix_at_snr(waveform, noise, snr_db)
  return audio.clip_examples(mixed, SAMPLE_RATE, num_frames=num_frames, num_real=num_real, pad_mode=pad_mode,
                             encoder=encoder)


def record_noisy_log_mel(record, snr_db: float, *, seed: int, clip_index: int, noise_dir: str | None,
                         pad_mode: str, encoder: str = 'vggish') -> np.ndarray:
  """The log-mel of one stored clip with background noise at ``snr_db`` (see the module doc).

  The noise covers the clip's real audio (``audio_length`` samples); its power is set against the
  power of that audio. Raises ValueError naming the clip when the record holds no waveform.
  """
  clip_id = record.get('clip_id', b'')
  clip_id = clip_id.decode() if isinstance(clip_id, bytes) else str(clip_id)
  waveform = records.decode_audio(record)
  if waveform.shape[0] == 0:
    raise ValueError(f'clip {clip_id!r} has no stored waveform (audio_length = 0; built from the '
                     "released .pkl log-mel without its wav): noise evaluation needs it; rebuild "
                     "with log_mel_source='wav'")
  frame_valid = np.asarray(record['frame_valid'], bool)
  rng = clip_rng(seed, clip_index, clip_id)
  noise = noise_source(noise_dir).sample(waveform.shape[0], rng)
  return noisy_log_mel(waveform, noise, snr_db, num_frames=frame_valid.shape[0],
                       num_real=int(frame_valid.sum()), pad_mode=pad_mode, encoder=encoder)
