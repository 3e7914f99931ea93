"""Evaluation outputs: PNG overlays (colours, legend names, TensorBoard) and the one-program eval step."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from qdformer_jax import sharding, testing
from qdformer_jax.data import noise, pipeline, registry, synthetic
from qdformer_jax.evaluation import evaluator as evaluator_lib
from qdformer_jax.evaluation import overlays, reports
from qdformer_jax.training import state as state_lib


def tiny_config(data_dir: str):
  c = testing.tiny_synthetic_config(data_dir)
  c.eval_batch_size = 2
  c.eval.limit = 3  # two batches, the second padded with an invalid clip
  c.eval.num_overlays = 3
  c.model.dec_layers = 1
  return c


class RecordingWriter:
  """Stands in for a tensorboardX SummaryWriter: records add_image calls."""

  def __init__(self):
    self.images = []
    self.flushed = False

  def add_image(self, tag, image, step, dataformats='CHW'):
    self.images.append((tag, np.asarray(image), step, dataformats))

  def flush(self):
    self.flushed = True


# -- class names and drawing -----------------------------------------------------------------------

def test_class_names_per_dataset(tmp_path):
  c = tiny_config(str(tmp_path))
  assert registry.class_names(c.data) == ('background',) + synthetic.CLASS_NAMES[:8]
  c.data.binary = True
  assert registry.class_names(c.data) == ('background', 'sounding')
  c.data.update(binary=False, name='avs_semantic', num_classes=70)
  names = registry.class_names(c.data)
  # The released index (1-based, background = 1), independent of the builder's copy.
  from conftest import released_data_dir
  label2idx = json.load(open(released_data_dir() / 'avsbench' / 'label2idx.json'))
  assert len(names) == 71 and names == tuple(sorted(label2idx, key=label2idx.get))
  c.data.num_classes = 8
  with pytest.raises(ValueError, match='num_classes'):
    registry.class_names(c.data)


def test_voc_palette_and_blend():
  colours = registry.palette(4)
  # PASCAL VOC: 0 black, 1 (128,0,0), 2 (0,128,0), 3 (128,128,0).
  np.testing.assert_array_equal(colours, [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]])
  frame = np.full((2, 2, 3), 100, np.uint8)
  labels = np.array([[0, 1], [2, 3]])
  out = overlays.blend(frame, labels, colours, alpha=0.5)
  expected = np.array([[[100, 100, 100], [114, 50, 50]], [[50, 114, 50], [114, 114, 50]]])
  np.testing.assert_array_equal(out, expected)  # (1 - a) * 100 + a * colour, rounded


def test_write_overlays_png_and_legend(tmp_path):
  c = tiny_config(str(tmp_path))
  t, s = 3, 16
  frames = np.random.default_rng(0).integers(0, 255, (2, t, s, s, 3), dtype=np.uint8)
  gt = np.zeros((2, t, s, s), np.uint8)
  gt[0, :, 2:8, 2:8] = 3        # class 3 in the ground truth of clip 0
  preds = np.zeros((2, t, s, s), np.int32)
  preds[0, 1, 8:, 8:] = 5       # class 5 predicted in frame 1
  preds[0, 2, :4, :4] = 3
  batch = {'frames': frames, 'semantic': gt, 'gt_valid': np.array([[True, False, True]] * 2),
           'frame_valid': np.array([[True, True, True], [True, True, False]]),
           'clip_valid': np.array([True, False]), 'index': np.array([7, -1])}
  writer = RecordingWriter()
  paths = overlays.write_overlays(str(tmp_path / 'ov'), [(batch, preds)], c, limit=4, writer=writer,
                                  tag='overlays_val', step=11)
  assert paths == [str(tmp_path / 'ov' / 'clip_00007.png')]  # the invalid clip is skipped
  with Image.open(paths[0]) as im:
    legend = json.loads(im.text['Legend'])
    pixels = np.asarray(im.convert('RGB'))
  names = registry.class_names(c.data)
  assert legend == [names[3], names[5]] == [synthetic.CLASS_NAMES[2], synthetic.CLASS_NAMES[4]]
  assert pixels.shape[0] > pixels.shape[1]  # one row per frame, GT | prediction side by side
  # The blended colour of class 3 (frame 100% covered region) appears in the picture.
  tag, image, step, fmt = writer.images[0]
  assert (tag, step, fmt) == ('overlays_val/clip_00007', 11, 'HWC') and writer.flushed
  np.testing.assert_array_equal(image, pixels)


# -- the evaluator ---------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  config = tiny_config(str(tmp_path_factory.mktemp('tfds')))
  mesh = sharding.make_mesh(config)
  graphdef, state = state_lib.model_part(*testing.random_train_state(config, mesh)[:2])  # the model alone
  # One Evaluator for the module: its eval step compiles once.
  return config, mesh, evaluator_lib.Evaluator(config, mesh, graphdef), state


def test_eval_step_is_one_program_without_callbacks(setup):
  config, mesh, evaluator, state = setup
  step = evaluator._step(False)
  it, _ = pipeline.make_eval_iterator(config.data, 'val', global_batch_size=2, limit=3)
  batches = [pipeline.to_global(pipeline.device_batch(b), mesh) for b in it]
  sums = evaluator._zero_sums(step, state, batches[0])
  hlo = step.lower(state, batches[0], sums, np.float32(0.5)).as_text()
  for marker in ('callback', 'host_compute', 'SendToHost', 'RecvFromHost', 'outfeed', 'infeed'):
    assert marker not in hlo, marker
  for batch in batches:
    sums, _ = step(state, batch, sums, np.float32(0.5))
  assert step._cache_size() == 1  # zero-initialised sums: one executable for every batch


def test_run_writes_overlays_images_and_noisy_runs(setup, tmp_path):
  config, mesh, evaluator, state = setup
  writer = RecordingWriter()
  out = str(tmp_path / 'reports' / 'overlays' / 'val_5')
  results = evaluator.run(state, 'val', collect=config.eval.num_overlays)
  overlays.write_overlays(out, results.pop('collected'), config, limit=config.eval.num_overlays, writer=writer,
                          tag='overlays_val', step=5)
  assert results['num_clips'] == 3 and 0.0 <= results['mIoU'] <= 1.0
  files = sorted(os.listdir(out))
  assert files == ['clip_00000.png', 'clip_00001.png', 'clip_00002.png']
  names = set(registry.class_names(config.data)[1:])
  for f in files:
    with Image.open(os.path.join(out, f)) as im:
      assert set(json.loads(im.text['Legend'])) <= names
  assert [t for t, *_ in writer.images] == [f'overlays_val/{f[:-4]}' for f in files]
  path = reports.write_report(str(tmp_path), 'val', 5, config, results)
  assert json.load(open(path))['metrics']['num_clips'] == 3
  # The same compiled step evaluates noisy audio (the noise sweep's runs).
  noisy = evaluator.run(state, 'val', noise_condition=noise.Condition(-10.0))
  assert noisy['noise_snr_db'] == -10.0 and 0.0 <= noisy['mIoU'] <= 1.0
  assert evaluator._step(False)._cache_size() == 1


# -- post-processing thresholds -----------------------------------------------------------------------

def test_threshold_sweep_equals_separate_runs(setup):
  """The sweep's metric sums (accumulated in the same pass) equal a run at each threshold, and every
  threshold shares the one compiled step (the threshold is a traced input)."""
  config, mesh, evaluator, state = setup
  assert evaluator.sweep == (0.3, 0.4, 0.5, 0.6, 0.7)
  main = evaluator.run(state, 'val', threshold=0.5)
  assert main['threshold'] == 0.5 and set(main['threshold_sweep']) == {'0.3', '0.4', '0.5', '0.6', '0.7'}
  for t in (0.3, 0.5, 0.7):
    alone = evaluator.run(state, 'val', threshold=t)
    for k in ('mIoU', 'F'):
      assert main['threshold_sweep'][f'{t:g}'][k] == alone[k], (t, k)
  # A threshold of 0 labels every pixel, 1.01 none: the sweep's ends must differ from each other.
  assert main['threshold_sweep']['0.3'] != main['threshold_sweep']['0.7'] or main['mIoU'] == 0.0
  assert evaluator._step(False)._cache_size() == 1


def test_threshold_parsing_and_picking(tmp_path):
  from qdformer_jax.evaluation import evals
  c = tiny_config(str(tmp_path))
  assert evals.parse_threshold(c) == 0.5
  c.eval.threshold = 'val'
  assert evals.parse_threshold(c) == 'val'
  for bad in ('bets', '1.5'):
    c.eval.threshold = bad
    with pytest.raises(ValueError, match="number in \\[0, 1\\] or 'val'"):
      evals.parse_threshold(c)
  c.eval.update(threshold='val', thresholds=())
  with pytest.raises(ValueError, match='thresholds, which is empty'):
    evals.parse_threshold(c)
  sweep = {'0.3': {'mIoU': 0.2}, '0.5': {'mIoU': 0.4}, '0.6': {'mIoU': 0.4}, '0.7': {'mIoU': float('nan')}}
  assert evals.pick_threshold({'threshold_sweep': sweep}, 'mIoU') == 0.5  # ties: the lower threshold
  with pytest.raises(ValueError, match='no finite'):
    evals.pick_threshold({'threshold_sweep': {'0.5': {'mIoU': float('nan')}}}, 'mIoU')


def test_threshold_picked_on_val_is_applied_to_test_and_reported(setup, tmp_path):
  from qdformer_jax.evaluation import evals
  config, mesh, evaluator, state = setup
  config = config.copy_and_resolve_references()
  config.eval.threshold = 'val'
  config.evals = {'test': {'kind': 'segmentation', 'split': 'test'}}
  evaluations = evals.Evaluations(config, mesh, None, str(tmp_path))
  evaluations.evaluator = evaluator  # the module's, already compiled
  out = evaluations.run(state, 7)
  val = evaluator.run(state, 'val', threshold=0.5)
  picked = evals.pick_threshold(val, config.best_metric)
  assert out['test']['threshold'] == picked
  report = json.load(open(tmp_path / 'reports' / 'eval_test_7.json'))
  assert report['metrics']['threshold'] == picked
  assert report['metrics']['threshold_source'].startswith('picked on val (step 7) by mIoU')
  assert not (tmp_path / 'reports' / 'eval_val_7.json').exists()  # val only served to pick it


def test_shuffled_audio_evaluation_changes_what_the_model_hears(setup):
  """The audio-use check feeds each clip another clip's audio: a model whose output depends on the
  audio (random weights do) scores differently; the frames, masks and threshold are the same."""
  config, mesh, evaluator, state = setup
  plain = evaluator.run(state, 'val', threshold=0.3)
  shuffled = evaluator.run(state, 'val', threshold=0.3, shuffle_audio=True)
  assert shuffled['shuffle_audio'] and not plain['shuffle_audio']
  scores = lambda r: [r['threshold_sweep'][t]['mIoU'] for t in sorted(r['threshold_sweep'])]  # noqa: E731
  assert scores(plain) != scores(shuffled)


def test_eval_results_carry_the_bottleneck_diagnostics(setup):
  """Every evaluation of a decomposing model reports what its per-frame tokens and codes say about
  the frame's sounding classes (evaluation/bottleneck.py), with values in their ranges."""
  config, mesh, evaluator, state = setup
  results = evaluator.run(state, 'val', threshold=0.5)
  diag = results['bottleneck']
  assert set(diag) == {'probe_r2_tokens', 'probe_r2_codes', 'slot_perplexity', 'code_class_mi',
                       'code_class_mi_heldout'}
  assert 1.0 <= diag['slot_perplexity'] <= config.model.codebook_size
  assert np.isnan(diag['code_class_mi']) or 0.0 <= diag['code_class_mi'] <= 1.0 + 1e-9
  assert np.isnan(diag['code_class_mi_heldout']) or diag['code_class_mi_heldout'] <= 1.0 + 1e-9


def test_train_log_lines_are_appended_and_read_back(tmp_path):
  reports.append_train_log(str(tmp_path), 2, {'loss': 3.5, 'codebook_restarts': 0.5})
  reports.append_train_log(str(tmp_path), 4, {'loss': 2.5})
  reports.append_train_log(str(tmp_path), 4, {'loss': 2.0})   # after a resume: the later line wins
  assert reports.read_train_log(str(tmp_path)) == {2: {'loss': 3.5, 'codebook_restarts': 0.5}, 4: {'loss': 2.0}}
  assert reports.read_train_log(str(tmp_path / 'none')) == {}
