"""Clip transforms (qdformer_jax.data.transforms) against NumPy references of the same geometry.

References: nearest neighbour = centre sampling src = floor((dst + 0.5) · in / out) (exact match
required); bilinear upscaling = half-pixel bilinear with edge clamping (|diff| <= 1 grey level, PIL
uses fixed-point weights; mean <= 0.5); sizes and crop offsets as torchvision computes them.
"""
from __future__ import annotations

import numpy as np
import pytest

from qdformer_jax.data import transforms


def _clip(t, h, w, seed=0):
  rng = np.random.default_rng(seed)
  frames = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
  semantic = rng.integers(0, 71, (t, h, w), dtype=np.uint8)
  return frames, semantic


def _nearest_reference(image, out_h, out_w):
  h, w = image.shape[:2]
  ys = np.floor((np.arange(out_h) + 0.5) * h / out_h).astype(int)
  xs = np.floor((np.arange(out_w) + 0.5) * w / out_w).astype(int)
  return image[ys][:, xs]


def _bilinear_reference(image, out_h, out_w):
  """Half-pixel-centre bilinear interpolation (align_corners=False), edges clamped; float."""
  h, w = image.shape[:2]
  y = np.clip((np.arange(out_h) + 0.5) * h / out_h - 0.5, 0, h - 1)
  x = np.clip((np.arange(out_w) + 0.5) * w / out_w - 0.5, 0, w - 1)
  y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  wy, wx = (y - y0)[:, None, None], (x - x0)[None, :, None]
  img = image.astype(np.float64)
  top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
  bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
  return top * (1 - wy) + bottom * wy


def _assert_close_grey(ours, reference):
  """uint8 output vs float reference: within one grey level (+ float slack), 0.5 on average."""
  diff = np.abs(ours.astype(np.float64) - reference)
  assert diff.max() <= 1.0 + 1e-6 and diff.mean() < 0.5


@pytest.mark.parametrize('h,w,expected', [(100, 200, (224, 448)), (360, 640, (224, 398)),
                                          (640, 360, (398, 224)), (224, 224, (224, 224))])
def test_short_side_size_follows_torchvision(h, w, expected):
  assert transforms.short_side_size(h, w, 224) == expected


def test_train_transform_geometry_short_side_crop():
  """A 60x90 clip: short side -> 224 (224x336), crop rows 0:224 and columns 56:280."""
  frames, semantic = _clip(2, 60, 90)
  out_frames, out_sem = transforms.train_transform(frames, semantic, 224)
  assert out_frames.shape == (2, 224, 224, 3) and out_sem.shape == (2, 224, 224)
  assert out_frames.dtype == np.uint8 and out_sem.dtype == np.uint8
  for t in range(2):
    ref_sem = _nearest_reference(semantic[t], 224, 336)[:, 56:280]
    np.testing.assert_array_equal(out_sem[t], ref_sem)
    ref = _bilinear_reference(frames[t], 224, 336)[:, 56:280]
    _assert_close_grey(out_frames[t], ref)


def test_center_crop_offsets_round_half():
  frames, semantic = _clip(1, 227, 230)
  f, s = transforms.center_crop(frames, semantic, 224)
  top, left = int(round(3 / 2)), int(round(6 / 2))  # round(1.5) = 2 (banker's), 3
  np.testing.assert_array_equal(s[0], semantic[0, top:top + 224, left:left + 224])
  np.testing.assert_array_equal(f[0], frames[0, top:top + 224, left:left + 224])
  with pytest.raises(ValueError, match='crop'):
    transforms.center_crop(*_clip(1, 100, 300), 224)


def test_flip_and_its_random_draw():
  frames, semantic = _clip(3, 224, 224)
  f, s = transforms.train_transform(frames, semantic, 224, flip=True)
  np.testing.assert_array_equal(f, frames[:, :, ::-1])
  np.testing.assert_array_equal(s, semantic[:, :, ::-1])
  f, s = transforms.train_transform(frames, semantic, 224, flip=False)
  np.testing.assert_array_equal(f, frames)
  draws = []
  rng = np.random.default_rng(0)
  for _ in range(40):
    f, s = transforms.train_transform(frames, semantic, 224, rng=rng, hflip=True)
    flipped = np.array_equal(s, semantic[:, :, ::-1])
    assert flipped or np.array_equal(s, semantic)
    assert np.array_equal(f, frames[:, :, ::-1] if flipped else frames)
    draws.append(flipped)
  assert 5 < sum(draws) < 35
  with pytest.raises(ValueError, match='rng'):
    transforms.train_transform(frames, semantic, 224, hflip=True)


def test_eval_transform_warps():
  frames, semantic = _clip(2, 50, 80, seed=3)
  f, s = transforms.eval_transform(frames, semantic, 224)
  assert f.shape == (2, 224, 224, 3) and s.shape == (2, 224, 224)
  np.testing.assert_array_equal(s[1], _nearest_reference(semantic[1], 224, 224))
  _assert_close_grey(f[1], _bilinear_reference(frames[1], 224, 224))
  f2, s2 = transforms.train_transform(frames, semantic, 224, mode='warp')
  np.testing.assert_array_equal(f2, f)
  np.testing.assert_array_equal(s2, s)


def test_masks_keep_their_class_ids_when_shrinking():
  """Nearest neighbour never invents a class: a 2-class mask stays 2-class after any resize."""
  semantic = np.zeros((1, 400, 600), np.uint8)
  semantic[0, 100:300, 200:450] = 42
  frames = np.zeros((1, 400, 600, 3), np.uint8)
  for _f, s in (transforms.train_transform(frames, semantic, 224),
               transforms.eval_transform(frames, semantic, 224)):
    assert set(np.unique(s)) == {0, 42}


def test_identity_at_size_and_input_checks():
  frames, semantic = _clip(2, 224, 224)
  f, s = transforms.eval_transform(frames, semantic, 224)
  np.testing.assert_array_equal(f, frames)
  np.testing.assert_array_equal(s, semantic)
  with pytest.raises(ValueError, match='frames'):
    transforms.eval_transform(frames.astype(np.float32), semantic)
  with pytest.raises(ValueError, match='semantic'):
    transforms.eval_transform(frames, semantic[:, :100])
  with pytest.raises(ValueError, match='mode'):
    transforms.train_transform(frames, semantic, 224, mode='random_crop')
