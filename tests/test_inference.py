"""qdformer_jax.inference: restore a workdir's model on this device and predict like the evaluator.

The workdir is written by the training code's own writers (``config.json`` as train_and_evaluate
writes it, ``Checkpoints.save`` of the NNX state of ``(model, optimizer)``) in a
process with 2 devices, parameters split over an fsdp mesh axis, and restored here on one device. It
holds two distinguishable weight sets: B at step 1 (evaluated: the best), A at step 2 (the latest). The
weights are drawn in NumPy on the abstract state instead of running two train steps: compiling the
model's initialiser and train step costs minutes on this shared 2-core machine, and a restore that
is checked leaf by leaf against the saved arrays is a stronger test than one against trained weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from qdformer_jax import inference, sharding, testing
from qdformer_jax.data import audio as audio_lib
from qdformer_jax.data import synthetic as synthetic_data
from qdformer_jax.data import transforms
from qdformer_jax.evaluation import postprocess
from qdformer_jax.models import build_model
from qdformer_jax.training import optim
from qdformer_jax.training.checkpoint import Checkpoints

SIZE, FRAMES = 32, 3


def tiny_config():
  # Inference never reads the dataset.
  return testing.tiny_synthetic_config('/nonexistent/tfds', image_size=SIZE, num_frames=FRAMES, clips=None,
                                       overrides={'model.dec_layers': 1})


def fill(abstract_state, seed: int):
  """Concrete values for an abstract NNX state: scaled normal weights, positive variances, 1-ish
  scales, random PRNG keys, zero optimizer moments."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    names = [str(getattr(p, 'key', '')) for p in path]
    name = next((n for n in reversed(names) if n), '')
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(rng.integers(0, 2 ** 32, x.shape + (2,), dtype=np.uint32))
    if names[0] != '0' or not jnp.issubdtype(x.dtype, jnp.floating):
      return jnp.asarray(np.zeros(x.shape, x.dtype))           # optimizer state, counters
    if 'var' in name:
      value = rng.uniform(0.5, 1.5, x.shape)
    elif name in ('codebook', 'prototypes'):  # spread out, so that slots take different codewords
      value = rng.standard_normal(x.shape)
    elif x.ndim <= 1 and name in ('scale', 'weight'):
      value = 1.0 + 0.1 * rng.standard_normal(x.shape)
    elif x.ndim <= 1:
      value = 0.3 * rng.standard_normal(x.shape)
    else:
      value = rng.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[:-1]))
    return jnp.asarray(value.astype(x.dtype))

  return jax.tree_util.tree_map_with_path(leaf, abstract_state)


def model_leaves(state) -> dict:
  """{path: array} of a model state (nnx.State of the model alone), keys as raw key data."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jax.tree_util.keystr(p): np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x) for p, x in flat}


def write_workdir(workdir: str, fsdp: int) -> None:
  """Writes a workdir as training leaves it, its state sharded over a (data, fsdp) mesh of all devices
  (params split over 'fsdp' as train.param_sharding does): B at step 1 (best), A at step 2 (latest);
  plus model_<k>.npz with the model's arrays for the test to compare against."""
  config = tiny_config().copy_and_resolve_references()
  with open(os.path.join(workdir, 'config.json'), 'w') as f:  # as train_and_evaluate writes it
    f.write(config.to_json_best_effort(indent=2))

  def model_and_optimizer():
    model = build_model(config, config.seed)
    return model, optim.make_optimizer(model, config.optim, (1,))

  graphdef, abstract = nnx.split(nnx.eval_shape(model_and_optimizer))
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'mesh_fsdp': fsdp}))
  shardings = jax.tree.map(lambda x: sharding.param_sharding(mesh, x), abstract)
  states = {k: jax.device_put(fill(abstract, seed), shardings) for k, seed in (('B', 1), ('A', 2))}
  ckpt = Checkpoints(workdir, keep=3, best_metric=config.best_metric)
  ckpt.save(1, states['B'], None, {'step': 1, 'config': config.name}, metrics={'mIoU': 0.5})
  ckpt.save(2, states['A'], None, {'step': 2, 'config': config.name})
  ckpt.wait()
  ckpt.close()
  for k, state in states.items():
    model, _ = nnx.merge(graphdef, state)
    np.savez(os.path.join(workdir, f'model_{k}.npz'), **model_leaves(nnx.state(model)))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """The workdir, saved by a process with 2 (fake CPU) devices, and the models A and B in memory."""
  workdir = str(tmp_path_factory.mktemp('run'))
  tests = os.path.dirname(os.path.abspath(__file__))
  code = (f'import sys; sys.path[:0] = {[os.path.dirname(tests), tests]!r}; import test_inference; '
          f'test_inference.write_workdir({workdir!r}, fsdp=2)')
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip())
  done = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  config = tiny_config().copy_and_resolve_references()
  graphdef, abstract = inference.abstract_model(config)  # nnx.eval_shape of build_model(config)

  def model(k):
    with np.load(os.path.join(workdir, f'model_{k}.npz')) as arrays:
      return graphdef, jax.tree_util.tree_map_with_path(
          lambda p, x: jax.random.wrap_key_data(arrays[jax.tree_util.keystr(p)])
          if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else jnp.asarray(arrays[jax.tree_util.keystr(p)]),
          abstract)

  return {'workdir': workdir, 'config': config, 'models': {k: model(k) for k in 'AB'}}


@pytest.fixture(scope='module')
def best(run):
  return inference.load(run['workdir'])


def assert_same_weights(predictor, model):
  got, want = model_leaves(predictor.state), model_leaves(model[1])
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_config_round_trips(run):
  restored = inference.config_from_json(os.path.join(run['workdir'], 'config.json'))
  assert restored.to_dict() == run['config'].to_dict()
  assert restored.lr_drop_steps == (5,) and restored.eval.noise_snrs == ()
  assert restored.model.backbone.pretrained is None and restored.eval.split is None
  restored.model.backbone.pretrained = '/weights'  # an unset placeholder still accepts its value
  assert isinstance(restored, ml_collections.ConfigDict)


def test_load_picks_best_then_latest_then_step_dir(run, best):
  workdir, models = run['workdir'], run['models']
  assert best.step == 1 and best.checkpoint_dir.endswith(os.path.join('checkpoints', '1'))
  assert_same_weights(best, models['B'])
  assert best.class_names == ('background',) + synthetic_data.class_names(8)
  latest = inference.load(workdir, which='latest')
  assert latest.step == 2
  assert_same_weights(latest, models['A'])
  step_dir = inference.load(os.path.join(workdir, 'checkpoints', '2'))
  assert step_dir.step == 2
  assert_same_weights(step_dir, models['A'])
  located, step, _ = inference._locate(workdir, 2, None, None)
  assert (str(located), step) == (os.path.join(workdir, 'checkpoints', '2'), 2)
  located, step, _ = inference._locate(workdir, 1, None, None)
  assert (str(located), step) == (os.path.join(workdir, 'checkpoints', '1'), 1)
  # Saved from 2 devices with some parameters split over 'fsdp'; restored onto this one device.
  saved = ocp.PyTreeCheckpointer().metadata(os.path.join(workdir, 'checkpoints', '1', 'state')).item_metadata.tree
  specs = [str(m.sharding.partition_spec) for m in jax.tree.leaves(saved['0'])]
  assert any('fsdp' in p for p in specs), specs[:3]
  assert {str(m.sharding.shape) for m in jax.tree.leaves(saved['0'])} == {'[1 2]'}
  for leaf in jax.tree.leaves(latest.state):
    assert leaf.sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def test_load_errors(run, tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoints in'):
    inference.load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    inference.load(str(tmp_path / 'missing'))
  with pytest.raises(FileNotFoundError, match=r'step 7 not found.*checkpoints/: \[1, 2\]'):
    inference.load(run['workdir'], step=7)
  with pytest.raises(ValueError, match='which must be'):
    inference.load(run['workdir'], which='last')
  with pytest.raises(ValueError, match='step directory'):
    inference.load(os.path.join(run['workdir'], 'checkpoints', '1'), which='best')
  other = run['config'].copy_and_resolve_references()
  other.model.codebook_size = 8
  with pytest.raises(ValueError, match=r'quantizer.codebook stored shape \(16, 32\), requested \(8, 32\)'):
    inference.load(run['workdir'], config=other)


def np_resize_bilinear(x, height, width):
  """Half-pixel bilinear upsampling of the last two axes, edges clamped (NumPy transcription)."""
  for axis, out in ((-2, height), (-1, width)):
    n = x.shape[axis]
    src = np.clip((np.arange(out) + 0.5) * n / out - 0.5, 0, n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = src - lo
    shape = [1] * x.ndim
    shape[axis] = out
    x = np.take(x, lo, axis=axis) * (1 - w).reshape(shape) + np.take(x, hi, axis=axis) * w.reshape(shape)
  return x


def np_postprocess(raw, height, width, threshold, binary):
  """docs/DESIGN.md §3 in NumPy, written out per class (the [C,H,W] score volume the fast path avoids)."""
  sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
  masks = sig(np_resize_bilinear(raw['pred_masks'].astype(np.float64), height, width))  # [B,T,N,H,W]
  probs = sig(raw['pred_logits'].astype(np.float64))                                   # [B,T,N,C]
  if binary:
    prob = (probs[..., 0, None, None] * masks).max(axis=2)
    return {'probability': prob, 'mask': prob > threshold}
  score_c = (probs[..., None, None] * masks[:, :, :, None]).max(axis=2)               # [B,T,C,H,W]
  best = score_c.max(axis=2)
  return {'labels': np.where(best >= threshold, score_c.argmax(axis=2) + 1, 0), 'scores': best}


@pytest.mark.parametrize('binary', [False, True])
def test_postprocess_matches_evaluator_and_numpy(binary):
  rng = np.random.default_rng(0)
  c = 1 if binary else 6
  raw = {'pred_logits': rng.normal(0, 2, (2, 3, 4, c)).astype(np.float32),
         'pred_masks': rng.normal(0, 3, (2, 3, 4, 5, 5)).astype(np.float32)}
  post = jax.jit(postprocess.postprocess, static_argnames=('height', 'width', 'binary'))
  square = post(raw, 0.5, height=20, width=20, binary=binary)
  if binary:  # same operations; XLA may fuse them differently (1 ulp)
    want = jax.jit(postprocess.binary_probability, static_argnums=(1, 2))(raw, 20, 20)
    np.testing.assert_allclose(square['probability'], want, rtol=0, atol=3e-7)
  else:
    np.testing.assert_array_equal(square['labels'], jax.jit(postprocess.semantic_labels, static_argnums=(1, 2))(raw, 20, 20))
  for threshold in (0.5, 0.0):
    got = post(raw, threshold, height=13, width=22, binary=binary)
    want = np_postprocess(raw, 13, 22, threshold, binary)
    for k in want:
      assert got[k].shape == (2, 3, 13, 22)
      if k in ('probability', 'scores'):
        np.testing.assert_allclose(got[k], want[k], atol=2e-6)
      else:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    if not binary:
      assert len(np.unique(got['labels'])) > 2  # the comparison covers several classes


def test_predict_matches_model_and_evaluator(run, best):
  rng = np.random.default_rng(3)
  frames = rng.integers(0, 256, (FRAMES, 40, 48, 3), dtype=np.uint8)
  sr = 44100
  t = np.arange(int(2.5 * sr)) / sr  # 2 whole examples: the third repeats the last ('repeat')
  wave = (0.3 * np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 1250 * t)], 1)).astype(np.float32)

  # Inputs: the evaluator's frame warp and the dataset's wav -> log-mel path.
  model_frames, log_mel, valid = best.preprocess(frames, wave, sample_rate=sr)
  empty = np.zeros(frames.shape[:3], np.uint8)
  np.testing.assert_array_equal(model_frames[0], transforms.eval_transform(frames, empty, SIZE)[0])
  examples = audio_lib.waveform_to_log_mel(wave, sr)
  assert examples.shape[0] == 2
  np.testing.assert_array_equal(log_mel[0], audio_lib.pad_examples(examples, FRAMES, 'repeat'))
  assert valid.shape == (1, FRAMES) and valid.all()

  compiled = best._postprocess._cache_size()  # jit caches are shared by every jit of postprocess
  out = best.predict(frames, wave, sample_rate=sr, threshold=0.0, return_raw=True)
  assert out['labels'].shape == (1, FRAMES, 40, 48) and out['labels'].dtype == np.int32
  assert out['class_names'] == best.class_names

  # The model called directly with the weights that were saved (B).
  graphdef, state = run['models']['B']
  forward = jax.jit(lambda s, f, a: nnx.merge(graphdef, s)(f, a, train=False))
  ref = forward(state, model_frames, log_mel)
  for k in ('pred_logits', 'pred_boxes', 'pred_masks'):
    np.testing.assert_allclose(out['raw'][k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)
  assert out['raw']['global_indices'].shape == (1, run['config'].model.num_queries)

  # Post-processing at the input resolution against NumPy, at the model's size against the evaluator.
  want = np_postprocess(out['raw'], 40, 48, 0.0, binary=False)
  np.testing.assert_allclose(out['scores'], want['scores'], atol=2e-6)
  np.testing.assert_array_equal(out['labels'], want['labels'])
  # Not a constant map (the random weights may still put every pixel on one slot and class; the
  # slot/class logic itself is checked on random outputs by test_postprocess_matches_evaluator_and_numpy).
  assert np.ptp(out['scores']) > 1e-3
  labels = jax.jit(postprocess.semantic_labels, static_argnums=(1, 2))
  at_model = best.predict(model_frames[0], log_mel[0], threshold=0.0)  # log-mel input, S×S frames
  np.testing.assert_array_equal(at_model['labels'], labels(out['raw'], SIZE, SIZE, 0.0))
  default = best.predict(model_frames[0], log_mel[0])
  np.testing.assert_array_equal(default['labels'], labels(out['raw'], SIZE, SIZE, 0.5))

  # One model program for all of these calls (same B, T); one post-processing program per size.
  assert best._forward._cache_size() == 1
  assert best._postprocess._cache_size() == compiled + 2


def test_predict_input_errors(best):
  frames = np.zeros((FRAMES, 32, 32, 3), np.uint8)
  log_mel = np.zeros((FRAMES, 96, 64), np.float32)
  with pytest.raises(ValueError, match='frames must be uint8'):
    best.predict(frames.astype(np.float32), log_mel)
  with pytest.raises(ValueError, match=r'frames must be \[T,H,W,3\]'):
    best.predict(frames[..., :2], log_mel)
  with pytest.raises(ValueError, match='for a waveform pass sample_rate'):
    best.predict(frames, np.zeros(16000 * 3, np.float32))
  with pytest.raises(ValueError, match=r'log-mel \[3, 96, 64\]'):
    best.predict(frames, log_mel[:2])
  with pytest.raises(ValueError, match='shorter than one 0.96 s'):
    best.predict(frames, np.zeros(8000, np.float32), sample_rate=16000)
  with pytest.raises(ValueError, match='pass a list of 2 waveforms'):
    best.predict(np.stack([frames, frames]), np.zeros(16000 * 3, np.float32), sample_rate=16000)
  with pytest.raises(ValueError, match='frame_valid'):
    best.predict(frames, log_mel, frame_valid=np.ones(2, bool))



def test_predictor_audio_follows_the_audio_encoder():
  """A run with model.audio.encoder='ast' turns waveforms into AST filterbanks (one per second) and
  names that shape when given precomputed examples of another (no model needed: the input step only)."""
  from qdformer_jax import inference
  from qdformer_jax.data import audio
  predictor = inference.Predictor.__new__(inference.Predictor)
  predictor.audio_encoder, predictor.audio_pad = 'ast', 'repeat'
  wave = np.random.default_rng(0).standard_normal(2 * 16000) * 0.1
  got = predictor._clip_log_mel(wave, 3, 16000, -1)  # 2 s for 3 frames: the last second repeated
  expected = audio.waveform_to_ast_fbank(wave, 16000)
  np.testing.assert_array_equal(got, np.concatenate([expected, expected[-1:]]))
  with pytest.raises(ValueError, match=r'AST filterbanks \[3, 98, 128\]'):
    predictor._clip_log_mel(np.zeros((3, 96, 64), np.float32), 3, None, -1)

NOTEBOOK = os.path.join(os.path.dirname(__file__), '..', 'notebooks', 'colab_predict.ipynb')


def test_notebook_is_valid_json_and_python():
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  assert nb['nbformat'] == 4 and nb['cells']
  for cell in nb['cells']:
    assert cell['cell_type'] in ('markdown', 'code')
    assert isinstance(cell['source'], (str, list))
  code = '\n'.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code')
  assert 'inference.load(' in code and '.predict(' in code
  for cell in nb['cells']:  # every code cell is valid Python once IPython's ! / % lines are dropped
    if cell['cell_type'] == 'code':
      source = ''.join(cell['source'])
      compile('\n'.join(l for l in source.splitlines() if not l.lstrip().startswith(('!', '%'))), 'cell', 'exec')


def test_notebook_schema():
  nbformat = pytest.importorskip('nbformat')
  nbformat.validate(nbformat.read(NOTEBOOK, as_version=4))
