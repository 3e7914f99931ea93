"""One process, several devices (docs/DESIGN.md §7): the sharded train step and checkpoints do not depend
on the device count.

Each test runs its JAX work in a fresh subprocess (this file, run as a script) whose
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` is set before JAX starts, so the parent pytest
process never fixes its own device count.

One 8-device worker (a module fixture) serves both tests:

1. ``test_first_steps_agree_on_1_and_8_devices``: from one initial state and the same two batches,
   the train step on a 1-device mesh, an 8-device data-parallel mesh and an 8-device mesh with the
   parameters split over 'fsdp' (mesh_fsdp=2) reports the same loss, loss terms and gradient norm
   (first step) and the same loss after one optimizer update (second step).
2. ``test_checkpoint_saved_on_8_devices_restores_on_1``: the mesh_fsdp=2 run of the 8-device worker
   is checkpointed (state + data iterator) and evaluated there; a 1-device worker creates its own
   state (equal to the 8-device initial state), restores the checkpoint onto its mesh (parameters
   and optimizer state bit-equal to the saved ones, iterator at the same batch) and evaluates to the
   same metrics.

Compile time dominates (the full model's train step is ~40 s of XLA CPU compilation even with
``jax_disable_most_optimizations``, which the workers set), so the workers share a persistent
compilation cache: ``$QDF_TEST_XLA_CACHE`` (default ``<tmp>/qdformer_jax_test_xla_cache``; set it to
an empty string to disable): reruns then compile nothing (tracing and lowering remain).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import worker_processes

pytestmark = pytest.mark.slow  # end-to-end runs: not in `pytest -m "not slow"` (CI runs them)

REPO = worker_processes.REPO
TIMEOUT_S = 900  # hard cap per worker: a hung worker is killed and the test fails
REL_TOL = 1e-5


# -- shared by the parent and the workers --------------------------------------------------------

def tiny_config(data_dir: str, **changes):
  """The smoke synthetic config (semantic, 8 classes) at 32 px, T = 2, batch 8 (divides 8 devices)."""
  from qdformer_jax import testing
  c = testing.tiny_synthetic_config(
      data_dir, num_frames=2, clips=(8, 6, 2),
      batch_size=8,        # divides 8 devices
      eval_batch_size=8,   # 6 clips -> one batch with 2 padding clips
      total_steps=2, lr_drop_steps=(1,), mesh_fsdp=1)
  c.model.dec_layers = 1  # one decoder layer: the step's compile time is what these tests pay for
  c.eval.limit = 0
  for k, v in changes.items():
    setattr(c, k, v)
  return c






def _start(role: str, devices: int, log_path: str, **kwargs) -> subprocess.Popen:
  spec = json.dumps({'cache': worker_processes.cache_dir(), 'kwargs': kwargs})
  log = open(log_path, 'w')
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), role, spec], cwd=REPO,
                          env=worker_processes.worker_env(devices), stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
  log.close()
  return proc






def run_worker(role: str, devices: int, tmp: str, **kwargs) -> tuple[dict, float]:
  """Runs one worker to completion (or kills it at TIMEOUT_S); returns (its JSON result, seconds)."""
  out = os.path.join(tmp, f'{role}.json')
  log = os.path.join(tmp, f'{role}.log')
  t0 = time.time()
  proc = _start(role, devices, log, out=out, **kwargs)
  try:
    proc.wait(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    worker_processes.kill(proc)
    pytest.fail(f'worker {role} timed out after {TIMEOUT_S} s; log tail:\n{worker_processes.tail(log)}')
  finally:
    worker_processes.kill(proc)
  if proc.returncode != 0:
    pytest.fail(f'worker {role} exited with {proc.returncode}; log tail:\n{worker_processes.tail(log)}')
  with open(out) as f:
    return json.load(f), time.time() - t0


def assert_close(a: float, b: float, what: str, rel: float = REL_TOL):
  assert np.isfinite(a) and np.isfinite(b), (what, a, b)
  assert abs(a - b) <= rel * max(abs(a), abs(b)) + 1e-7, f'{what}: {a!r} vs {b!r}'


def relative_error(a: float, b: float) -> float:
  return abs(a - b) / max(abs(a), abs(b), 1e-12)


# -- workers (run in subprocesses) ----------------------------------------------------------------

def _one_device_mesh():
  import jax
  from jax.sharding import AxisType, Mesh

  from qdformer_jax import sharding
  return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), sharding.BATCH_AXES, axis_types=(AxisType.Auto,) * 2)


def _host_state(state) -> dict:
  """Flat {path: numpy array} of a train state (PRNG keys as key data), fetched from the devices."""
  import jax

  from qdformer_jax.training.checkpoint import to_saveable
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(to_saveable(state)))[0]
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def _fsdp_split_leaves(state) -> list[str]:
  """Paths of the leaves split over 'fsdp', after checking each device holds exactly its part."""
  import jax
  split = []
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    spec = tuple(x.sharding.spec)
    if 'fsdp' in spec:
      axis = spec.index('fsdp')
      expected = list(x.shape)
      expected[axis] //= x.sharding.mesh.shape['fsdp']
      assert all(s.data.shape == tuple(expected) for s in x.addressable_shards), jax.tree_util.keystr(path)
      split.append(jax.tree_util.keystr(path))
  return split


def worker_eight_devices(data_dir: str, workdir: str, dump: str, out: str):
  """8 devices: the first two train steps on three meshes from one initial state and the same
  batches; then the mesh_fsdp=2 run (parameters split over 'fsdp') is checkpointed (state + data
  iterator), dumped and evaluated."""
  import jax

  from qdformer_jax import sharding
  from qdformer_jax.data import pipeline
  from qdformer_jax.evaluation import evaluator as evaluator_lib
  from qdformer_jax.training import state as state_lib
  from qdformer_jax.training import step as step_lib
  from qdformer_jax.training.checkpoint import Checkpoints, from_saveable, to_saveable
  assert jax.device_count() == 8, jax.devices()
  config = tiny_config(data_dir, mesh_fsdp=2)
  mesh_fsdp = sharding.make_mesh(config)
  graphdef, state, abstract = state_lib.create_train_state(config, mesh_fsdp, tuple(config.lr_drop_steps))
  split = _fsdp_split_leaves(state)
  init = _host_state(state)
  initial = jax.device_get(to_saveable(state))  # host copy: every mesh starts from fresh buffers
  del state
  it = pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed)
  batches = [pipeline.device_batch(next(it)) for _ in range(2)]
  meshes = {'1': _one_device_mesh(), '8': sharding.make_mesh(tiny_config(data_dir, mesh_fsdp=1)), 'fsdp2': mesh_fsdp}
  result = {'fsdp_split_leaves': split, 'mesh_shapes': {k: dict(m.shape) for k, m in meshes.items()},
            'metrics': {}, 'seconds': {}}
  for name, mesh in meshes.items():  # 'fsdp2' last: its trained state is checkpointed below
    t0 = time.time()
    shardings = jax.tree.map(lambda x, mesh=mesh: sharding.param_sharding(mesh, x), abstract)
    st = jax.device_put(from_saveable(abstract, initial), shardings)
    step = step_lib.make_train_step(graphdef, config, shardings, mesh)
    history = []
    for batch in batches:
      st, metrics = step(st, pipeline.to_global(batch, mesh))
      history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    result['metrics'][name] = history
    result['seconds'][name] = round(time.time() - t0, 1)

  t0 = time.time()
  ckpt = Checkpoints(workdir, keep=2, best_metric=None)
  ckpt.save(2, st, it, {'step': 2, 'config': config.name})
  ckpt.wait()
  ckpt.close()
  result['fsdp_split_leaves_saved'] = _fsdp_split_leaves(st)
  trained = _host_state(st)
  following = next(it)  # the batch a resumed run must see next
  np.savez(dump, **{'init/' + k: v for k, v in init.items()}, **{'trained/' + k: v for k, v in trained.items()},
           **{'next/' + k: following[k] for k in pipeline.DEVICE_KEYS})
  model_graphdef, model_state = state_lib.model_part(graphdef, st)
  result['eval'] = evaluator_lib.Evaluator(config, mesh_fsdp, model_graphdef).run(model_state, config.data.eval_split)
  result['seconds']['save_and_eval'] = round(time.time() - t0, 1)
  with open(out, 'w') as f:
    json.dump(result, f)


def worker_restore(data_dir: str, workdir: str, dump: str, out: str):
  """1 device: own initial state, restore of the 8-device checkpoint, comparisons, evaluation."""
  import jax

  from qdformer_jax import sharding
  from qdformer_jax.data import pipeline
  from qdformer_jax.evaluation import evaluator as evaluator_lib
  from qdformer_jax.training import state as state_lib
  from qdformer_jax.training.checkpoint import Checkpoints
  assert jax.device_count() == 1, jax.devices()
  config = tiny_config(data_dir, mesh_fsdp=1)
  mesh = sharding.make_mesh(config)
  graphdef, state, abstract = state_lib.create_train_state(config, mesh, tuple(config.lr_drop_steps))
  ref = np.load(dump)
  init = _host_state(state)
  result = {'num_leaves': len(init),
            'init_mismatch': sorted(k for k, v in init.items() if not np.array_equal(v, ref['init/' + k]))}
  it = pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed)
  ckpt = Checkpoints(workdir, keep=2, best_metric=None)
  restored, meta, step = ckpt.restore(abstract, data_iterator=it)
  ckpt.close()
  host = _host_state(restored)
  result['restored_mismatch'] = sorted(k for k, v in host.items() if not np.array_equal(v, ref['trained/' + k]))
  result['restored_changed_from_init'] = int(sum(not np.array_equal(host[k], init[k]) for k in host))
  result['restored_devices'] = sorted({str(d) for x in jax.tree.leaves(restored) for d in x.sharding.device_set})
  result['meta'], result['step'] = meta, step
  following = next(it)
  result['iterator_mismatch'] = [k for k in pipeline.DEVICE_KEYS if not np.array_equal(following[k], ref['next/' + k])]
  model_graphdef, model_state = state_lib.model_part(graphdef, restored)
  result['eval'] = evaluator_lib.Evaluator(config, mesh, model_graphdef).run(model_state, config.data.eval_split)
  with open(out, 'w') as f:
    json.dump(result, f)


WORKERS = {'eight_devices': worker_eight_devices, 'restore': worker_restore}


def _worker_main(role: str, spec: str):
  spec = json.loads(spec)
  import jax
  jax.config.update('jax_disable_most_optimizations', True)  # compile time; every mesh alike
  if spec['cache']:
    jax.config.update('jax_compilation_cache_dir', spec['cache'])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
    jax.config.update('jax_compilation_cache_max_size', 256 * 2 ** 20)  # LRU-evicted beyond this
  WORKERS[role](**spec['kwargs'])


# -- tests ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """Builds the tiny synthetic dataset once, in the parent, so workers only read it."""
  path = str(tmp_path_factory.mktemp('tfds'))
  worker_processes.build_dataset(tiny_config(path))
  return path


@pytest.fixture(scope='module')
def eight_device_run(data_dir, tmp_path_factory):
  """The 8-device worker, run once for both tests: (its result, workdir, dump path)."""
  tmp = str(tmp_path_factory.mktemp('eight_devices'))
  workdir, dump = os.path.join(tmp, 'run'), os.path.join(tmp, 'dump.npz')
  result, seconds = run_worker('eight_devices', 8, tmp, data_dir=data_dir, workdir=workdir, dump=dump)
  print(f'8-device worker: {seconds:.0f} s, phases {result["seconds"]}')
  return result, workdir, dump


def test_first_steps_agree_on_1_and_8_devices(eight_device_run):
  result = eight_device_run[0]
  assert result['mesh_shapes'] == {'1': {'data': 1, 'fsdp': 1}, '8': {'data': 8, 'fsdp': 1},
                                   'fsdp2': {'data': 4, 'fsdp': 2}}
  # mesh_fsdp=2 really splits parameters (and their Adam moments) over 'fsdp', from creation on.
  split = result['fsdp_split_leaves']
  assert any(p.startswith('[0]') for p in split) and any("'mu'" in p for p in split), split
  ref = result['metrics']['1']
  first = ref[0]
  assert all(np.isfinite(v) for v in first.values())
  for key in ('loss', 'loss_class', 'loss_mask', 'loss_dice', 'loss_bbox', 'loss_giou', 'loss_quant', 'grad_norm'):
    assert first[key] > 0, key  # the terms compared below are live, not zeros
  worst = {}
  for name in ('8', 'fsdp2'):
    other = result['metrics'][name]
    assert set(other[0]) == set(first)
    for key in first:  # every loss term and diagnostic of the first step
      assert_close(first[key], other[0][key], f'{name} devices, step 1, {key}')
    assert_close(ref[1]['loss'], other[1]['loss'], f'{name} devices, step 2 (after one update), loss')
    worst[name] = max(relative_error(first[k], other[0][k]) for k in first)
    worst[name + '_step2'] = relative_error(ref[1]['loss'], other[1]['loss'])
  assert ref[1]['loss'] != first['loss']  # the second step saw updated parameters
  print('max relative difference vs 1 device:', worst)


def test_checkpoint_saved_on_8_devices_restores_on_1(eight_device_run, data_dir, tmp_path):
  saved, workdir, dump = eight_device_run
  restored, seconds = run_worker('restore', 1, str(tmp_path), data_dir=data_dir, workdir=workdir, dump=dump)
  print(f'1-device restore worker {seconds:.0f} s')
  assert saved['fsdp_split_leaves_saved'], 'the saved state should hold parameters split over fsdp'
  # Created already sharded on 8 devices == created on 1 device.
  assert restored['init_mismatch'] == [], restored['init_mismatch']
  # The restored state is the saved one, bit for bit, now on the single device.
  assert restored['restored_mismatch'] == [], restored['restored_mismatch']
  assert restored['restored_changed_from_init'] > restored['num_leaves'] // 2
  assert len(restored['restored_devices']) == 1, restored['restored_devices']
  assert restored['step'] == 2 and restored['meta']['step'] == 2
  assert restored['iterator_mismatch'] == []
  # Evaluation on 1 device of the restored state == evaluation on 8 devices of the live state.
  a, b = saved['eval'], restored['eval']
  assert a['num_clips'] == b['num_clips'] == 6
  for key in ('mIoU', 'F', 'num_classes_seen'):
    assert abs(a[key] - b[key]) <= 1e-5, (key, a[key], b[key])
  print('eval 8 devices:', {k: a[k] for k in ('mIoU', 'F')}, '1 device:', {k: b[k] for k in ('mIoU', 'F')})


if __name__ == '__main__':
  _worker_main(sys.argv[1], sys.argv[2])
