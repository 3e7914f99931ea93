"""The ablation runner (qdformer_jax/experiments/ablation.py): runs, tables, resumes; and the
reproducibility it relies on: the same seed gives bitwise equal parameters."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from qdformer_jax.experiments import ablation

slow = pytest.mark.slow  # end-to-end runs: not in `pytest -m "not slow"` (CI runs them)


@slow
def test_runner_writes_tables_and_does_not_redo_finished_runs(tmp_path):
  out = tmp_path / 'abl'
  argv = ['--out', str(out), '--config', 'configs/synthetic.py:smoke', '--variants', 'full,baseline',
          '--seeds', '0', '--steps', '2', '--snrs', '10,0', '--data_dir', str(tmp_path / 'tfds')]
  assert ablation.main(argv) == 0
  results = json.load(open(out / 'results.json'))
  assert [(r['variant'], r['seed'], r['steps']) for r in results['runs']] == [('full', 0, 2), ('baseline', 0, 2)]
  for r in results['runs']:
    assert 0.0 <= r['test'] <= 1.0 and set(r['noise']) == {'clean', '10', '0'}
    assert r['noise']['clean'] == r['test']  # the sweep's clean row is the plain test evaluation
    negative = r['negative_audio']
    assert all(0.0 <= negative[f'fpr_{k}'] <= 1.0 for k in ('silence', 'noise', 'offscreen'))
    assert r['negative_fraction'] == 0.0
    assert 'stored_fpr_silence' not in negative  # the smoke config builds no stored negative clips
  table = (out / 'results.md').read_text()
  assert ('| variant | foreground, own audio | FPR silence | FPR noise | FPR off-screen | G-mIoU | G-F | '
          'stored silent clips: FPR | stored noise-only: FPR | stored off-screen-only: FPR |') in table
  assert '| full | row 6: + LC (full) |' in table and '| baseline | row 1: no decomposition |' in table
  assert (out / 'results.png').stat().st_size > 0
  # Rerun: finished runs are read back, not trained again (their checkpoints are untouched).
  ckpt = out / 'runs' / 'full' / 'seed0' / 'checkpoints'
  before = {p: os.path.getmtime(ckpt / p) for p in os.listdir(ckpt)}
  assert ablation.main(argv) == 0
  assert {p: os.path.getmtime(ckpt / p) for p in os.listdir(ckpt)} == before
  again = json.load(open(out / 'results.json'))
  assert [r['test'] for r in again['runs']] == [r['test'] for r in results['runs']]
  # --reevaluate: the final checkpoints are evaluated again (reports rewritten), nothing is trained.
  report = out / 'runs' / 'full' / 'seed0' / 'reports' / 'negative_audio_test_2.json'
  stamp = os.path.getmtime(report)
  assert ablation.main(argv[:4] + ['--variants', 'full'] + argv[6:] + ['--reevaluate']) == 0
  assert os.path.getmtime(report) != stamp
  assert {p: os.path.getmtime(ckpt / p) for p in os.listdir(ckpt)} == before
  assert json.load(open(out / 'results.json'))['runs'][0]['test'] == results['runs'][0]['test']
  # --reevaluate test: only the plain test report (where the bottleneck's diagnostics are) is rewritten.
  test_report = out / 'runs' / 'full' / 'seed0' / 'reports' / 'eval_test_2.json'
  stamps = os.path.getmtime(report), os.path.getmtime(test_report)
  assert ablation.main(argv[:4] + ['--variants', 'full'] + argv[6:] + ['--reevaluate', 'test']) == 0
  assert os.path.getmtime(report) == stamps[0] and os.path.getmtime(test_report) != stamps[1]
  assert '| code MI held out | probe codes | probe tokens | restarts / 100 steps | quant. error global | quant. error local |' in (out / 'results.md').read_text()
  assert 'code_class_mi_heldout' in json.load(open(out / 'results.json'))['runs'][0]['bottleneck']


def test_variants_name_real_config_fields():
  base = ablation.load_config('configs/synthetic.py:smoke')
  for name in ablation.VARIANTS:
    config = ablation.run_config(base, name, 1, 10, '/tmp/x')
    assert config.seed == 1 and config.total_steps == 10 and config.lr_drop_steps == (8,)
  literal = ablation.run_config(base, 'literal', 0, 0, '/tmp/x')
  assert (literal.model.vq_normalize, literal.loss.quant_reduction, literal.loss.focal_gamma) == (False, 'sum', 2.0)
  assert (literal.loss.commit_weight, literal.model.vq_warmup_fraction) == (0.25, 0.0)  # the paper's Eq. 9, no warm-up


# (K, λ_com, warm-up fraction) of the model each pinned variant was measured as (README tables).
PINNED = {
    'no_warmup': (32, 0.25, 0.0), 'codebook_128': (128, 0.25, 0.0), 'plain_codebook': (32, 0.25, 0.0),
    'eq9_sum': (32, 0.25, 0.0), 'focal': (32, 0.25, 0.0), 'literal': (32, 0.25, 0.0), 'rotation': (32, 0.25, 0.0),
    'ema': (32, 0.25, 0.0), 'slot_entropy': (32, 0.25, 0.0), 'audio_tokens': (32, 0.25, 0.0),
    'token_pos': (32, 0.25, 0.0), 'warmup_kmeans': (32, 0.25, 0.25), 'warmup_token_pos': (32, 0.25, 0.25),
    'warmup_ema': (32, 0.25, 0.25), 'warmup_rotation': (32, 0.25, 0.25), 'warmup_no_commit': (32, 0.0, 0.25),
    'warmup_commit_005': (32, 0.05, 0.25), 'warmup_128': (128, 0.25, 0.25), 'warmup_no_commit_128': (128, 0.0, 0.25),
    'warmup_no_commit_256': (256, 0.0, 0.25)}


@pytest.mark.parametrize('recipe', ['shipped', 'before_warmup', 'warmup_32'])
def test_pinned_variants_name_the_same_model_whatever_the_recipe(recipe):
  base = ablation.base_config('configs/synthetic.py:semantic_hard', recipe)
  for name, want in PINNED.items():
    c = ablation.run_config(base, name, 0, 0, '/tmp/x')
    assert (c.model.codebook_size, c.loss.commit_weight, c.model.vq_warmup_fraction, c.model.vq_warmup_steps) == \
        (*want, 0), name
  # `full` follows the recipe: the shipped one (warm-up, K = 128, no commitment term) or an earlier one.
  full = ablation.run_config(base, 'full', 0, 0, '/tmp/x')
  assert (full.model.codebook_size, full.loss.commit_weight, full.model.vq_warmup_fraction) == {
      'shipped': (128, 0.0, 0.25), 'before_warmup': (32, 0.25, 0.0), 'warmup_32': (32, 0.25, 0.25)}[recipe]
  assert ablation.base_config('configs/synthetic.py', recipe, 0.1).data.negative_fraction == 0.1


def _finished_run(tmp_path, base, variant, changes=None, steps=10):
  """A run dir that looks finished (its config.json and its last report), trained with ``changes``."""
  from qdformer_jax.training import resume, startup
  config = ablation.run_config(base, variant, 0, steps, str(tmp_path / 'tfds'))
  for field, value in (changes or {}).items():
    ablation.set_field(config, field, value)
  workdir = ablation.run_dir(str(tmp_path / 'out'), variant, 0)
  os.makedirs(workdir)
  resume.write_run_config(startup.resolved_config(config), workdir)
  done = ablation.done_report(workdir, config, 'test')
  os.makedirs(os.path.dirname(done), exist_ok=True)
  open(done, 'w').write('{}')
  return workdir


def test_a_finished_run_of_another_config_is_refused(tmp_path):
  """A run directory whose config.json differs from what its variant resolves to now (the shipped
  recipe changed since) is refused, naming the fields; one of the same config is accepted; a
  continuous run ignores the quantizer's fields, which do not change its model."""
  base = ablation.load_config('configs/synthetic.py:smoke')
  config = lambda variant: ablation.run_config(base, variant, 0, 10, str(tmp_path / 'tfds'))  # noqa: E731
  old_recipe = {'loss.commit_weight': 0.25, 'model.codebook_size': 32}
  cases = [('full', None, None), ('warmup_kmeans', None, None), ('baseline', None, None),
           ('full', old_recipe, r"finished run of 'full'.*loss\.commit_weight: run 0\.25, variant 0\.0"),
           ('no_quant', old_recipe, None), ('no_quant', {'model.hidden_dim': 48}, r'model\.hidden_dim: run 48'),
           ('no_quant', {'model.quantizer': 'fsq'}, r'model\.quantizer: run "fsq"')]
  for i, (variant, changes, error) in enumerate(cases):
    workdir = _finished_run(tmp_path / str(i), base, variant, changes)
    if error:
      with pytest.raises(ValueError, match=error):
        ablation.check_finished_run(workdir, variant, config(variant))
    else:
      ablation.check_finished_run(workdir, variant, config(variant))
  # Evaluating such a continuous run again builds its model with the codebook it was trained with (the
  # checkpoint holds that shape); a quantized run is evaluated with its variant's config as it is.
  workdir = _finished_run(tmp_path / 'again', base, 'no_quant', old_recipe)
  trained = ablation.as_trained(config('no_quant'), workdir)
  assert (trained.model.codebook_size, trained.loss.commit_weight) == (32, 0.25)
  assert config('no_quant').model.codebook_size != 32
  assert ablation.as_trained(config('full'), _finished_run(tmp_path / 'q', base, 'full', None)).model.codebook_size \
      == config('full').model.codebook_size


def test_the_runner_refuses_a_stale_run_before_training_anything(tmp_path, monkeypatch, capsys):
  """`full` trained with the recipe shipped before: the command stops at once with one line naming
  the run and the fields, and trains nothing (not even the variants listed before it)."""
  base = ablation.load_config('configs/synthetic.py:smoke')
  _finished_run(tmp_path, base, 'full', {'loss.commit_weight': 0.25, 'model.codebook_size': 32})
  trained = []
  monkeypatch.setattr(ablation.train, 'train_and_evaluate', lambda config, workdir: trained.append(workdir))
  argv = ['--out', str(tmp_path / 'out'), '--config', 'configs/synthetic.py:smoke', '--variants', 'baseline,full',
          '--seeds', '0', '--steps', '10', '--data_dir', str(tmp_path / 'tfds')]
  with pytest.raises(SystemExit) as exit_:
    ablation.main(argv)
  assert exit_.value.code == 2 and trained == []
  err = capsys.readouterr().err
  assert "finished run of 'full'" in err and 'model.codebook_size: run 32, variant' in err and '--recipe' in err


def test_an_unknown_evaluation_to_redo_is_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    ablation.main(['--out', str(tmp_path / 'out'), '--config', 'configs/synthetic.py:smoke', '--reevaluate', 'tset'])
  assert exit_.value.code == 2
  assert "--reevaluate tset: unknown ['tset']; known: test,audio_use,noise,negative_audio" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_:
    ablation.main(['--out', str(tmp_path / 'out'), '--config', 'configs/synthetic.py:smoke', '--reevaluate='])
  assert exit_.value.code == 2 and '--reevaluate: name the evaluations to redo' in capsys.readouterr().err


@slow
def test_same_seed_gives_bitwise_equal_parameters(tmp_path):
  """Two runs of the same config and seed end with bitwise equal parameters (what makes the
  ablation's comparisons and the README's figures reproducible)."""
  import jax
  from flax import nnx

  from configs import synthetic
  from qdformer_jax import sharding
  from qdformer_jax.data import pipeline
  from qdformer_jax.training import state as state_lib
  from qdformer_jax.training import step as step_lib
  config = synthetic.get_config('smoke')
  config.data.data_dir = str(tmp_path / 'tfds')
  mesh = sharding.make_mesh(config)
  finals = []
  for _ in range(2):
    graphdef, state, abstract = state_lib.create_train_state(config, mesh, (5,))
    step = step_lib.make_train_step(graphdef, config, jax.tree.map(lambda x: x.sharding, abstract), mesh)
    it = pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed)
    for _ in range(3):
      state, _ = step(state, pipeline.to_global(pipeline.device_batch(next(it)), mesh))
    finals.append(jax.tree.leaves(jax.device_get(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param))))
  assert len(finals[0]) > 10
  for a, b in zip(*finals):
    np.testing.assert_array_equal(a, b)
