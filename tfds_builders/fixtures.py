"""A small, fake but exactly laid-out copy of the AVSBench releases.

    python -m tfds_builders.fixtures --out DIR

writes ``DIR/avsbench_object`` (``Single-source/`` S4 and ``Multi-sources/`` MS3) and
``DIR/avsbench_semantic`` (AVSS), each a few real clip names per split from the released metadata,
with real PNG/JPEG/WAV files and the S4/MS3 ``.pkl`` log-mel where the releases have them. The
pictures are synthetic (moving coloured ellipses on a textured background, the masks cover the
sounding ones) and the sound is a harmonic tone per class. Use them for the tests and to
smoke-test a setup before building the real data:

    AvsObject(config='s4', data_dir=D, file_format='array_record', raw_dir=DIR/'avsbench_object')

Audio formats vary on purpose (16 kHz stereo int16 as the S4 extraction wrote, mono, 22.05 and
44.1 kHz, float32) so that the whole front end is exercised.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import pickle
from pathlib import Path

import numpy as np
import scipy.io.wavfile
from PIL import Image

from qdformer_jax.data import audio, avsbench, records

# Real clips from the released AVSS metadata (the v1s rows are S4 clips, the v1m rows MS3 clips).
# S4: (name, start second, category, split); the names are the AVSS ``vid`` and ``s_sec`` values,
# the categories the S4 folder names of the clips' AVSS classes.
S4_CLIPS = (
    ('--ZHUMfueO0', 5, 'female_singing', 'train'),
    ('--yJcmmwiMc', 0, 'playing_acoustic_guitar', 'train'),
    ('-03Hd0MBgQY', 1, 'playing_piano', 'train'),
    ('--FenyW2i_4', 5, 'female_singing', 'val'),
    ('-0gYWIOfqdM', 3, 'playing_glockenspiel', 'val'),
    ('-1q0XHPxqe8', 0, 'race_car', 'test'),
    ('-2McrNUTKQQ', 1, 'female_singing', 'test'),
)
# The AVSS class of each S4 category used above (for the fake pictures and sounds).
S4_CATEGORY_CLASS = {'female_singing': 'woman', 'playing_acoustic_guitar': 'guitar',
                     'playing_piano': 'piano', 'playing_glockenspiel': 'marimba', 'race_car': 'car'}
# MS3: (name, split, sounding objects)
MS3_CLIPS = (
    ('0meOlo03O3g_1', 'train', 'piano_guitar_tabla'),
    ('2IoF4ClnbPk_1', 'train', 'piano_guitar_man'),
    ('IguMXMwDq6k_2', 'val', 'man_dog_woman'),
    ('Kot-gIKy4Qk_1', 'val', 'man_guitar_violin'),
    ('BZyTr2Pku2A_2', 'test', 'woman_piano_guitar'),
    ('BvtaXGFoeRA_0', 'test', 'guitar_woman_tabla'),
)
# AVSS metadata rows: vid, uid, s_min, s_sec, a_obj, split, label
AVSS_ROWS = (
    ('--ZHUMfueO0', '--ZHUMfueO0_5000_10000', 0, 5, 'woman', 'train', 'v1s'),
    ('0meOlo03O3g_1', '0meOlo03O3g_1', 0, 0, 'piano_guitar_tabla', 'train', 'v1m'),
    ('_-apT0tfo6U', '_-apT0tfo6U_60000_70000', 1, 0, 'girl_guitar', 'train', 'v2'),
    ('_2csfAj7jH0', '_2csfAj7jH0_11000_21000', 0, 11, 'squirrel', 'train', 'v2'),
    ('--FenyW2i_4', '--FenyW2i_4_5000_10000', 0, 5, 'woman', 'val', 'v1s'),
    ('IguMXMwDq6k_2', 'IguMXMwDq6k_2', 0, 0, 'man_dog_woman', 'val', 'v1m'),
    ('T4LYhpdIub8', 'T4LYhpdIub8_260000_270000', 4, 20, 'cello_saxophone_drum_piano_trumpet',
     'val', 'v2'),
    ('-1q0XHPxqe8', '-1q0XHPxqe8_0_5000', 0, 0, 'car', 'test', 'v1s'),
    ('BvtaXGFoeRA_0', 'BvtaXGFoeRA_0', 0, 0, 'guitar_woman_tabla', 'test', 'v1m'),
    ('8cGUDi8c7a4', '8cGUDi8c7a4_60000_70000', 1, 0, 'drum_guitar_woman_boy', 'test', 'v2'),
)
# Frame sizes (H, W) of the v2 clips (AVSS frames come at their video's size).
AVSS_V2_SIZES = {'_-apT0tfo6U_60000_70000': (96, 128), '_2csfAj7jH0_11000_21000': (128, 96),
                 'T4LYhpdIub8_260000_270000': (90, 160), '8cGUDi8c7a4_60000_70000': (120, 160)}
# (sample rate, channels, dtype) of the audio of some clips; the others: 16 kHz stereo int16
# (S4/MS3, as the official extraction wrote them) or 16 kHz mono int16 (AVSS).
AUDIO_FORMATS = {'-03Hd0MBgQY': (44100, 1, 'int16'), 'Kot-gIKy4Qk_1': (16000, 1, 'float32'),
                 '_2csfAj7jH0_11000_21000': (22050, 1, 'int16')}
OBJECT_SIZE = 224  # S4/MS3 frames are 224x224
MS3_FRAME_NAME = '{name}.mp4_{i}.png'


def _class_ids(a_obj: str) -> list[int]:
  """Metadata ``a_obj`` ('girl_guitar') -> AVSS class ids (tokens outside the index dropped)."""
  names = [t.replace(' ', '') for t in a_obj.split('_')]
  return [avsbench.AVSS_CLASS_NAMES.index(n) for n in names if n in avsbench.AVSS_CLASS_NAMES]


def _scene(rng: np.random.Generator, classes: list[int], num_frames: int, size: tuple[int, int],
           always_sounding: bool = False):
  """Fake frames and per-frame class-id maps of the sounding objects (the first one sounds in
  every frame when ``always_sounding``, as the single source of S4 does).

  Returns (frames uint8 [T,H,W,3], ids uint8 [T,H,W], sounding bool [T, len(classes)]).
  """
  h, w = size
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  base = rng.uniform(40, 200, 3)
  background = (base + 30 * np.sin(xx / w * 3 + rng.uniform(0, 6))[..., None]
                + 20 * np.cos(yy / h * 2)[..., None])
  start = rng.uniform(0.25, 0.75, (len(classes), 2))
  velocity = rng.uniform(-0.04, 0.04, (len(classes), 2))
  radius = rng.uniform(0.12, 0.25, (len(classes), 2))
  sounding = rng.random((num_frames, len(classes))) < 0.75
  sounding[:, 0] |= always_sounding
  frames = np.empty((num_frames, h, w, 3), np.uint8)
  ids = np.zeros((num_frames, h, w), np.uint8)
  palette = avsbench.voc_palette(avsbench.NUM_AVSS_CLASSES).astype(np.float64)
  for t in range(num_frames):
    texture = rng.normal(0, 6, (-(-h // 8), -(-w // 8), 3)).repeat(8, 0).repeat(8, 1)[:h, :w]
    image = background + texture
    for k, c in enumerate(classes):
      cy, cx = np.clip(start[k] + velocity[k] * t, 0.15, 0.85) * (h, w)
      inside = ((yy - cy) / (radius[k, 0] * h)) ** 2 + ((xx - cx) / (radius[k, 1] * w)) ** 2 <= 1
      image[inside] = 0.6 * palette[c] + 0.4 * (255 - palette[c])
      ids[t][inside] = c if sounding[t, k] else 0
    frames[t] = np.clip(image, 0, 255).astype(np.uint8)
  return frames, ids, sounding


def _tone(classes: list[int], sounding: np.ndarray, seconds: float, rate: int,
          rng: np.random.Generator) -> np.ndarray:
  """A harmonic tone per class, on while the class sounds (one frame per second), plus noise."""
  n = int(round(seconds * rate))
  time = np.arange(n) / rate
  wave = 0.01 * rng.standard_normal(n)
  second = np.minimum(time.astype(int), sounding.shape[0] - 1)
  for k, c in enumerate(classes):
    f0 = 110.0 + 23.0 * c
    tone = sum(np.sin(2 * np.pi * f0 * h * time + rng.uniform(0, 6)) / h for h in (1, 2, 3))
    wave += 0.15 * tone * sounding[second, k] * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * time) ** 2)
  return np.clip(wave, -1, 1)


def _write_wav(path: Path, wave: np.ndarray, rate: int, channels: int, dtype: str,
               rng: np.random.Generator) -> None:
  """Writes ``wave`` (float mono at ``rate``) as a WAV of the given channel count and sample type."""
  if channels == 2:
    wave = np.stack([wave, 0.8 * wave + 0.005 * rng.standard_normal(wave.shape)], axis=1)
  data = (np.clip(wave, -1, 1) * 32767).astype(np.int16) if dtype == 'int16' else wave.astype(dtype)
  path.parent.mkdir(parents=True, exist_ok=True)
  scipy.io.wavfile.write(path, rate, data)


def write_released_log_mel(path: Path, examples: np.ndarray, as_torch: bool = False) -> None:
  """[5, 96, 64] -> a ``.pkl`` laid out as AVSBench released it: a pickled [5, 1, 96, 64] float32
  value, a torch tensor with ``as_torch`` (as released; needs torch) or else a NumPy array (which
  the builders read without torch)."""
  value = examples[:, None].astype(np.float32)
  if as_torch:
    import torch

    value = torch.from_numpy(value)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'wb') as f:
    pickle.dump(value, f)


def _png(array: np.ndarray) -> bytes:
  """PNG bytes, fast (zlib level 1): the fixtures favour writing speed over size."""
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG', compress_level=1)
  return buf.getvalue()


def _save(path: Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def _object_mask_png(ids: np.ndarray) -> bytes:
  """A released-style S4/MS3 mask: object 255, its one-pixel rim 64 (an edge value that a
  threshold at 128 would lose; the builders binarise with > 0)."""
  fg = ids > 0
  inner = fg.copy()
  inner[1:, :] &= fg[:-1, :]
  inner[:-1, :] &= fg[1:, :]
  inner[:, 1:] &= fg[:, :-1]
  inner[:, :-1] &= fg[:, 1:]
  mask = np.where(inner, 255, np.where(fg, 64, 0)).astype(np.uint8)
  return _png(mask)


def _clip_audio(key: str, classes, sounding, seconds, rng, default):
  rate, channels, dtype = AUDIO_FORMATS.get(key, default)
  return _tone(classes, sounding, seconds, rate, rng), rate, channels, dtype


def write_s4(root: Path, rng: np.random.Generator, torch_pkl: bool = False) -> None:
  """``root/Single-source/{s4_meta_data.csv, s4_data/...}``."""
  subset = root / 'Single-source'
  data = subset / 's4_data'
  subset.mkdir(parents=True, exist_ok=True)
  with open(subset / 's4_meta_data.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['name', 'start', 'category', 'split'])
    writer.writerows(S4_CLIPS)
  for name, _, category, split in S4_CLIPS:
    classes = [avsbench.AVSS_CLASS_NAMES.index(S4_CATEGORY_CLASS[category])]
    frames, ids, sounding = _scene(rng, classes, 5, (OBJECT_SIZE, OBJECT_SIZE), True)
    rel = Path(split) / category / name
    for i in range(1, 6):
      _save(data / 'visual_frames' / rel / f'{name}_{i}.png', _png(frames[i - 1]))
      if split != 'train' or i == 1:
        _save(data / 'gt_masks' / rel / f'{name}_{i}.png', _object_mask_png(ids[i - 1]))
    wave, rate, channels, dtype = _clip_audio(name, classes, sounding, 5.0, rng, (16000, 2, 'int16'))
    wav = data / 'audio_wav' / split / category / f'{name}.wav'
    _write_wav(wav, wave, rate, channels, dtype, rng)
    write_released_log_mel(data / 'audio_log_mel' / split / category / f'{name}.pkl',
                           audio.pad_examples(audio.wav_to_log_mel(wav), 5, 'repeat'), torch_pkl)


def write_ms3(root: Path, rng: np.random.Generator, torch_pkl: bool = False) -> None:
  """``root/Multi-sources/{ms3_meta_data.csv, ms3_data/...}`` (frames without a split folder)."""
  subset = root / 'Multi-sources'
  data = subset / 'ms3_data'
  subset.mkdir(parents=True, exist_ok=True)
  with open(subset / 'ms3_meta_data.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['name', 'split'])
    writer.writerows((name, split) for name, split, _ in MS3_CLIPS)
  for name, split, a_obj in MS3_CLIPS:
    classes = _class_ids(a_obj)
    frames, ids, sounding = _scene(rng, classes, 5, (OBJECT_SIZE, OBJECT_SIZE))
    for i in range(1, 6):
      _save(data / 'visual_frames' / name / MS3_FRAME_NAME.format(name=name, i=i),
            _png(frames[i - 1]))
      _save(data / 'gt_masks' / split / name / f'{name}_{i}.png', _object_mask_png(ids[i - 1]))
    wave, rate, channels, dtype = _clip_audio(name, classes, sounding, 5.0, rng, (16000, 2, 'int16'))
    wav = data / 'audio_wav' / split / f'{name}.wav'
    _write_wav(wav, wave, rate, channels, dtype, rng)
    write_released_log_mel(data / 'audio_log_mel' / split / f'{name}.pkl',
                           audio.pad_examples(audio.wav_to_log_mel(wav), 5, 'repeat'), torch_pkl)


def write_avss(root: Path, rng: np.random.Generator, semantic_pngs: bool = True) -> None:
  """``root/{metadata.csv, label2idx.json, v1s|v1m|v2/{uid}/...}``.

  Frames as JPEG, ``labels_rgb`` as palette-coloured RGB PNGs and (with ``semantic_pngs``)
  ``labels_semantic`` as 8-bit class-id PNGs; v1s train clips are annotated on frame 0 only.
  """
  root.mkdir(parents=True, exist_ok=True)
  with open(root / 'metadata.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['vid', 'uid', 's_min', 's_sec', 'a_obj', 'split', 'label'])
    writer.writerows(AVSS_ROWS)
  (root / 'label2idx.json').write_text(json.dumps(
      {name: i + 1 for i, name in enumerate(avsbench.AVSS_CLASS_NAMES)}, indent=4))
  for _, uid, _, _, a_obj, split, label in AVSS_ROWS:
    n = avsbench.AVSS_CLIP_FRAMES[label]
    size = AVSS_V2_SIZES.get(uid, (OBJECT_SIZE, OBJECT_SIZE))
    classes = _class_ids(a_obj)
    frames, ids, sounding = _scene(rng, classes, n, size)
    clip = root / label / uid
    annotated = [0] if (label == 'v1s' and split == 'train') else range(n)
    for t in range(n):
      _save(clip / 'frames' / f'{t}.jpg', records.encode_jpeg(frames[t], quality=90))
      if t in annotated:
        _save(clip / 'labels_rgb' / f'{t}.png', _png(avsbench.class_ids_to_rgb(ids[t])))
        if semantic_pngs:
          _save(clip / 'labels_semantic' / f'{t}.png', _png(ids[t]))
    wave, rate, channels, dtype = _clip_audio(uid, classes, sounding, float(n), rng,
                                              (16000, 1, 'int16'))
    _write_wav(clip / 'audio.wav', wave, rate, channels, dtype, rng)


def write_fixtures(out, seed: int = 0, torch_pkl: bool = False) -> dict[str, Path]:
  """Writes all three fake releases under ``out``; returns the raw dirs of the two builders.

  ``torch_pkl`` writes the S4/MS3 log-mel ``.pkl`` files as pickled torch tensors, as released.
  """
  out = Path(out)
  rng = np.random.default_rng(seed)
  object_root = out / 'avsbench_object'
  semantic_root = out / 'avsbench_semantic'
  write_s4(object_root, rng, torch_pkl)
  write_ms3(object_root, rng, torch_pkl)
  write_avss(semantic_root, rng)
  return {'avs_object': object_root, 'avs_semantic': semantic_root}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True, help='folder to write the fake releases into')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--torch-pkl', action='store_true',
                      help='write the .pkl log-mel as torch tensors, as released (needs torch)')
  args = parser.parse_args(argv)
  roots = write_fixtures(args.out, seed=args.seed, torch_pkl=args.torch_pkl)
  for name, root in roots.items():
    print(f'{name}: raw_dir={root}')


if __name__ == '__main__':
  main()
