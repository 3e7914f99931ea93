"""The avs_object / avs_semantic TFDS builders on the fake releases of tfds_builders.fixtures.

Every record is checked against the raw files read independently here (PIL / scipy): frames are the
released bytes, masks the binarised / class-id images, ground-truth and padding flags follow the
release rules; then each bad-input case of the builder READMEs, skipped-and-counted or an error.
"""
from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io.wavfile
import tensorflow_datasets as tfds
from PIL import Image

from qdformer_jax.data import audio, avsbench, records
from tfds_builders import fixtures
from tfds_builders.avs_object import AvsObject
from tfds_builders.avs_semantic import AvsSemantic

SPLITS = ('train', 'val', 'test')


def _build(cls, config, data_dir, **kwargs):
  builder = cls(config=config, data_dir=str(data_dir), file_format='array_record', **kwargs)
  builder.download_and_prepare()
  return builder


def _records(builder, split):
  source = builder.as_data_source(split)
  return {r['clip_id'].decode(): r for r in (source[i] for i in range(len(source)))}


def _summary(builder, split):
  return builder.info.metadata['build_summary'][split]


@pytest.fixture(scope='module')
def raw(tmp_path_factory):
  return fixtures.write_fixtures(tmp_path_factory.mktemp('raw'))


@pytest.fixture(scope='module')
def built(raw, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('data')
  return {
      's4': _build(AvsObject, 's4', data_dir, raw_dir=raw['avs_object']),
      'ms3': _build(AvsObject, 'ms3', data_dir, raw_dir=raw['avs_object']),
      'avss': _build(AvsSemantic, 'all', data_dir, raw_dir=raw['avs_semantic']),
  }


def _expected_split_sizes():
  s4 = {s: sum(c[3] == s for c in fixtures.S4_CLIPS) for s in SPLITS}
  ms3 = {s: sum(c[1] == s for c in fixtures.MS3_CLIPS) for s in SPLITS}
  avss = {s: sum(r[5] == s for r in fixtures.AVSS_ROWS) for s in SPLITS}
  return {'s4': s4, 'ms3': ms3, 'avss': avss}


def test_split_sizes_and_shapes(built):
  expected = _expected_split_sizes()
  assert expected['s4'] == {'train': 3, 'val': 2, 'test': 2}
  assert expected['avss'] == {'train': 4, 'val': 3, 'test': 3}
  for name, builder in built.items():
    T = 10 if name == 'avss' else 5
    for split in SPLITS:
      source = builder.as_data_source(split)
      assert len(source) == expected[name][split], (name, split)
      summary = _summary(builder, split)
      assert summary['written'] == summary['listed'] == len(source) and summary['skipped'] == 0
      for i in range(len(source)):
        r = source[i]
        assert len(r['frames']) == len(r['semantic']) == T
        assert r['log_mel'].shape == (T, 96, 64) and r['log_mel'].dtype == np.float32
        assert r['gt_valid'].shape == r['frame_valid'].shape == (T,)
        assert not np.any(r['gt_valid'] & ~r['frame_valid'])


def test_s4_records_match_release(built, raw):
  data = Path(raw['avs_object']) / 'Single-source' / 's4_data'
  for split in SPLITS:
    recs = _records(built['s4'], split)
    for name, _, category, clip_split in fixtures.S4_CLIPS:
      if clip_split != split:
        continue
      r = recs[name]
      assert r['category'].decode() == category
      rel = Path(split) / category / name
      for i in range(5):
        assert r['frames'][i] == (data / 'visual_frames' / rel / f'{name}_{i + 1}.png').read_bytes()
      # Train clips have a mask for frame 1 only.
      expected_gt = [True] + [split != 'train'] * 4
      assert r['gt_valid'].tolist() == expected_gt and r['frame_valid'].all()
      for i in range(5):
        if not expected_gt[i]:
          assert r['semantic'][i] == b''
          continue
        released = np.asarray(Image.open(data / 'gt_masks' / rel / f'{name}_{i + 1}.png'))
        assert set(np.unique(released)) == {0, 64, 255}  # the rim (64) must count as object
        ids = records.decode_image(r['semantic'][i], 'L')
        np.testing.assert_array_equal(ids, (released > 0).astype(np.uint8))
      rate, wave = scipy.io.wavfile.read(data / 'audio_wav' / split / category / f'{name}.wav')
      np.testing.assert_array_equal(
          r['log_mel'], audio.pad_examples(audio.waveform_to_log_mel(wave, rate), 5, 'repeat'))


def test_ms3_records_match_release(built, raw):
  data = Path(raw['avs_object']) / 'Multi-sources' / 'ms3_data'
  for split in SPLITS:
    recs = _records(built['ms3'], split)
    for name, clip_split, _ in fixtures.MS3_CLIPS:
      if clip_split != split:
        continue
      r = recs[name]
      assert r['gt_valid'].all() and r['frame_valid'].all()
      for i in range(5):
        assert r['frames'][i] == (data / 'visual_frames' / name / f'{name}.mp4_{i + 1}.png').read_bytes()
        released = np.asarray(Image.open(data / 'gt_masks' / split / name / f'{name}_{i + 1}.png'))
        np.testing.assert_array_equal(records.decode_image(r['semantic'][i], 'L'), released > 0)


def test_avss_records_match_release(built, raw):
  root = Path(raw['avs_semantic'])
  for split in SPLITS:
    recs = _records(built['avss'], split)
    for _, uid, _, _, _, clip_split, label in fixtures.AVSS_ROWS:
      if clip_split != split:
        continue
      r = recs[uid]
      n = 10 if label == 'v2' else 5
      assert r['category'].decode() == label
      assert r['frame_valid'].tolist() == [True] * n + [False] * (10 - n)
      expected_gt = [True] + [not (label == 'v1s' and split == 'train')] * (n - 1) + [False] * (10 - n)
      assert r['gt_valid'].tolist() == expected_gt
      assert all(f == b'' for f in r['frames'][n:]) and all(m == b'' for m in r['semantic'][n:])
      assert np.all(r['log_mel'][n:] == 0)
      for t in range(n):
        assert r['frames'][t] == (root / label / uid / 'frames' / f'{t}.jpg').read_bytes()
        if expected_gt[t]:
          released = np.asarray(Image.open(root / label / uid / 'labels_semantic' / f'{t}.png'))
          np.testing.assert_array_equal(records.decode_image(r['semantic'][t], 'L'), released)
        else:
          assert r['semantic'][t] == b''
      frame = records.decode_image(r['frames'][0], 'RGB')
      assert frame.shape[:2] == fixtures.AVSS_V2_SIZES.get(uid, (224, 224))
      rate, wave = scipy.io.wavfile.read(root / label / uid / 'audio.wav')
      np.testing.assert_array_equal(r['log_mel'][:n], audio.waveform_to_log_mel(wave, rate)[:n])


def test_palette():
  palette = avsbench.voc_palette(256)
  # Published PASCAL-VOC colours: background, aeroplane, bicycle, bird, boat, ..., person, tv.
  assert palette[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
  assert palette[15].tolist() == [192, 128, 128] and palette[20].tolist() == [0, 64, 128]
  assert len({tuple(c) for c in palette}) == 256
  ids = np.arange(71, dtype=np.uint8).reshape(1, 71).repeat(3, 0)
  np.testing.assert_array_equal(avsbench.rgb_to_class_ids(avsbench.class_ids_to_rgb(ids)), ids)
  bad = avsbench.class_ids_to_rgb(ids)
  bad[0, 0] = (1, 2, 3)
  with pytest.raises(ValueError, match=r'\(1, 2, 3\) x1'):
    avsbench.rgb_to_class_ids(bad)
  with pytest.raises(ValueError, match='palette'):  # id 71 is not one of the 71 AVSS colours
    avsbench.rgb_to_class_ids(palette[71][None, None])


def test_label2idx_matches_release():
  from conftest import released_data_dir
  released = released_data_dir() / 'avsbench' / 'label2idx.json'
  assert avsbench.read_label2idx(released) == avsbench.AVSS_CLASS_NAMES


def test_avss_labels_rgb_round_trip(built, raw, tmp_path):
  """Building from labels_rgb (palette decoding) gives the same class ids as labels_semantic."""
  rgb = _build(AvsSemantic, 'all', tmp_path, raw_dir=raw['avs_semantic'], label_source='rgb')
  for split in SPLITS:
    a, b = _records(built['avss'], split), _records(rgb, split)
    assert a.keys() == b.keys()
    for uid in a:
      for t in range(10):
        assert (a[uid]['semantic'][t] == b'') == (b[uid]['semantic'][t] == b'')
        if a[uid]['semantic'][t]:
          np.testing.assert_array_equal(records.decode_image(a[uid]['semantic'][t], 'L'),
                                        records.decode_image(b[uid]['semantic'][t], 'L'))


def test_pkl_log_mel_and_manual_dir(built, raw, tmp_path):
  """log_mel_source='pkl' reads the released files (here made from the same wavs); the manual
  dir works in place of raw_dir; the summary survives a reload."""
  builder = AvsObject(config='s4', data_dir=str(tmp_path), file_format='array_record',
                      log_mel_source='pkl')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(raw['avs_object'])))
  for split in SPLITS:
    a, b = _records(built['s4'], split), _records(builder, split)
    for name in a:
      np.testing.assert_allclose(b[name]['log_mel'], a[name]['log_mel'], rtol=0, atol=1e-6)
  reloaded = AvsObject(config='s4', data_dir=str(tmp_path))
  summary = reloaded.info.metadata['build_summary']['train']
  assert summary['written'] == 3 and 'multichannel_audio' not in summary['notes']  # pkl: no wav
  notes = _summary(built['s4'], 'train')['notes']
  assert notes['multichannel_audio']['count'] == 2  # the 16 kHz stereo wavs, mixed down


def _write_wav(path, seconds, rate=16000, channels=1, silent=False):
  rng = np.random.default_rng(0)
  wave = np.zeros((int(seconds * rate), channels)) if silent else 0.2 * rng.standard_normal(
      (int(seconds * rate), channels))
  scipy.io.wavfile.write(path, rate, (wave[:, 0] if channels == 1 else wave * 32767).astype(
      np.float32 if channels == 1 else np.int16))


def _truncate(path, fraction=0.5):
  data = Path(path).read_bytes()
  Path(path).write_bytes(data[:int(len(data) * fraction)])


def test_s4_bad_clips_skipped_and_counted(raw, tmp_path):
  root = Path(shutil.copytree(raw['avs_object'], tmp_path / 'raw'))
  data = root / 'Single-source' / 's4_data'
  clip = {c[0]: Path(c[3]) / c[2] / c[0] for c in fixtures.S4_CLIPS}
  # train: a missing frame, a truncated mask; the third clip is intact.
  (data / 'visual_frames' / clip['--ZHUMfueO0'] / '--ZHUMfueO0_3.png').unlink()
  _truncate(data / 'gt_masks' / clip['--yJcmmwiMc'] / '--yJcmmwiMc_1.png')
  # val: a 3.2 s wav (3 examples: repeat-padded), a silent wav.
  _write_wav(data / 'audio_wav' / f"{clip['--FenyW2i_4']}.wav", 3.2)
  _write_wav(data / 'audio_wav' / f"{clip['-0gYWIOfqdM']}.wav", 5.0, silent=True)
  # test: a 0.5 s wav (no whole example), an unreadable wav... and the other intact.
  _write_wav(data / 'audio_wav' / f"{clip['-1q0XHPxqe8']}.wav", 0.5)
  builder = _build(AvsObject, 's4', tmp_path / 'data', raw_dir=root)

  train = _summary(builder, 'train')
  assert (train['listed'], train['written'], train['skipped']) == (3, 1, 2)
  [missing] = train['skipped_by_reason']['missing_file']['errors']
  assert '--ZHUMfueO0' in missing and '--ZHUMfueO0_3.png' in missing
  [truncated] = train['skipped_by_reason']['unreadable_image']['errors']
  assert '--yJcmmwiMc' in truncated and '--yJcmmwiMc_1.png' in truncated
  assert list(_records(builder, 'train')) == ['-03Hd0MBgQY']

  val = _summary(builder, 'val')
  assert val['written'] == 2 and val['notes']['short_audio']['clips'] == ['--FenyW2i_4']
  assert val['notes']['silent_audio']['clips'] == ['-0gYWIOfqdM']
  short = _records(builder, 'val')['--FenyW2i_4']['log_mel']
  assert np.all(short[3] == short[2]) and np.all(short[4] == short[2])  # repeat padding
  assert not np.all(short[2] == short[1])
  silent = _records(builder, 'val')['-0gYWIOfqdM']['log_mel']
  np.testing.assert_allclose(silent, np.log(0.01), atol=1e-6)

  test = _summary(builder, 'test')
  assert test['written'] == 1
  [too_short] = test['skipped_by_reason']['audio_too_short']['errors']
  assert '-1q0XHPxqe8' in too_short and '-1q0XHPxqe8.wav' in too_short


def test_avss_bad_clips_skipped_and_counted(raw, tmp_path):
  root = Path(shutil.copytree(raw['avs_semantic'], tmp_path / 'raw'))
  _truncate(root / 'v2' / '_-apT0tfo6U_60000_70000' / 'frames' / '3.jpg', 0.6)  # truncated JPEG
  shutil.rmtree(root / 'v1m' / 'IguMXMwDq6k_2')  # listed in metadata.csv but absent
  _write_wav(root / 'v2' / 'T4LYhpdIub8_260000_270000' / 'audio.wav', 6.5)  # 6 of 10 examples
  _write_wav(root / 'v1s' / '-1q0XHPxqe8_0_5000' / 'audio.wav', 5.0, rate=48000, channels=2)
  (root / 'v2' / '8cGUDi8c7a4_60000_70000' / 'audio.wav').write_bytes(b'not a wav at all')
  builder = _build(AvsSemantic, 'all', tmp_path / 'data', raw_dir=root)

  train = _summary(builder, 'train')
  assert (train['written'], train['skipped']) == (3, 1)
  [truncated] = train['skipped_by_reason']['unreadable_image']['errors']
  assert '_-apT0tfo6U_60000_70000' in truncated and '3.jpg' in truncated

  val = _summary(builder, 'val')
  assert (val['written'], val['skipped']) == (2, 1)
  [absent] = val['skipped_by_reason']['missing_file']['errors']
  assert 'IguMXMwDq6k_2' in absent
  assert val['notes']['short_audio']['clips'] == ['T4LYhpdIub8_260000_270000']
  short = _records(builder, 'val')['T4LYhpdIub8_260000_270000']['log_mel']
  assert np.all(short[6:] == 0) and not np.any(np.all(short[:6] == 0, axis=(1, 2)))

  test = _summary(builder, 'test')
  assert (test['written'], test['skipped']) == (2, 1)
  [unreadable] = test['skipped_by_reason']['unreadable_audio']['errors']
  assert '8cGUDi8c7a4_60000_70000' in unreadable and 'audio.wav' in unreadable
  assert test['notes']['multichannel_audio']['clips'] == ['-1q0XHPxqe8_0_5000']


def _rewrite_csv(path, drop_column):
  with open(path, newline='') as f:
    rows = list(csv.reader(f))
  keep = [i for i, name in enumerate(rows[0]) if name != drop_column]
  with open(path, 'w', newline='') as f:
    csv.writer(f).writerows([[row[i] for i in keep] for row in rows])


def test_missing_metadata_column_or_file_is_an_error(raw, tmp_path):
  root = Path(shutil.copytree(Path(raw['avs_object']) / 'Single-source', tmp_path / 'o' / 'Single-source'))
  _rewrite_csv(root / 's4_meta_data.csv', 'category')
  with pytest.raises(avsbench.ReleaseError, match=r"s4_meta_data.csv.*\['category'\] missing"):
    _build(AvsObject, 's4', tmp_path / 'd1', raw_dir=tmp_path / 'o')
  with pytest.raises(avsbench.ReleaseError, match='ms3_meta_data.csv: metadata file not found'):
    _build(AvsObject, 'ms3', tmp_path / 'd2', raw_dir=tmp_path / 'o')
  avss = tmp_path / 's'
  avss.mkdir()
  shutil.copy(Path(raw['avs_semantic']) / 'metadata.csv', avss)
  shutil.copy(Path(raw['avs_semantic']) / 'label2idx.json', avss)
  _rewrite_csv(avss / 'metadata.csv', 'label')
  with pytest.raises(avsbench.ReleaseError, match=r"metadata.csv.*\['label'\] missing"):
    _build(AvsSemantic, 'all', tmp_path / 'd3', raw_dir=avss)
  (avss / 'label2idx.json').unlink()
  with pytest.raises(avsbench.ReleaseError, match='label2idx.json not found'):
    _build(AvsSemantic, 'all', tmp_path / 'd4', raw_dir=avss)


def test_unknown_palette_colour_or_class_id_is_an_error(raw, tmp_path):
  root = Path(shutil.copytree(raw['avs_semantic'], tmp_path / 'raw'))
  clip = root / 'v1m' / '0meOlo03O3g_1'
  rgb = np.asarray(Image.open(clip / 'labels_rgb' / '2.png')).copy()
  rgb[0, 0] = (1, 2, 3)
  Image.fromarray(rgb).save(clip / 'labels_rgb' / '2.png')
  with pytest.raises(avsbench.ReleaseError,
                     match=r'0meOlo03O3g_1.*labels_rgb/2.png.*\(1, 2, 3\) x1'):
    _build(AvsSemantic, 'v1m', tmp_path / 'd1', raw_dir=root, label_source='rgb')
  ids = np.asarray(Image.open(clip / 'labels_semantic' / '2.png')).copy()
  ids[0, 0] = 99
  Image.fromarray(ids).save(clip / 'labels_semantic' / '2.png')
  with pytest.raises(avsbench.ReleaseError, match=r'0meOlo03O3g_1.*labels_semantic/2.png.*99'):
    _build(AvsSemantic, 'v1m', tmp_path / 'd2', raw_dir=root)


def test_strict_build_stops_at_a_bad_clip(raw, tmp_path):
  root = Path(shutil.copytree(raw['avs_object'], tmp_path / 'raw'))
  frame = root / 'Multi-sources' / 'ms3_data' / 'visual_frames' / '2IoF4ClnbPk_1' / '2IoF4ClnbPk_1.mp4_4.png'
  frame.unlink()
  with pytest.raises(avsbench.ReleaseError, match=r'2IoF4ClnbPk_1.*2IoF4ClnbPk_1.mp4_4.png.*strict'):
    _build(AvsObject, 'ms3', tmp_path / 'data', raw_dir=root, strict=True)


def test_truncated_wav_is_unreadable_audio_and_odd_mask_values_are_noted(raw, tmp_path):
  """A WAV cut inside its data is skipped as unreadable_audio naming the file (a strict build stops);
  S4/MS3 mask values other than 0 and 255 (the fixtures' rim of 64) are binarised and noted with the
  file and the pixel count."""
  root = Path(shutil.copytree(raw['avs_object'], tmp_path / 'raw'))
  specs = avsbench.list_s4(root, 'val')
  _truncate(specs[0].wav)
  summary = avsbench.BuildSummary('avs_object/s4', 'val')
  written = [key for key, _ in avsbench.generate_examples(specs, summary)]
  assert written == [s.clip_id for s in specs[1:]]
  [error] = summary.to_dict()['skipped_by_reason']['unreadable_audio']['errors']
  assert specs[0].clip_id in error and str(specs[0].wav) in error and 'truncated WAV file' in error
  [noted] = summary.to_dict()['notes']['mask_values']['clips']
  assert re.match(rf'{re.escape(specs[1].clip_id)}: \d+ pixels in 5 mask\(s\) with values other than 0 and 255 '
                  r'\(e\.g\. \[64\]; binarised as > 0\), first .*_1\.png$', noted), noted
  assert 'note (mask_values): 1 clips' in summary.report()
  with pytest.raises(avsbench.ReleaseError, match=r'truncated WAV file.*unreadable_audio; strict build'):
    list(avsbench.generate_examples(specs, avsbench.BuildSummary('s4', 'val'), strict=True))


def test_build_command_refuses_an_existing_dataset_unless_overwrite(built, raw, tmp_path, capsys):
  """Rerunning a builder into a data dir that holds its dataset version is an error that says so and
  offers --overwrite; --overwrite rebuilds it."""
  from tfds_builders.avs_object import __main__ as build_object
  from tfds_builders.avs_semantic import __main__ as build_semantic
  data_dir = tmp_path / 'data'
  shutil.copytree(Path(built['s4'].data_dir).parents[1], data_dir / 'avs_object')
  args = ['--raw_dir', str(raw['avs_object']), '--data_dir', str(data_dir), '--config', 's4']
  with pytest.raises(SystemExit) as exit_info:
    build_object.main(args)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert re.search(r'error: already built: avs_object/s4/1\.1\.0 in \S+avs_object/s4/1\.1\.0\. Pass --overwrite', err), err
  stamp = (Path(data_dir) / 'avs_object' / 's4' / '1.1.0' / 'dataset_info.json').stat().st_mtime_ns
  build_object.main(args + ['--overwrite'])
  assert (Path(data_dir) / 'avs_object' / 's4' / '1.1.0' / 'dataset_info.json').stat().st_mtime_ns != stamp
  assert 'avs_object/s4:' in capsys.readouterr().out
  shutil.copytree(Path(built['avss'].data_dir).parents[1], data_dir / 'avs_semantic')
  with pytest.raises(SystemExit):
    build_semantic.main(['--raw_dir', str(raw['avs_semantic']), '--data_dir', str(data_dir)])
  assert 'already built: avs_semantic/all/1' in capsys.readouterr().err


def test_fixtures_lay_out_every_listed_file(raw):
  """Every path the listers derive from the metadata exists in the fake releases."""
  for split in SPLITS:
    for spec in (avsbench.list_s4(raw['avs_object'], split)
                 + avsbench.list_ms3(raw['avs_object'], split)
                 + avsbench.list_avss(raw['avs_semantic'], split)):
      paths = list(spec.frames) + [m for m in spec.masks if m] + [spec.wav]
      assert all(p.is_file() for p in paths), spec.clip_id
      if spec.log_mel_pkl:
        assert audio.load_released_log_mel(spec.log_mel_pkl).shape == (5, 96, 64)


def test_metadata_row_errors(tmp_path):
  header = 'vid,uid,s_min,s_sec,a_obj,split,label\n'
  cases = {
      'short line': (header + 'a,a_0_5000,0,0,dog,train,v1s\nb,b_0_5000,0,0\n', r'line 3 has 4 values'),
      'unknown label': (header + 'a,a_0_5000,0,0,dog,train,v3\n', r"clip a_0_5000 has label 'v3'"),
      'duplicate': (header + 'a,a_0,0,0,dog,train,v2\na,a_0,0,0,cat,train,v2\n', r"more than once.*a_0"),
  }
  for _name, (text, message) in cases.items():
    (tmp_path / 'metadata.csv').write_text(text)
    with pytest.raises(avsbench.ReleaseError, match=message):
      avsbench.list_avss(tmp_path, 'train')
  (tmp_path / 'metadata.csv').write_text(header + '\n' + 'a,a_0,0,0,dog,val,v2\n')
  [spec] = avsbench.list_avss(tmp_path, 'val')  # blank lines are ignored
  assert spec.frames[9] == tmp_path / 'v2' / 'a_0' / 'frames' / '9.jpg'
  assert spec.masks[0] == tmp_path / 'v2' / 'a_0' / 'labels_rgb' / '0.png'  # no labels_semantic
