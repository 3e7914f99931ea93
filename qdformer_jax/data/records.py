"""The one record layout every dataset builder writes and every pipeline reads.

All builders (synthetic_avs, avs_object, avs_semantic) store a clip as the same TFDS features, so
that one grain pipeline serves them all. Frames and masks stay encoded (PNG/JPEG bytes, as
released) and are decoded by PIL in the input pipeline, which keeps TensorFlow out of the project:
TFDS writes and reads these features (ArrayRecord) without it.

| feature      | type                          | meaning                                              |
|--------------|-------------------------------|------------------------------------------------------|
| clip_id      | text                          | unique clip name                                     |
| category     | text                          | dataset label (S4 category, AVSS v1s/v1m/v2, ...)    |
| frames       | T × bytes                     | encoded RGB PNG/JPEG; b'' for a padded frame         |
| semantic     | T × bytes                     | encoded 8-bit PNG of class ids; b'' where no GT      |
| log_mel      | float32 [T, 96, 64]           | VGGish examples (qdformer_jax.data.audio)            |
| audio        | int16 [T · 16000]             | the 16 kHz mono waveform log_mel was computed from,  |
|              |                               | PCM int16 (x · 32768), zero-padded or cut to T s     |
| audio_length | int32                         | samples of ``audio`` before the zero padding         |
| gt_valid     | bool [T]                      | frame has ground truth                               |
| frame_valid  | bool [T]                      | real frame, not padding                              |

``audio`` lets evaluation change the sound before the front end (noise robustness: mix noise into
the waveform, then recompute ``log_mel``); :func:`encode_audio` / :func:`decode_audio` convert it.
A record whose builder had no waveform (AVSBench built from the released ``.pkl`` log-mel without
the wav) holds ``audio_length = 0``.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from qdformer_jax.data.audio import EXAMPLE_FRAMES as NUM_MEL_FRAMES
from qdformer_jax.data.audio import NUM_MEL_BINS
from qdformer_jax.data.audio import SAMPLE_RATE as AUDIO_SAMPLE_RATE


def clip_features(num_frames: int):
  """The TFDS FeaturesDict of one clip with ``num_frames`` frames."""
  import tensorflow_datasets as tfds  # imported lazily: only builders need TFDS

  encoded = tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_), length=num_frames)
  return tfds.features.FeaturesDict({
      'clip_id': tfds.features.Text(),
      'category': tfds.features.Text(),
      'frames': encoded,
      'semantic': tfds.features.Sequence(
          tfds.features.Tensor(shape=(), dtype=np.object_), length=num_frames),
      # BYTES encoding: one serialized buffer instead of a float list (about 100x faster to write).
      'log_mel': tfds.features.Tensor(
          shape=(num_frames, NUM_MEL_FRAMES, NUM_MEL_BINS), dtype=np.float32,
          encoding=tfds.features.Encoding.BYTES),
      'audio': tfds.features.Tensor(
          shape=(num_frames * AUDIO_SAMPLE_RATE,), dtype=np.int16,
          encoding=tfds.features.Encoding.BYTES),
      'audio_length': tfds.features.Tensor(shape=(), dtype=np.int32),
      'gt_valid': tfds.features.Tensor(shape=(num_frames,), dtype=np.bool_),
      'frame_valid': tfds.features.Tensor(shape=(num_frames,), dtype=np.bool_),
  })


def encode_audio(waveform16k, num_frames: int) -> tuple[np.ndarray, np.int32]:
  """1-D float waveform at 16 kHz in [-1, 1] -> (``audio`` int16 [num_frames·16000], ``audio_length``).

  Samples are rounded to int16 PCM (x · 32768, clipped to the int16 range), cut to num_frames
  seconds and zero-padded to that length; ``audio_length`` counts the samples before the padding.
  """
  waveform16k = np.asarray(waveform16k, np.float64)
  if waveform16k.ndim != 1:
    raise ValueError(f'encode_audio expects a 1-D mono waveform, got shape {waveform16k.shape}')
  total = num_frames * AUDIO_SAMPLE_RATE
  pcm = np.clip(np.round(waveform16k[:total] * 32768.0), -32768, 32767).astype(np.int16)
  out = np.zeros((total,), np.int16)
  out[:pcm.shape[0]] = pcm
  return out, np.int32(pcm.shape[0])


def decode_audio(record) -> np.ndarray:
  """A record's waveform: float64 [audio_length] at 16 kHz (int16 / 32768, padding removed).

  Raises KeyError naming the fields when the record predates them (rebuild the dataset).
  """
  if 'audio' not in record or 'audio_length' not in record:
    raise KeyError(f"record {record.get('clip_id', b'?')!r} has no 'audio'/'audio_length' features: it "
                   'was built before they were added; rebuild the dataset (delete its TFDS '
                   'directory and build again)')
  length = int(record['audio_length'])
  return np.asarray(record['audio'][:length], np.int16) / 32768.0


def encode_png(array: np.ndarray) -> bytes:
  """uint8 [H,W] (grayscale) or [H,W,3] (RGB) -> PNG bytes."""
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f'encode_png expects uint8, got {array.dtype}')
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buf, format='JPEG', quality=quality)
  return buf.getvalue()


def decode_image(data: bytes, mode: str) -> np.ndarray:
  """PNG/JPEG bytes -> uint8 array; mode 'RGB' gives [H,W,3], 'L' or 'P' gives [H,W] as stored."""
  with Image.open(io.BytesIO(data)) as im:
    if mode == 'RGB':
      im = im.convert('RGB')
    elif im.mode not in ('L', 'P'):
      raise ValueError(f'expected a single-channel class-id PNG, got mode {im.mode}')
    return np.asarray(im, dtype=np.uint8)
