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
| gt_valid     | bool [T]                      | frame has ground truth                               |
| frame_valid  | bool [T]                      | real frame, not padding                              |
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

NUM_MEL_FRAMES = 96
NUM_MEL_BINS = 64


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
      'gt_valid': tfds.features.Tensor(shape=(num_frames,), dtype=np.bool_),
      'frame_valid': tfds.features.Tensor(shape=(num_frames,), dtype=np.bool_),
  })


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
