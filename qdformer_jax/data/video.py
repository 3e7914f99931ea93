"""Reading a user's own video (frames at 1 fps plus its soundtrack), windowing it into clips of T
frames, and writing an overlay video back: the I/O behind ``python -m qdformer_jax.predict``.

Decoding and encoding go through PyAV (``pip install av``; its wheels bundle FFmpeg). PyAV is
imported only when a video file is read or written, so :func:`read_frames_dir` and
:func:`windows` work without it.

Frame sampling (:func:`read_video`)
  AVSBench extracts one frame per second of each 5 s (S4, MS3, AVSS v1) or 10 s (AVSS v2) clip and
  pairs frame k with the k-th second of audio; it does not state which instant of the second the
  frame is taken from. Here the video is cut into segments of ``1/fps`` seconds, measured from its
  first frame (time 0), and frame k is the decoded frame whose timestamp is nearest to the middle
  of segment k, ``(k + 0.5) / fps`` (a tie goes to the earlier frame). Segment k is sampled when
  its middle lies inside the video (before the end of its last frame), so a video of duration d
  gives ``ceil(d · fps - 0.5)`` frames: 5 frames for anything from just over 4.5 s to 5.5 s,
  which tolerates the few-hundredths-of-a-second shortfall common in cut clips. The middle is the
  instant that best represents the segment whichever convention the dataset used (start, middle
  or any frame of the second is at most half a segment away), and it is the centre of the audio
  the frame is paired with. ``Video.timestamps`` holds the chosen frames' own timestamps.

Soundtrack
  All audio frames of the first audio stream are decoded, converted to float and mixed down to
  mono by :func:`qdformer_jax.data.audio.to_mono_float` (channel mean), at the stream's native rate
  (resample with :func:`qdformer_jax.data.audio.resample`). Sample 0 is aligned with the first
  video frame: audio that starts earlier is cut, audio that starts later is preceded by zeros.

Windows (:func:`windows`)
  n sampled frames are split into consecutive, non-overlapping windows of T frames (T seconds at
  1 fps). A tail shorter than T (and a video shorter than T, which then gives a single window) is
  padded up to T by repeating its last real frame, marked False in ``frame_valid`` so that the model
  keeps a static [T, ...] shape and the padded frames are ignored; ``Window.num_real`` counts the
  real frames, for callers that prefer to reject short videos. A window's audio is the T/fps
  seconds of waveform from its start time, zero-padded past the end of the soundtrack.

Writing (:func:`write_video`)
  H.264 (libx264, CRF 18) in yuv420p when the bundled FFmpeg has it, else MPEG-4 Part 2; the
  soundtrack, when given, is muxed as mono AAC. yuv420p needs even sizes: an odd height or width is
  padded by one row or column repeating the last one (nothing is cropped), so the file can be one
  pixel larger than the frames. A path ending in ``.gif`` writes an animated GIF with Pillow instead
  (no audio, no PyAV needed).

Errors name the file and what to do: FileNotFoundError for a missing file or folder, ValueError for
a file that is not a readable video, has no video stream, no or a silent soundtrack when one is
required, or a folder without frames.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from qdformer_jax.data import audio as audio_lib

FRAME_EXTENSIONS = ('.png', '.jpg', '.jpeg')
AUDIO_MODES = ('auto', 'required', 'none')
AAC_SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025,
                    8000, 7350)
_INSTALL_AV = 'pip install "av>=14"'


@dataclasses.dataclass(frozen=True)
class Video:
  """Frames sampled at ``fps`` and the soundtrack of a video (or of a folder of frames).

  Attributes:
    frames: uint8 [n, H, W, 3] RGB, upright (a rotation in the file's display matrix is applied).
    timestamps: float64 [n], seconds from the first frame of the file to each sampled frame (for a
      frames folder, the segment middles (k + 0.5) / fps).
    duration: seconds of video, from its first frame to the end of its last one (n / fps for a
      frames folder).
    fps: the sampling rate, frames per second.
    audio: float32 [samples] mono waveform in about [-1, 1] at ``sample_rate``, sample 0 at the
      first frame; None without a soundtrack (or when not asked for).
    sample_rate: the soundtrack's native rate in Hz, or None.
    source: the file or folder it was read from.
  """
  frames: np.ndarray
  timestamps: np.ndarray
  duration: float
  fps: float
  audio: np.ndarray | None = None
  sample_rate: int | None = None
  source: str = ''

  @property
  def num_frames(self) -> int:
    return int(self.frames.shape[0])

  @property
  def has_sound(self) -> bool:
    """True when there is a soundtrack with at least one non-zero sample."""
    return self.audio is not None and bool(np.any(self.audio))


@dataclasses.dataclass(frozen=True)
class Window:
  """One clip of T sampled frames, as :func:`windows` cuts them.

  Attributes:
    index: the window's position (0, 1, ...).
    start: the first sampled frame it covers.
    num_real: how many of its T frames are real (T except in a padded tail).
    indices: int [T] sampled-frame indices to gather; padding repeats the last real frame.
    frame_valid: bool [T], False on padding.
    start_time: seconds from the video's start, start / fps.
    seconds: the window's length in seconds, T / fps.
  """
  index: int
  start: int
  num_real: int
  indices: np.ndarray
  frame_valid: np.ndarray
  start_time: float
  seconds: float

  @property
  def length(self) -> int:
    return int(self.indices.shape[0])

  def take(self, per_frame: np.ndarray) -> np.ndarray:
    """[n, ...] per-sampled-frame array (frames, timestamps, ...) -> [T, ...] for this window."""
    return np.asarray(per_frame)[self.indices]

  def audio(self, waveform: np.ndarray, sample_rate: float) -> np.ndarray:
    """The window's ``seconds`` of a mono waveform from ``start_time`` (see :func:`audio_slice`)."""
    return audio_slice(waveform, sample_rate, self.start_time, self.seconds)


def _import_av():
  try:
    import av
  except ImportError as e:
    raise ImportError(f'reading and writing video files needs PyAV: {_INSTALL_AV}') from e
  return av


def _check_fps(fps) -> Fraction:
  if (isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not math.isfinite(fps)
      or fps <= 0):
    raise ValueError(f'fps must be a positive number, got {fps!r}')
  return Fraction(fps)


def _av_message(e: Exception) -> str:
  return getattr(e, 'strerror', None) or str(e)


# ---------------------------------------------------------------------------------------------
# Reading.


class _Sampler:
  """Picks, for each segment middle (k + 0.5) / fps after the first frame, the nearest frame.

  Frames arrive in presentation order; a frame is converted to RGB only when it is picked.
  """

  def __init__(self, fps: Fraction):
    self.period = 1 / fps
    self.t0: Fraction | None = None
    self.k = 0
    self.prev: list | None = None  # [time, av frame, rgb array or None, duration or None]
    self.last_step: Fraction | None = None
    self.frames: list[np.ndarray] = []
    self.times: list[Fraction] = []

  def _target(self) -> Fraction:
    return self.t0 + (self.k + Fraction(1, 2)) * self.period

  def _pick(self, entry: list) -> None:
    if entry[2] is None:
      entry[2] = _to_rgb(entry[1])
      entry[1] = None  # the decoded frame is no longer needed
    self.frames.append(entry[2])
    self.times.append(entry[0])
    self.k += 1

  def push(self, time: Fraction, frame, duration: Fraction | None) -> None:
    if self.t0 is None:
      self.t0 = time
    elif time <= self.prev[0]:
      return  # a repeated or out-of-order timestamp: keep the first frame seen
    entry = [time, frame, None, duration]
    while self._target() <= time:
      target = self._target()
      if self.prev is not None and target - self.prev[0] <= time - target:
        self._pick(self.prev)  # nearer, or a tie: the earlier frame
      else:
        self._pick(entry)
    if self.prev is not None:
      self.last_step = time - self.prev[0]
    self.prev = entry

  def end(self, fallback_step: Fraction) -> Fraction | None:
    """The end of the last frame: its timestamp plus its duration (or the last frame step)."""
    if self.prev is None:
      return None
    step = self.prev[3] or self.last_step or fallback_step
    return self.prev[0] + step

  def finish(self, end: Fraction) -> None:
    """Samples the segments whose middle lies before ``end``; they all follow the last frame."""
    while self._target() < end:
      self._pick(self.prev)


def _to_rgb(frame) -> np.ndarray:
  """A decoded PyAV video frame -> uint8 [H, W, 3] RGB, upright."""
  rgb = frame.to_ndarray(format='rgb24')
  try:
    rotation = int(frame.rotation or 0)
  except (AttributeError, TypeError, ValueError):
    rotation = 0
  # The display matrix turns the stored picture counterclockwise by `rotation` degrees.
  quarter_turns = round(rotation / 90) % 4
  if quarter_turns:
    rgb = np.ascontiguousarray(np.rot90(rgb, quarter_turns))
  return rgb


def _frame_time(frame, stream, index: int, rate: Fraction) -> Fraction:
  time_base = frame.time_base or stream.time_base
  if frame.pts is not None and time_base is not None:
    return frame.pts * Fraction(time_base)
  return index / rate  # no timestamp: assume a constant frame rate


def _frame_duration(frame, stream) -> Fraction | None:
  time_base = frame.time_base or stream.time_base
  duration = getattr(frame, 'duration', None)
  if duration and time_base is not None and duration > 0:
    return duration * Fraction(time_base)
  return None


def _is_picture_stream(stream, av) -> bool:
  """True for a still picture attached to an audio file (cover art), which is no video."""
  try:
    return bool(stream.disposition & av.stream.Disposition.attached_pic)
  except (AttributeError, TypeError):
    return False


def _open_media(path: Path, av, what: str):
  if not path.exists():
    raise FileNotFoundError(f'{path}: no such file; check the path to the {what}')
  if path.is_dir():
    raise ValueError(f'{path}: is a folder, not a {what} file; pass a file (for a folder of '
                     'frames use read_frames_dir)')
  try:
    return av.open(str(path), mode='r')
  except av.FFmpegError as e:
    raise ValueError(f'{path}: not a readable media file ({_av_message(e)}); pass a {what} file '
                     'such as .mp4, .mov, .mkv, .avi or .webm') from e


def _soundtrack(chunks: list[np.ndarray], sample_rate: int) -> np.ndarray | None:
  """Float32 [channels, n] chunks -> float32 mono [samples] (channel mean), or None if empty."""
  if not chunks:
    return None
  channels = max(c.shape[0] for c in chunks)
  # A stream whose channel count changes mid-way is mixed down chunk by chunk.
  if any(c.shape[0] != channels for c in chunks):
    chunks = [c.mean(axis=0, keepdims=True) for c in chunks]
  samples = np.concatenate(chunks, axis=1).T  # [n, channels]
  if samples.shape[0] == 0:
    return None
  if samples.shape[0] < samples.shape[1]:
    return samples.mean(axis=1).astype(np.float32)
  return audio_lib.to_mono_float(samples).astype(np.float32)


def _align(waveform: np.ndarray, offset: int) -> np.ndarray:
  """Shifts a waveform that starts ``offset`` samples after time 0 onto time 0."""
  if offset > 0:
    return np.concatenate([np.zeros((offset,), waveform.dtype), waveform])
  return waveform[-offset:]


def read_video(path, *, fps: float = 1.0, audio: str = 'auto',
               max_duration: float | None = None) -> Video:
  """Decodes a video file: frames sampled at ``fps`` and its soundtrack (see the module docstring).

  Args:
    path: a video file FFmpeg can read (.mp4, .mov, .mkv, .avi, .webm, ...).
    fps: frames sampled per second; frame k is the one nearest to (k + 0.5) / fps.
    audio: 'auto' reads the soundtrack when there is one (``Video.audio`` is None otherwise);
      'required' raises ValueError when the file has no soundtrack or only silence; 'none' does not
      decode audio.
    max_duration: when given, only the first ``max_duration`` seconds are read (frames and audio),
      which bounds memory for long videos; ``duration`` is then at most ``max_duration``.

  Returns:
    A :class:`Video`.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: not a readable media file, no video stream, a video too short for one frame, or
      (audio='required') no soundtrack or a silent one.
    ImportError: PyAV is not installed.
  """
  rate = _check_fps(fps)
  if audio not in AUDIO_MODES:
    raise ValueError(f'audio must be one of {AUDIO_MODES}, got {audio!r}')
  if max_duration is not None and not (math.isfinite(max_duration) and max_duration > 0):
    raise ValueError(f'max_duration must be a positive number of seconds, got {max_duration!r}')
  limit = None if max_duration is None else Fraction(max_duration)
  av = _import_av()
  path = Path(path)
  container = _open_media(path, av, 'video')
  with container:
    video_streams = [s for s in container.streams.video if not _is_picture_stream(s, av)]
    if not video_streams:
      kinds = sorted({s.type for s in container.streams}) or ['nothing']
      raise ValueError(f'{path}: has no video stream (it holds {", ".join(kinds)}); pass a video '
                       'file, or a folder of frames to read_frames_dir')
    vstream = video_streams[0]
    vstream.thread_type = 'AUTO'
    astream = None
    if audio != 'none' and container.streams.audio:
      astream = container.streams.audio[0]
    if audio == 'required' and astream is None:
      raise ValueError(f'{path}: has no soundtrack; pass the audio separately (e.g. a WAV file) or '
                       'use a video with sound')
    native_rate = Fraction(vstream.guessed_rate or vstream.average_rate or 25)

    sampler = _Sampler(rate)
    resampler = None
    chunks: list[np.ndarray] = []
    audio_start: Fraction | None = None
    sample_rate = None
    num_video = 0
    video_done = False
    audio_done = astream is None
    streams = [vstream] + ([astream] if astream is not None else [])
    try:
      for packet in container.demux(*streams):
        if packet.stream.index == vstream.index:
          if video_done:
            continue
          for frame in packet.decode():
            time = _frame_time(frame, vstream, num_video, native_rate)
            num_video += 1
            sampler.push(time, frame, _frame_duration(frame, vstream))
            if limit is not None and time - sampler.t0 >= limit:
              video_done = True
              break
        else:
          if audio_done:
            continue
          for frame in packet.decode():
            if resampler is None:
              sample_rate = int(frame.sample_rate)
              audio_start = _frame_time(frame, astream, 0, Fraction(sample_rate))
              # Only a format conversion to float planar: same layout, same rate.
              resampler = av.AudioResampler(format='fltp', layout=frame.layout, rate=sample_rate)
            for converted in resampler.resample(frame):
              chunks.append(converted.to_ndarray().astype(np.float32, copy=False))
            if (limit is not None and sampler.t0 is not None
                and _frame_time(frame, astream, 0, Fraction(sample_rate)) - sampler.t0 >= limit):
              audio_done = True
              break
        if video_done and audio_done:
          break
      if resampler is not None and not audio_done:
        for converted in resampler.resample(None):
          chunks.append(converted.to_ndarray().astype(np.float32, copy=False))
    except av.FFmpegError as e:
      raise ValueError(f'{path}: could not be decoded ({_av_message(e)}); the file may be damaged, '
                       're-encode it (e.g. to H.264 MP4) and try again') from e

    if num_video == 0:
      raise ValueError(f'{path}: its video stream holds no decodable frame; pass a video with '
                       'pictures')
    end = sampler.end(1 / native_rate)
    if limit is not None:
      end = min(end, sampler.t0 + limit)
    sampler.finish(end)
    duration = float(end - sampler.t0)
    if not sampler.frames:
      raise ValueError(f'{path}: the video lasts {duration:.3f} s, too short for one frame at '
                       f'fps={float(rate):g} (it must last over {0.5 / float(rate):g} s); '
                       'pass a longer video')

    waveform = None
    if astream is not None:
      waveform = _soundtrack(chunks, sample_rate) if sample_rate else None
      if waveform is not None:
        offset = round((audio_start - sampler.t0) * sample_rate)
        waveform = _align(waveform, offset)
        if limit is not None:
          waveform = waveform[:round(limit * sample_rate)]
      if audio == 'required':
        if waveform is None or waveform.size == 0:
          raise ValueError(f'{path}: its audio stream holds no decodable sound; pass the audio '
                           'separately (e.g. a WAV file)')
        if not np.any(waveform):
          raise ValueError(f'{path}: its soundtrack is silent (all samples are zero); pass the '
                           'audio separately (e.g. a WAV file) or use a video with sound')
      if waveform is None:
        sample_rate = None

  frames = np.stack(sampler.frames)
  timestamps = np.array([float(t - sampler.t0) for t in sampler.times], np.float64)
  return Video(frames=frames, timestamps=timestamps, duration=duration, fps=float(rate),
               audio=waveform, sample_rate=sample_rate if waveform is not None else None,
               source=str(path))


def read_soundtrack(path, *, allow_silent: bool = False) -> tuple[np.ndarray, int]:
  """An audio file (or a video's soundtrack) -> (float32 mono waveform, native sample rate).

  WAV files are read with :func:`qdformer_jax.data.audio.read_wav` (no PyAV needed); any other
  format (.mp3, .m4a, .flac, a video, ...) is decoded with PyAV. Raises FileNotFoundError when the
  file is missing and ValueError when it is unreadable, has no audio, or is silent (all-zero)
  unless ``allow_silent``.
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path}: no such file; check the path to the audio')
  if path.suffix.lower() == '.wav':
    samples, sample_rate = audio_lib.read_wav(path)
    waveform = audio_lib.to_mono_float(samples).astype(np.float32)
  else:
    av = _import_av()
    container = _open_media(path, av, 'audio')
    with container:
      if not container.streams.audio:
        raise ValueError(f'{path}: has no audio stream; pass a file with sound (e.g. a WAV file)')
      stream = container.streams.audio[0]
      resampler, chunks, sample_rate = None, [], None
      try:
        for frame in container.decode(stream):
          if resampler is None:
            sample_rate = int(frame.sample_rate)
            resampler = av.AudioResampler(format='fltp', layout=frame.layout, rate=sample_rate)
          chunks.extend(f.to_ndarray().astype(np.float32, copy=False)
                        for f in resampler.resample(frame))
        if resampler is not None:
          chunks.extend(f.to_ndarray().astype(np.float32, copy=False)
                        for f in resampler.resample(None))
      except av.FFmpegError as e:
        raise ValueError(f'{path}: its audio could not be decoded ({_av_message(e)}); convert it '
                         'to a WAV file and try again') from e
      waveform = _soundtrack(chunks, sample_rate) if sample_rate else None
      if waveform is None:
        raise ValueError(f'{path}: its audio stream holds no decodable sound; pass another file')
  if waveform.size == 0:
    raise ValueError(f'{path}: holds no audio samples; pass a file with sound')
  if not allow_silent and not np.any(waveform):
    raise ValueError(f'{path}: the audio is silent (all samples are zero); pass a file with sound')
  return waveform, int(sample_rate)


def _natural_key(name: str):
  """'frame_10.png' after 'frame_2.png': digit runs compare as numbers."""
  return [(0, int(part), '') if part.isdigit() else (1, 0, part.lower())
          for part in re.split(r'(\d+)', name) if part]


def read_frames_dir(path, fps: float = 1.0) -> Video:
  """A folder of frames (*.png, *.jpg, *.jpeg, in natural order) -> :class:`Video` without audio.

  Frame k is taken to be the middle of second k (timestamp (k + 0.5) / fps, duration n / fps), as
  :func:`read_video` samples. Frames are converted to RGB (EXIF orientation applied) and must all
  have the same size. Raises FileNotFoundError when the folder is missing and ValueError when it is
  a file, holds no frames, or holds an unreadable frame or frames of different sizes.
  """
  rate = _check_fps(fps)
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f'{path}: no such folder; check the path to the frames')
  if not path.is_dir():
    raise ValueError(f'{path}: is a file, not a folder of frames; pass a folder (for a video file '
                     'use read_video)')
  files = sorted((p for p in path.iterdir()
                  if p.is_file() and p.suffix.lower() in FRAME_EXTENSIONS),
                 key=lambda p: _natural_key(p.name))
  if not files:
    raise ValueError(f'{path}: holds no frames ({", ".join("*" + e for e in FRAME_EXTENSIONS)}); '
                     'pass a folder of images or a video file')
  frames = []
  for file in files:
    try:
      with Image.open(file) as image:
        frame = np.asarray(ImageOps.exif_transpose(image).convert('RGB'))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      raise ValueError(f'{file}: not a readable image ({e}); remove or replace it') from e
    if frames and frame.shape != frames[0].shape:
      raise ValueError(f'{file}: is {frame.shape[1]}x{frame.shape[0]}, but {files[0].name} is '
                       f'{frames[0].shape[1]}x{frames[0].shape[0]}; all frames must have one size')
    frames.append(frame)
  n = len(frames)
  timestamps = (np.arange(n, dtype=np.float64) + 0.5) / float(rate)
  return Video(frames=np.stack(frames), timestamps=timestamps, duration=float(n / rate),
               fps=float(rate), source=str(path))


# ---------------------------------------------------------------------------------------------
# Windows.


def windows(num_frames: int, window: int, *, fps: float = 1.0) -> list[Window]:
  """Consecutive windows of ``window`` sampled frames covering all ``num_frames`` of a video.

  Window i covers frames [i·window, (i+1)·window); the last one, when fewer frames remain (and the
  only one, when the video has fewer than ``window`` frames), repeats its last real frame up to
  ``window`` with ``frame_valid`` False there. ``fps`` (the sampling rate) sets the windows'
  ``start_time`` and ``seconds`` for slicing audio. Raises ValueError when num_frames < 1.
  """
  rate = _check_fps(fps)
  if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
    raise ValueError(f'window must be a positive number of frames, got {window!r}')
  if (isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer))
      or num_frames < 1):
    raise ValueError(f'the video must have at least one sampled frame, got {num_frames!r}')
  window, num_frames = int(window), int(num_frames)
  out = []
  for index, start in enumerate(range(0, num_frames, window)):
    num_real = min(window, num_frames - start)
    positions = np.arange(window)
    out.append(Window(
        index=index, start=start, num_real=num_real,
        indices=start + np.minimum(positions, num_real - 1),
        frame_valid=positions < num_real,
        start_time=float(start / rate), seconds=float(window / rate)))
  return out


def audio_slice(waveform: np.ndarray, sample_rate: float, start_time: float,
                seconds: float) -> np.ndarray:
  """``seconds`` of a 1-D waveform from ``start_time``: float32 [round(seconds · sample_rate)].

  Sample i of the slice is sample round(start_time · sample_rate) + i of the waveform; samples past
  its end are zeros, so every window of a video has the same length.
  """
  if sample_rate <= 0:
    raise ValueError(f'sample_rate must be positive, got {sample_rate}')
  if start_time < 0 or seconds < 0:
    raise ValueError(f'start_time and seconds must not be negative, got {start_time}, {seconds}')
  waveform = np.asarray(waveform)
  if waveform.ndim != 1:
    raise ValueError(f'waveform must be 1-D mono, got shape {waveform.shape}')
  first = int(round(start_time * sample_rate))
  length = int(round(seconds * sample_rate))
  out = np.zeros((length,), np.float32)
  piece = waveform[first:first + length]
  out[:piece.shape[0]] = piece
  return out


# ---------------------------------------------------------------------------------------------
# Writing.


def _check_frames(frames) -> np.ndarray:
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
    raise ValueError(f'frames must be uint8 [n>=1, H, W, 3], got {frames.dtype} {frames.shape}')
  return frames


def _pad_even(frames: np.ndarray) -> np.ndarray:
  """Pads an odd height or width by repeating the last row or column (yuv420p needs even sizes)."""
  _, height, width, _ = frames.shape
  pad_h, pad_w = height % 2, width % 2
  if not (pad_h or pad_w):
    return frames
  return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode='edge')


def mp4_codec() -> str:
  """'libx264' when the installed PyAV's FFmpeg can encode H.264 with it, else 'mpeg4'."""
  av = _import_av()
  try:
    av.codec.Codec('libx264', 'w')
    return 'libx264'
  except Exception:  # UnknownCodecError; its location differs between PyAV versions
    return 'mpeg4'


def _write_gif(path: Path, frames: np.ndarray, fps: float) -> Path:
  images = [Image.fromarray(f) for f in frames]
  milliseconds = max(20, int(round(1000 / fps)))  # GIF delays are in 10 ms units; 20 ms minimum
  images[0].save(path, save_all=True, append_images=images[1:], duration=milliseconds, loop=0)
  return path


def write_video(path, frames, fps: float, audio=None, sample_rate: float | None = None, *,
                codec: str | None = None, crf: int = 18) -> Path:
  """Writes frames (and a soundtrack) as a video file; returns the path.

  Args:
    path: the output file; .mp4 (or .mov, .mkv) is encoded with PyAV, .gif with Pillow (no audio).
    frames: uint8 [n, H, W, 3] RGB.
    fps: frames per second of ``frames`` (1 for frames sampled at 1 fps).
    audio: optional waveform (1-D or [n, channels], int16 or float; mixed down to mono), muxed as
      AAC from the first frame on. Rates AAC cannot carry are resampled to 48 kHz.
    sample_rate: the audio's rate in Hz (required with ``audio``).
    codec: the video encoder; default :func:`mp4_codec` (libx264, else mpeg4).
    crf: libx264 constant rate factor (lower is better quality; 18 is visually lossless).

  Odd heights/widths are padded by one edge row/column (yuv420p needs even sizes).
  """
  frames = _check_frames(frames)
  rate = _check_fps(fps)
  path = Path(path)
  if not path.parent.is_dir():
    raise FileNotFoundError(f'{path}: its folder {path.parent} does not exist; create it first')
  if audio is not None and (sample_rate is None or sample_rate <= 0):
    raise ValueError(f'{path}: pass the sample_rate of the audio to write it')
  if path.suffix.lower() == '.gif':
    if audio is not None:
      warnings.warn(f'{path}: a GIF holds no sound; the audio is not written', stacklevel=2)
    return _write_gif(path, frames, float(rate))
  av = _import_av()
  codec = codec or mp4_codec()
  frames = _pad_even(frames)
  _, height, width, _ = frames.shape
  waveform = None
  if audio is not None:
    waveform = audio_lib.to_mono_float(audio)
    sample_rate = float(sample_rate)
    if int(sample_rate) != sample_rate or int(sample_rate) not in AAC_SAMPLE_RATES:
      waveform = audio_lib.resample(waveform, sample_rate, 48000)
      sample_rate = 48000
    sample_rate = int(sample_rate)
    waveform = np.clip(waveform, -1.0, 1.0).astype(np.float32)

  if codec == 'libx264':
    options = {'crf': str(int(crf)), 'preset': 'medium'}
  elif codec == 'mpeg4':
    options = {'flags': '+qscale', 'global_quality': str(2 * 118)}  # -q:v 2 (118 = FF_QP2LAMBDA)
  else:
    options = {}
  container_options = {'movflags': '+faststart'} if path.suffix.lower() in ('.mp4', '.mov') else {}
  rational_rate = rate.limit_denominator(1_000_000)
  try:
    container = av.open(str(path), mode='w', container_options=container_options)
  except (av.FFmpegError, ValueError) as e:
    raise ValueError(f'{path}: cannot write this kind of file ({_av_message(e)}); use a path '
                     'ending in .mp4 (or .gif)') from e
  try:
    with container:
      vstream = container.add_stream(codec, rate=rational_rate, options=options)
      vstream.width, vstream.height, vstream.pix_fmt = width, height, 'yuv420p'
      astream = None
      if waveform is not None:
        astream = container.add_stream('aac', rate=sample_rate, layout='mono')
      written = 0  # audio samples encoded so far
      for i, image in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format='rgb24')
        frame.pts = i
        container.mux(vstream.encode(frame))
        if astream is not None:  # interleave: the audio up to the end of this frame
          until = min(waveform.shape[0], int(round((i + 1) / rational_rate * sample_rate)))
          if i == frames.shape[0] - 1:
            until = waveform.shape[0]
          written = _encode_audio(av, container, astream, waveform, written, until, sample_rate)
      container.mux(vstream.encode(None))
      if astream is not None:
        container.mux(astream.encode(None))
  except av.FFmpegError as e:
    raise ValueError(f'{path}: encoding with {codec} failed ({_av_message(e)}); try codec="mpeg4" '
                     'or a .gif path') from e
  return path


def _encode_audio(av, container, stream, waveform, start: int, until: int, sample_rate: int) -> int:
  chunk = 1024 * 16
  for first in range(start, until, chunk):
    piece = waveform[first:min(first + chunk, until)]
    frame = av.AudioFrame.from_ndarray(piece[None, :], format='fltp', layout='mono')
    frame.sample_rate = sample_rate
    frame.pts = first
    container.mux(stream.encode(frame))
  return max(start, until)
