"""Several processes (hosts) on one machine (docs/DESIGN.md §7): the input split, global batch assembly,
the train step, Orbax multi-process checkpoints and padded evaluation across process boundaries.

``test_two_processes_on_loopback`` starts two worker processes (this file, run as a script), each with
2 fake CPU devices, CPU collectives over gloo and ``jax.distributed.initialize`` on a free loopback
port: 4 devices in 2 processes, mesh (data=1, fsdp=4), so the large parameters are split across the
processes and each process saves and restores only its own shards. It checks:

* input split: each process's batch is its block of the global batch, and the global batch (gathered
  on the devices) is the one a single-process pipeline yields (same clips, same order, same
  augmentation);
* ``to_global``: every device holds its rows of its own process's data;
* one train step: both processes get the same loss (finite, > 0);
* Orbax: save (state + per-process data iterator) and restore onto the 2-process mesh: every shard of
  every leaf equals the saved one, on both processes, and the iterators resume at the same batch;
* evaluation with padding (10 clips, global eval batch 8): the device-assembled eval batches hold the
  clips in split order with the padding marked, and the metric sums count every clip's frames once.

The workers always end: ``initialize`` has a timeout, the parent kills a worker whose peer failed and
both after ``TIMEOUT_S``. Skipped only when this jaxlib has no gloo CPU collectives.
``test_process_batches_are_the_single_process_batches`` checks the input split on the host for 2 and 4
processes without starting JAX workers. Compile time: see tests/test_multidevice.py (the workers use
the same persistent compilation cache, ``$QDF_TEST_XLA_CACHE``).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import worker_processes

pytestmark = pytest.mark.slow  # end-to-end runs: not in `pytest -m "not slow"` (CI runs them)

REPO = worker_processes.REPO
TIMEOUT_S = 900       # hard cap for the two workers
PEER_GRACE_S = 30     # once one worker failed, the other gets this long before it is killed
NUM_PROCESSES = 2
LOCAL_DEVICES = 2
EVAL_CLIPS = 10       # with eval batch 8: 2 eval batches, 6 padding clips
GLOO_UNAVAILABLE = worker_processes.GLOO_UNAVAILABLE


# -- shared by the parent and the workers --------------------------------------------------------

def tiny_config(data_dir: str, **changes):
  """Smoke synthetic config, binary single-source task (its metric sums count frames), 32 px, T = 2."""
  from qdformer_jax import testing
  return testing.tiny_synthetic_config(
      data_dir, num_frames=2, clips=(8, EVAL_CLIPS, 2), arg='smoke,single',
      overrides={'model.dec_layers': 1, 'eval.limit': 0, 'batch_size': 8, 'eval_batch_size': 8, 'total_steps': 1,
                 'lr_drop_steps': (), 'mesh_fsdp': NUM_PROCESSES * LOCAL_DEVICES, **changes})


def _free_port() -> int:
  try:
    import portpicker
    return portpicker.pick_unused_port()
  except ImportError:
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      return s.getsockname()[1]








def run_processes(tmp: str, **kwargs) -> tuple[list[dict], float]:
  """Runs the NUM_PROCESSES workers to completion; returns (their JSON results, seconds)."""
  port = _free_port()
  procs, logs, outs = [], [], []
  t0 = time.time()
  try:
    for i in range(NUM_PROCESSES):
      outs.append(os.path.join(tmp, f'process{i}.json'))
      logs.append(os.path.join(tmp, f'process{i}.log'))
      spec = json.dumps({'cache': worker_processes.cache_dir(), 'kwargs': dict(
          kwargs, process_id=i, port=port, out=outs[-1])})
      with open(logs[-1], 'w') as log:
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), 'host', spec], cwd=REPO,
                                      env=worker_processes.worker_env(LOCAL_DEVICES), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    deadline = t0 + TIMEOUT_S
    while any(p.poll() is None for p in procs):
      if time.time() > deadline:
        raise TimeoutError(f'workers still running after {TIMEOUT_S} s')
      if any(p.poll() not in (None, 0) for p in procs):
        deadline = min(deadline, time.time() + PEER_GRACE_S)
      time.sleep(0.5)
  except TimeoutError as e:
    for p in procs:
      worker_processes.kill(p)
    pytest.fail(f'{e}; logs:\n' + '\n'.join(f'--- process {i}\n{worker_processes.tail(l)}' for i, l in enumerate(logs)))
  finally:
    for p in procs:
      worker_processes.kill(p)
  results = worker_processes.worker_results(procs, outs, logs)
  return results, time.time() - t0


# -- the worker (one per process) -----------------------------------------------------------------

def _gather(tree, mesh):
  """A global array tree -> numpy on every process (replicated through a jitted identity)."""
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  full = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree)
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), full)


def _rows_match_local(global_batch: dict, local: dict, process_id: int) -> bool:
  """Every addressable shard holds its rows of this process's block of the global batch."""
  per_process = next(iter(local.values())).shape[0]
  for key, x in global_batch.items():
    for shard in x.addressable_shards:
      rows = shard.index[0]
      start, stop = rows.start - process_id * per_process, rows.stop - process_id * per_process
      if start < 0 or stop > per_process or not np.array_equal(np.asarray(shard.data), local[key][start:stop]):
        return False
  return True


def _local_shards(state) -> dict:
  """{(path, shard index): numpy data} of this process's shards (PRNG keys as key data)."""
  import jax

  from qdformer_jax.training.checkpoint import to_saveable
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(to_saveable(state))[0]:
    for shard in x.addressable_shards:
      out[(jax.tree_util.keystr(path), str(shard.index), str(shard.device))] = np.asarray(shard.data)
  return out


def worker_host(process_id: int, port: int, data_dir: str, workdir: str, out: str):
  import jax
  try:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=NUM_PROCESSES,
                               process_id=process_id, initialization_timeout=120)
    jax.devices()
  except Exception as e:  # noqa: BLE001  (reported to the parent, which skips only on gloo errors)
    if 'gloo' not in str(e).lower():
      raise
    with open(out, 'w') as f:
      json.dump({GLOO_UNAVAILABLE: f'{type(e).__name__}: {e}'}, f)
    return
  from jax.experimental import multihost_utils

  from qdformer_jax import sharding
  from qdformer_jax.data import pipeline
  from qdformer_jax.evaluation import evaluator as evaluator_lib
  from qdformer_jax.training import state as state_lib
  from qdformer_jax.training import step as step_lib
  from qdformer_jax.training.checkpoint import Checkpoints
  result = {'process_index': jax.process_index(), 'process_count': jax.process_count(),
            'device_count': jax.device_count(), 'local_device_count': jax.local_device_count(), 'seconds': {}}
  t0 = time.time()
  config = tiny_config(data_dir)
  mesh = sharding.make_mesh(config)
  result['mesh'] = dict(mesh.shape)

  # Input split and global batch assembly.
  it = pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                    process_index=jax.process_index(), process_count=jax.process_count())
  local = pipeline.device_batch(next(it))
  batch = pipeline.to_global(local, mesh)
  result['global_shapes'] = {k: list(v.shape) for k, v in batch.items()}
  result['rows_match_local'] = _rows_match_local(batch, local, jax.process_index())
  np.savez(out + '.batch.npz', **{'local/' + k: v for k, v in local.items()},
           **{'global/' + k: v for k, v in _gather(batch, mesh).items()})

  # One train step on parameters split across the processes.
  graphdef, state, abstract = state_lib.create_train_state(config, mesh, tuple(config.lr_drop_steps))
  result['leaves_split_across_processes'] = sum(not x.is_fully_addressable and not x.is_fully_replicated
                                                for x in jax.tree.leaves(state))
  step = step_lib.make_train_step(graphdef, config, jax.tree.map(lambda x: x.sharding, abstract), mesh)
  state, metrics = step(state, batch)
  result['metrics'] = {k: float(v) for k, v in jax.device_get(metrics).items()}
  result['seconds']['init_and_step'] = round(time.time() - t0, 1)

  # Orbax: every process saves its shards and its iterator; a new manager restores them.
  t0 = time.time()
  ckpt = Checkpoints(workdir, keep=2, best_metric=None)
  ckpt.save(1, state, it, {'step': 1, 'config': config.name})
  ckpt.wait()
  ckpt.close()
  saved = _local_shards(state)
  following = next(it)
  it2 = pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                     process_index=jax.process_index(), process_count=jax.process_count())
  ckpt = Checkpoints(workdir, keep=2, best_metric=None)
  restored, meta, restored_step = ckpt.restore(abstract, data_iterator=it2)
  ckpt.close()
  got = _local_shards(restored)
  resumed = next(it2)
  result['restore'] = {
      'step': restored_step, 'meta': meta, 'num_local_shards': len(saved),
      'same_shard_layout': sorted(got) == sorted(saved),
      'mismatched': sorted(k[0] for k in saved if k not in got or not np.array_equal(got[k], saved[k]))[:20],
      'same_shardings': all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state))),
      'iterator_mismatch': [k for k in pipeline.DEVICE_KEYS if not np.array_equal(resumed[k], following[k])],
  }
  result['seconds']['checkpoint'] = round(time.time() - t0, 1)

  # Evaluation with padding: the assembled eval batches, then the evaluator's metrics.
  t0 = time.time()
  eval_it, total = pipeline.make_eval_iterator(
      config.data, config.data.eval_split, global_batch_size=config.eval_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  result['eval_total'] = total
  result['eval_batches'] = []
  for host_batch in eval_it:
    keys = {'index': host_batch['index'], 'clip_valid': host_batch['clip_valid']}
    gathered = _gather(pipeline.to_global(keys, mesh), mesh)
    result['eval_batches'].append({k: v.tolist() for k, v in gathered.items()})
  model_graphdef, model_state = state_lib.model_part(graphdef, restored)
  result['eval'] = evaluator_lib.Evaluator(config, mesh, model_graphdef).run(model_state, config.data.eval_split)
  result['seconds']['eval'] = round(time.time() - t0, 1)

  with open(out, 'w') as f:
    json.dump(result, f)
  multihost_utils.sync_global_devices('test_multihost done')
  jax.distributed.shutdown()


def _worker_main(role: str, spec: str):
  assert role == 'host', role
  spec = json.loads(spec)
  import jax
  jax.config.update('jax_disable_most_optimizations', True)  # compile time, as in test_multidevice
  if spec['cache']:
    jax.config.update('jax_compilation_cache_dir', spec['cache'])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
    jax.config.update('jax_compilation_cache_max_size', 256 * 2 ** 20)  # LRU-evicted beyond this
  worker_host(**spec['kwargs'])


# -- tests ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """Builds the tiny synthetic dataset once, in the parent, so workers only read it."""
  path = str(tmp_path_factory.mktemp('tfds'))
  worker_processes.build_dataset(tiny_config(path))
  return path


@pytest.mark.parametrize('process_count', [2, 4])
def test_process_batches_are_the_single_process_batches(data_dir, process_count):
  """Host-side input split: process p's batch k is block p of the single-process global batch k."""
  from qdformer_jax.data import pipeline
  config = tiny_config(data_dir)
  one = pipeline.make_train_iterator(config.data, global_batch_size=8, seed=3)
  parts = [pipeline.make_train_iterator(config.data, global_batch_size=8, seed=3, process_index=p,
                                        process_count=process_count) for p in range(process_count)]
  for _ in range(3):  # 24 clips: three epochs of the 8-clip split, reshuffled each epoch
    expected = next(one)
    got = [next(it) for it in parts]
    assert all(g['frames'].shape[0] == 8 // process_count for g in got)
    for key in pipeline.DEVICE_KEYS:
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), expected[key], err_msg=key)

  single, total = pipeline.make_eval_iterator(config.data, 'val', global_batch_size=8)
  single = list(single)
  split = [list(pipeline.make_eval_iterator(config.data, 'val', global_batch_size=8, process_index=p,
                                            process_count=process_count)[0]) for p in range(process_count)]
  assert total == EVAL_CLIPS and all(len(s) == len(single) == 2 for s in split)
  seen = []
  for k, expected in enumerate(single):
    for key in (*pipeline.DEVICE_KEYS, 'clip_valid', 'index'):
      np.testing.assert_array_equal(np.concatenate([s[k][key] for s in split]), expected[key], err_msg=key)
    seen += [int(i) for i, v in zip(expected['index'], expected['clip_valid']) if v]
  assert seen == list(range(EVAL_CLIPS))  # every clip once, in split order


def test_two_processes_on_loopback(data_dir, tmp_path):
  from qdformer_jax.data import pipeline
  workdir = str(tmp_path / 'run')
  results, seconds = run_processes(str(tmp_path), data_dir=data_dir, workdir=workdir)
  print(f'two processes: {seconds:.0f} s;', [r['seconds'] for r in results])
  config = tiny_config(data_dir)
  for i, r in enumerate(results):
    assert (r['process_index'], r['process_count'], r['device_count'], r['local_device_count']) == (i, 2, 4, 2)
    assert r['mesh'] == {'data': 1, 'fsdp': 4}

  # Input split and global assembly vs the single-process pipeline's first global batch.
  expected = pipeline.device_batch(next(pipeline.make_train_iterator(
      config.data, global_batch_size=config.batch_size, seed=config.seed)))
  batches = [np.load(os.path.join(str(tmp_path), f'process{i}.json.batch.npz')) for i in range(2)]
  for key, value in expected.items():
    np.testing.assert_array_equal(np.concatenate([b['local/' + key] for b in batches]), value, err_msg=key)
    for b in batches:
      np.testing.assert_array_equal(b['global/' + key], value, err_msg=key)
  log_mel = [b['local/log_mel'].reshape(4, -1) for b in batches]
  assert not any((x == y).all() for x in log_mel[0] for y in log_mel[1])  # disjoint clips
  for r in results:
    assert r['rows_match_local']
    assert r['global_shapes']['frames'] == [8, 2, 32, 32, 3]

  # One train step: the same (replicated) metrics on both processes.
  m0, m1 = results[0]['metrics'], results[1]['metrics']
  assert m0 == m1
  assert np.isfinite(m0['loss']) and m0['loss'] > 0 and m0['grad_norm'] > 0
  assert results[0]['leaves_split_across_processes'] > 0

  # Orbax multi-process save/restore.
  for r in results:
    restore = r['restore']
    assert restore['step'] == 1 and restore['meta']['step'] == 1
    assert restore['same_shard_layout'] and restore['same_shardings']
    assert restore['mismatched'] == [], restore['mismatched']
    assert restore['num_local_shards'] > 0
    assert restore['iterator_mismatch'] == []
  data_files = os.listdir(os.path.join(workdir, 'checkpoints', '1', 'data'))
  assert sorted(f for f in data_files if f.startswith('process_')) == ['process_0-of-2.json', 'process_1-of-2.json']

  # Padded evaluation: global batches in split order, padding marked, every clip's frames once.
  single, total = pipeline.make_eval_iterator(config.data, 'val', global_batch_size=config.eval_batch_size)
  single = list(single)
  expected_frames = sum(int((b['gt_valid'] & b['frame_valid'] & b['clip_valid'][:, None]).sum()) for b in single)
  assert expected_frames == EVAL_CLIPS * config.data.num_frames
  for r in results:
    assert r['eval_total'] == total == EVAL_CLIPS
    assert [b['index'] for b in r['eval_batches']] == [b['index'].tolist() for b in single]
    assert [b['clip_valid'] for b in r['eval_batches']] == [b['clip_valid'].tolist() for b in single]
    assert r['eval']['num_clips'] == EVAL_CLIPS
    assert r['eval']['num_frames'] == expected_frames
    assert 0.0 <= r['eval']['J'] <= 1.0
  for key in ('J', 'F_official_per_batch', 'F_dataset', 'num_frames'):  # replicated sums: identical
    assert results[0]['eval'][key] == results[1]['eval'][key], key


if __name__ == '__main__':
  _worker_main(sys.argv[1], sys.argv[2])
