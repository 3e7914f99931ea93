"""The audio front ends in NumPy/SciPy (docs/DESIGN.md §4.1): VGGish log-mel and, for the Audio
Spectrogram Transformer, Kaldi filterbanks (:func:`waveform_to_ast_fbank`, :func:`waveform_to_examples`).

A torch-free transcription of torchvggish's ``vggish_input.waveform_to_examples`` and
``mel_features``: mono mix-down, resampling to 16 kHz, 25 ms periodic-Hann frames every 10 ms,
512-point FFT magnitude, 64 HTK-mel bands over 125-7500 Hz, log(mel + 0.01), then non-overlapping
96-frame examples. Used by every dataset builder (synthetic and AVSBench) and by noise-robustness
evaluation, so that audio always takes exactly one path to the model.

Resampling reproduces ``resampy.resample`` with its ``kaiser_best`` filter (the resampler
torchvggish calls) in NumPy, so that features of 22.05/44.1/48 kHz audio match torchvggish's without
resampy, numba or torch.

Also here: WAV reading (:func:`read_wav`), padding to a fixed number of examples
(:func:`pad_examples`), the released AVSBench ``.pkl`` log-mel files (:func:`load_released_log_mel`;
torch is needed only when a file holds a torch tensor, as the released ones do) and mixing at a
given SNR (:func:`mix_at_snr`).
"""
from __future__ import annotations

import functools
import io
import os
import pickle
import warnings

import numpy as np
import scipy.io.wavfile
import scipy.signal

SAMPLE_RATE = 16000
STFT_WINDOW_SECONDS = 0.025
STFT_HOP_SECONDS = 0.010
NUM_MEL_BINS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01
EXAMPLE_FRAMES = 96  # 0.96 s at 100 frames per second
_MEL_BREAK_FREQUENCY_HERTZ = 700.0
_MEL_HIGH_FREQUENCY_Q = 1127.0

WINDOW_LENGTH = int(round(SAMPLE_RATE * STFT_WINDOW_SECONDS))  # 400 samples
HOP_LENGTH = int(round(SAMPLE_RATE * STFT_HOP_SECONDS))  # 160 samples
FFT_LENGTH = 2 ** int(np.ceil(np.log2(WINDOW_LENGTH)))  # 512


def _frame(data: np.ndarray, window_length: int, hop_length: int) -> np.ndarray:
  """[n, ...] -> [frames, window_length, ...] view of the whole windows every ``hop_length`` rows."""
  num_frames = max(0, 1 + (data.shape[0] - window_length) // hop_length)
  shape = (num_frames, window_length) + data.shape[1:]
  strides = (data.strides[0] * hop_length,) + data.strides
  return np.lib.stride_tricks.as_strided(data, shape=shape, strides=strides, writeable=False)


def _periodic_hann(window_length: int) -> np.ndarray:
  return 0.5 - (0.5 * np.cos(2 * np.pi / window_length * np.arange(window_length)))


def _hertz_to_mel(frequencies_hertz):
  """HTK mel scale."""
  return _MEL_HIGH_FREQUENCY_Q * np.log(1.0 + (frequencies_hertz / _MEL_BREAK_FREQUENCY_HERTZ))


def mel_matrix(num_spectrogram_bins: int = FFT_LENGTH // 2 + 1,
               sample_rate: float = SAMPLE_RATE) -> np.ndarray:
  """[num_spectrogram_bins, 64] triangular HTK-mel weights over 125-7500 Hz (no weight on DC)."""
  nyquist_hertz = sample_rate / 2.0
  spectrogram_bins_mel = _hertz_to_mel(np.linspace(0.0, nyquist_hertz, num_spectrogram_bins))
  band_edges_mel = np.linspace(_hertz_to_mel(MEL_MIN_HZ), _hertz_to_mel(MEL_MAX_HZ), NUM_MEL_BINS + 2)
  lower, center, upper = band_edges_mel[:-2], band_edges_mel[1:-1], band_edges_mel[2:]
  lower_slope = (spectrogram_bins_mel[:, None] - lower) / (center - lower)
  upper_slope = (upper - spectrogram_bins_mel[:, None]) / (upper - center)
  weights = np.maximum(0.0, np.minimum(lower_slope, upper_slope))
  weights[0, :] = 0.0  # the DC bin carries no mel weight
  return weights


_MEL_MATRIX = mel_matrix()
_WINDOW = _periodic_hann(WINDOW_LENGTH)


def to_mono_float(waveform: np.ndarray) -> np.ndarray:
  """Samples -> float64 mono in about [-1, 1].

  Accepts 1-D or [n, channels] arrays of int16 (scaled by 1/32768, as torchvggish does), int32
  (1/2^31), uint8 (offset 128, 1/128) or float (used as is). Channels are averaged after scaling.
  """
  waveform = np.asarray(waveform)
  if waveform.dtype == np.int16:
    waveform = waveform / 32768.0
  elif waveform.dtype == np.int32:
    waveform = waveform / 2147483648.0
  elif waveform.dtype == np.uint8:
    waveform = (waveform.astype(np.float64) - 128.0) / 128.0
  elif not np.issubdtype(waveform.dtype, np.floating):
    raise ValueError(f'waveform dtype {waveform.dtype} is not supported: pass int16, int32, uint8 '
                     'or float samples')
  waveform = waveform.astype(np.float64, copy=False)
  if waveform.ndim == 2:
    if waveform.shape[1] > waveform.shape[0]:
      raise ValueError(f'waveform of shape {waveform.shape} has more channels than samples: pass '
                       '[n, channels] (transpose a [channels, n] array)')
    waveform = waveform.mean(axis=1)
  elif waveform.ndim != 1:
    raise ValueError(f'waveform must be 1-D or [n, channels], got shape {waveform.shape}')
  return waveform


# resampy's 'kaiser_best' filter (the one torchvggish resamples with): the right wing of a
# Kaiser-windowed sinc, 50 zero crossings, 2^13 table entries per crossing. Parameters fitted to the
# table resampy ships (largest tap difference 6e-12).
_RESAMPLE_ZEROS = 50
_RESAMPLE_TABLE = 2 ** 13
_RESAMPLE_ROLLOFF = 0.9173473712608761
_RESAMPLE_BETA = 12.984585258693688


@functools.lru_cache(maxsize=1)
def _resample_half_window() -> np.ndarray:
  n = _RESAMPLE_TABLE * _RESAMPLE_ZEROS
  sinc = _RESAMPLE_ROLLOFF * np.sinc(_RESAMPLE_ROLLOFF * np.linspace(0.0, _RESAMPLE_ZEROS, n + 1))
  taper = scipy.signal.windows.kaiser(2 * n + 1, _RESAMPLE_BETA)[n:]
  return taper * sinc


def resample(waveform: np.ndarray, sample_rate: float, target_rate: int = SAMPLE_RATE) -> np.ndarray:
  """1-D float64 waveform at ``sample_rate`` -> ``target_rate``, as ``resampy.resample`` does it.

  Band-limited interpolation (Smith's algorithm) with resampy's default 'kaiser_best' filter:
  output sample t sits at input time t · sample_rate / target_rate; the filter wings left and right
  of it are read from the tabulated window with linear interpolation between entries, scaled by
  the rate ratio when downsampling. The arithmetic follows resampy's loop term by term, vectorised
  over output samples, so the results agree to the filter table (about 1e-10). The output has
  int(n · target_rate / sample_rate) samples (empty when that is 0); the identity when the rates
  agree.
  """
  if sample_rate <= 0:
    raise ValueError(f'sample_rate must be positive, got {sample_rate}')
  if sample_rate == target_rate:
    return waveform
  x = np.asarray(waveform, np.float64)
  ratio = float(target_rate) / float(sample_rate)
  n_out = int(x.shape[0] * float(target_rate) / float(sample_rate))
  if n_out < 1:
    return np.zeros((0,), np.float64)
  window = _resample_half_window()
  if ratio < 1:
    window = ratio * window
  delta = np.diff(window, append=window[-1])
  scale = min(1.0, ratio)
  step = int(scale * _RESAMPLE_TABLE)
  time = np.arange(n_out) * (1.0 / ratio)
  base = time.astype(np.int64)  # the input sample at or left of each output time
  frac = scale * (time - base)
  y = np.zeros((n_out,), np.float64)
  weight = np.empty_like(y)
  samples = np.empty_like(y)
  index = np.empty((n_out,), np.int64)
  source = np.empty((n_out,), np.int64)
  for side in ('left', 'right'):
    if side == 'right':
      frac = scale - frac
    position = frac * _RESAMPLE_TABLE
    offset = position.astype(np.int64)
    eta = position - offset
    taps = (window.shape[0] - offset) // step
    # Taps stop at the signal edges: x[base - i] for i <= base, x[base + 1 + i] inside x.
    taps = np.minimum(base + 1, taps) if side == 'left' else np.minimum(x.shape[0] - base - 1, taps)
    for i in range(int(taps.max(initial=0))):
      np.add(offset, i * step, out=index)
      np.take(delta, index, out=weight, mode='clip')
      weight *= eta
      weight += np.take(window, index, mode='clip')
      np.add(base, -i if side == 'left' else i + 1, out=source)
      np.take(x, source, out=samples, mode='clip')
      weight *= samples
      weight *= i < taps  # taps past an edge or the filter end contribute nothing
      y += weight
  return y


def log_mel_spectrogram(waveform16k: np.ndarray) -> np.ndarray:
  """[samples] at 16 kHz -> float64 [frames, 64] log-mel (torchvggish's mel_features)."""
  waveform16k = np.ascontiguousarray(waveform16k, dtype=np.float64)
  frames = _frame(waveform16k, WINDOW_LENGTH, HOP_LENGTH)
  if frames.shape[0] == 0:
    return np.zeros((0, NUM_MEL_BINS), np.float64)
  spectrogram = np.abs(np.fft.rfft(frames * _WINDOW, FFT_LENGTH))
  return np.log(spectrogram @ _MEL_MATRIX + LOG_OFFSET)


def waveform_to_log_mel(waveform: np.ndarray, sample_rate: float) -> np.ndarray:
  """VGGish examples of a waveform: float32 [n, 96, 64], n = the whole 0.96 s examples it holds.

  Args:
    waveform: 1-D mono or [n, channels] samples, int16 or float (see :func:`to_mono_float`).
    sample_rate: its rate in Hz; anything but 16 kHz is resampled (see :func:`resample`).

  Equal to torchvggish's ``vggish_input.waveform_to_examples(waveform, sample_rate,
  return_tensor=False)`` for float input and to its ``wavfile_to_examples`` for int16 samples
  (scaled by 1/32768), without torch.
  """
  data = resample(to_mono_float(waveform), sample_rate)
  examples = _frame(log_mel_spectrogram(data), EXAMPLE_FRAMES, EXAMPLE_FRAMES)
  return np.ascontiguousarray(examples, dtype=np.float32).reshape(-1, EXAMPLE_FRAMES, NUM_MEL_BINS)



# -- the Audio Spectrogram Transformer's front end (model.audio.encoder = 'ast') --------------------
# Kaldi-compatible log mel filterbank as the AST reference computes it (transformers'
# ASTFeatureExtractor = torchaudio.compliance.kaldi.fbank(window_type='hanning', num_mel_bins=128)
# on the float waveform): 25 ms frames every 10 ms with snip_edges (only whole frames), per-frame DC
# removal, pre-emphasis 0.97 (the first sample against itself), symmetric Hann window, 512-point
# power spectrum, 128 triangular bands on Kaldi's mel scale (1127 ln(1 + f/700)) over 20-8000 Hz
# without the Nyquist bin, natural log floored at float32 epsilon; then AST's AudioSet
# normalisation (x - mean) / (2 std). One example per second of audio (16,000 samples -> 98
# frames), the contract every audio encoder of the model keeps; a partial last second of at least
# one frame is its own example, its missing frames zero before the normalisation (as the
# extractor pads to max_length).

AST_NUM_MEL_BINS = 128
AST_EXAMPLE_SAMPLES = SAMPLE_RATE  # one second
AST_EXAMPLE_FRAMES = 1 + (AST_EXAMPLE_SAMPLES - WINDOW_LENGTH) // HOP_LENGTH  # 98
AST_MEAN, AST_STD = -4.2677393, 4.5689974  # AudioSet statistics of the AST release
AST_PREEMPHASIS = 0.97
AST_LOW_HZ = 20.0
_FLOAT32_EPS = float(np.finfo(np.float32).eps)


def kaldi_mel_matrix(num_bins: int = AST_NUM_MEL_BINS, sample_rate: float = SAMPLE_RATE,
                     fft_length: int = FFT_LENGTH, low_hz: float = AST_LOW_HZ) -> np.ndarray:
  """[fft_length // 2 + 1, num_bins] Kaldi mel weights: triangles in the mel domain between equally
  spaced mel edges from low_hz to Nyquist; the Nyquist bin gets no weight (Kaldi uses fft/2 bins)."""
  mel = lambda f: 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)
  edges = np.linspace(mel(low_hz), mel(sample_rate / 2.0), num_bins + 2)
  left, center, right = edges[:-2], edges[1:-1], edges[2:]
  bins_mel = mel(np.arange(fft_length // 2) * sample_rate / fft_length)[:, None]
  weights = np.maximum(0.0, np.minimum((bins_mel - left) / (center - left), (right - bins_mel) / (right - center)))
  return np.concatenate([weights, np.zeros((1, num_bins))], axis=0)


_KALDI_MEL = kaldi_mel_matrix()
_SYMMETRIC_HANN = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WINDOW_LENGTH) / (WINDOW_LENGTH - 1))


def kaldi_fbank(waveform16k: np.ndarray) -> np.ndarray:
  """[samples] float at 16 kHz -> float64 [frames, 128] Kaldi log mel filterbank (see above)."""
  waveform16k = np.ascontiguousarray(waveform16k, dtype=np.float64)
  frames = _frame(waveform16k, WINDOW_LENGTH, HOP_LENGTH)
  if frames.shape[0] == 0:
    return np.zeros((0, AST_NUM_MEL_BINS), np.float64)
  frames = frames - frames.mean(axis=1, keepdims=True)
  previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
  frames = frames - AST_PREEMPHASIS * previous
  power = np.abs(np.fft.rfft(frames * _SYMMETRIC_HANN, FFT_LENGTH)) ** 2
  return np.log(np.maximum(power @ _KALDI_MEL, _FLOAT32_EPS))


def waveform_to_ast_fbank(waveform: np.ndarray, sample_rate: float) -> np.ndarray:
  """AST examples of a waveform: float32 [n, 98, 128], one per second (normalised filterbanks).

  Mono mix-down and resampling as :func:`waveform_to_log_mel`; second k is samples
  [16000 k, 16000 (k + 1)); n counts the whole seconds plus a last partial one that holds at least
  one 25 ms frame. Equal to ``ASTFeatureExtractor(max_length=98)`` applied to each second.
  """
  data = resample(to_mono_float(waveform), sample_rate)
  count = data.shape[0] // AST_EXAMPLE_SAMPLES + int(data.shape[0] % AST_EXAMPLE_SAMPLES >= WINDOW_LENGTH)
  out = np.zeros((count, AST_EXAMPLE_FRAMES, AST_NUM_MEL_BINS), np.float64)
  for k in range(count):
    fbank = kaldi_fbank(data[k * AST_EXAMPLE_SAMPLES:(k + 1) * AST_EXAMPLE_SAMPLES])
    out[k, :fbank.shape[0]] = fbank
  return ((out - AST_MEAN) / (2.0 * AST_STD)).astype(np.float32)


# model.audio.encoder -> the front end that feeds it: AST takes its filterbanks, every other encoder
# ('vggish', 'small') VGGish's log-mel examples.
def example_shape(encoder: str = 'vggish') -> tuple[int, int]:
  """(frames, bands) of one audio example for ``model.audio.encoder`` (= ``data.audio_encoder``)."""
  return (AST_EXAMPLE_FRAMES, AST_NUM_MEL_BINS) if encoder == 'ast' else (EXAMPLE_FRAMES, NUM_MEL_BINS)


def waveform_to_examples(waveform: np.ndarray, sample_rate: float, encoder: str = 'vggish') -> np.ndarray:
  """float32 [n, *example_shape(encoder)]: AST filterbanks for 'ast', else VGGish log-mel."""
  if encoder == 'ast':
    return waveform_to_ast_fbank(waveform, sample_rate)
  return waveform_to_log_mel(waveform, sample_rate)

def read_wav(path_or_bytes) -> tuple[np.ndarray, int]:
  """A WAV file (path or bytes) -> (samples as stored: 1-D or [n, channels], sample rate).

  Reads PCM (uint8, int16, 24/32-bit int) and IEEE float WAVs with scipy; raises ValueError naming
  the file when it is not a readable WAV, including a truncated one (its header announces more
  audio data than the file holds; scipy would only warn and return the shorter audio).
  """
  source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
  name = '<bytes>' if isinstance(path_or_bytes, bytes) else os.fspath(path_or_bytes)
  declared, held = _riff_sizes(path_or_bytes)
  if declared is not None and held < declared:
    raise ValueError(f'{name}: truncated WAV file (its header announces {declared} bytes, the file holds {held})')
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always', scipy.io.wavfile.WavFileWarning)
      sample_rate, samples = scipy.io.wavfile.read(source)
  except (ValueError, EOFError, OSError) as e:
    raise ValueError(f'{name}: not a readable WAV file ({e})') from e
  for w in caught:
    if issubclass(w.category, scipy.io.wavfile.WavFileWarning) and 'EOF' in str(w.message):
      raise ValueError(f'{name}: truncated WAV file ({w.message})')
    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)  # the others, as scipy gave them
  return samples, int(sample_rate)


def _riff_sizes(path_or_bytes) -> tuple[int | None, int]:
  """(file size a RIFF/WAVE header announces or None, bytes actually held)."""
  if isinstance(path_or_bytes, bytes):
    head, held = path_or_bytes[:12], len(path_or_bytes)
  else:
    try:
      with open(path_or_bytes, 'rb') as f:
        head = f.read(12)
        held = os.fstat(f.fileno()).st_size
    except OSError:
      return None, 0  # scipy reports it
  if len(head) < 12 or head[:4] != b'RIFF' or head[8:12] != b'WAVE':
    return None, held
  size = int.from_bytes(head[4:8], 'little')
  return (None if size in (0, 0xFFFFFFFF) else size + 8), held  # 0 / max: written by a streaming writer


def wav_to_log_mel(path_or_bytes) -> np.ndarray:
  """A WAV file -> float32 [n, 96, 64] VGGish examples (torchvggish's ``wavfile_to_examples``)."""
  samples, sample_rate = read_wav(path_or_bytes)
  return waveform_to_log_mel(samples, sample_rate)


def pad_examples(examples: np.ndarray, num_examples: int, mode: str) -> np.ndarray:
  """Pads or trims [n, ...] examples (VGGish [n, 96, 64], AST [n, 98, 128]) to ``num_examples``.

  mode 'repeat' repeats the last example (AVSBench S4/MS3; a clip with no example at all gets
  zeros), 'zeros' appends zero examples (AVSS).
  """
  if mode not in ('repeat', 'zeros'):
    raise ValueError(f"pad mode must be 'repeat' or 'zeros', got {mode!r}")
  n = examples.shape[0]
  if n >= num_examples:
    return examples[:num_examples]
  if mode == 'repeat' and n > 0:
    pad = np.repeat(examples[-1:], num_examples - n, axis=0)
  else:
    pad = np.zeros((num_examples - n,) + examples.shape[1:], examples.dtype)
  return np.concatenate([examples, pad], axis=0)



def clip_examples(waveform: np.ndarray, sample_rate: float, *, num_frames: int, num_real: int, pad_mode: str,
                  encoder: str = 'vggish') -> np.ndarray:
  """float32 [num_frames, *example_shape(encoder)] of a clip's waveform, laid out as the builders lay
  out the stored log-mel: the first ``num_real`` examples (padded to that many with ``pad_mode``),
  then zero examples up to ``num_frames``."""
  examples = waveform_to_examples(waveform, sample_rate, encoder)
  examples = pad_examples(examples[:num_real], num_real, pad_mode)
  return pad_examples(examples, num_frames, 'zeros')

class _TensorUnpickler(pickle.Unpickler):
  """Unpickles only what a pickled torch tensor or NumPy array needs, nothing else."""

  _ALLOWED = {
      ('torch._utils', '_rebuild_tensor'), ('torch._utils', '_rebuild_tensor_v2'),
      ('torch._utils', '_rebuild_parameter'), ('torch.storage', '_load_from_bytes'),
      ('torch', 'FloatStorage'), ('torch', 'DoubleStorage'), ('torch', 'HalfStorage'),
      ('collections', 'OrderedDict'), ('numpy', 'ndarray'), ('numpy', 'dtype'),
      ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
      ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f'refusing to load {module}.{name} from a log-mel .pkl file')
    return super().find_class(module, name)


def load_released_log_mel(path) -> np.ndarray:
  """A released AVSBench ``audio_log_mel/*.pkl`` -> float32 [n, 96, 64].

  The files hold a pickled torch tensor [n, 1, 96, 64] (written with ``pickle``, or ``torch.save``
  in some copies), so torch must be installed to read them; NumPy arrays are accepted too. Only
  tensor/array reconstruction is unpickled.
  """
  name = os.fspath(path)
  with open(path, 'rb') as f:
    data = f.read()
  try:
    if data[:2] == b'PK':  # torch.save zip container
      import torch

      value = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    else:
      value = _TensorUnpickler(io.BytesIO(data)).load()
  except ModuleNotFoundError as e:
    raise ImportError(f'{name}: reading the released .pkl log-mel needs torch '
                      '(pip install torch==2.13.0), or build from the wav files instead') from e
  except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as e:
    raise ValueError(f'{name}: not a readable log-mel .pkl file ({e})') from e
  if hasattr(value, 'detach'):
    value = value.detach().cpu().numpy()
  value = np.asarray(value, dtype=np.float32)
  if value.ndim == 4 and value.shape[1] == 1:
    value = value[:, 0]
  if value.ndim != 3 or value.shape[1:] != (EXAMPLE_FRAMES, NUM_MEL_BINS):
    raise ValueError(f'{name}: expected a log-mel tensor [n, 1, 96, 64], got shape {value.shape}')
  return value


def mix_at_snr(signal: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
  """signal + noise scaled so that 10·log10(P_signal / P_noise) = snr_db (noise tiled or cut)."""
  signal = np.asarray(signal, np.float64)
  noise = np.resize(np.asarray(noise, np.float64), signal.shape)
  p_signal = np.mean(signal ** 2)
  p_noise = np.mean(noise ** 2)
  if p_noise <= 0.0:
    return signal
  scale = np.sqrt(p_signal / (p_noise * 10.0 ** (snr_db / 10.0)))
  return signal + scale * noise
