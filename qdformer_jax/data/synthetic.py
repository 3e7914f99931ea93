"""Procedural audio-visual segmentation clips in pure NumPy (docs/DESIGN.md §4.3, `synthetic_avs`).

Each class pairs a visual identity (shape, colour, texture) with a sound identity (a harmonic tone
with its own fundamental, harmonic profile and amplitude/frequency modulation). A clip shows 1–3
objects of distinct classes on a textured background, moving a little from frame to frame. In every
frame each visible object either sounds or is silent; the ground-truth mask covers only the
sounding objects, so a model that ignores the audio cannot score well. Off-screen sounds (classes
that are not visible) and background noise at a random SNR are mixed in.

Audio/frame alignment: the waveform is ``num_frames`` seconds at 16 kHz, as for AVSBench, but the
sound states switch at the VGGish example boundaries (every 0.96 s = 15360 samples; the last state
runs to the end), so that log-mel example t of `audio.waveform_to_log_mel` hears exactly the sounds
of frame t (the 10 ms ramps that avoid clicks sit where neighbouring examples' STFT windows
overlap; measured leak into a neighbouring example: under 0.5 % of its energy).

Everything is deterministic given the seed (or `numpy.random.Generator`) passed to `make_clip`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import scipy.ndimage
import scipy.signal

from qdformer_jax.data import audio

TASKS = ('single', 'multi', 'semantic')
SAMPLE_RATE = audio.SAMPLE_RATE
SEGMENT_SAMPLES = int(audio.EXAMPLE_FRAMES * audio.STFT_HOP_SECONDS * SAMPLE_RATE)  # 15360
_RAMP_SAMPLES = 160  # 10 ms raised-cosine on/off ramps
# A switch at example boundary B ramps over [B+40, B+200): inside the 240 samples that the last
# STFT window of the earlier example and the first window of the later one share.
_RAMP_OFFSET = 40
_MAX_PARTIAL_HZ = 7000.0  # partials stay below the 7500 Hz top of the mel filterbank
_WAVETABLE_SIZE = 8192  # entries per period of a tone's wavetable (a power of 2)
_MODULATOR_STEP = 16  # samples between updates of a tone's vibrato/tremolo (1 ms)
_SOURCE_RMS = 0.1  # RMS of a source at gain 1 (leaves headroom for 4 sources plus noise)


@dataclasses.dataclass(frozen=True)
class ClassSpec:
  """The visual and sound identity of one class."""
  name: str
  shape: str
  colour: tuple[int, int, int]
  texture: str
  f0: float  # fundamental, Hz
  harmonics: tuple[float, ...]  # amplitude of partial h+1 (0 = absent)
  am_rate: float  # amplitude modulation rate, Hz
  am_depth: float  # 0..1
  fm_rate: float  # vibrato rate, Hz
  fm_depth: float  # relative frequency deviation


def _f0_grid() -> np.ndarray:
  """12 fundamentals spaced geometrically over 150–2500 Hz (about 4.9 semitones apart)."""
  return 150.0 * (2500.0 / 150.0) ** (np.arange(12) / 11.0)


# Class k uses fundamental _F0_ORDER[k] of the grid: any prefix of the class list (num_classes < 12)
# still spans the whole 150–2500 Hz range.
_F0_ORDER = (0, 6, 3, 9, 1, 7, 4, 10, 2, 8, 5, 11)
_PROFILES = {
    'rich': (1.0, 0.7, 0.5, 0.35, 0.25, 0.18, 0.12, 0.08),  # sawtooth-like
    'odd': (1.0, 0.0, 0.45, 0.0, 0.25, 0.0, 0.15, 0.0),  # clarinet-like
    'pure': (1.0, 0.15),  # near-sine
    'bright': (0.5, 1.0, 0.8, 0.6, 0.4),  # strong 2nd/3rd partials
    'hollow': (1.0, 0.0, 0.0, 0.6, 0.0, 0.0, 0.3),  # 1st, 4th, 7th
}
# name, shape, colour, texture, profile, am_rate, am_depth, fm_rate, fm_depth
_CLASS_TABLE = (
    ('red_disc', 'disc', (225, 40, 40), 'solid', 'rich', 0.0, 0.0, 5.0, 0.010),
    ('green_square', 'square', (40, 190, 60), 'hstripes', 'odd', 4.0, 0.5, 0.0, 0.0),
    ('blue_triangle', 'triangle', (50, 80, 235), 'solid', 'pure', 8.0, 0.7, 0.0, 0.0),
    ('yellow_ring', 'ring', (240, 225, 50), 'solid', 'bright', 0.0, 0.0, 3.0, 0.020),
    ('magenta_cross', 'cross', (215, 60, 205), 'solid', 'hollow', 2.0, 0.6, 0.0, 0.0),
    ('cyan_diamond', 'diamond', (60, 215, 225), 'dots', 'rich', 6.0, 0.4, 6.0, 0.008),
    ('orange_star', 'star', (250, 140, 25), 'solid', 'odd', 0.0, 0.0, 7.0, 0.015),
    ('white_ellipse', 'ellipse', (245, 245, 245), 'vstripes', 'pure', 3.0, 0.8, 0.0, 0.0),
    ('purple_hexagon', 'hexagon', (125, 45, 175), 'checker', 'bright', 5.0, 0.5, 2.0, 0.010),
    ('pink_semicircle', 'semicircle', (250, 150, 185), 'solid', 'hollow', 0.0, 0.0, 4.0, 0.012),
    ('brown_frame', 'frame', (135, 80, 35), 'solid', 'rich', 1.5, 0.7, 0.0, 0.0),
    ('lime_bar', 'bar', (170, 245, 90), 'hstripes', 'odd', 7.0, 0.3, 5.0, 0.006),
)
CLASSES: tuple[ClassSpec, ...] = tuple(
    ClassSpec(name, shape, colour, texture, float(_f0_grid()[_F0_ORDER[k]]), _PROFILES[profile],
              am_rate, am_depth, fm_rate, fm_depth)
    for k, (name, shape, colour, texture, profile, am_rate, am_depth, fm_rate, fm_depth)
    in enumerate(_CLASS_TABLE))
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
MAX_CLASSES = len(CLASSES)


def class_names(num_classes: int) -> tuple[str, ...]:
  """Names of the first ``num_classes`` classes; semantic id c+1 is class c."""
  if not 1 <= num_classes <= MAX_CLASSES:
    raise ValueError(f'num_classes must be in 1..{MAX_CLASSES}, got {num_classes}')
  return CLASS_NAMES[:num_classes]


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """What `make_clip` generates.

  task: 'single' (binary masks; one sounding object, which sounds in every frame, the others are
    silent), 'multi' (binary masks; every visible object sounds in each frame with probability
    `sound_prob`) or 'semantic' (like 'multi', masks hold class ids c+1).
  num_classes: the clips draw their classes from the first `num_classes` of `CLASSES`.
  min_objects, max_objects: visible objects per clip (distinct classes); None = task default
    (single 1–3, multi 2–3, semantic 1–3).
  object_size: range of the object's bounding-box side as a fraction of image_size.
  max_speed: largest motion per frame as a fraction of image_size.
  offscreen_prob: probability that a clip has an off-screen source (a class that is not visible),
    which then sounds in each frame with probability `offscreen_frame_prob`.
  snr_db: range of the background-noise level, in dB below a source of gain 1.
  gain: range of the per-clip gain of each source.

  Harder variants (defaults leave the clips, and the random stream, as they were):
  shared_partials: classes pair up on one fundamental (`shared_f0`), so a frame's spectrum no
    longer names its classes by pitch; only harmonic profile and modulation separate a pair.
  max_offscreen: an off-screen clip has 1..max_offscreen off-screen sources.
  min_sounding: at least min(min_sounding, visible objects) objects sound in every frame
    (concurrent sources).
  frame_snr_jitter_db: each frame's noise is louder by U(0, jitter) dB (noise bursts that mask
    single frames: the clip's other frames still name the classes).
  """
  task: str = 'semantic'
  image_size: int = 64
  num_frames: int = 5
  num_classes: int = 8
  min_objects: int | None = None
  max_objects: int | None = None
  sound_prob: float = 0.6
  object_size: tuple[float, float] = (0.22, 0.47)
  max_speed: float = 0.03
  offscreen_prob: float = 0.5
  offscreen_frame_prob: float = 0.6
  snr_db: tuple[float, float] = (5.0, 25.0)
  gain: tuple[float, float] = (0.5, 1.0)
  shared_partials: bool = False
  max_offscreen: int = 1
  min_sounding: int = 0
  frame_snr_jitter_db: float = 0.0

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f'ClipConfig.task must be one of {TASKS}, got {self.task!r}')
    defaults = {'single': (1, 3), 'multi': (2, 3), 'semantic': (1, 3)}[self.task]
    if self.min_objects is None:
      object.__setattr__(self, 'min_objects', defaults[0])
    if self.max_objects is None:
      object.__setattr__(self, 'max_objects', defaults[1])
    if not 1 <= self.min_objects <= self.max_objects:
      raise ValueError(f'ClipConfig needs 1 <= min_objects <= max_objects, got '
                       f'{self.min_objects}, {self.max_objects}')
    if self.max_offscreen < 1:
      raise ValueError(f'ClipConfig.max_offscreen must be >= 1, got {self.max_offscreen}')
    need = self.max_objects + self.max_offscreen
    if not need <= self.num_classes <= MAX_CLASSES:
      raise ValueError(f'ClipConfig.num_classes must be in {need}..{MAX_CLASSES} '
                       f'(max_objects + max_offscreen leaves classes for off-screen sound), got {self.num_classes}')
    if self.image_size < 16:
      raise ValueError(f'ClipConfig.image_size must be >= 16, got {self.image_size}')
    if self.num_frames < 1:
      raise ValueError(f'ClipConfig.num_frames must be >= 1, got {self.num_frames}')
    for name in ('sound_prob', 'offscreen_prob', 'offscreen_frame_prob'):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f'ClipConfig.{name} must be in [0, 1], got {getattr(self, name)}')

  @property
  def binary(self) -> bool:
    return self.task != 'semantic'

  @property
  def num_labels(self) -> int:
    """C of the model: 1 for the binary tasks, num_classes for 'semantic'."""
    return 1 if self.binary else self.num_classes


class Clip(NamedTuple):
  """One generated clip.

  frames: uint8 [T,H,W,3]. semantic: uint8 [T,H,W] (0 background; class+1 for 'semantic', 1 for the
  binary tasks) covering only the objects that sound in that frame. waveform: float32
  [T·16000] at 16 kHz. metadata: dict with
    classes int [n] (visible classes, 0-based, in drawing order: later objects occlude earlier),
    sounding bool [T,n], visible bool [T,n] (object has visible pixels), object_masks bool
    [T,n,H,W] (visible pixels of each object), offscreen_classes int [m] (m = 0, or
    1..max_offscreen), offscreen_sounding bool [T,m], gains float [n+m], snr_db float, frame_snr_db
    float [T] (the noise level of each frame), centers float [T,n,2] (x, y
    pixels), sizes float [n] (bounding-box side, pixels), negative (None, or the kind of a negative
    clip: see `make_clip`).
  """
  frames: np.ndarray
  semantic: np.ndarray
  waveform: np.ndarray
  metadata: dict[str, Any]


def _as_rng(seed_or_rng) -> np.random.Generator:
  if isinstance(seed_or_rng, np.random.Generator):
    return seed_or_rng
  return np.random.default_rng(seed_or_rng)


# ----------------------------------------------------------------------------------------------- audio

def shared_f0(class_id: int) -> float:
  """The fundamental of ``class_id`` when classes share partials: pairs (2k, 2k+1) sound on the
  fundamental of class 2k, so their partials coincide and only the harmonic profile and the
  modulation tell them apart (e.g. 'odd' ⊂ 'rich', 'pure' ⊂ 'bright' partial sets)."""
  return CLASSES[class_id - class_id % 2].f0


def class_tone(class_id: int, num_samples: int, rng: np.random.Generator,
               detune: float = 1.0, f0: float | None = None) -> np.ndarray:
  """The sound identity of ``class_id``: float64 [num_samples] at 16 kHz with RMS 1.

  Harmonic partials of the class profile (those below 7 kHz) on a vibrato fundamental f0·detune,
  times the class's amplitude modulation; the modulation and partial phases are random. ``f0``
  replaces the class's own fundamental (see `shared_f0`).
  """
  if not 0 <= class_id < MAX_CLASSES:
    raise ValueError(f'class_id must be in 0..{MAX_CLASSES - 1}, got {class_id}')
  spec = CLASSES[class_id]
  f0 = (spec.f0 if f0 is None else f0) * detune
  # The slow modulators are computed every millisecond and held (steps far below audibility).
  t = np.arange(0, num_samples, _MODULATOR_STEP) / SAMPLE_RATE
  vibrato = np.sin(2 * np.pi * spec.fm_rate * t + rng.uniform(0, 2 * np.pi))
  inst_freq = np.repeat(f0 * (1.0 + spec.fm_depth * vibrato), _MODULATOR_STEP)[:num_samples]
  cycles = np.cumsum(inst_freq) / SAMPLE_RATE  # phase of the fundamental, in periods
  # One period of the harmonic waveform as a wavetable, read without interpolation (the phase
  # error of at most 2π/8192 puts the distortion below -60 dB).
  grid = np.arange(_WAVETABLE_SIZE) / _WAVETABLE_SIZE
  table = np.zeros(_WAVETABLE_SIZE)
  for h, amp in enumerate(spec.harmonics, start=1):
    if amp > 0 and h * f0 * (1 + spec.fm_depth) < _MAX_PARTIAL_HZ:
      table += amp * np.sin(2 * np.pi * h * grid + rng.uniform(0, 2 * np.pi))
  signal = table[(cycles * _WAVETABLE_SIZE).astype(np.int64) & (_WAVETABLE_SIZE - 1)]
  tremolo = np.sin(2 * np.pi * spec.am_rate * t + rng.uniform(0, 2 * np.pi))
  signal *= np.repeat(1.0 - spec.am_depth * (0.5 + 0.5 * tremolo), _MODULATOR_STEP)[:num_samples]
  return signal / np.sqrt(np.mean(signal ** 2))


def background_noise(num_samples: int, rng: np.random.Generator) -> np.ndarray:
  """Coloured noise with RMS 1: white noise plus a random share of its one-pole low-pass (50-400 Hz)."""
  white = rng.standard_normal(num_samples)
  pole = np.exp(-2 * np.pi * rng.uniform(50.0, 400.0) / SAMPLE_RATE)
  low = scipy.signal.lfilter([1.0 - pole], [1.0, -pole], white)
  mix = rng.uniform(0.2, 0.8)
  noise = mix * white / np.std(white) + (1 - mix) * low / (np.std(low) + 1e-12)
  return noise / np.sqrt(np.mean(noise ** 2))


def frame_gate(active: np.ndarray, num_samples: int) -> np.ndarray:
  """Per-sample gain in [0, 1] that is active[t] over frame t's audio segment.

  Segment t spans samples [t·15360, (t+1)·15360) (one VGGish example); the last segment runs to
  ``num_samples``. Switches are 10 ms raised-cosine ramps just after the boundaries, where the
  neighbouring examples' STFT windows overlap, so at most the two windows at a boundary see them.
  """
  active = np.asarray(active, np.float64)
  gate = np.repeat(active, SEGMENT_SAMPLES)[:num_samples]
  if gate.shape[0] < num_samples:
    gate = np.concatenate([gate, np.full(num_samples - gate.shape[0], active[-1])])
  ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(_RAMP_SAMPLES) + 0.5) / _RAMP_SAMPLES)
  for t in range(1, len(active)):
    start = t * SEGMENT_SAMPLES + _RAMP_OFFSET
    if active[t] != active[t - 1] and start + _RAMP_SAMPLES <= num_samples:
      gate[start - _RAMP_OFFSET:start] = active[t - 1]
      gate[start:start + _RAMP_SAMPLES] = active[t - 1] + (active[t] - active[t - 1]) * ramp
  return gate


def class_waveform(classes: Sequence[int], num_frames: int, seed_or_rng,
                   sounding: np.ndarray | None = None, gains: Sequence[float] | None = None,
                   snr_db: float | np.ndarray | None = None,
                   shared_partials: bool = False) -> np.ndarray:
  """The waveform of a clip in which ``classes`` sound: float32 [num_frames·16000] at 16 kHz.

  sounding: bool [num_frames, len(classes)], which class sounds in which frame (default: all, all
  the time). gains: per-class gain (default 1). snr_db: background noise level in dB below a source
  of gain 1 (None: no noise), one value or one per frame (switched like the sources). Each class
  gets a random detune of ±3 %. shared_partials: classes sound on `shared_f0`. The result is scaled
  down if its peak would exceed 0.99.
  """
  rng = _as_rng(seed_or_rng)
  classes = [int(c) for c in classes]
  num_samples = num_frames * SAMPLE_RATE
  if sounding is None:
    sounding = np.ones((num_frames, len(classes)), bool)
  sounding = np.asarray(sounding, bool)
  if sounding.shape != (num_frames, len(classes)):
    raise ValueError(f'sounding must have shape (num_frames, len(classes)) = '
                     f'{(num_frames, len(classes))}, got {sounding.shape}')
  gains = np.ones(len(classes)) if gains is None else np.asarray(gains, np.float64)
  if gains.shape != (len(classes),):
    raise ValueError(f'gains must have one entry per class ({len(classes)}), got shape {gains.shape}')
  mix = np.zeros(num_samples)
  for i, c in enumerate(classes):
    tone = class_tone(c, num_samples, rng, detune=rng.uniform(0.97, 1.03),
                      f0=shared_f0(c) if shared_partials else None)
    mix += _SOURCE_RMS * gains[i] * frame_gate(sounding[:, i], num_samples) * tone
  if snr_db is not None:
    if np.ndim(snr_db) == 0:
      level = 10.0 ** (-float(snr_db) / 20.0)
    else:
      level = frame_gate(10.0 ** (-np.asarray(snr_db, np.float64) / 20.0), num_samples)
    mix += _SOURCE_RMS * level * background_noise(num_samples, rng)
  peak = np.max(np.abs(mix)) if num_samples else 0.0
  if peak > 0.99:
    mix *= 0.99 / peak
  return mix.astype(np.float32)


# ---------------------------------------------------------------------------------------------- images

def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Inside-test of a shape in coordinates normalised by the half size (object spans [-1, 1]²)."""
  rho = np.hypot(u, v)
  au, av = np.abs(u), np.abs(v)
  if shape == 'disc':
    return rho <= 1.0
  if shape == 'square':
    return np.maximum(au, av) <= 0.85
  if shape == 'triangle':  # apex up
    return (v <= 0.8) & (au <= 0.95 * (v + 0.95) / 1.75)
  if shape == 'ring':
    return (rho <= 1.0) & (rho >= 0.5)
  if shape == 'cross':
    return ((au <= 0.33) & (av <= 1.0)) | ((av <= 0.33) & (au <= 1.0))
  if shape == 'diamond':
    return au + av <= 1.0
  if shape == 'star':
    return rho <= 0.6 + 0.4 * np.cos(5 * np.arctan2(u, -v))
  if shape == 'ellipse':
    return u ** 2 + (v / 0.55) ** 2 <= 1.0
  if shape == 'hexagon':
    return np.maximum(0.866 * au + 0.5 * av, av) <= 0.92
  if shape == 'semicircle':
    return (rho <= 1.0) & (v <= 0.25)
  if shape == 'frame':
    return (np.maximum(au, av) <= 0.92) & (np.maximum(au, av) >= 0.55)
  if shape == 'bar':
    return (au <= 0.4) & (av <= 1.0)
  raise ValueError(f'unknown shape {shape!r}')


def _texture(texture: str, x: np.ndarray, y: np.ndarray, period: float) -> np.ndarray:
  """Brightness factor of a texture (1 or 0.6) at pixel coordinates relative to the object."""
  if texture == 'solid':
    on = np.ones(x.shape, bool)
  elif texture == 'hstripes':
    on = np.floor(y / period) % 2 == 0
  elif texture == 'vstripes':
    on = np.floor(x / period) % 2 == 0
  elif texture == 'checker':
    on = (np.floor(x / period) + np.floor(y / period)) % 2 == 0
  elif texture == 'dots':
    on = np.hypot((x / period) % 2 - 1, (y / period) % 2 - 1) > 0.6
  else:
    raise ValueError(f'unknown texture {texture!r}')
  return np.where(on, 1.0, 0.6)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
  """float [1,H,W,3]: a muted, smoothly varying colour field."""
  base = rng.uniform(70, 150) + rng.uniform(-15, 15, size=3)
  cells = max(2, size // 8)
  coarse = rng.normal(0.0, 28.0, size=(cells + 1, cells + 1, 3))
  field = scipy.ndimage.zoom(coarse, (size / (cells + 1), size / (cells + 1), 1), order=1)[:size, :size]
  return base + field[None]


def _place_objects(config: ClipConfig, classes: np.ndarray, rng: np.random.Generator):
  """Sizes [n] and centre tracks [T,n,2] (pixels) of the objects, spread out and moving slightly."""
  size = config.image_size
  n = len(classes)
  sides = rng.uniform(*config.object_size, size=n) * size
  half = sides / 2
  starts = np.zeros((n, 2))
  for i in range(n):
    for _ in range(50):  # rejection sampling: keep the objects mostly apart
      starts[i] = rng.uniform(half[i], size - half[i], size=2)
      if all(np.hypot(*(starts[i] - starts[j])) >= 0.8 * (half[i] + half[j]) for j in range(i)):
        break
  velocity = rng.uniform(-1.0, 1.0, size=(n, 2)) * config.max_speed * size
  centers = np.zeros((config.num_frames, n, 2))
  pos = starts.copy()
  for t in range(config.num_frames):
    centers[t] = pos
    pos = pos + velocity
    low, high = half[:, None], size - half[:, None]
    bounced = (pos < low) | (pos > high)
    velocity = np.where(bounced, -velocity, velocity)
    pos = np.clip(pos, low, high)
  return sides, centers


def _render(config: ClipConfig, classes: np.ndarray, sides: np.ndarray, centers: np.ndarray,
            rng: np.random.Generator):
  """Frames uint8 [T,H,W,3] and the visible pixels of each object bool [T,n,H,W]."""
  size, num_frames, n = config.image_size, config.num_frames, len(classes)
  noise = rng.normal(0.0, 9.0, size=(num_frames, size, size, 3))  # per-frame pixel noise
  image = _background(size, rng) + noise
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  brightness = rng.uniform(0.85, 1.1, size=n)
  owner = np.full((num_frames, size, size), -1)
  for t in range(num_frames):
    for i, c in enumerate(classes):  # later objects occlude earlier ones
      spec = CLASSES[c]
      dx, dy = xx - centers[t, i, 0], yy - centers[t, i, 1]
      inside = _shape_mask(spec.shape, dx / (sides[i] / 2), dy / (sides[i] / 2))
      shade = _texture(spec.texture, dx + sides[i], dy + sides[i], max(2.0, sides[i] / 6))
      colour = np.asarray(spec.colour, np.float64) * brightness[i]
      pixel = colour * shade[..., None] + noise[t]
      image[t] = np.where(inside[..., None], pixel, image[t])
      owner[t][inside] = i
  object_masks = owner[:, None] == np.arange(n)[None, :, None, None]
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), object_masks


# ------------------------------------------------------------------------------------------------ clip

NEGATIVE_KINDS = ('silence', 'noise', 'offscreen')


def make_clip(config: ClipConfig, seed_or_rng, negative: str | None = None) -> Clip:
  """Generates one clip of ``config`` deterministically from a seed or `numpy.random.Generator`.

  negative: None (a clip of ``config``), or a negative clip in which no visible object sounds, so
  its target is empty in every frame; it hears 'silence' (an all-zero waveform), 'noise' (only the
  background noise, at the config's SNR and bursts) or 'offscreen' (1..max_offscreen classes that
  are not visible, at least one sounding in every frame, over the background noise). The frames are
  drawn as for a positive clip. ``metadata['negative']`` names the kind (None for a positive clip).
  """
  if not isinstance(config, ClipConfig):
    raise TypeError(f'make_clip expects a ClipConfig, got {type(config).__name__}')
  if negative is not None and negative not in NEGATIVE_KINDS:
    raise ValueError(f'make_clip: negative must be None or one of {NEGATIVE_KINDS}, got {negative!r}')
  rng = _as_rng(seed_or_rng)
  num_frames = config.num_frames
  n = int(rng.integers(config.min_objects, config.max_objects + 1))
  chosen = rng.permutation(config.num_classes)
  classes, others = chosen[:n], chosen[n:]

  if config.task == 'single':
    sounding = np.zeros((num_frames, n), bool)
    sounding[:, rng.integers(n)] = True
  else:
    sounding = rng.random((num_frames, n)) < config.sound_prob
    if config.min_sounding > 0:  # switch on the silent objects with the highest draws until enough sound
      order = np.argsort(np.where(sounding, -1.0, rng.random((num_frames, n))), axis=1)[:, ::-1]
      need = np.maximum(min(config.min_sounding, n) - sounding.sum(1), 0)
      for t in range(num_frames):
        sounding[t, order[t, :need[t]]] = True

  if negative is not None:
    sounding[:] = False  # nothing visible sounds: the target is empty
  if negative == 'offscreen' or (negative is None and rng.random() < config.offscreen_prob):
    m = 1 if config.max_offscreen == 1 else int(rng.integers(1, config.max_offscreen + 1))
    offscreen = others[:m]
    offscreen_sounding = rng.random((num_frames, m)) < config.offscreen_frame_prob
    if negative == 'offscreen':  # an off-screen-only clip hears something in every frame
      quiet = ~offscreen_sounding.any(axis=1)
      offscreen_sounding[quiet, rng.integers(m, size=int(quiet.sum()))] = True
  else:
    offscreen = others[:0]
    offscreen_sounding = np.zeros((num_frames, 0), bool)

  sides, centers = _place_objects(config, classes, rng)
  frames, object_masks = _render(config, classes, sides, centers, rng)

  labels = np.ones(n, np.uint8) if config.binary else (classes + 1).astype(np.uint8)
  semantic = np.zeros((num_frames, config.image_size, config.image_size), np.uint8)
  for i in range(n):
    semantic[object_masks[:, i] & sounding[:, i, None, None]] = labels[i]

  gains = rng.uniform(*config.gain, size=n + len(offscreen))
  snr_db = float(rng.uniform(*config.snr_db))
  frame_snr_db = snr_db
  if config.frame_snr_jitter_db > 0:
    frame_snr_db = snr_db - rng.uniform(0.0, config.frame_snr_jitter_db, size=num_frames)
  if negative == 'silence':
    waveform = np.zeros(num_frames * SAMPLE_RATE, np.float32)
  elif negative == 'noise':
    waveform = class_waveform([], num_frames, rng, snr_db=frame_snr_db)
  else:
    waveform = class_waveform(np.concatenate([classes, offscreen]), num_frames, rng,
                              sounding=np.concatenate([sounding, offscreen_sounding], axis=1),
                              gains=gains, snr_db=frame_snr_db, shared_partials=config.shared_partials)
  metadata = {
      'classes': classes.astype(np.int64),
      'sounding': sounding,
      'visible': object_masks.any(axis=(2, 3)),
      'object_masks': object_masks,
      'offscreen_classes': offscreen.astype(np.int64),
      'offscreen_sounding': offscreen_sounding,
      'gains': gains,
      'snr_db': snr_db,
      'frame_snr_db': np.broadcast_to(np.float64(frame_snr_db), (num_frames,)).copy(),
      'centers': centers,
      'sizes': sides,
      'negative': negative,
  }
  return Clip(frames, semantic, waveform, metadata)


def clip_log_mel(waveform: np.ndarray, num_frames: int) -> np.ndarray:
  """float32 [num_frames, 96, 64]: the VGGish examples of a clip's waveform, one per frame."""
  examples = audio.waveform_to_log_mel(waveform, SAMPLE_RATE)
  return audio.pad_examples(examples, num_frames, 'repeat')
