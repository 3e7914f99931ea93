"""Task configs (configs/s4.py, ms3.py, avss.py): the paper recipe, the ':' arguments, models that
build (under ``nnx.eval_shape``, no compute), the main.py flag syntax, and one end-to-end ':smoke'
training run of AVSS on the fake AVSBench release (tfds_builders/fixtures.py)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from configs import avss, ms3, s4
from qdformer_jax.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = {'s4': s4, 'ms3': ms3, 'avss': avss}
ARGS = ('', 'smoke', 'swin_t', 'smoke,swin_t', 'literal', 'smoke,literal', 'pvt_v2_b5,ast', 'smoke,pvt_v2_b0,ast')

# docs/DESIGN.md §4-6 and the AVSBench releases.
RECIPES = {
    's4': dict(name='avs_object', builder_config='s4', num_frames=5, binary=True, num_classes=1,
               epochs=13, drops=(11,), best='J', resize='warp'),
    'ms3': dict(name='avs_object', builder_config='ms3', num_frames=5, binary=True, num_classes=1,
                epochs=13, drops=(11,), best='J', resize='warp'),
    'avss': dict(name='avs_semantic', builder_config='all', num_frames=10, binary=False, num_classes=70,
                 epochs=16, drops=(14,), best='mIoU', resize='short_side_crop'),
}


@pytest.mark.parametrize('arg', ARGS)
@pytest.mark.parametrize('task', list(TASKS))
def test_config_loads_with_the_paper_recipe(task, arg):
  c = TASKS[task].get_config(arg)
  r = RECIPES[task]
  assert c.name == task
  assert (c.data.name, c.data.builder_config, c.data.num_frames, c.data.binary, c.data.num_classes) == (
      r['name'], r['builder_config'], r['num_frames'], r['binary'], r['num_classes'])
  assert c.data.train_resize == r['resize']
  assert c.best_metric == r['best']
  assert (c.num_epochs, tuple(c.lr_drop_epochs)) == (r['epochs'], r['drops'])
  assert c.data.data_dir is None  # the user's: --config.data.data_dir=...
  smoke = 'smoke' in arg
  if smoke:
    assert c.total_steps > 0 and c.model.hidden_dim < 64 and c.data.image_size < 224
    assert 0 < c.eval_every <= c.total_steps and c.checkpoint_every <= c.total_steps
  else:
    # Paper sizes (docs/DESIGN.md §1, §6).
    assert c.total_steps == 0 and c.data.image_size == 224 and c.batch_size == 4
    assert (c.model.hidden_dim, c.model.num_queries, c.model.codebook_size) == (256, 5, 128)
    assert (c.optim.learning_rate, c.optim.backbone_lr_mult, c.optim.weight_decay) == (1e-4, 0.5, 5e-4)
    assert c.model.audio.encoder == ('ast' if 'ast' in arg else 'vggish')
  assert c.data.audio_encoder == c.model.audio.encoder  # the pipeline's front end follows the encoder
  named = [b for b in ('swin_t', 'pvt_v2_b5', 'pvt_v2_b0') if b in arg]
  expected_backbone = named[0] if named else ('resnet18' if smoke else 'resnet50')
  assert c.model.backbone.name == expected_backbone
  # The codebook recipe: cosine codebook + restarts + Eq. 9 averaged over d + the continuous warm-up,
  # without the commitment term, unless ':literal' (the paper's Eq. 9 with λ_com = 0.25, no warm-up).
  recipe = (c.model.vq_normalize, c.model.vq_restart_dead, c.loss.quant_reduction, c.model.vq_warmup_fraction,
            c.loss.commit_weight)
  assert recipe == ((False, False, 'sum', 0.0, 0.25) if 'literal' in arg else (True, True, 'mean', 0.25, 0.0))
  assert (c.loss.focal_alpha, c.loss.focal_gamma) == (0.25, 2.0)  # the paper's class loss either way


@pytest.mark.parametrize('arg', ['smok', 'smoke,resnet50,swin_t', 'vit'])
def test_bad_config_argument_raises(arg):
  with pytest.raises(ValueError, match='config argument'):
    avss.get_config(arg)


@pytest.mark.slow  # compiles and runs a train step end to end: not in the quick command
def test_main_py_command_line(tmp_path):
  """The docstring command runs as written: main.py parses `configs/avss.py:smoke,swin_t` and the
  `--config.*` overrides, and the job stops at the first thing it needs, the unbuilt dataset."""
  data_dir = tmp_path / 'not_built'
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config', 'configs/avss.py:smoke,swin_t', '--workdir', str(tmp_path / 'w'),
       f'--config.data.data_dir={data_dir}', '--config.model.dtype=bfloat16'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert f"avs_semantic/all is not built under '{data_dir}'" in proc.stderr
  saved = json.load(open(tmp_path / 'w' / 'config.json'))
  assert saved['model']['backbone']['name'] == 'swin_t' and saved['model']['dtype'] == 'bfloat16'
  assert saved['data']['data_dir'] == str(data_dir)


def test_mesh_fsdp_is_overridable_on_the_command_line(tmp_path):
  """`mesh_fsdp` is declared in configs/base.py, so the locked config accepts --config.mesh_fsdp and
  the value reaches train.make_mesh (3 divides neither 1 nor 8 devices: the mesh check fails)."""
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config', 'configs/synthetic.py:smoke', '--workdir', str(tmp_path / 'w'),
       '--config.mesh_fsdp=3'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert 'mesh_fsdp=3 does not divide the' in proc.stderr, proc.stderr[-2000:]
  assert json.load(open(tmp_path / 'w' / 'config.json'))['mesh_fsdp'] == 3


def param_count(config) -> tuple[int, nnx.Module]:
  model = nnx.eval_shape(lambda: build_model(config, 0))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))), model


# Tracing a paper-sized model costs ~10 s: the ResNet-50 one is traced (and counted module by
# module) in tests/test_model.py, the Swin-T one here, the PVT-v2-B5 one in tests/test_backbones.py; S4 and MS3 build the same model as AVSS but
# for the class head (test_object_models_equal_avss_model). Every smoke model is built.
BUILDS = [('avss', 'swin_t')] + [(t, 'smoke') for t in TASKS] + [('s4', 'smoke,swin_t'), ('ms3', 'smoke,pvt_v2_b0,ast')]


@pytest.mark.parametrize('task,arg', BUILDS)
def test_config_builds_under_eval_shape(task, arg):
  c = TASKS[task].get_config(arg)
  count, model = param_count(c)
  assert model.class_head.layers[-1].out_features == c.data.num_classes
  if arg == 'swin_t':
    # Official Swin-T (28,288,354) without its classifier (769,000) and final LayerNorm (1,536), with
    # the detection variant's LayerNorm on each of the 4 outputs (2 x (96 + 192 + 384 + 768)).
    assert type(model.backbone).__name__ == 'SwinTransformer'
    backbone = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model.backbone, nnx.Param)))
    assert backbone == 28_288_354 - 769_000 - 1_536 + 2 * (96 + 192 + 384 + 768)
    assert count > 120_000_000
  else:
    assert count < 1_000_000  # smoke


def test_object_models_equal_avss_model():
  reference = avss.get_config().model.to_dict()
  for task in ('s4', 'ms3'):
    assert TASKS[task].get_config().model.to_dict() == reference, task
    assert TASKS[task].get_config('swin_t').model.to_dict() == avss.get_config('swin_t').model.to_dict()


@pytest.fixture(scope='module')
def fixture_data(tmp_path_factory):
  """The fake release (python -m tfds_builders.fixtures) built by the three AVSBench builders."""
  from tfds_builders.avs_object import AvsObject
  from tfds_builders.avs_semantic import AvsSemantic
  from tfds_builders.fixtures import write_fixtures
  root = tmp_path_factory.mktemp('fixtures')
  raw = write_fixtures(root / 'raw')
  data_dir = str(root / 'tfds')
  AvsSemantic(config='all', data_dir=data_dir, file_format='array_record',
              raw_dir=str(raw['avs_semantic'])).download_and_prepare()
  for config in ('s4', 'ms3'):
    AvsObject(config=config, data_dir=data_dir, file_format='array_record',
              raw_dir=str(raw['avs_object'])).download_and_prepare()
  return data_dir


# (task, dataset name in the report, metric checked, clips in the fixture's val split)
SMOKE_RUNS = [('avss', 'avs_semantic/all', 'mIoU', 3), ('s4', 'avs_object/s4', 'J', None),
              ('ms3', 'avs_object/ms3', 'J', None)]


@pytest.mark.slow  # compiles and runs a train step end to end: not in the quick command
@pytest.mark.parametrize('task,dataset,metric,val_clips', SMOKE_RUNS)
def test_smoke_run_on_fixtures_writes_report(task, dataset, metric, val_clips, fixture_data, tmp_path):
  """configs/<task>.py:smoke on the fixtures: one train step, a checkpoint and an eval report."""
  from qdformer_jax.training import train
  c = TASKS[task].get_config('smoke')
  c.data.data_dir = fixture_data
  c.total_steps = 1
  c.lr_drop_steps = ()
  c.eval_every = c.checkpoint_every = c.log_every = 1
  workdir = str(tmp_path / 'run')
  # Threefry partitionable draws of 4-D shapes take 10-20 s each to compile on XLA:CPU; the init
  # values do not matter to this test.
  with jax.threefry_partitionable(False):
    results = train.train_and_evaluate(c, workdir)
  report = json.load(open(os.path.join(workdir, 'reports', 'eval_val_latest.json')))
  assert report['config'] == task and report['dataset'] == dataset and report['step'] == 1
  if val_clips is not None:
    assert report['metrics']['num_clips'] == val_clips
  assert report['metrics']['num_clips'] > 0
  assert 0.0 <= report['metrics'][metric] <= 1.0
  assert results[metric] == report['metrics'][metric]
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['1']


def test_binary_eval_batch_must_hold_whole_official_batches():
  """The AVSBench F per-batch mode groups eval.official_batch_clips clips: an eval batch that is not
  a multiple of it fails when the Evaluator is made (before training), naming both fields; every
  ':smoke' config of a binary task has a valid one (it used to fail at its first evaluation)."""
  from configs import synthetic
  from qdformer_jax.evaluation import evaluator as evaluator_lib
  for config in (s4.get_config('smoke'), ms3.get_config('smoke'), synthetic.get_config('smoke,single')):
    assert config.data.binary
    assert config.eval_batch_size % config.eval.official_batch_clips == 0
    evaluator_lib.Evaluator(config, None, None)
  config = s4.get_config('smoke')
  config.eval_batch_size = 2
  with pytest.raises(ValueError, match=r'eval_batch_size=2 .*official_batch_clips=4'):
    evaluator_lib.Evaluator(config, None, None)
