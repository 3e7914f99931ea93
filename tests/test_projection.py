"""benchmarks/projection.py: the epoch-time arithmetic, and the lowered step's FLOPs against the compiled one's."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import projection  # noqa: E402


def test_projection_arithmetic():
  flops = {'s4': {'batch': 4, 'clip_flops': 2.0e12}, 'avss': {'batch': 4, 'clip_flops': 5.0e12}}
  rates = {'avs_object/s4': 10.0, 'avs_semantic/all': 4.0}
  rows = {(r['task'], r['hardware']): r for r in projection.project(flops, rates, mfu=0.5)}
  assert len(rows) == 2 * len(projection.HARDWARE)
  one = rows[('s4', 'TPU v5e, 1 chip')]
  assert one['clips_per_s'] == pytest.approx(197e12 * 0.5 / 2.0e12)
  assert one['epoch_seconds'] == pytest.approx(3452 * 2.0e12 / (197e12 * 0.5))
  assert one['steps_per_s'] == pytest.approx(one['clips_per_s'] / 4)
  slice8 = rows[('s4', 'TPU v5e-8 slice')]
  assert slice8['epoch_seconds'] == pytest.approx(one['epoch_seconds'] / 8)
  # one host drives all 8 chips: it must feed 8x the clips, from the same per-core decode rate
  assert slice8['cores_needed_per_host'] == pytest.approx(8 * one['cores_needed_per_host'])
  avss = rows[('avss', 'H100 SXM, 1 GPU')]
  assert avss['epoch_seconds'] == pytest.approx(8498 * 5.0e12 / (989e12 * 0.5))
  assert avss['cores_needed_per_host'] == pytest.approx(avss['clips_per_s'] / 4.0)
  # An 'ast' task's pipeline also computes the filterbanks: 0.25 s per clip on top of 1 / 4 clips/s.
  flops = {'avss_ast': {'batch': 4, 'clip_flops': 5.0e12}}
  row = projection.project(flops, rates, mfu=0.5, ast_seconds={'avss_ast': 0.25})[0]
  assert row['pipeline_clips_per_s_per_core'] == pytest.approx(2.0)
  assert row['cores_needed_per_host'] == pytest.approx(row['clips_per_s'] / 2.0)


@pytest.mark.slow  # compiles the full paper-sized train step
def test_lowered_step_flops_match_the_compiled_step():
  """The script counts the lowered program (no compile of the paper-sized step); on the tiny config
  the compiled program's count agrees (XLA's fusions do not change the arithmetic)."""
  import jax

  from benchmarks.model_cost import load_config
  from qdformer_jax import sharding
  from qdformer_jax.data import pipeline
  from qdformer_jax.training import state as state_lib
  from qdformer_jax.training import step as step_lib

  spec = 'configs/synthetic.py:smoke'
  measured = projection.step_flops(spec)
  config = load_config(spec)
  config.model.dtype = config.model.backbone.dtype = 'bfloat16'
  mesh = sharding.make_mesh(config)
  graphdef, abstract_state = state_lib.abstract_train_state(config, mesh, ())
  step = step_lib.make_train_step(graphdef, config, jax.tree.map(lambda x: x.sharding, abstract_state), mesh)
  compiled = step.lower(abstract_state, pipeline.batch_spec(config.data, config.batch_size, mesh)).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  assert measured['batch'] == config.batch_size
  assert measured['clip_flops'] * measured['batch'] == pytest.approx(measured['step_flops'])
  assert measured['step_flops'] == pytest.approx(float(analysis['flops']), rel=0.15)
