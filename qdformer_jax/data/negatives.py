"""Negative audio: a clip whose sound has nothing visible sounding (the AVSBench-Robust protocol).

A negative clip keeps its frames and hears one of

* ``silence``: an all-zero waveform through the model's front end;
* ``noise``: broadband (white Gaussian) noise at the level (RMS) of the clip's own audio;
* ``offscreen``: another clip's audio whose sounding classes are absent from this clip's frames.

Its target is empty: every valid frame is all background, so what a model segments there is a false
positive (docs/DESIGN.md, "Negative audio"). Evaluation applies one kind to every clip of a split
(:class:`Negative`, an explicit argument of ``pipeline.make_eval_iterator``); training with
``data.negative_fraction`` turns that fraction of its clips into negatives of
``data.negative_kinds`` (:func:`train_negative`).

Off-screen donors. A dataset with class labels (synthetic, AVSS: the masks hold class ids) gets a
class-aware donor: the next clip of the split (cyclically, from a seeded offset) whose ground-truth
classes are disjoint from this clip's. The masks show the classes that sound and are visible: a donor's
off-screen sources, and a visible but silent object of this clip, are not in them. S4 and MS3 have no
class ids: the donor is another clip of a different ``category`` (S4's category; MS3 has none, so any
other clip), as AVSBench-Robust does; :func:`offscreen_rule` says which rule a dataset gets.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from qdformer_jax.data import audio, records, registry

KINDS = ('silence', 'noise', 'offscreen')


@dataclasses.dataclass(frozen=True)
class Negative:
  """Negative audio for an evaluation: every clip hears ``kind`` (one of :data:`KINDS`) and its
  target is emptied. ``seed`` draws the noise (per clip index). ``donors``: for 'offscreen', the index
  of the clip whose audio clip i hears (:func:`offscreen_donors`)."""
  kind: str
  seed: int = 0
  donors: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'negative audio kind must be one of {KINDS}, got {self.kind!r}')
    if self.kind == 'offscreen' and self.donors is None:
      raise ValueError("negative audio 'offscreen' needs donors (negatives.offscreen_donors)")


def class_aware(data_config) -> bool:
  """Whether the dataset's masks hold class ids (off-screen donors can be chosen by class)."""
  return registry.get(data_config.name).semantic_names is not None


OFFSCREEN_RULES = ('class_aware', 'any')


def offscreen_rule(data_config, rule: str = 'class_aware') -> str:
  """One line: how off-screen audio is chosen on this dataset under ``rule`` ('class_aware': by class
  where the dataset has class ids, else by category; 'any': any other clip)."""
  if rule == 'any':
    return "any other clip's audio (eval.offscreen='any'): its sources may be visible in this clip"
  if class_aware(data_config):
    return ("class-aware: another clip's audio whose ground-truth classes are disjoint from this clip's "
            '(the classes the masks show: visible and sounding)')
  return (f'{data_config.name} has no class labels: another clip\'s audio, of a different category where '
          'the record has one (S4), else any other clip (MS3), as AVSBench-Robust does')


def clip_classes(record) -> frozenset[int]:
  """The class ids (> 0) of a record's ground-truth masks, over its frames with ground truth."""
  found: set[int] = set()
  valid = np.asarray(record['gt_valid'], bool) & np.asarray(record['frame_valid'], bool)
  for t, encoded in enumerate(record['semantic']):
    if valid[t] and encoded:
      found.update(int(c) for c in np.unique(records.decode_image(encoded, 'L')) if c > 0)
  return frozenset(found)


def _category(record) -> str:
  value = record.get('category', b'')
  return value.decode() if isinstance(value, bytes) else str(value)


def compatible(data_config, record, donor) -> bool:
  """Whether ``donor``'s audio is off-screen for ``record`` under :func:`offscreen_rule`."""
  return _keys_compatible(_key(record, data_config), _key(donor, data_config), class_aware(data_config))


def offscreen_donors(source, total: int, data_config, seed: int = 0,
                     rule: str = 'class_aware') -> tuple[tuple[int, ...], int]:
  """(donor index of each of the first ``total`` clips of ``source``, clips without a compatible donor).

  Clip i takes the first compatible clip among i + k, i + k + 1, ... (cyclically, k >= 1 drawn from
  ``seed``); a clip with none takes clip i + k anyway and is counted (a split of one class). With
  ``rule='any'`` every other clip is compatible."""
  if rule not in OFFSCREEN_RULES:
    raise ValueError(f'eval.offscreen must be one of {OFFSCREEN_RULES}, got {rule!r}')
  if total < 2:
    raise ValueError(f'off-screen audio needs at least 2 clips in the split, got {total}')
  offset = 1 + int(np.random.default_rng(seed).integers(total - 1))
  keys = [_key(source[i], data_config) if rule != 'any' else None for i in range(total)]
  donors, missing = [], 0
  for i in range(total):
    for k in range(total):
      j = (i + offset + k) % total
      if j == i:
        continue
      if rule == 'any' or _keys_compatible(keys[i], keys[j], class_aware(data_config)):
        donors.append(j)
        break
    else:
      donors.append((i + offset) % total)
      missing += 1
  return tuple(donors), missing


def _key(record, data_config):
  """What off-screen compatibility compares: the clip's classes, or its category."""
  return clip_classes(record) if class_aware(data_config) else _category(record)


def _keys_compatible(mine, theirs, by_class: bool) -> bool:
  """A class-aware donor sounds (has classes) none of which this clip shows; else another category."""
  if by_class:
    return bool(theirs) and not theirs & mine
  return not mine or not theirs or mine != theirs


@functools.lru_cache(maxsize=8)
def _silence(num_frames: int, num_real: int, pad_mode: str, encoder: str) -> np.ndarray:
  return audio.clip_examples(np.zeros(num_real * audio.SAMPLE_RATE), audio.SAMPLE_RATE, num_frames=num_frames,
                             num_real=num_real, pad_mode=pad_mode, encoder=encoder)


def _clip_id(record) -> str:
  value = record.get('clip_id', b'?')
  return value.decode() if isinstance(value, bytes) else str(value)


def negative_audio(record, kind: str, data_config, *, rng: np.random.Generator | None = None,
                   donor_log_mel: np.ndarray | None = None) -> np.ndarray:
  """The audio examples (as ``pipeline.record_log_mel`` lays them out) of ``record`` hearing ``kind``:
  silence, noise drawn with ``rng`` at the RMS of its own waveform, or the donor clip's audio
  examples ``donor_log_mel`` (off-screen)."""
  frame_valid = np.asarray(record['frame_valid'], bool)
  num_frames, num_real = frame_valid.shape[0], int(frame_valid.sum())
  encoder = data_config.get('audio_encoder') or 'vggish'
  pad_mode = registry.get(data_config.name).audio_pad
  if kind == 'silence':
    return _silence(num_frames, num_real, pad_mode, encoder).copy()
  if kind == 'offscreen':
    if donor_log_mel is None:
      raise ValueError(f'clip {_clip_id(record)!r}: off-screen audio needs a donor clip')
    return np.asarray(donor_log_mel, np.float32)
  if kind != 'noise':
    raise ValueError(f'negative audio kind must be one of {KINDS}, got {kind!r}')
  waveform = records.decode_audio(record)
  if waveform.shape[0] == 0:
    raise ValueError(f'clip {_clip_id(record)!r} has no stored waveform (audio_length = 0; built from the '
                     "released .pkl log-mel): noise at the level of its audio needs it; rebuild with "
                     "log_mel_source='wav', or leave 'noise' out of data.negative_kinds")
  level = float(np.sqrt(np.mean(waveform ** 2))) or 0.1  # a silent clip's noise at -20 dBFS
  rng = rng if rng is not None else np.random.default_rng(0)
  noise = np.clip(rng.standard_normal(waveform.shape[0]) * level, -1.0, 1.0)
  return audio.clip_examples(noise, audio.SAMPLE_RATE, num_frames=num_frames, num_real=num_real,
                             pad_mode=pad_mode, encoder=encoder)


def make_negative(clip: dict, log_mel: np.ndarray) -> dict:
  """``clip`` (the batch contract, one clip) hearing ``log_mel`` with an empty target."""
  return dict(clip, log_mel=np.asarray(log_mel, np.float32), semantic=np.zeros_like(clip['semantic']))


def draw_train_negative(record, data_config, source, rng: np.random.Generator) -> tuple[str, dict | None] | None:
  """With probability ``data.negative_fraction``: (kind, donor record or None) of a negative drawn
  from ``data.negative_kinds`` (an off-screen donor is drawn from ``source``: up to 16 tries for a
  compatible one, then the last one drawn); else None."""
  fraction = float(data_config.negative_fraction)
  if fraction <= 0.0 or rng.random() >= fraction:
    return None
  kinds = tuple(data_config.negative_kinds)
  kind = kinds[int(rng.integers(len(kinds)))]
  donor = None
  if kind == 'offscreen':
    for _ in range(16):
      donor = source[int(rng.integers(len(source)))]
      if _clip_id(donor) != _clip_id(record) and compatible(data_config, record, donor):
        break
  return kind, donor
