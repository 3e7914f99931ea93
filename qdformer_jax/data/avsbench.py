"""AVSBench as released: the S4, MS3 and AVSS layouts, read into the common record (docs/DESIGN.md §4.1).

Shared by the ``avs_object`` and ``avs_semantic`` TFDS builders. Listing functions
(:func:`list_s4`, :func:`list_ms3`, :func:`list_avss`) turn a release directory and a split into
:class:`ClipSpec` s (file paths and per-frame flags, no file read except the metadata);
:func:`load_clip` reads and checks one clip and returns the record of ``records.clip_features``;
:func:`generate_examples` does that for a split while a :class:`BuildSummary` counts what was
skipped or noted.

Bad input is handled in one of two ways (each builder's README lists the cases):

* :class:`ReleaseError` (a ValueError) stops the build with a message naming the clip, the file and
  what to do: missing metadata file or column, unknown label in the metadata, colour outside the
  palette, class id out of range, duplicate clip name.
* :class:`BadClip` marks a clip that cannot be used (missing or unreadable frame, mask or audio,
  audio shorter than one 0.96 s example, frame/mask sizes that disagree): the clip is skipped and
  counted in the build summary, or raised as a :class:`ReleaseError` when the build is ``strict``.

Audio shorter than the clip (fewer examples than frames), silent audio and multichannel audio are
used (padded / mixed down, as the reference code does) and listed in the summary as notes; so
is a ``log_mel_source='pkl'`` clip whose wav is missing or unreadable (``no_waveform``: the record
is written with an empty ``audio``, which only noise-robustness evaluation needs), and an S4/MS3
mask holding values other than 0 and 255 (``mask_values``: binarised as > 0 like the others; the
note names the file and counts the pixels). A WAV whose header announces more data than the file
holds is ``unreadable_audio``.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from qdformer_jax.data import audio, records
from qdformer_jax.data.classes import AVSS_CLASS_NAMES, NUM_AVSS_CLASSES, voc_palette  # noqa: F401

SPLITS = ('train', 'val', 'test')
OBJECT_FRAMES = 5  # S4 / MS3 clip length T
AVSS_FRAMES = 10  # AVSS record length T (v1 clips padded)
AVSS_LABELS = ('v1s', 'v1m', 'v2')
AVSS_CLIP_FRAMES = {'v1s': 5, 'v1m': 5, 'v2': 10}

# The 23 S4 categories (folder names of s4_data).
S4_CATEGORIES = (
    'ambulance_siren', 'baby_laughter', 'cap_gun_shooting', 'cat_meowing', 'chainsawing_trees',
    'coyote_howling', 'dog_barking', 'driving_buses', 'female_singing', 'helicopter',
    'horse_clip-clop', 'lawn_mowing', 'lions_roaring', 'male_speech', 'mynah_bird_singing',
    'playing_acoustic_guitar', 'playing_glockenspiel', 'playing_piano', 'playing_tabla',
    'playing_ukulele', 'playing_violin', 'race_car', 'typing_on_computer_keyboard')

# Summary keys: reasons a clip is skipped, and notes on clips that were written.
SKIP_REASONS = ('missing_file', 'unreadable_image', 'unreadable_audio', 'audio_too_short',
                'size_mismatch')
NOTES = ('short_audio', 'silent_audio', 'multichannel_audio', 'no_waveform', 'mask_values')


class ReleaseError(ValueError):
  """The release cannot be read as documented; the build stops."""


class BadClip(Exception):
  """One clip cannot be used; the build skips and counts it (or stops when strict)."""

  def __init__(self, reason: str, clip_id: str, path, detail: str):
    if reason not in SKIP_REASONS:
      raise ValueError(f'unknown skip reason {reason!r}')
    self.reason = reason
    self.clip_id = clip_id
    self.path = os.fspath(path)
    self.detail = detail
    super().__init__(f'clip {clip_id}: {path}: {detail}')


# --------------------------------------------------------------------------------------------
# Palette (labels_rgb) and class ids.


def class_ids_to_rgb(class_ids: np.ndarray, num_classes: int = NUM_AVSS_CLASSES) -> np.ndarray:
  """uint8 [H,W] class ids -> uint8 [H,W,3] palette colours (as in ``labels_rgb``)."""
  class_ids = np.asarray(class_ids)
  if class_ids.size and class_ids.max() >= num_classes:
    raise ValueError(f'class id {int(class_ids.max())} is outside 0..{num_classes - 1}')
  return voc_palette(num_classes)[class_ids]


def rgb_to_class_ids(rgb: np.ndarray, num_classes: int = NUM_AVSS_CLASSES) -> np.ndarray:
  """uint8 [H,W,3] ``labels_rgb`` colours -> uint8 [H,W] class ids by exact palette match.

  Raises ValueError listing the colours (and their pixel counts) that are not one of the
  ``num_classes`` palette colours.
  """
  rgb = np.asarray(rgb)
  if rgb.ndim != 3 or rgb.shape[-1] != 3:
    raise ValueError(f'expected an RGB label image [H,W,3], got shape {rgb.shape}')
  codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
  palette = voc_palette(num_classes).astype(np.int64)
  palette_codes = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
  order = np.argsort(palette_codes)
  sorted_codes = palette_codes[order]
  pos = np.clip(np.searchsorted(sorted_codes, codes), 0, num_classes - 1)
  known = sorted_codes[pos] == codes
  if not known.all():
    unknown, counts = np.unique(codes[~known], return_counts=True)
    top = np.argsort(-counts)[:5]
    listed = ', '.join(f'({u >> 16}, {(u >> 8) & 255}, {u & 255}) x{c}'
                       for u, c in zip(unknown[top], counts[top]))
    raise ValueError(f'{int((~known).sum())} pixels have colours outside the {num_classes}-class '
                     f'palette: {listed}')
  return order[pos].astype(np.uint8)


def read_label2idx(path) -> tuple[str, ...]:
  """``label2idx.json`` (1-based, background = 1) -> class names by 0-based id."""
  path = Path(path)
  if not path.is_file():
    raise ReleaseError(f'{path}: label2idx.json not found; it ships with AVS-Semantic next to '
                       'metadata.csv (point raw_dir at that folder)')
  try:
    mapping = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ReleaseError(f'{path}: not valid JSON ({e})') from e
  ids = sorted(mapping.values()) if isinstance(mapping, dict) else None
  if ids != list(range(1, len(mapping) + 1)) or mapping.get('background') != 1:
    raise ReleaseError(f'{path}: expected a JSON object name -> index with indices 1..N and '
                       'background = 1 (the released AVSS class index)')
  return tuple(name for name, _ in sorted(mapping.items(), key=lambda kv: kv[1]))


# --------------------------------------------------------------------------------------------
# Metadata and clip listing.


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """Where one clip's files are and what the record should hold.

  ``frames`` are the clip's real frames in order (``num_frames - len(frames)`` padded ones
  follow); ``masks[t]`` is the ground-truth file of real frame t or None where the release has
  none; ``mask_kinds[t]`` says how to read it: 'binary' (> 0 -> 1), 'palette' (labels_rgb) or
  'class_ids' (labels_semantic).
  """
  clip_id: str
  split: str
  category: str
  frames: tuple[Path, ...]
  masks: tuple[Path | None, ...]
  mask_kinds: tuple[str | None, ...]
  wav: Path
  log_mel_pkl: Path | None
  num_frames: int
  audio_pad: str  # 'repeat' (S4/MS3) or 'zeros' (AVSS)


def read_metadata(path, required: Iterable[str]) -> tuple[list[str], list[dict[str, str]]]:
  """A metadata CSV with a header row -> (header, rows as dicts, values stripped).

  Raises ReleaseError naming the file when it is absent or lacks one of the ``required`` columns.
  """
  path = Path(path)
  if not path.is_file():
    raise ReleaseError(f'{path}: metadata file not found; point raw_dir at the folder that holds '
                       'the release as unpacked (see the builder README)')
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.reader(f)
    header = [h.strip() for h in next(reader, [])]
    lines = list(enumerate(reader, start=2))
  missing = [c for c in required if c not in header]
  if not header or missing:
    raise ReleaseError(f'{path}: metadata column(s) {missing} missing; found columns {header}')
  rows = []
  for line, values in lines:
    if not any(v.strip() for v in values):
      continue
    if len(values) < len(header):
      raise ReleaseError(f'{path}: line {line} has {len(values)} values, expected {len(header)}')
    rows.append(dict(zip(header, (v.strip() for v in values))))
  return header, rows


def _check_unique(specs: list[ClipSpec], csv_path) -> list[ClipSpec]:
  counts = collections.Counter(s.clip_id for s in specs)
  dups = [c for c, n in counts.items() if n > 1]
  if dups:
    raise ReleaseError(f'{csv_path}: clip name(s) listed more than once in one split: {dups[:5]}')
  return specs


def _data_dir(raw_dir: Path, subset_dir: str, data_name: str) -> Path:
  """``{raw}/{subset}/{data}`` as released, or ``{raw}/{data}`` beside the subset folder."""
  for candidate in (raw_dir / subset_dir / data_name, raw_dir / data_name):
    if candidate.is_dir():
      return candidate
  raise ReleaseError(f'{raw_dir}: folder {data_name}/ not found (looked in {raw_dir / subset_dir} '
                     f'and {raw_dir}); point raw_dir at the folder holding {subset_dir}/')


def list_s4(raw_dir, split: str) -> list[ClipSpec]:
  """S4 clips of ``split``: ``Single-source/s4_meta_data.csv`` + ``s4_data/`` (train: mask 1 only)."""
  raw_dir = Path(raw_dir)
  csv_path = raw_dir / 'Single-source' / 's4_meta_data.csv'
  header, rows = read_metadata(csv_path, required=('category', 'split'))
  data = _data_dir(raw_dir, 'Single-source', 's4_data')
  specs = []
  for row in rows:
    if row['split'] != split:
      continue
    name, category = row[header[0]], row['category']
    frames_dir = data / 'visual_frames' / split / category / name
    masks_dir = data / 'gt_masks' / split / category / name
    num_masks = 1 if split == 'train' else OBJECT_FRAMES
    masks = tuple(masks_dir / f'{name}_{i}.png' if i <= num_masks else None
                  for i in range(1, OBJECT_FRAMES + 1))
    specs.append(ClipSpec(
        clip_id=name, split=split, category=category,
        frames=tuple(frames_dir / f'{name}_{i}.png' for i in range(1, OBJECT_FRAMES + 1)),
        masks=masks, mask_kinds=tuple('binary' if m else None for m in masks),
        wav=data / 'audio_wav' / split / category / f'{name}.wav',
        log_mel_pkl=data / 'audio_log_mel' / split / category / f'{name}.pkl',
        num_frames=OBJECT_FRAMES, audio_pad='repeat'))
  return _check_unique(specs, csv_path)


def list_ms3(raw_dir, split: str) -> list[ClipSpec]:
  """MS3 clips of ``split``: ``Multi-sources/ms3_meta_data.csv`` + ``ms3_data/`` (5 masks each).

  Frames sit in ``visual_frames/{name}/{name}.mp4_{i}.png`` with no split folder.
  """
  raw_dir = Path(raw_dir)
  csv_path = raw_dir / 'Multi-sources' / 'ms3_meta_data.csv'
  header, rows = read_metadata(csv_path, required=('split',))
  data = _data_dir(raw_dir, 'Multi-sources', 'ms3_data')
  specs = []
  for row in rows:
    if row['split'] != split:
      continue
    name = row[header[0]]
    masks = tuple(data / 'gt_masks' / split / name / f'{name}_{i}.png'
                  for i in range(1, OBJECT_FRAMES + 1))
    specs.append(ClipSpec(
        clip_id=name, split=split, category='',
        frames=tuple(data / 'visual_frames' / name / f'{name}.mp4_{i}.png'
                     for i in range(1, OBJECT_FRAMES + 1)),
        masks=masks, mask_kinds=('binary',) * OBJECT_FRAMES,
        wav=data / 'audio_wav' / split / f'{name}.wav',
        log_mel_pkl=data / 'audio_log_mel' / split / f'{name}.pkl',
        num_frames=OBJECT_FRAMES, audio_pad='repeat'))
  return _check_unique(specs, csv_path)


def list_avss(raw_dir, split: str, labels: Iterable[str] = AVSS_LABELS,
              label_source: str = 'auto') -> list[ClipSpec]:
  """AVSS clips of ``split`` whose ``label`` is in ``labels``.

  ``{label}/{uid}/frames/{t}.jpg`` (5 frames for v1s/v1m, 10 for v2), ``audio.wav`` and per
  annotated frame ``labels_semantic/{t}.png`` (class ids) or ``labels_rgb/{t}.png`` (palette).
  ``label_source``: 'auto' takes labels_semantic where that file exists and labels_rgb otherwise;
  'rgb' or 'semantic' insist on one. v1s train clips have ground truth on frame 0 only.
  """
  if label_source not in ('auto', 'rgb', 'semantic'):
    raise ValueError(f"label_source must be 'auto', 'rgb' or 'semantic', got {label_source!r}")
  raw_dir = Path(raw_dir)
  csv_path = raw_dir / 'metadata.csv'
  _, rows = read_metadata(csv_path, required=('uid', 'split', 'label'))
  labels = tuple(labels)
  specs = []
  for row in rows:
    if row['label'] not in AVSS_LABELS:
      raise ReleaseError(f"{csv_path}: clip {row['uid']} has label {row['label']!r}; "
                         f'expected one of {AVSS_LABELS}')
    if row['split'] != split or row['label'] not in labels:
      continue
    uid, label = row['uid'], row['label']
    clip_dir = raw_dir / label / uid
    n = AVSS_CLIP_FRAMES[label]
    annotated = [0] if (label == 'v1s' and split == 'train') else list(range(n))
    masks, kinds = [], []
    for t in range(n):
      if t not in annotated:
        masks.append(None)
        kinds.append(None)
        continue
      semantic = clip_dir / 'labels_semantic' / f'{t}.png'
      if label_source == 'semantic' or (label_source == 'auto' and semantic.is_file()):
        masks.append(semantic)
        kinds.append('class_ids')
      else:
        masks.append(clip_dir / 'labels_rgb' / f'{t}.png')
        kinds.append('palette')
    specs.append(ClipSpec(
        clip_id=uid, split=split, category=label,
        frames=tuple(clip_dir / 'frames' / f'{t}.jpg' for t in range(n)),
        masks=tuple(masks), mask_kinds=tuple(kinds), wav=clip_dir / 'audio.wav', log_mel_pkl=None,
        num_frames=AVSS_FRAMES, audio_pad='zeros'))
  return _check_unique(specs, csv_path)


# --------------------------------------------------------------------------------------------
# Reading one clip.


def _open_image(path: Path, clip_id: str, what: str) -> tuple[bytes, Image.Image]:
  if not path.is_file():
    raise BadClip('missing_file', clip_id, path, f'{what} not found')
  data = path.read_bytes()
  try:
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes fully: truncated or corrupt files fail here
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    raise BadClip('unreadable_image', clip_id, path, f'{what} cannot be decoded ({e})') from e
  return data, image


def _binary_mask(image: Image.Image) -> np.ndarray:
  """Any mask PNG -> uint8 {0, 1}: a pixel is foreground when its value (any RGB channel) > 0."""
  if image.mode in ('1', 'L', 'I', 'I;16', 'F'):
    foreground = np.asarray(image) > 0
  elif image.mode == 'LA':
    foreground = np.asarray(image)[..., 0] > 0
  else:
    foreground = np.asarray(image.convert('RGB')).any(axis=-1)
  return foreground.astype(np.uint8)


def _odd_mask_values(image: Image.Image) -> tuple[int, list[int]]:
  """(number of pixels, up to 5 of their values) of a binary mask whose values are not 0 or 255."""
  if image.mode == '1':
    return 0, []
  values = np.asarray(image.convert('RGB') if image.mode not in ('L', 'I', 'I;16', 'F', 'LA') else image)
  if image.mode == 'LA':
    values = values[..., 0]
  odd = (values != 0) & (values != 255)
  if values.ndim == 3:
    odd = odd.any(axis=-1)
    values = values.max(axis=-1)
  return int(odd.sum()), [int(v) for v in np.unique(values[odd])[:5]]


def _class_id_mask(image: Image.Image, spec: ClipSpec, path: Path) -> np.ndarray:
  """labels_semantic PNG (single channel, or RGB with equal channels) -> uint8 class ids."""
  ids = np.asarray(image)
  if ids.ndim == 3:
    if image.mode not in ('RGB', 'RGBA') or not (ids[..., :1] == ids[..., 1:3]).all():
      raise ReleaseError(f'clip {spec.clip_id}: {path}: expected a single-channel class-id PNG, got '
                         f'mode {image.mode}; use label_source="rgb" to read labels_rgb instead')
    ids = ids[..., 0]
  if ids.size and (ids.min() < 0 or ids.max() >= NUM_AVSS_CLASSES):
    raise ReleaseError(f'clip {spec.clip_id}: {path}: class id {int(ids.max())} outside '
                       f'0..{NUM_AVSS_CLASSES - 1}; labels_semantic must hold label2idx - 1')
  return ids.astype(np.uint8)


def _palette_mask(image: Image.Image, spec: ClipSpec, path: Path) -> np.ndarray:
  try:
    return rgb_to_class_ids(np.asarray(image.convert('RGB')))
  except ValueError as e:
    raise ReleaseError(f'clip {spec.clip_id}: {path}: {e}; labels_rgb must use the exact '
                       'PASCAL-VOC palette colours (a lossy or resized copy will not work)') from e


def _read_waveform(spec: ClipSpec, notes: list[str]) -> np.ndarray:
  """The clip's wav as the front end hears it: float64 mono at 16 kHz (mixed down, resampled)."""
  path = spec.wav
  if not path.is_file():
    raise BadClip('missing_file', spec.clip_id, path, 'audio wav not found')
  try:
    samples, sample_rate = audio.read_wav(path)
  except ValueError as e:
    raise BadClip('unreadable_audio', spec.clip_id, path, str(e)) from e
  if samples.ndim == 2 and samples.shape[1] > 1:
    notes.append('multichannel_audio')
  mono = audio.to_mono_float(samples)
  if mono.size and not np.any(mono):
    notes.append('silent_audio')
  return audio.resample(mono, sample_rate)


def _log_mel(spec: ClipSpec, log_mel_source: str, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """The clip's [num_frames, 96, 64] log-mel (trimmed to its real frames, padded to T) and its
  16 kHz mono waveform (float64; empty when ``log_mel_source='pkl'`` and the wav is unusable)."""
  real = len(spec.frames)
  if log_mel_source == 'pkl':
    path = spec.log_mel_pkl
    if path is None:
      raise ReleaseError(f'clip {spec.clip_id}: this release has no .pkl log-mel; use '
                         "log_mel_source='wav'")
    if not path.is_file():
      raise BadClip('missing_file', spec.clip_id, path, 'log-mel .pkl not found')
    try:
      examples = audio.load_released_log_mel(path)
    except ValueError as e:
      raise BadClip('unreadable_audio', spec.clip_id, path, str(e)) from e
    try:  # the waveform is kept when the wav is there; the .pkl alone still makes a record
      waveform = _read_waveform(spec, [])
    except BadClip:
      notes.append('no_waveform')
      waveform = np.zeros((0,), np.float64)
  elif log_mel_source == 'wav':
    path = spec.wav
    waveform = _read_waveform(spec, notes)
    examples = audio.waveform_to_log_mel(waveform, audio.SAMPLE_RATE)
  else:
    raise ValueError(f"log_mel_source must be 'wav' or 'pkl', got {log_mel_source!r}")
  if examples.shape[0] == 0:
    raise BadClip('audio_too_short', spec.clip_id, path,
                  'audio holds no whole 0.96 s VGGish example')
  if examples.shape[0] < real:
    notes.append('short_audio')
  examples = audio.pad_examples(examples[:real], real, spec.audio_pad)
  return audio.pad_examples(examples, spec.num_frames, 'zeros'), waveform


def load_clip(spec: ClipSpec, log_mel_source: str = 'wav') -> tuple[dict, list]:
  """Reads and checks one clip -> (record of ``records.clip_features(spec.num_frames)``, notes: each
  a note name or a (name, detail) pair).

  Frames are stored as released (encoded bytes, fully decoded once here to check them); masks
  are converted to class ids (S4/MS3: > 0 -> 1; AVSS: labels_semantic ids or exact palette match)
  and stored as 8-bit PNGs. Raises BadClip or ReleaseError as the module docstring says.
  """
  notes: list = []
  odd_masks: list[tuple[Path, int, list[int]]] = []
  T = spec.num_frames
  frames, semantic = [], []
  gt_valid = np.zeros((T,), bool)
  frame_valid = np.zeros((T,), bool)
  size = None
  for t, path in enumerate(spec.frames):
    data, image = _open_image(path, spec.clip_id, f'frame {t}')
    if size is None:
      size = image.size
    elif image.size != size:
      raise BadClip('size_mismatch', spec.clip_id, path,
                    f'frame {t} is {image.size[0]}x{image.size[1]}, frame 0 is {size[0]}x{size[1]}')
    frames.append(data)
    frame_valid[t] = True
    mask_path, kind = spec.masks[t], spec.mask_kinds[t]
    if mask_path is None:
      semantic.append(b'')
      continue
    _, mask_image = _open_image(mask_path, spec.clip_id, f'mask of frame {t}')
    if mask_image.size != size:
      raise BadClip('size_mismatch', spec.clip_id, mask_path,
                    f'mask is {mask_image.size[0]}x{mask_image.size[1]}, frame is {size[0]}x{size[1]}')
    if kind == 'binary':
      ids = _binary_mask(mask_image)
      pixels, values = _odd_mask_values(mask_image)
      if pixels:
        odd_masks.append((mask_path, pixels, values))
    elif kind == 'class_ids':
      ids = _class_id_mask(mask_image, spec, mask_path)
    else:
      ids = _palette_mask(mask_image, spec, mask_path)
    semantic.append(records.encode_png(ids))
    gt_valid[t] = True
  pad = T - len(frames)
  if odd_masks:
    values = sorted({v for _, _, vs in odd_masks for v in vs})[:5]
    notes.append(('mask_values', f'{sum(p for _, p, _ in odd_masks)} pixels in {len(odd_masks)} mask(s) with '
                                 f'values other than 0 and 255 (e.g. {values}; binarised as > 0), first '
                                 f'{odd_masks[0][0]}'))
  log_mel, waveform = _log_mel(spec, log_mel_source, notes)
  waveform, waveform_length = records.encode_audio(waveform, T)
  example = {
      'clip_id': spec.clip_id,
      'category': spec.category,
      'frames': frames + [b''] * pad,
      'semantic': semantic + [b''] * pad,
      'log_mel': log_mel,
      'audio': waveform,
      'audio_length': waveform_length,
      'gt_valid': gt_valid,
      'frame_valid': frame_valid,
  }
  return example, notes


# --------------------------------------------------------------------------------------------
# A split.


class BuildSummary:
  """Counts of one split's build: clips listed, written, skipped (by reason) and noted.

  ``to_dict`` keeps every count and, per reason or note, the first ``max_listed`` messages or
  clip names (the dict goes into the dataset's metadata.json).
  """

  def __init__(self, name: str, split: str, max_listed: int = 50):
    self.name = name
    self.split = split
    self.max_listed = max_listed
    self.listed = 0
    self.written = 0
    self.skipped: dict[str, list[str]] = {r: [] for r in SKIP_REASONS}
    self.notes: dict[str, list[str]] = {n: [] for n in NOTES}

  def to_dict(self) -> dict:
    def entry(items, key):
      return {'count': len(items), key: items[:self.max_listed]}

    return {
        'listed': self.listed,
        'written': self.written,
        'skipped': sum(len(v) for v in self.skipped.values()),
        'skipped_by_reason': {k: entry(v, 'errors') for k, v in self.skipped.items() if v},
        'notes': {k: entry(v, 'clips') for k, v in self.notes.items() if v},
    }

  def report(self) -> str:
    """One paragraph for the build log."""
    lines = [f'{self.name} {self.split}: {self.written} of {self.listed} clips written, '
             f'{self.listed - self.written} skipped']
    for reason, items in self.skipped.items():
      if items:
        lines.append(f'  skipped ({reason}): {len(items)}, e.g. {items[0]}')
    for note, clips in self.notes.items():
      if clips:
        lines.append(f'  note ({note}): {len(clips)} clips, e.g. {clips[0]}')
    return '\n'.join(lines)


def generate_examples(specs: list[ClipSpec], summary: BuildSummary, *, strict: bool = False,
                      log_mel_source: str = 'wav') -> Iterator[tuple[str, dict]]:
  """(key, record) for every usable clip; unusable ones are counted in ``summary``.

  With ``strict`` a BadClip stops the build as a ReleaseError instead of being skipped.
  """
  for spec in specs:
    summary.listed += 1
    try:
      example, notes = load_clip(spec, log_mel_source)
    except BadClip as e:
      if strict:
        raise ReleaseError(f'{e} (reason: {e.reason}; strict build)') from e
      summary.skipped[e.reason].append(str(e))
      continue
    for note in notes:
      note, detail = note if isinstance(note, tuple) else (note, None)
      summary.notes[note].append(spec.clip_id if detail is None else f'{spec.clip_id}: {detail}')
    summary.written += 1
    yield spec.clip_id, example


def already_built_message(builders) -> str:
  """The error of a build command whose TFDS ``builders`` already hold their dataset version."""
  listed = '; '.join(f'{b.info.full_name} in {b.data_dir}' for b in builders)
  return (f'already built: {listed}. Pass --overwrite to rebuild from the release (replaces it), or use '
          'the existing dataset as it is')
