"""``python -m qdformer_jax.predict`` (segment your own video) against a trained smoke workdir.

The input is written here with ``qdformer_jax.data.video.write_video``: 7 s of synthetic frames
(96 x 80, two synthetic clips back to back, each frame held for a second at 4 fps) with the clips'
tone soundtrack at 16 kHz, so that the smoke model (T = 5 frames) segments it in two windows, the
second padded by 3 frames. The reference predictions are computed independently: ``read_video``,
``windows`` and ``Predictor.predict`` on each window with its audio slice and ``frame_valid``; the
CLI must write exactly those labels (mask PNGs, per-frame pixel counts in predictions.json) and mean
scores within the JSON's 4-decimal rounding. The MP4 is checked by reading it back (frames, sound).
Bad inputs must each exit with code 2 and one ``error:`` line naming the problem.
"""
from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
import scipy.io.wavfile
from PIL import Image

av = pytest.importorskip('av')

from qdformer_jax import inference, predict  # noqa: E402
from qdformer_jax.data import registry, synthetic, video  # noqa: E402
from qdformer_jax.evaluation import overlays  # noqa: E402

pytestmark = pytest.mark.slow  # a trained workdir per module (~30 s): not in `pytest -m "not slow"`

HEIGHT, WIDTH, NATIVE_FPS, SECONDS, SR = 80, 96, 4, 7, synthetic.SAMPLE_RATE


def _synthetic_seconds(seconds: int):
  """[seconds, 80, 96, 3] frames (one per second) and their soundtrack, from synthetic clips."""
  config = synthetic.ClipConfig(task='semantic', image_size=WIDTH, num_frames=5, num_classes=8)
  clips = [synthetic.make_clip(config, seed) for seed in (11, 12)]
  frames = np.concatenate([c.frames for c in clips])[:seconds, 8:8 + HEIGHT]
  waveform = np.concatenate([c.waveform for c in clips])[:seconds * SR]
  return frames, waveform


def _write(path, frames, waveform=None):
  return str(video.write_video(path, np.repeat(frames, NATIVE_FPS, axis=0), NATIVE_FPS, audio=waveform,
                               sample_rate=None if waveform is None else SR))


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  """Paths of the test videos (good and bad)."""
  d = tmp_path_factory.mktemp('predict_inputs')
  frames, waveform = _synthetic_seconds(SECONDS)
  paths = {
      'clip': _write(d / 'clip.mp4', frames, waveform),
      'short': _write(d / 'short.mp4', frames[:3], waveform[:3 * SR]),
      'silent': _write(d / 'silent.mp4', frames, np.zeros_like(waveform)),
      'no_audio': _write(d / 'no_audio.mp4', frames),
  }
  garbage = d / 'garbage.mp4'
  garbage.write_text('not a video\n')
  paths['garbage'] = str(garbage)
  audio_only = d / 'audio_only.m4a'  # a file with sound and no picture
  container = av.open(str(audio_only), 'w')
  stream = container.add_stream('aac', rate=SR, layout='mono')
  frame = av.AudioFrame.from_ndarray(waveform[None, :SR].astype(np.float32), format='fltp', layout='mono')
  frame.sample_rate, frame.pts = SR, 0
  container.mux(stream.encode(frame))
  container.mux(stream.encode(None))
  container.close()
  paths['audio_only'] = str(audio_only)
  (d / 'empty_workdir').mkdir()
  paths['empty_workdir'] = str(d / 'empty_workdir')
  paths['dir'] = str(d)
  return paths


@pytest.fixture(scope='module')
def predictor(trained_workdir):
  return inference.load(trained_workdir)


def reference(predictor, path):
  """(Video, labels int32 [n,H,W], scores float32 [n,H,W]) by read_video + windows + predict."""
  clip = video.read_video(path)
  labels, scores = [], []
  for window in video.windows(clip.num_frames, predictor.num_frames, fps=1.0):
    out = predictor.predict(window.take(clip.frames), window.audio(clip.audio, clip.sample_rate),
                            sample_rate=clip.sample_rate, frame_valid=window.frame_valid)
    labels.append(out['labels'][0, :window.num_real])
    scores.append(out['scores'][0, :window.num_real])
  return clip, np.concatenate(labels), np.concatenate(scores)


@pytest.fixture(scope='module')
def expected(predictor, inputs):
  return reference(predictor, inputs['clip'])


@pytest.fixture(scope='module')
def cli_run(trained_workdir, inputs, tmp_path_factory):
  """Runs the CLI once on the 7 s clip: (output folder, return code, stdout)."""
  out = tmp_path_factory.mktemp('predict_out') / 'out'
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    code = predict.main(['--workdir', trained_workdir, '--video', inputs['clip'], '--out', str(out)])
  return out, code, stdout.getvalue()


def test_cli_predictions_match_predictor(cli_run, expected, predictor, trained_workdir):
  out, code, _ = cli_run
  assert code == 0
  clip, labels, scores = expected
  assert clip.num_frames == SECONDS and labels.shape == (SECONDS, HEIGHT, WIDTH)
  report = json.loads((out / predict.PREDICTIONS_FILE).read_text())

  run = report['run']
  assert run['workdir'] == os.path.abspath(trained_workdir)
  assert run['checkpoint_step'] == predictor.step and run['config_name'] == 'synthetic'
  assert run['threshold'] == 0.5 and run['window_frames'] == predictor.num_frames == 5
  assert report['input']['sampled_frames'] == SECONDS and report['input']['frame_size'] == [HEIGHT, WIDTH]
  assert report['class_names'] == list(predictor.class_names)
  assert [(w['first_frame'], w['real_frames'], w['padded_frames']) for w in report['windows']] == [
      (0, 5, 0), (5, 2, 3)]

  assert [f['index'] for f in report['frames']] == list(range(SECONDS))
  np.testing.assert_allclose([f['time'] for f in report['frames']], clip.timestamps, atol=1e-4)
  for k, frame in enumerate(report['frames']):
    np.testing.assert_array_equal(predict.read_mask(out / frame['mask']), labels[k], err_msg=f'frame {k}')
    ids, counts = np.unique(labels[k], return_counts=True)
    want = {int(c): int(n) for c, n in zip(ids, counts) if c > 0}
    assert {c['id']: c['pixels'] for c in frame['classes']} == want, f'frame {k}'
    for c in frame['classes']:
      assert c['name'] == predictor.class_names[c['id']]
      assert c['fraction'] == pytest.approx(want[c['id']] / labels[k].size, abs=1e-6)
      assert c['mean_score'] == pytest.approx(float(scores[k][labels[k] == c['id']].mean()), abs=6e-5)
  frames_with = {}
  for k in range(SECONDS):
    for c in set(np.unique(labels[k]).tolist()) - {0}:
      frames_with[c] = frames_with.get(c, 0) + 1
  assert {e['id']: e['frames'] for e in report['summary']} == frames_with


def test_cli_writes_overlays_and_video(cli_run, expected):
  out, _, _ = cli_run
  clip, labels, _ = expected
  report = json.loads((out / predict.PREDICTIONS_FILE).read_text())
  names = report['class_names']
  pngs = sorted(p.name for p in (out / predict.OVERLAYS_DIR).iterdir())
  assert pngs == [predict.frame_name(k) for k in range(SECONDS)]
  for k, frame in enumerate(report['frames']):
    with Image.open(out / frame['overlay']) as image:
      assert image.width == 400 and image.height > 400 * HEIGHT / WIDTH  # 4 in at 100 dpi + legend
      legend = json.loads(image.text['Legend'])
    assert legend == [names[c] for c in sorted(set(np.unique(labels[k]).tolist()) - {0})]

  written = video.read_video(out / predict.VIDEO_FILE, audio='required')
  assert written.num_frames == SECONDS and written.sample_rate == SR and written.has_sound
  assert written.duration == pytest.approx(SECONDS, abs=0.05)
  colours = registry.palette(len(names))
  for k in range(SECONDS):  # the masks are blended in (H.264 at CRF 18: a few grey levels off)
    want = overlays.blend(clip.frames[k], labels[k], colours).astype(np.float32)
    assert np.abs(written.frames[k].astype(np.float32) - want).mean() < 4.0, f'frame {k}'
  n = min(written.audio.shape[0], clip.audio.shape[0]) - SR // 10
  assert np.corrcoef(written.audio[:n], clip.audio[:n])[0, 1] > 0.95  # the original sound, re-encoded


def test_cli_prints_where_the_outputs_are(cli_run):
  out, _, stdout = cli_run
  assert 'segmented 7 frames in 2 windows' in stdout
  report = json.load(open(out / predict.PREDICTIONS_FILE))
  for w in report['windows']:  # every window says whether anything was judged to be sounding
    assert w['sounding'] == (w['frames_with_a_mask'] > 0)
    assert f'window {w["index"]} ({w["start_time"]:g} s): ' in stdout
  for name in (predict.PREDICTIONS_FILE, predict.VIDEO_FILE, predict.OVERLAYS_DIR, predict.MASKS_DIR):
    assert os.path.join(str(out), name) in stdout


def test_short_video_with_pad_short(predictor, inputs, tmp_path):
  """Shorter than one window: padded (2 of 5 frames invalid) with pad_short, as predict would."""
  report = predict.segment_video(predictor, inputs['short'], tmp_path, pad_short=True, progress=False)
  clip = video.read_video(inputs['short'])
  (window,) = video.windows(clip.num_frames, predictor.num_frames)
  assert window.num_real == 3 and window.frame_valid.tolist() == [True] * 3 + [False] * 2
  want = predictor.predict(window.take(clip.frames), window.audio(clip.audio, clip.sample_rate),
                           sample_rate=clip.sample_rate, frame_valid=window.frame_valid)['labels'][0, :3]
  np.testing.assert_array_equal(report['labels'], want)
  assert report['windows'] == [{'index': 0, 'start_time': 0.0, 'first_frame': 0, 'real_frames': 3,
                                'padded_frames': 2, 'sounding': bool(want.any()),
                                'frames_with_a_mask': int(np.sum(np.any(want > 0, axis=(1, 2))))}]
  assert video.read_video(tmp_path / predict.VIDEO_FILE).num_frames == 3


def test_frames_dir_with_wav(predictor, expected, tmp_path):
  """A folder of the sampled frames (lossless PNG) and the soundtrack as a WAV: the same labels."""
  clip, labels, _ = expected
  frames_dir = tmp_path / 'frames'
  frames_dir.mkdir()
  for k, frame in enumerate(clip.frames):
    Image.fromarray(frame).save(frames_dir / f'{k}.png')
  wav = tmp_path / 'sound.wav'
  scipy.io.wavfile.write(wav, clip.sample_rate, clip.audio.astype(np.float32))
  report = predict.segment_video(predictor, frames_dir, tmp_path / 'out', audio=wav, progress=False,
                                 write_mp4=False)
  np.testing.assert_array_equal(report['labels'], labels)
  assert report['input']['audio'] == str(wav) and report['outputs']['video'] is None
  assert not (tmp_path / 'out' / predict.VIDEO_FILE).exists()


BAD_INPUTS = {  # name: (arguments, substrings of the error line)
    'unreadable': (['--video', '{garbage}'], ['garbage.mp4', 'not a readable media file']),
    'missing': (['--video', '{dir}/nowhere.mp4'], ['nowhere.mp4', 'no such file']),
    'no_video_stream': (['--video', '{audio_only}'], ['audio_only.m4a', 'has no video stream']),
    'frames_without_audio': (['--frames_dir', '{dir}'], ['a folder of frames has no sound', '--audio']),
    'missing_audio': (['--video', '{clip}', '--audio', '{dir}/nowhere.wav'], ['nowhere.wav', 'no such file']),
    'short': (['--video', '{short}'], ['short.mp4', 'lasts 3.00 s', 'window of 5 frames (5 s)', '--pad_short']),
    'no_checkpoint': (['--video', '{clip}', '--workdir', '{empty_workdir}'], ['no checkpoints in', 'empty_workdir']),
    'threshold': (['--video', '{clip}', '--threshold', '1.5'], ['--threshold must be between 0 and 1']),
    'min_score': (['--video', '{clip}', '--min_score', '1'], ['--min_score must be in [0, 1)']),
}


@pytest.mark.parametrize('case', sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(case, trained_workdir, inputs, tmp_path, capsys):
  args, wanted = BAD_INPUTS[case]
  argv = ['--workdir', trained_workdir, '--out', str(tmp_path / 'out'), '--no_progress']
  argv += [a.format(**inputs) for a in args]  # a later --workdir replaces the first
  with pytest.raises(SystemExit) as exit_info:
    predict.main(argv)
  assert exit_info.value.code == 2
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, errors
  for part in wanted:
    assert part in errors[0], errors[0]
  assert not (tmp_path / 'out' / predict.PREDICTIONS_FILE).exists()


def test_frame_stats_binary_and_semantic():
  labels = np.array([[0, 1, 1], [2, 2, 2]])
  scores = np.array([[0.1, 0.6, 0.8], [0.9, 0.7, 0.5]], np.float32)
  names = ('background', 'a', 'b')
  assert predict._frame_stats(labels, scores, names, binary=False) == {'classes': [
      {'id': 2, 'name': 'b', 'pixels': 3, 'fraction': 0.5, 'mean_score': 0.7},
      {'id': 1, 'name': 'a', 'pixels': 2, 'fraction': 0.333333, 'mean_score': 0.7}]}
  mask = (labels > 0).astype(np.int32)
  assert predict._frame_stats(mask, scores, ('background', 'sounding'), binary=True) == {
      'foreground_pixels': 5, 'foreground_fraction': 0.833333, 'mean_probability': 0.7}
  assert predict._frame_stats(np.zeros_like(mask), scores, ('background', 'sounding'), binary=True) == {
      'foreground_pixels': 0, 'foreground_fraction': 0.0, 'mean_probability': None}
  assert predict.workdir_of('/w/checkpoints/6') == '/w'
  assert predict.workdir_of('gs://b/run/checkpoints/6/') == 'gs://b/run'
  assert predict.workdir_of('/elsewhere/6') is None


@pytest.mark.parametrize('case', ['silent', 'no_audio'])
def test_a_silent_or_soundless_video_is_segmented_with_silence(case, trained_workdir, inputs, predictor, tmp_path,
                                                               capfd):
  """A user's own video may be silent: it is segmented with silence (one warning line), and each
  window says whether anything was judged to be sounding, as the model's own silence prediction."""
  out = tmp_path / 'out'
  assert predict.main(['--workdir', trained_workdir, '--video', inputs[case], '--out', str(out), '--no_progress']) == 0
  printed = capfd.readouterr()
  report = json.load(open(out / predict.PREDICTIONS_FILE))
  assert report['input']['audio'].endswith({'silent': '(its soundtrack, silent)',
                                            'no_audio': '(no soundtrack: silence)'}[case])
  clip = video.read_video(inputs[case], audio='none')
  for w in report['windows']:
    window = video.windows(clip.num_frames, predictor.num_frames, fps=1.0)[w['index']]
    silence = np.zeros(predictor.num_frames * SR, np.float32)
    labels = predictor.predict(window.take(clip.frames), silence, sample_rate=SR,
                               frame_valid=window.frame_valid)['labels'][0, :window.num_real]
    assert w['frames_with_a_mask'] == int(np.sum(np.any(labels > 0, axis=(1, 2))))
  for w in report['windows']:
    assert f'window {w["index"]} ({w["start_time"]:g} s): ' in printed.out


def test_min_score_suppresses_weak_masks(predictor, inputs, expected, tmp_path):
  clip, labels, scores = expected
  kept = predict.segment_video(predictor, inputs['clip'], tmp_path / 'a', progress=False, write_mp4=False,
                               min_score=0.0)
  np.testing.assert_array_equal(kept['labels'], labels)
  # A bar above every class's mean score: nothing is left, every window is "nothing sounding".
  none = predict.segment_video(predictor, inputs['clip'], tmp_path / 'b', progress=False, write_mp4=False,
                               min_score=0.999)
  assert not none['labels'].any() and not any(w['sounding'] for w in none['windows'])
  assert none['run']['min_score'] == 0.999
  frame_labels = np.array([[0, 1, 1], [2, 2, 0]])
  frame_scores = np.array([[0.9, 0.3, 0.5], [0.8, 0.9, 0.1]], np.float32)
  np.testing.assert_array_equal(predict.suppress_weak(frame_labels, frame_scores, 0.5, binary=False),
                                [[0, 0, 0], [2, 2, 0]])  # class 1: mean 0.4 < 0.5 dropped; class 2: 0.85 kept
  np.testing.assert_array_equal(predict.suppress_weak(frame_labels > 0, frame_scores, 0.7, binary=True),
                                np.zeros((2, 3), bool))  # foreground mean 0.625 < 0.7


def test_read_inputs_warns_once_for_a_soundless_video(inputs, caplog):
  with caplog.at_level('WARNING'):
    got = predict.read_inputs(inputs['no_audio'])
  assert not got.waveform.any() and got.waveform.shape[0] >= SECONDS * got.sample_rate
  lines = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert len(lines) == 1 and 'no_audio.mp4 has no soundtrack: segmenting it with silence' in lines[0]
