"""Video I/O (qdformer_jax.data.video) on synthetic files written with PyAV.

The main clip: 5.5 s of 64x48 frames at 25 fps whose colour changes every second (137 frames, so the
video stream lasts 5.48 s), with a 440 Hz sine soundtrack at 44.1 kHz (AAC) that starts at 0.5 s.
Tolerances: frame colours within 12 grey levels of the encoded ones (H.264/MPEG-4 of flat colours
is off by ~1-3); the soundtrack's FFT peak within 2 Hz of 440 Hz; its onset within 30 ms of 0.5 s
(AAC frames are 23 ms).
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.io.wavfile
from PIL import Image

av = pytest.importorskip('av')

from qdformer_jax.data import video  # noqa: E402

W, H, NATIVE_FPS, SECONDS, SR = 64, 48, 25, 5.5, 44100
TONE_HZ, TONE_START = 440.0, 0.5


def _colour(second: int) -> np.ndarray:
  return np.array([(40 * second + 20) % 256, (230 - 40 * second) % 256, (97 * second) % 256],
                  np.uint8)


def _tone(seconds: float, rate: int, start: float = 0.0) -> np.ndarray:
  t = np.arange(int(round(seconds * rate))) / rate
  return (0.5 * np.sin(2 * np.pi * TONE_HZ * t) * (t >= start)).astype(np.float32)


def _write_clip(path, *, sound: np.ndarray | None, rotation: int = 0, codec: str = 'libx264'):
  """The synthetic clip of the module docstring, written with PyAV only (not with write_video)."""
  container = av.open(str(path), 'w')
  vstream = container.add_stream(codec, rate=NATIVE_FPS)
  vstream.width, vstream.height, vstream.pix_fmt = W, H, 'yuv420p'
  if rotation:
    vstream.set_display_rotation(rotation)
  astream = container.add_stream('aac', rate=SR, layout='mono') if sound is not None else None
  for i in range(int(SECONDS * NATIVE_FPS)):
    image = np.empty((H, W, 3), np.uint8)
    image[...] = _colour(i // NATIVE_FPS)
    image[:8, :8] = 255  # a white marker in the top-left corner
    frame = av.VideoFrame.from_ndarray(image, format='rgb24')
    frame.pts = i
    container.mux(vstream.encode(frame))
  container.mux(vstream.encode(None))
  if astream is not None:
    for first in range(0, sound.shape[0], 4096):
      frame = av.AudioFrame.from_ndarray(sound[None, first:first + 4096], format='fltp',
                                         layout='mono')
      frame.sample_rate, frame.pts = SR, first
      container.mux(astream.encode(frame))
    container.mux(astream.encode(None))
  container.close()
  return path


@pytest.fixture(scope='module')
def clip(tmp_path_factory):
  return _write_clip(tmp_path_factory.mktemp('video') / 'clip.mp4',
                     sound=_tone(SECONDS, SR, TONE_START))


@pytest.fixture(scope='module')
def clip_video(clip):
  return video.read_video(clip)


def _peak_hz(waveform: np.ndarray, rate: int) -> float:
  spectrum = np.abs(np.fft.rfft(waveform * np.hanning(waveform.size)))
  return float(np.fft.rfftfreq(waveform.size, 1 / rate)[np.argmax(spectrum)])


def _assert_colours(frames: np.ndarray, seconds) -> None:
  for frame, second in zip(frames, seconds):
    centre = frame[16:, 16:].reshape(-1, 3).astype(int)  # away from the marker
    np.testing.assert_array_less(np.abs(centre - _colour(second)).max(), 12)


def test_one_frame_per_second_from_the_middle_of_each_second(clip_video):
  v = clip_video
  assert v.frames.dtype == np.uint8 and v.frames.shape == (5, H, W, 3)
  assert v.num_frames == 5 and v.fps == 1.0
  assert v.duration == pytest.approx(137 / NATIVE_FPS)  # the last frame ends at 5.48 s
  # The middles 0.5, 1.5, ... fall halfway between two frames (0.48 and 0.52): the earlier wins.
  np.testing.assert_allclose(v.timestamps, np.arange(5) + 0.48, atol=1e-9)
  _assert_colours(v.frames, range(5))
  assert (v.frames[:, :8, :8] > 200).all()  # the marker is top-left: no rotation applied


def test_other_sampling_rates_and_max_duration(clip):
  v = video.read_video(clip, fps=2.0, audio='none')
  # Middles at 0.25, 0.75, ..., 5.25 lie before 5.48 s; 5.75 does not.
  assert v.num_frames == 11 and v.audio is None and v.sample_rate is None
  _assert_colours(v.frames, [int((k + 0.5) / 2) for k in range(11)])
  short = video.read_video(clip, max_duration=2.0)
  assert short.num_frames == 2 and short.duration == pytest.approx(2.0)
  _assert_colours(short.frames, range(2))
  assert short.audio.shape[0] == pytest.approx(2.0 * SR, abs=1)


def test_soundtrack_duration_pitch_and_alignment(clip_video):
  v = clip_video
  assert v.sample_rate == SR and v.audio.dtype == np.float32 and v.audio.ndim == 1
  assert v.has_sound
  assert v.audio.shape[0] / SR == pytest.approx(SECONDS, abs=0.03)
  assert _peak_hz(v.audio[SR:5 * SR], SR) == pytest.approx(TONE_HZ, abs=2.0)
  assert np.abs(v.audio[SR:5 * SR]).max() == pytest.approx(0.5, abs=0.05)
  onset = np.argmax(np.abs(v.audio) > 0.1) / SR
  assert onset == pytest.approx(TONE_START, abs=0.03)


def test_windows_pad_the_tail_with_the_last_frame():
  ws = video.windows(12, 5)
  assert [w.start for w in ws] == [0, 5, 10] and [w.num_real for w in ws] == [5, 5, 2]
  np.testing.assert_array_equal(ws[1].indices, [5, 6, 7, 8, 9])
  np.testing.assert_array_equal(ws[2].indices, [10, 11, 11, 11, 11])
  np.testing.assert_array_equal(ws[2].frame_valid, [True, True, False, False, False])
  assert ws[2].start_time == 10.0 and ws[2].seconds == 5.0 and ws[2].length == 5
  assert all(w.frame_valid.all() for w in ws[:2])
  # Exactly whole windows: no padding; a video shorter than a window: one padded window.
  assert [w.num_real for w in video.windows(10, 5)] == [5, 5]
  (only,) = video.windows(3, 5)
  np.testing.assert_array_equal(only.indices, [0, 1, 2, 2, 2])
  assert only.num_real == 3 and only.frame_valid.sum() == 3
  ws = video.windows(7, 2, fps=2.0)
  assert [w.start_time for w in ws] == [0.0, 1.0, 2.0, 3.0] and ws[0].seconds == 1.0
  for bad in (0, -1):
    with pytest.raises(ValueError, match='at least one sampled frame'):
      video.windows(bad, 5)
  with pytest.raises(ValueError, match='window'):
    video.windows(5, 0)


def test_window_audio_slices_are_fixed_length_and_zero_padded():
  rate = 10
  waveform = np.arange(1, 73, dtype=np.float32)  # 7.2 s at 10 Hz
  ws = video.windows(7, 5)
  first, second = (w.audio(waveform, rate) for w in ws)
  assert first.shape == second.shape == (50,) and first.dtype == np.float32
  np.testing.assert_array_equal(first, waveform[:50])
  np.testing.assert_array_equal(second[:22], waveform[50:])
  assert not second[22:].any()
  np.testing.assert_array_equal(video.audio_slice(waveform, rate, 8.0, 1.0), np.zeros(10))


def test_windows_of_a_read_video(clip_video):
  v = clip_video
  (w,) = video.windows(v.num_frames, 5, fps=v.fps)
  assert w.take(v.frames).shape == (5, H, W, 3) and w.frame_valid.all()
  clip_audio = w.audio(v.audio, v.sample_rate)
  assert clip_audio.shape == (5 * SR,)
  np.testing.assert_array_equal(clip_audio, v.audio[:5 * SR])
  (w10,) = video.windows(v.num_frames, 10, fps=v.fps)
  np.testing.assert_array_equal(w10.take(v.timestamps)[5:], np.full(5, v.timestamps[-1]))
  assert w10.num_real == 5 and w10.audio(v.audio, v.sample_rate).shape == (10 * SR,)


@pytest.mark.parametrize('codec', [None, 'mpeg4'])
def test_write_video_round_trip(tmp_path, codec):
  frames = np.empty((3, 47, 63, 3), np.uint8)  # odd sizes: padded to 48x64
  for k in range(3):
    frames[k] = _colour(k)
  rate = 22050
  out = video.write_video(tmp_path / 'out.mp4', frames, fps=1.0, audio=_tone(3.0, rate),
                          sample_rate=rate, codec=codec)
  v = video.read_video(out, audio='required')
  assert v.frames.shape == (3, 48, 64, 3) and v.duration == pytest.approx(3.0)
  _assert_colours(v.frames, range(3))
  assert v.sample_rate == rate
  assert v.audio.shape[0] / rate == pytest.approx(3.0, abs=0.05)
  assert _peak_hz(v.audio[rate // 2:5 * rate // 2], rate) == pytest.approx(TONE_HZ, abs=2.0)


def test_write_video_resamples_rates_aac_lacks_and_writes_gifs(tmp_path):
  frames = np.zeros((2, 16, 16, 3), np.uint8)
  frames[1] = 255
  out = video.write_video(tmp_path / 'odd_rate.mp4', frames, fps=1.0,
                          audio=(_tone(2.0, 20000) * 32767).astype(np.int16), sample_rate=20000)
  v = video.read_video(out, audio='required')
  assert v.num_frames == 2 and v.sample_rate == 48000
  assert _peak_hz(v.audio[12000:84000], 48000) == pytest.approx(TONE_HZ, abs=2.0)
  silent = video.write_video(tmp_path / 'no_sound.mp4', frames, fps=2.0)
  v = video.read_video(silent, fps=2.0)
  assert v.audio is None and v.num_frames == 2 and v.duration == pytest.approx(1.0)
  gif = video.write_video(tmp_path / 'out.gif', frames, fps=1.0)
  with Image.open(gif) as image:
    assert image.n_frames == 2 and image.size == (16, 16)
  with pytest.raises(ValueError, match='uint8'):
    video.write_video(tmp_path / 'bad.mp4', frames.astype(np.float32), fps=1.0)
  with pytest.raises(ValueError, match='sample_rate'):
    video.write_video(tmp_path / 'bad.mp4', frames, fps=1.0, audio=np.zeros(10))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    video.write_video(tmp_path / 'missing' / 'out.mp4', frames, fps=1.0)


def test_display_rotation_is_applied(tmp_path):
  path = _write_clip(tmp_path / 'rotated.mp4', sound=None, rotation=90)
  v = video.read_video(path, audio='none')
  # 90 degrees counterclockwise: 64x48 becomes 48x64 and the top-left marker goes bottom-left.
  assert v.frames.shape == (5, W, H, 3)
  assert (v.frames[:, -8:, :8] > 200).all() and (v.frames[:, :8, :8] < 200).any()


def test_read_soundtrack(tmp_path, clip):
  waveform, rate = video.read_soundtrack(clip)
  assert rate == SR and waveform.shape[0] / SR == pytest.approx(SECONDS, abs=0.03)
  wav = tmp_path / 'tone.wav'
  stereo = np.stack([_tone(1.0, 16000)] * 2, 1)
  scipy.io.wavfile.write(wav, 16000, (stereo * 32767).astype(np.int16))
  waveform, rate = video.read_soundtrack(wav)
  assert rate == 16000 and waveform.shape == (16000,) and waveform.dtype == np.float32
  assert _peak_hz(waveform, rate) == pytest.approx(TONE_HZ, abs=2.0)
  scipy.io.wavfile.write(tmp_path / 'silent.wav', 16000, np.zeros(16000, np.int16))
  with pytest.raises(ValueError, match='silent.wav.*silent'):
    video.read_soundtrack(tmp_path / 'silent.wav')
  assert not video.read_soundtrack(tmp_path / 'silent.wav', allow_silent=True)[0].any()


def test_read_frames_dir(tmp_path):
  for k in (1, 2, 10):  # natural order: 2 before 10
    Image.fromarray(np.full((H, W, 3), _colour(k), np.uint8)).save(tmp_path / f'clip_{k}.png')
  Image.fromarray(np.full((H, W), 128, np.uint8)).convert('RGB').save(tmp_path / 'clip_11.JPG')
  (tmp_path / 'notes.txt').write_text('not a frame')
  v = video.read_frames_dir(tmp_path)
  assert v.frames.shape == (4, H, W, 3) and v.audio is None and v.sample_rate is None
  np.testing.assert_array_equal(v.frames[:3, 0, 0], [_colour(1), _colour(2), _colour(10)])
  assert abs(int(v.frames[3, 0, 0, 0]) - 128) <= 2
  np.testing.assert_allclose(v.timestamps, [0.5, 1.5, 2.5, 3.5])
  assert v.duration == 4.0
  Image.fromarray(np.zeros((H + 2, W, 3), np.uint8)).save(tmp_path / 'clip_12.png')
  with pytest.raises(ValueError, match='clip_12.png.*one size'):
    video.read_frames_dir(tmp_path)


# Errors -------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothing.mp4: no such file'):
    video.read_video(tmp_path / 'nothing.mp4')
  with pytest.raises(FileNotFoundError, match='nothing.wav: no such file'):
    video.read_soundtrack(tmp_path / 'nothing.wav')


def test_not_a_media_file(tmp_path):
  fake = tmp_path / 'notes.mp4'
  fake.write_text('these are my notes, not a video\n' * 20)
  with pytest.raises(ValueError, match='notes.mp4: not a readable media file'):
    video.read_video(fake)
  with pytest.raises(ValueError, match='is a folder'):
    video.read_video(tmp_path)


def test_audio_only_file_has_no_video_stream(tmp_path):
  path = tmp_path / 'tone.m4a'
  container = av.open(str(path), 'w', format='mp4')
  stream = container.add_stream('aac', rate=SR, layout='mono')
  frame = av.AudioFrame.from_ndarray(_tone(1.0, SR)[None], format='fltp', layout='mono')
  frame.sample_rate, frame.pts = SR, 0
  container.mux(stream.encode(frame))
  container.mux(stream.encode(None))
  container.close()
  with pytest.raises(ValueError, match='tone.m4a: has no video stream'):
    video.read_video(path)
  assert video.read_soundtrack(path)[1] == SR  # still a usable --audio file


def test_required_soundtrack_missing(tmp_path):
  path = _write_clip(tmp_path / 'mute.mp4', sound=None)
  assert video.read_video(path).audio is None  # 'auto' accepts it
  with pytest.raises(ValueError, match='mute.mp4: has no soundtrack'):
    video.read_video(path, audio='required')
  with pytest.raises(ValueError, match='mute.mp4: has no audio stream'):
    video.read_soundtrack(path)


def test_required_soundtrack_silent(tmp_path):
  path = _write_clip(tmp_path / 'silent.mp4', sound=np.zeros(int(SECONDS * SR), np.float32))
  v = video.read_video(path)  # 'auto' returns the silent track
  assert v.audio is not None and not v.has_sound
  with pytest.raises(ValueError, match='silent.mp4: its soundtrack is silent'):
    video.read_video(path, audio='required')


def test_frames_dir_errors(tmp_path):
  with pytest.raises(ValueError, match='holds no frames'):
    video.read_frames_dir(tmp_path)
  with pytest.raises(FileNotFoundError, match='no such folder'):
    video.read_frames_dir(tmp_path / 'missing')
  (tmp_path / 'broken.png').write_bytes(b'not a png')
  with pytest.raises(ValueError, match='broken.png: not a readable image'):
    video.read_frames_dir(tmp_path)
  with pytest.raises(ValueError, match='is a file'):
    video.read_frames_dir(tmp_path / 'broken.png')


def test_too_short_and_bad_arguments(tmp_path, clip):
  with pytest.raises(ValueError, match='fps'):
    video.read_video(clip, fps=0)
  with pytest.raises(ValueError, match='audio must be'):
    video.read_video(clip, audio='yes')
  # At fps=0.1 a segment lasts 10 s; its middle (5 s) is inside the 5.48 s video, 15 s is not.
  assert video.read_video(clip, fps=0.1, audio='none').num_frames == 1
  with pytest.raises(ValueError, match='too short for one frame'):
    video.read_video(clip, fps=0.05, audio='none')
