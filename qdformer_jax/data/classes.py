"""Class vocabularies and colours shared by the builders, the evaluation and the predictor.

Kept apart from the release readers (``avsbench.py``) so that drawing a mask or naming a class never
imports build-time code.
"""
from __future__ import annotations

import numpy as np

# AVSS class names by 0-based id (label2idx.json minus 1; background = 0).
AVSS_CLASS_NAMES = (
    'background', 'accordion', 'airplane', 'axe', 'baby', 'bassoon', 'bell', 'bird', 'boat', 'boy',
    'bus', 'car', 'cat', 'cello', 'clarinet', 'clipper', 'clock', 'dog', 'donkey', 'drum', 'duck',
    'elephant', 'emergency-car', 'erhu', 'flute', 'frying-food', 'girl', 'goose', 'guitar', 'gun',
    'guzheng', 'hair-dryer', 'handpan', 'harmonica', 'harp', 'helicopter', 'hen', 'horse',
    'keyboard', 'leopard', 'lion', 'man', 'marimba', 'missile-rocket', 'motorcycle', 'mower',
    'parrot', 'piano', 'pig', 'pipa', 'saw', 'saxophone', 'sheep', 'sitar', 'sorna', 'squirrel',
    'tabla', 'tank', 'tiger', 'tractor', 'train', 'trombone', 'truck', 'trumpet', 'tuba', 'ukulele',
    'utv', 'vacuum-cleaner', 'violin', 'wolf', 'woman')
NUM_AVSS_CLASSES = len(AVSS_CLASS_NAMES)  # 71


def voc_palette(num_colors: int = 256) -> np.ndarray:
  """The PASCAL-VOC bit-interleaved palette: uint8 [num_colors, 3], id 0 black."""
  ids = np.arange(num_colors)
  palette = np.zeros((num_colors, 3), np.int64)
  for j in range(8):
    for channel in range(3):
      palette[:, channel] |= ((ids >> (3 * j + channel)) & 1) << (7 - j)
  return palette.astype(np.uint8)
