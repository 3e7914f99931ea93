"""Clip transforms of the input pipeline, on decoded NumPy arrays (docs/DESIGN.md §4.1).

Pure functions of (frames uint8 [T,H,W,3], semantic uint8 [T,H,W]) -> the same at the output size;
the only randomness, the horizontal flip, comes from a generator the caller passes (or an explicit
``flip``), so the pipeline owns the RNG.

* train: resize the short side to ``size`` (bilinear frames, nearest masks) and centre-crop
  ``size``×``size`` (AVSS training), or warp to size×size; optional horizontal flip;
* eval: warp (resize both sides) to ``size``×``size``.

Resizing is PIL's (the library torchvision's PIL path uses): bilinear with antialiasing when
shrinking, nearest neighbour for class-id masks so that no new class id appears. Sizes follow
torchvision: the long side becomes int(size · long / short), the crop offset round((H - size) / 2).
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def _check(frames: np.ndarray, semantic: np.ndarray) -> None:
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f'frames must be uint8 [T,H,W,3], got {frames.dtype} {frames.shape}')
  if semantic.dtype != np.uint8 or semantic.shape != frames.shape[:3]:
    raise ValueError(f'semantic must be uint8 {frames.shape[:3]}, got {semantic.dtype} '
                     f'{semantic.shape}')


def resize(frames: np.ndarray, semantic: np.ndarray, height: int, width: int):
  """Resizes every frame to height×width: frames bilinear (antialiased), masks nearest."""
  _check(frames, semantic)
  if frames.shape[1:3] == (height, width):
    return frames, semantic
  out_frames = np.stack([
      np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BILINEAR))
      for f in frames])
  out_semantic = np.stack([
      np.asarray(Image.fromarray(m).resize((width, height), Image.Resampling.NEAREST))
      for m in semantic])
  return out_frames, out_semantic


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
  """(H, W) with the short side ``size`` and the long side int(size · long / short)."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def center_crop(frames: np.ndarray, semantic: np.ndarray, size: int):
  """The central size×size window (offsets round((H - size) / 2), round((W - size) / 2))."""
  _check(frames, semantic)
  h, w = frames.shape[1:3]
  if h < size or w < size:
    raise ValueError(f'cannot crop {size}x{size} out of {h}x{w} frames')
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return (frames[:, top:top + size, left:left + size],
          semantic[:, top:top + size, left:left + size])


def horizontal_flip(frames: np.ndarray, semantic: np.ndarray):
  """Mirrors every frame and mask left-right."""
  _check(frames, semantic)
  return frames[:, :, ::-1], semantic[:, :, ::-1]


TRAIN_MODES = ('short_side_crop', 'warp')


def train_transform(frames: np.ndarray, semantic: np.ndarray, size: int = 224, *,
                    rng: np.random.Generator | None = None, mode: str = 'short_side_crop',
                    hflip: bool = False, flip: bool | None = None):
  """The training view of a clip, one geometry for all its frames.

  ``mode`` 'short_side_crop' resizes the short side to ``size`` and centre-crops size×size (AVSS);
  'warp' resizes to size×size. Then the clip is mirrored when ``flip`` is True; with ``flip`` None
  and ``hflip`` True, the mirror is drawn with probability 1/2 from ``rng``.
  """
  if mode == 'short_side_crop':
    frames, semantic = resize(frames, semantic, *short_side_size(*frames.shape[1:3], size))
    frames, semantic = center_crop(frames, semantic, size)
  elif mode == 'warp':
    frames, semantic = resize(frames, semantic, size, size)
  else:
    raise ValueError(f'train resize mode must be one of {TRAIN_MODES}, got {mode!r}')
  if flip is None and hflip:
    if rng is None:
      raise ValueError('hflip=True needs an rng (np.random.Generator) to draw the flip from')
    flip = bool(rng.random() < 0.5)
  if flip:
    frames, semantic = horizontal_flip(frames, semantic)
  return np.ascontiguousarray(frames), np.ascontiguousarray(semantic)


def eval_transform(frames: np.ndarray, semantic: np.ndarray, size: int = 224):
  """Warps every frame and mask to size×size (aspect ratio not kept)."""
  frames, semantic = resize(frames, semantic, size, size)
  return np.ascontiguousarray(frames), np.ascontiguousarray(semantic)
