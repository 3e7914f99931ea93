"""Segment your own video with a trained model: masks of the sounding objects, frame by frame.

  python -m qdformer_jax.predict --workdir /tmp/qdf --video clip.mp4 --out /tmp/clip_masks
  python -m qdformer_jax.predict --workdir /tmp/qdf --video clip.mp4 --audio other.wav --out OUT
  python -m qdformer_jax.predict --workdir /tmp/qdf --frames_dir frames/ --audio clip.wav --out OUT

Options: ``--which best|latest`` (default: best if the workdir has one, else latest), ``--threshold``
(0.5), ``--min_score`` (0: keep every mask; else a class's mask in a frame whose mean score is below
it is dropped, binary: the frame's foreground), ``--fps`` (frames sampled per second, 1 as AVSBench), ``--pad_short`` (accept a video shorter
than one window), ``--no_progress``, ``--debug`` (tracebacks of input errors), ``--verbosity N``.

The video is read as the datasets are sampled (:mod:`qdformer_jax.data.video`): one frame per
second, the middle frame of each second, paired with that second of the soundtrack. The frames are
cut into consecutive windows of T = ``predictor.num_frames`` frames (the training clips' length, T
seconds); a shorter tail is padded by repeating its last frame, the padding marked invalid
(``frame_valid``) so that it takes no part in the prediction and is dropped from the outputs. Each
window is segmented by ``Predictor.predict`` with its T seconds of waveform at the soundtrack's own
rate. The soundtrack is the video's unless ``--audio`` names another file (needed for a folder of
frames). A video without a soundtrack, or with a silent one, is segmented with silence (one warning
line says so): a model that listens then finds nothing sounding. Every window says whether anything
was judged to be sounding in it (a mask left after ``--min_score``), in ``predictions.json`` and in
the closing lines.

Outputs, in ``--out``:

  overlays/frame_<k>.png   frame k with the predicted classes blended in and a legend
                           (``overlays.render_frame``; the legend names are also in the PNG's
                           ``Legend`` text chunk)
  masks/frame_<k>.png      the predicted class id of every pixel (a palette PNG, 0 = background,
                           the PASCAL-VOC colours; binary configs: 0/1), at the frame's resolution
  overlay.mp4              the sampled frames with the masks blended in, at the sampling rate (one
                           frame per second), with the original soundtrack
  predictions.json         the run (workdir, checkpoint step, config, threshold, ...), the input,
                           the windows and, per frame, its time and the classes present with their
                           pixel count, pixel fraction and mean score (binary configs: foreground
                           pixels, fraction and mean probability over the foreground)

Errors a user can cause (missing or unreadable file, no video stream, a folder of frames without
``--audio``, a video shorter than one window, a workdir without a checkpoint) print one line and exit with code 2.

This module is an entry point: nothing in the package imports it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from qdformer_jax import console
from qdformer_jax import workdir as workdir_lib
from qdformer_jax.data import registry
from qdformer_jax.data import video as video_lib
from qdformer_jax.evaluation import overlays

PREDICTIONS_FILE = 'predictions.json'
VIDEO_FILE = 'overlay.mp4'
OVERLAYS_DIR = 'overlays'
MASKS_DIR = 'masks'
DATASET_FPS = 1.0  # every dataset the configs name samples one frame per second


@dataclasses.dataclass(frozen=True)
class Inputs:
  """A decoded video (frames sampled at ``video.fps``) and the soundtrack it is segmented with."""
  video: video_lib.Video
  waveform: np.ndarray
  sample_rate: int
  audio_source: str


def frame_name(index: int) -> str:
  return f'frame_{index:04d}.png'


def read_inputs(video=None, *, frames_dir=None, audio=None, sample_rate: float | None = None,
                fps: float = DATASET_FPS) -> Inputs:
  """Decodes a video file (or a folder of frames) and its soundtrack.

  Args:
    video: a video file, or an already decoded :class:`~qdformer_jax.data.video.Video`.
    frames_dir: instead of ``video``, a folder of frames (one per 1/fps seconds); needs ``audio``.
    audio: None (the video's own soundtrack), an audio file (WAV, or anything FFmpeg reads), or a
      waveform (1-D or [n, channels]) with ``sample_rate``.
    sample_rate: the rate of a waveform ``audio``.
    fps: frames sampled per second.

  Raises FileNotFoundError / ValueError (one line naming the file and the fix) for a missing or
  unreadable file or no video stream. A video without a soundtrack, or a silent soundtrack or audio,
  is segmented with silence (a warning line says so).
  """
  if (video is None) == (frames_dir is None):
    raise ValueError('pass a video (--video FILE) or a folder of frames (--frames_dir DIR), not both')
  if frames_dir is not None and audio is None:
    raise ValueError(f'{frames_dir}: a folder of frames has no sound; pass the soundtrack with --audio FILE')
  own_audio = audio is None
  if isinstance(video, video_lib.Video):
    clip = video
  elif frames_dir is not None:
    clip = video_lib.read_frames_dir(frames_dir, fps=fps)
  else:
    clip = video_lib.read_video(video, fps=fps, audio='auto' if own_audio else 'none')

  if own_audio:
    if clip.audio is None or clip.audio.size == 0:
      logging.warning('%s has no soundtrack: segmenting it with silence (a model that listens finds nothing '
                      'sounding; pass --audio FILE to give it a sound)', clip.source)
      rate = 16000
      waveform = np.zeros(int(np.ceil(clip.duration * rate)) + rate, np.float32)
      source = f'{clip.source} (no soundtrack: silence)'
    else:
      waveform, rate, source = clip.audio, int(clip.sample_rate), f'{clip.source} (its soundtrack)'
      if not clip.has_sound:
        logging.warning('%s: its soundtrack is silent (all samples are zero): a model that listens finds nothing '
                        'sounding', clip.source)
        source = f'{clip.source} (its soundtrack, silent)'
  elif isinstance(audio, (str, os.PathLike)):
    waveform, rate = video_lib.read_soundtrack(audio, allow_silent=True)
    source = str(audio)
    if not np.any(waveform):
      logging.warning('%s is silent (all samples are zero): a model that listens finds nothing sounding', audio)
  else:
    if sample_rate is None or not sample_rate > 0:
      raise ValueError('a waveform audio needs its sample_rate (Hz)')
    from qdformer_jax.data import audio as audio_lib
    waveform, rate, source = audio_lib.to_mono_float(np.asarray(audio)), sample_rate, 'waveform'
  return Inputs(video=clip, waveform=np.asarray(waveform, np.float32), sample_rate=rate, audio_source=source)


def _names(predictor) -> tuple[str, ...]:
  if predictor.class_names:
    return tuple(predictor.class_names)
  if predictor.binary:
    return registry.BINARY_CLASS_NAMES
  return ('background',) + tuple(f'class {i}' for i in range(1, int(predictor.config.data.num_classes) + 1))


def _progress(items, enabled: bool, total_frames: int):
  """tqdm over the windows when installed (else one log line per window)."""
  if not enabled:
    return items
  try:
    from tqdm import tqdm
  except ImportError:
    def logged():
      for item in items:
        logging.info('window %d/%d (frames %d-%d of %d)', item.index + 1, len(items), item.start,
                     item.start + item.num_real - 1, total_frames)
        yield item
    return logged()
  return tqdm(items, desc='segmenting', unit='window', file=sys.stderr, dynamic_ncols=True)


def _write_mask(path: Path, labels: np.ndarray, num_ids: int) -> None:
  if num_ids <= 256:
    image = Image.fromarray(labels.astype(np.uint8), mode='P')
    image.putpalette(registry.palette(256).reshape(-1).tolist())
  else:
    image = Image.fromarray(labels.astype(np.uint16))
  image.save(path)


def read_mask(path) -> np.ndarray:
  """int32 [H, W] class ids of a mask PNG written by :func:`segment_video`."""
  with Image.open(path) as image:
    return np.asarray(image).astype(np.int32)


def _frame_stats(labels, scores, names, binary: bool) -> dict:
  """What predictions.json says about one frame: the classes present (binary: the foreground)."""
  total = int(labels.size)
  if binary:
    fg = labels > 0
    count = int(fg.sum())
    return {'foreground_pixels': count, 'foreground_fraction': round(count / total, 6),
            'mean_probability': round(float(scores[fg].mean()), 4) if count else None}
  ids, counts = np.unique(labels, return_counts=True)
  classes = []
  for c, count in zip(ids.tolist(), counts.tolist()):
    if c == 0:
      continue
    classes.append({'id': int(c), 'name': names[c], 'pixels': int(count),
                    'fraction': round(count / total, 6),
                    'mean_score': round(float(scores[labels == c].mean()), 4)})
  classes.sort(key=lambda e: -e['pixels'])
  return {'classes': classes}


def suppress_weak(labels: np.ndarray, scores: np.ndarray, min_score: float, binary: bool) -> np.ndarray:
  """One frame's labels without its weak masks: (semantic) each class whose mean score over its pixels
  is below ``min_score`` becomes background; (binary) the whole foreground when its mean probability
  is below it."""
  if min_score <= 0.0:
    return labels
  out = labels.copy()
  if binary:
    fg = labels > 0
    if fg.any() and float(scores[fg].mean()) < min_score:
      out[fg] = 0
    return out
  for c in np.unique(labels):
    if c > 0 and float(scores[labels == c].mean()) < min_score:
      out[labels == c] = 0
  return out


def workdir_of(checkpoint_dir) -> str | None:
  """The workdir of a checkpoint step directory ``<workdir>/checkpoints/<step>`` (local or gs://)."""
  if not checkpoint_dir:
    return None
  parent = str(checkpoint_dir).rstrip('/').rpartition('/')[0]
  head, _, tail = parent.rpartition('/')
  return head if tail == workdir_lib.CHECKPOINTS else None


def _clear(directory: Path) -> None:
  """Removes the frame PNGs an earlier run left (a longer video leaves more frames)."""
  for old in directory.glob('frame_*.png'):
    old.unlink()


def segment_video(predictor, video, out_dir, *, audio=None, sample_rate: float | None = None,
                  fps: float = DATASET_FPS, threshold: float = 0.5, min_score: float = 0.0,
                  pad_short: bool = False, progress: bool = True, write_mp4: bool = True,
                  run: dict | None = None) -> dict:
  """Segments a whole video window by window and writes the outputs of the module docstring.

  Args:
    predictor: an ``inference.Predictor`` (``inference.load(workdir)``).
    video: a video file, a folder of frames, a decoded ``Video``, or :class:`Inputs` (then ``audio``
      and ``fps`` are not used).
    out_dir: the output folder (created; files of an earlier run are replaced).
    audio: None (the video's soundtrack), an audio file, or a waveform with ``sample_rate``.
    fps: frames sampled per second (1: as the model was trained).
    threshold: the score (binary: probability) a pixel needs to be foreground.
    min_score: a mask whose mean score is below it is dropped (:func:`suppress_weak`); 0 keeps all.
    pad_short: accept a video shorter than one window (padded like a tail; otherwise ValueError).
    progress: show a progress bar over the windows.
    write_mp4: also write ``overlay.mp4``.
    run: extra facts for ``predictions.json``'s ``run`` entry (the CLI adds the workdir as given).

  Returns:
    The content of ``predictions.json`` plus, under ``'labels'``, the predicted class ids uint8/int32
    [num_frames, H, W] of every sampled frame (binary: 0/1), which the JSON file does not hold.
  """
  if isinstance(video, Inputs):
    inputs = video
  elif isinstance(video, (str, os.PathLike)) and Path(video).is_dir():
    inputs = read_inputs(frames_dir=video, audio=audio, sample_rate=sample_rate, fps=fps)
  else:
    inputs = read_inputs(video, audio=audio, sample_rate=sample_rate, fps=fps)
  if not 0.0 < float(threshold) < 1.0:
    raise ValueError(f'threshold must be between 0 and 1, got {threshold}')
  if not 0.0 <= float(min_score) < 1.0:
    raise ValueError(f'min_score must be in [0, 1), got {min_score}')
  clip, waveform, rate = inputs.video, inputs.waveform, inputs.sample_rate
  length, n = predictor.num_frames, clip.num_frames
  if n < length and not pad_short:
    raise ValueError(
        f'{clip.source}: the video lasts {clip.duration:.2f} s ({n} frame{"s" * (n != 1)} at '
        f'{clip.fps:g} fps), shorter than one window of {length} frames ({length / clip.fps:g} s) '
        f'that the model segments at once; pass a video of at least {length / clip.fps:g} s, or '
        'accept padding with --pad_short (pad_short=True)')
  if clip.fps != DATASET_FPS:
    logging.warning('sampling %g frames per second; the model was trained on %g (one second of '
                    'audio per frame)', clip.fps, DATASET_FPS)
  names = _names(predictor)
  binary = predictor.binary
  out = Path(out_dir)
  overlay_dir, mask_dir = out / OVERLAYS_DIR, out / MASKS_DIR
  for directory in (overlay_dir, mask_dir):
    directory.mkdir(parents=True, exist_ok=True)
    _clear(directory)

  height, width = clip.frames.shape[1:3]
  label_dtype = np.uint8 if len(names) <= 256 else np.int32
  labels = np.zeros((n, height, width), label_dtype)
  blended = np.empty_like(clip.frames) if write_mp4 else None
  colours = registry.palette(len(names))
  cuts = video_lib.windows(n, length, fps=clip.fps)
  frames_info, windows_info = [], []
  for window in _progress(cuts, progress, n):
    result = predictor.predict(window.take(clip.frames), window.audio(waveform, rate), sample_rate=rate,
                               frame_valid=window.frame_valid, threshold=threshold)
    if binary:
      window_labels, window_scores = result['mask'][0].astype(np.int32), result['probability'][0]
    else:
      window_labels, window_scores = result['labels'][0], result['scores'][0]
    window_labels = np.stack([suppress_weak(window_labels[t], window_scores[t], float(min_score), binary)
                              for t in range(window_labels.shape[0])])
    for t in range(window.num_real):
      k = window.start + t
      labels[k] = window_labels[t]
      time = float(clip.timestamps[k])
      name = frame_name(k)
      fig, legend = overlays.render_frame(clip.frames[k], window_labels[t], names,
                                          title=f'frame {k}, {time:.2f} s')
      overlays.save_figure(fig, str(overlay_dir / name), legend)
      _write_mask(mask_dir / name, window_labels[t], len(names))
      if blended is not None:
        blended[k] = overlays.blend(clip.frames[k], window_labels[t], colours)
      frames_info.append({'index': k, 'time': round(time, 4), 'window': window.index,
                          'overlay': f'{OVERLAYS_DIR}/{name}', 'mask': f'{MASKS_DIR}/{name}',
                          **_frame_stats(window_labels[t], window_scores[t], names, binary)})
    sounding_frames = int(np.sum(np.any(window_labels[:window.num_real] > 0, axis=(1, 2))))
    windows_info.append({'index': window.index, 'start_time': round(window.start_time, 4),
                         'first_frame': window.start, 'real_frames': window.num_real,
                         'padded_frames': length - window.num_real,
                         'sounding': sounding_frames > 0, 'frames_with_a_mask': sounding_frames})

  video_path = None
  if write_mp4:
    video_path = video_lib.write_video(out / VIDEO_FILE, blended, clip.fps, audio=waveform, sample_rate=rate)

  summary = {}
  for info in frames_info:
    present = ([{'id': 1, 'name': names[1]}] if info.get('foreground_pixels') else []) if binary \
        else info['classes']
    for entry in present:
      summary.setdefault(entry['id'], {'id': entry['id'], 'name': entry['name'], 'frames': 0})['frames'] += 1
  checkpoint_dir = predictor.checkpoint_dir
  facts = {
      'workdir': workdir_of(checkpoint_dir), 'checkpoint_dir': checkpoint_dir, 'checkpoint_step': predictor.step,
      'config_name': predictor.config.get('name'), 'dataset': predictor.config.data.name,
      'builder_config': predictor.config.data.get('builder_config'), 'binary': binary,
      'threshold': float(threshold), 'min_score': float(min_score), 'window_frames': length, 'fps': clip.fps,
      'image_size': predictor.image_size,
  }
  facts.update(run or {})
  report = {
      'run': facts,
      'input': {'video': clip.source, 'audio': inputs.audio_source, 'duration': round(clip.duration, 4),
                'sampled_frames': n, 'frame_size': [int(height), int(width)], 'sample_rate': int(rate)},
      'class_names': list(names),
      'outputs': {'overlays': OVERLAYS_DIR, 'masks': MASKS_DIR,
                  'video': VIDEO_FILE if video_path is not None else None},
      'summary': sorted(summary.values(), key=lambda e: -e['frames']),
      'windows': windows_info,
      'frames': frames_info,
  }
  with open(out / PREDICTIONS_FILE, 'w') as f:
    json.dump(report, f, indent=1)
  return {**report, 'labels': labels}


# -- command line ----------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m qdformer_jax.predict',
      description='Segment the sounding objects of a video with a trained QDFormer workdir.')
  p.add_argument('--workdir', required=True,
                 help='a training workdir (config.json + checkpoints/) or one checkpoint step directory')
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument('--video', help='the video file (.mp4, .mov, .mkv, .avi, .webm, ...)')
  source.add_argument('--frames_dir', help='instead of --video: a folder of frames, one per second '
                      '(*.png, *.jpg; natural order); needs --audio')
  p.add_argument('--audio', help="an audio file to use instead of the video's soundtrack")
  p.add_argument('--out', required=True, help='the output folder')
  p.add_argument('--which', choices=('best', 'latest'), default=None,
                 help='the checkpoint: best by the config metric, or latest (default: best if any)')
  p.add_argument('--threshold', type=float, default=0.5, help='foreground score threshold (default 0.5)')
  p.add_argument('--min_score', type=float, default=0.0,
                 help='drop a mask whose mean score is below this (default 0: keep every mask)')
  p.add_argument('--fps', type=float, default=DATASET_FPS,
                 help='frames sampled per second (default 1, as the datasets the models train on)')
  p.add_argument('--pad_short', action='store_true',
                 help='accept a video shorter than one window (its frames are padded)')
  p.add_argument('--no_progress', action='store_true', help='no progress bar')
  p.add_argument('--debug', action='store_true', help='show the traceback of input errors')
  p.add_argument('--verbosity', type=int, default=0, help='1: third-party logs too; 2: debug logs')
  return p


def main(argv=None) -> int:
  """The command line (``argv`` without the program name); exits with code 2 on a user error."""
  args = _parser().parse_args(argv)
  from absl import flags
  from absl import logging as absl_logging
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # absl's defaults (no absl flags here); absl logs otherwise warn
  absl_logging.use_absl_handler()
  console.setup(args.verbosity)
  with console.user_errors(args.debug):
    if not 0.0 < args.threshold < 1.0:
      raise ValueError(f'--threshold must be between 0 and 1, got {args.threshold}')
    if not 0.0 <= args.min_score < 1.0:
      raise ValueError(f'--min_score must be in [0, 1), got {args.min_score}')
    if not (args.fps > 0 and np.isfinite(args.fps)):
      raise ValueError(f'--fps must be a positive number, got {args.fps}')
    # The inputs first: their errors come before the model is restored.
    inputs = read_inputs(args.video, frames_dir=args.frames_dir, audio=args.audio, fps=args.fps)
    logging.info('%s: %d frames sampled at %g fps (%.2f s), sound from %s', inputs.video.source,
                 inputs.video.num_frames, inputs.video.fps, inputs.video.duration, inputs.audio_source)
    from qdformer_jax import inference
    predictor = inference.load(args.workdir, which=args.which)
    logging.info('%r', predictor)
    report = segment_video(predictor, inputs, args.out, threshold=args.threshold, min_score=args.min_score,
                           pad_short=args.pad_short, progress=not args.no_progress, run={'which': args.which})
  out = os.path.abspath(args.out)
  seen = ', '.join(f'{e["name"]} ({e["frames"]} frames)' for e in report['summary']) or 'no sounding object'
  print(f'segmented {report["input"]["sampled_frames"]} frames in {len(report["windows"])} windows '
        f'with {report["run"]["config_name"]} step {report["run"]["checkpoint_step"]}: {seen}')
  for w in report['windows']:
    verdict = (f'sounding in {w["frames_with_a_mask"]} of {w["real_frames"]} frames' if w['sounding']
               else 'nothing sounding')
    print(f'  window {w["index"]} ({w["start_time"]:g} s): {verdict}')
  print(f'outputs in {out}:')
  print(f'  {os.path.join(out, PREDICTIONS_FILE)}')
  if report['outputs']['video']:
    print(f'  {os.path.join(out, VIDEO_FILE)}')
  print(f'  {os.path.join(out, OVERLAYS_DIR)}/  ({len(report["frames"])} overlay PNGs)')
  print(f'  {os.path.join(out, MASKS_DIR)}/  (class-id mask PNGs)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
