"""What survives what: preemption and Ctrl-C, crashes, two runs building one dataset, a full disk,
divergence, bad checkpoints, config drift, another process count, bad inputs
(qdformer_jax/training/train.py, checkpoint.py, full_disk.py; qdformer_jax/data/first_use.py; the data
builders' checks).

Runs of the tiny smoke config (``configs/synthetic.py:smoke`` at 32 px, T = 2, one decoder layer,
8 steps, a checkpoint every 2, an evaluation every 4) go through ``main.py`` in subprocesses where a
signal or a kill is involved, and through ``train_and_evaluate`` in this process otherwise. One
uninterrupted run (the ``reference`` fixture) is what every interrupted-and-resumed run must equal
bit for bit. The elastic test resumes it 1 -> 2 -> 1 processes (2 JAX processes on loopback, gloo, as
tests/test_multihost.py), stops them with SIGTERM to one of them (JAX's preemption service picks the
step), and checks every global batch against the single-process input pipeline.
All runs share the persistent compilation cache of tests/conftest.py.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import worker_processes

pytestmark = pytest.mark.slow  # end-to-end runs: not in `pytest -m "not slow"` (CI runs them)

REPO = worker_processes.REPO
CONFIG = 'configs/synthetic.py:smoke'
TOTAL = 8
# The tiny run: every field also given on the command line, so in-process and main.py runs are equal.
OVERRIDES = {'data.image_size': 32, 'data.num_frames': 2, 'model.dec_layers': 1, 'total_steps': TOTAL,
             'lr_drop_steps': (6,), 'checkpoint_every': 2, 'eval_every': 4, 'log_every': 1}
RUN_TIMEOUT_S = 600
NO_EVAL = {'val': {'kind': 'segmentation', 'split': '', 'every': -1}}


def tiny_config(data_dir: str, **changes):
  """The smoke config with OVERRIDES, then ``changes`` (dotted names with '__' for '.')."""
  from qdformer_jax import testing
  return testing.tiny_synthetic_config(data_dir, clips=None, overrides={
      **OVERRIDES, **{k.replace('__', '.'): v for k, v in changes.items()}})


def main_args(data_dir: str, workdir: str, **changes) -> list[str]:
  values = {**OVERRIDES, **{k.replace('__', '.'): v for k, v in changes.items()}}
  return [sys.executable, os.path.join(REPO, 'main.py'), '--config', os.path.join(REPO, CONFIG),
          '--workdir', workdir, f'--config.data.data_dir={data_dir}',
          *[f'--config.{k}={v}' for k, v in values.items()]]


def start(data_dir: str, workdir: str, log: str, *, env: dict | None = None, **changes) -> subprocess.Popen:
  with open(log, 'a') as f:
    f.write(f'\n=== run {time.strftime("%H:%M:%S")}\n')
    # A run started from a terminal handles Ctrl-C, whatever this test process inherited: a shell's
    # background job starts with SIGINT ignored, which its children inherit (and a run keeps an
    # ignored SIGINT ignored). A handled signal is reset to the default at exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
      return subprocess.Popen(main_args(data_dir, workdir, **changes), cwd=REPO,
                              env={**worker_processes.worker_env(1), **(env or {})},
                              stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
      signal.signal(signal.SIGINT, previous)


def wait_until(proc: subprocess.Popen, condition, timeout: float = RUN_TIMEOUT_S) -> bool:
  """Polls ``condition`` every 5 ms while ``proc`` runs; True once it holds, False if ``proc`` ended."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return True
    if proc.poll() is not None:
      return condition()
    time.sleep(0.005)
  worker_processes.kill(proc)
  raise TimeoutError('run did not reach the expected point')


def finish(proc: subprocess.Popen, log: str) -> int:
  try:
    return proc.wait(timeout=RUN_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    worker_processes.kill(proc)
    pytest.fail(f'run timed out; log:\n{worker_processes.tail(log)}')


def read(path: str) -> str:
  with open(path, errors='replace') as f:
    return f.read()


def last_run(log: str) -> str:
  return read(log).rsplit('=== run', 1)[-1]


def params(workdir: str, step: int = TOTAL) -> dict:
  import jax
  import orbax.checkpoint as ocp
  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def assert_same_params(workdir: str, reference: str) -> None:
  got, want = params(workdir), params(reference)
  assert got.keys() == want.keys()
  different = [k for k in want if not np.array_equal(got[k], want[k])]
  assert not different, f'{len(different)} of {len(want)} leaves differ from the uninterrupted run, e.g. {different[:3]}'


def steps_in(workdir: str) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())


def best_step(workdir: str) -> int | None:
  from qdformer_jax.training.checkpoint import Checkpoints
  ckpt = Checkpoints(workdir, best_metric='mIoU')
  try:
    return ckpt.best_step()
  finally:
    ckpt.close()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def reference(data_dir, tmp_path_factory) -> str:
  """An uninterrupted run (in this process): the parameters every resumed run must reproduce."""
  from qdformer_jax.training import train
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  train.train_and_evaluate(tiny_config(data_dir), workdir)
  assert steps_in(workdir) == [4, 6, 8]
  return workdir


def copy_of(workdir: str, tmp_path) -> str:
  return shutil.copytree(workdir, str(tmp_path / 'copy'))


# -- preemption and crashes -------------------------------------------------------------------------

def test_sigterm_then_kill9_during_a_save_resume_to_the_same_parameters(data_dir, reference, tmp_path):
  """SIGTERM at a random step after the first checkpoint saves that step and exits 143; a rerun
  killed with SIGKILL while a checkpoint is being written, then rerun, ends with the final report,
  a best checkpoint and the uninterrupted run's parameters, bit for bit."""
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'run.log')
  seed = random.randrange(10 ** 6)
  target = random.Random(seed).randint(3, TOTAL - 2)
  print(f'seed {seed}: SIGTERM once step {target} is logged')

  proc = start(data_dir, workdir, log)
  assert wait_until(proc, lambda: f'step {target}/{TOTAL}' in read(log)), worker_processes.tail(log)
  proc.send_signal(signal.SIGTERM)
  assert finish(proc, log) == 143, worker_processes.tail(log)
  [line] = [ln for ln in last_run(log).splitlines() if 'stopped by SIGTERM' in ln]
  stopped = int(re.search(r'at step (\d+)', line).group(1))
  assert stopped >= target and 'rerun the same command' in line
  assert stopped in steps_in(workdir)
  assert os.path.exists(os.path.join(workdir, 'checkpoints', str(stopped), 'commit_success.txt'))
  meta = json.loads(read(os.path.join(workdir, 'checkpoints', str(stopped), 'meta', 'metadata')))
  assert meta['global_batch'] == stopped and meta['process_count'] == 1

  proc = start(data_dir, workdir, log)
  ckpts = os.path.join(workdir, 'checkpoints')
  in_save = wait_until(proc, lambda: bool(glob.glob(os.path.join(ckpts, '*.orbax-checkpoint-tmp*'))))
  worker_processes.kill(proc)
  print('SIGKILL', 'while a checkpoint was being written' if in_save else 'after the run ended')
  assert f'resumed from step {stopped}' in last_run(log)

  proc = start(data_dir, workdir, log)
  assert finish(proc, log) == 0, worker_processes.tail(log)
  assert 'Traceback' not in read(log)
  assert os.path.exists(os.path.join(workdir, 'reports', f'eval_val_{TOTAL}.json'))
  assert best_step(workdir) in steps_in(workdir)
  assert_same_params(workdir, reference)


def test_ctrl_c_saves_the_step_like_a_preemption(data_dir, reference, tmp_path, caplog):
  """Ctrl-C (SIGINT to the process group, as a terminal sends it) at a step after a periodic
  checkpoint saves that step, exits 130 with one line saying where and how to resume, no traceback;
  the rerun (in this process: no second start-up) resumes from it and ends bit for bit as the
  uninterrupted run."""
  from qdformer_jax.training import train
  workdir, log = str(tmp_path / 'run'), str(tmp_path / 'run.log')
  target = random.choice([2, 4])  # the loop asks before it logs: the stop is at target + 1 or later
  print(f'Ctrl-C once step {target} is logged')

  proc = start(data_dir, workdir, log)
  assert wait_until(proc, lambda: f'step {target}/{TOTAL}' in read(log)), worker_processes.tail(log)
  os.killpg(proc.pid, signal.SIGINT)
  assert finish(proc, log) == 130, worker_processes.tail(log)
  text = last_run(log)
  [line] = [ln for ln in text.splitlines() if 'stopped by Ctrl-C (SIGINT)' in ln]
  stopped = int(re.search(r'at step (\d+)', line).group(1))
  print(f'stopped at step {stopped}')
  assert stopped > target and 'rerun the same command' in line  # after the periodic checkpoint `target`
  assert os.path.join(workdir, 'checkpoints') in line
  assert stopped in steps_in(workdir)
  assert os.path.exists(os.path.join(workdir, 'checkpoints', str(stopped), 'commit_success.txt'))
  for noise in ('Traceback', 'KeyboardInterrupt'):
    assert noise not in text, noise

  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(tiny_config(data_dir), workdir)
  assert f'resumed from step {stopped}' in caplog.text
  assert_same_params(workdir, reference)


@pytest.mark.parametrize('kernel_imported', [False, True])
def test_a_second_ctrl_c_stops_at_once_naming_the_unsaved_step(kernel_imported, monkeypatch, capfd):
  """The first Ctrl-C asks the loop to save and stop (one line); a second one, while the step is
  being saved, exits at once with code 130 and one line naming the step that was not saved. Having
  imported ipykernel (as the notebook test does in this process) does not make a script a notebook."""
  from qdformer_jax.training import preemption
  if kernel_imported:
    monkeypatch.setitem(sys.modules, 'ipykernel', types.ModuleType('ipykernel'))

  class Exited(Exception):
    pass

  def exit_now(code):
    raise Exited(code)
  monkeypatch.setattr(preemption.os, '_exit', exit_now)
  # As in a terminal, even when pytest runs as a shell's background job (SIGINT ignored).
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  stop = preemption.StopRequest(where='/runs/x/checkpoints')
  try:
    assert not stop.requested(4)
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested(5) and stop.code == 130 and stop.reason == 'Ctrl-C (SIGINT)'
    with pytest.raises(Exited) as exited:
      os.kill(os.getpid(), signal.SIGINT)  # while step 5 is saved
      time.sleep(1)
  finally:
    stop.close()
  assert exited.value.args == (130,)
  first, second = capfd.readouterr().err.strip().splitlines()
  assert 'Ctrl-C: saving the current step, then stopping' in first
  assert second.endswith('error: second Ctrl-C: stopped at once; step 5 was not saved (the rerun resumes from the '
                         'latest complete checkpoint in /runs/x/checkpoints)')
  restored = signal.getsignal(signal.SIGINT)
  signal.signal(signal.SIGINT, outer)
  assert restored is signal.default_int_handler  # close() put back the handler it found


def test_killed_between_the_final_checkpoint_and_its_evaluation(data_dir, reference, tmp_path, caplog):
  """The state a kill leaves after the final step was saved and before it was evaluated (the step
  holds no metrics, its report is missing): the rerun evaluates it, ranks it, and writes the report."""
  from qdformer_jax.training import train
  workdir = copy_of(reference, tmp_path)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', str(TOTAL), 'metrics'))
  for name in (f'eval_val_{TOTAL}.json', 'eval_val_latest.json'):
    os.remove(os.path.join(workdir, 'reports', name))
  with caplog.at_level(logging.INFO):
    final = train.train_and_evaluate(tiny_config(data_dir), workdir)
  assert f'evaluating step {TOTAL} (its evaluation was missing: val)' in caplog.text
  assert 'first train step' not in caplog.text and 'compiled the train step' not in caplog.text  # nothing retrained
  report = json.loads(read(os.path.join(workdir, 'reports', f'eval_val_{TOTAL}.json')))
  assert report['metrics']['mIoU'] == final['mIoU']
  assert best_step(workdir) is not None
  assert json.loads(read(os.path.join(workdir, 'checkpoints', str(TOTAL), 'metrics', 'metrics')))['mIoU'] == final['mIoU']


# -- two runs at once, a full disk -----------------------------------------------------------------

def test_two_runs_started_together_build_the_dataset_once(reference, tmp_path):
  """Two runs started at the same instant on one empty TFDS_DATA_DIR: one builds the synthetic
  dataset, the other waits for it (one line) and reads it; both finish, no traceback, no leftover.
  (``reference`` only warms the compilation cache: these runs compile the same train step.)"""
  tfds_dir = str(tmp_path / 'tfds')
  logs = [str(tmp_path / f'run{i}.log') for i in range(2)]
  runs = dict(total_steps=2, checkpoint_every=2, eval_every=-1)
  procs = [start('', str(tmp_path / f'run{i}'), logs[i], env={'TFDS_DATA_DIR': tfds_dir}, **runs) for i in range(2)]
  codes = [finish(p, log) for p, log in zip(procs, logs)]
  texts = [read(log) for log in logs]
  assert codes == [0, 0], '\n'.join(worker_processes.tail(log) for log in logs)
  built = [ln for t in texts for ln in t.splitlines() if re.match(r'\S+ building synthetic_avs/', ln)]
  waited = [ln for t in texts for ln in t.splitlines() if 'waiting for another process building synthetic_avs/' in ln]
  print(f'{len(waited)} run(s) waited for the other one')
  assert len(built) == 1, built
  assert len(waited) <= 1
  assert not any('Traceback' in t for t in texts)
  [variant] = [d for d in os.listdir(os.path.join(tfds_dir, 'synthetic_avs')) if not d.startswith('.')]
  assert sorted(os.listdir(os.path.join(tfds_dir, 'synthetic_avs', variant))) == ['1.2.0', '1.2.0.lock']
  for i in range(2):
    assert steps_in(str(tmp_path / f'run{i}')) == [2]


def test_closed_loop_tracebacks_are_dropped_and_other_output_kept():
  """What TensorStore callbacks print after a failed save closed Orbax's event loop (whole, split
  across writes, or interleaved with another thread's) is dropped; any other traceback passes."""
  import io

  from qdformer_jax.training import full_disk
  frame = '  File "/usr/lib/python3.11/asyncio/base_events.py", line 806, in call_soon_threadsafe\n'
  closed = ('Traceback (most recent call last):\n' + frame + '    self._check_closed()\n'
            '  File "/usr/lib/python3.11/asyncio/base_events.py", line 519, in _check_closed\n'
            "    raise RuntimeError('Event loop is closed')\nRuntimeError: Event loop is closed\n")
  other = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\nValueError: kept\n'
  out = io.StringIO()
  stream = full_disk._ClosedLoopTracebacks(out)
  stream.write('12:00:00 step 1/8\n')
  for piece in (closed[:7], closed[7:60], closed[60:]):
    stream.write(piece)
  lines = closed.splitlines(keepends=True)
  for line in lines[:2] + lines + lines[2:]:  # another thread's traceback inside this one, line by line
    stream.write(line)
  stream.write(other)
  stream.write('Trace')  # a partial line is held until it is complete
  stream.write('s of nothing\n')
  # A noise line written in pieces outside a block (its header went with another block; seen on the
  # full-disk test): the indent alone and the start of the line are held, then the line is dropped.
  for piece in ('    ', "raise RuntimeError('Event loop is closed')", '\n', 'RuntimeError', ': ',
                'Event loop is closed', '\n', '    ', 'kept', ' whole\n', 'RuntimeError', ': other\n'):
    stream.write(piece)
  stream.release()
  assert out.getvalue() == ('12:00:00 step 1/8\n' + other + 'Traces of nothing\n' + '    kept whole\n'
                            + 'RuntimeError: other\n')


def test_closed_loop_tracebacks_from_threads_writing_in_turn_are_dropped():
  """Callback threads print their tracebacks at the same time, a frame's indent, source line and
  newline in separate writes, so one line on the terminal can hold pieces of two threads' lines
  (seen on CI: "    self._check_closed()self._check_closed()Traceback (most recent call last):").
  Each thread's text is judged on its own: all of it is dropped, a third thread's line passes whole."""
  import io
  import threading

  from qdformer_jax.training import full_disk
  pieces = ['Traceback (most recent call last):\n', '  File "/usr/lib/python3.11/asyncio/base_events.py", '
            'line 806, in call_soon_threadsafe\n', '    ', 'self._check_closed()', '\n',
            '  File "/usr/lib/python3.11/asyncio/base_events.py", line 519, in _check_closed\n', '    ',
            "raise RuntimeError('Event loop is closed')", '\n', 'RuntimeError', ': ', 'Event loop is closed', '\n']
  out = io.StringIO()
  stream = full_disk._ClosedLoopTracebacks(out)
  turns = [threading.Semaphore(0) for _ in range(3)]

  def writer(i, texts):
    for text in texts:
      turns[i].acquire()
      stream.write(text)
      turns[(i + 1) % 3].release()

  third = ['12:00:01 ', 'eval ', 'val', ' mIoU=0.5', '\n'] + [''] * (len(pieces) - 5)
  threads = [threading.Thread(target=writer, args=(i, t)) for i, t in enumerate([pieces, pieces, third])]
  for t in threads:
    t.start()
  turns[0].release()
  for t in threads:
    t.join(timeout=10)
  stream.release()
  lines = out.getvalue().splitlines()
  assert ''.join(lines) == '12:00:01 eval val mIoU=0.5', out.getvalue()


def _mount_small_filesystem(path: str, size_bytes: int) -> None:
  """A tmpfs of ``size_bytes`` at ``path``; skips the test where mounting is not permitted."""
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0:
    pytest.skip('a small filesystem needs mount (root): not running as root')
  proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size_bytes}', 'tmpfs', path],
                        capture_output=True, text=True)
  if proc.returncode:
    pytest.skip(f'cannot mount a small tmpfs here: {proc.stderr.strip() or proc.returncode}')


def _fill(path: str) -> None:
  """Writes ``path`` until the filesystem is full."""
  chunk = b'\0' * 65536
  with open(path, 'wb', buffering=0) as f:
    try:
      while True:
        f.write(chunk)
    except OSError:
      pass
  with open(path, 'ab', buffering=0) as f:  # the last partial page
    try:
      while True:
        f.write(b'\0' * 512)
    except OSError:
      pass


def test_full_disk_is_one_line_and_the_previous_checkpoint_evaluates(data_dir, reference, tmp_path):
  """--workdir on a filesystem with room for two checkpoints (and the run's small files): the save of
  step 6 runs out of space. The run exits 2 with one error line (the directory, the free space, the
  size of a checkpoint, the remedies), no traceback, no partial <step>.orbax-checkpoint-tmp; steps 2
  and 4 remain, step 4 bit for bit as the uninterrupted run's. With the disk then completely full,
  eval mode restores step 4, evaluates it, prints its metrics and says the reports were not written."""
  from qdformer_jax.training import full_disk
  one = full_disk.tree_bytes(os.path.join(reference, 'checkpoints', '4'))
  small = str(tmp_path / 'small')
  _mount_small_filesystem(small, 2 * one + 3 * 2 ** 19)
  try:
    workdir, log = os.path.join(small, 'run'), str(tmp_path / 'run.log')
    proc = start(data_dir, workdir, log)
    assert finish(proc, log) == 2, worker_processes.tail(log)
    text = last_run(log)
    lines = [ln for ln in text.splitlines()[1:] if ln.strip()]
    after = lines[max(i for i, ln in enumerate(lines) if re.search(r'step \d+/', ln)) + 1:]
    print(f'{len(lines)} lines in all, {len(after)} after the last step line:', *after, sep='\n')
    assert len(after) <= 3, after
    [error] = [ln for ln in lines if 'no space left on device' in ln]
    checkpoints = os.path.join(workdir, 'checkpoints')
    assert f'while saving checkpoint step 6 in {checkpoints}' in error
    assert re.search(r'\d+\.\d MB free, one checkpoint takes \d+\.\d MB', error), error
    assert 'keep_checkpoints' in error and '--workdir' in error and 'resumes from step 4' in error
    for noise in ('Traceback', 'Event loop is closed', 'never retrieved', '_sharding', 'RESOURCE_EXHAUSTED'):
      assert noise not in text, noise
    assert not glob.glob(os.path.join(checkpoints, '*.orbax-checkpoint-tmp*'))
    assert steps_in(workdir) == [2, 4]
    assert all(np.array_equal(a, b) for a, b in zip(params(workdir, 4).values(), params(reference, 4).values()))

    _fill(os.path.join(small, 'filler'))
    proc = start(data_dir, workdir, log, mode='eval')
    assert finish(proc, log) == 2, worker_processes.tail(log)
    text = last_run(log)
    assert re.search(r'eval val \(val\) @ 4: mIoU=\d', text), text
    [error] = [ln for ln in text.splitlines() if 'reports could not be written' in ln]
    assert 'No space left on device' in error and 'step 4' in error
    assert 'Traceback' not in text
    assert not glob.glob(os.path.join(workdir, 'reports', '*.partial'))
  finally:
    subprocess.run(['umount', '-l', small], capture_output=True)  # lazy: also if a killed run held a file


# -- divergence -------------------------------------------------------------------------------------

def nan_audio_at(monkeypatch, step: int):
  """The train loop's batch ``step`` (1-based, counted from the run's first step) gets NaN audio, so
  that step's loss and gradients are NaN (the loop's own device_batch, wrapped)."""
  from qdformer_jax.data import pipeline
  original, calls = pipeline.device_batch, []

  def device_batch(batch):
    batch = original(batch)
    if 'clip_valid' not in batch:  # a train batch (eval batches carry clip_valid)
      calls.append(1)
      if len(calls) == step:
        batch = dict(batch, log_mel=np.full_like(batch['log_mel'], np.nan))
    return batch
  monkeypatch.setattr(pipeline, 'device_batch', device_batch)


def test_nonfinite_loss_stops_then_skip_mode_finishes(data_dir, tmp_path, caplog, monkeypatch):
  """Default: NaN audio at step 5 makes that step's gradients non-finite; the run stops naming step 5
  and the non-finite terms, and step 4 stays the latest checkpoint. The same workdir with
  nonfinite='skip' resumes from 4, skips step 5's update, counts it and finishes with finite
  parameters."""
  from qdformer_jax.training import step as step_lib
  from qdformer_jax.training import train
  workdir = str(tmp_path / 'run')
  config = tiny_config(data_dir, total_steps=6, evals=NO_EVAL)
  nan_audio_at(monkeypatch, 5)
  with pytest.raises(step_lib.NonFiniteError, match=r'at step 5: .*(grad_norm|loss).*latest checkpoint is step 4'):
    train.train_and_evaluate(config, workdir)
  assert steps_in(workdir) == [2, 4]

  config = tiny_config(data_dir, total_steps=6, evals=NO_EVAL, nonfinite='skip')
  nan_audio_at(monkeypatch, 1)  # the resumed run's first step is step 5
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, workdir)
  assert 'resumed from step 4' in caplog.text
  assert '1 non-finite update(s) skipped so far (first at step 5)' in caplog.text
  assert steps_in(workdir) == [2, 4, 6]
  meta = json.loads(read(os.path.join(workdir, 'checkpoints', '6', 'meta', 'metadata')))
  assert meta['skipped_updates'] == 1
  for name, value in params(workdir, 6).items():
    if np.issubdtype(value.dtype, np.floating):
      assert np.isfinite(value).all(), name
  # The skipped step left the parameters as they were after step 4, and the run went on.
  assert any(not np.array_equal(a, b) for a, b in zip(params(workdir, 4).values(), params(workdir, 6).values()))


def test_consecutive_nonfinite_limit_and_messages():
  """check_finite: 'error' names the first step and its terms; 'skip' stops at the limit in a row."""
  import ml_collections

  from qdformer_jax.training import startup
  from qdformer_jax.training import step as step_lib
  config = ml_collections.ConfigDict(dict(nonfinite='skip', nonfinite_max_consecutive=3,
                                          optim=dict(learning_rate=1e8)))
  health = {'bad': 3, 'first_step': 7, 'first_terms': {'loss': True, 'grad_norm': True, 'loss_mask': False},
            'max_run': 2, 'max_run_end': 9}
  step_lib.check_finite(health, config, latest_checkpoint=6, skipped_before=0)  # 2 in a row < 3
  with pytest.raises(step_lib.NonFiniteError, match=r'3 consecutive non-finite updates ending at step 10'):
    step_lib.check_finite(dict(health, max_run=3, max_run_end=10), config, 6, 0)
  config.nonfinite = 'error'
  with pytest.raises(step_lib.NonFiniteError, match=r'at step 7: grad_norm, loss; .*latest checkpoint is step 6'):
    step_lib.check_finite(health, config, 6, 0)
  with pytest.raises(ValueError, match=r"config.nonfinite must be one of \['error', 'skip'\]"):
    startup.validate(ml_collections.ConfigDict(dict(mode='train', nonfinite='ignore', nonfinite_max_consecutive=1)))


# -- bad checkpoints --------------------------------------------------------------------------------

def test_unreadable_checkpoints_are_moved_aside_and_the_previous_one_resumes(data_dir, reference, tmp_path):
  """Step 8 with a truncated data file and step 6 without its _METADATA: one line each (step, file,
  reason), both moved to <step>.corrupt-1, the run resumes from 4 and ends bit for bit as the reference."""
  workdir, log = copy_of(reference, tmp_path), str(tmp_path / 'run.log')
  data = os.path.join(workdir, 'checkpoints', str(TOTAL), 'state', 'd')
  largest = max(os.listdir(data), key=lambda f: os.path.getsize(os.path.join(data, f)))
  with open(os.path.join(data, largest), 'r+b') as f:
    f.truncate(100)
  os.remove(os.path.join(workdir, 'checkpoints', '6', 'state', '_METADATA'))

  proc = start(data_dir, workdir, log)
  assert finish(proc, log) == 0, worker_processes.tail(log)
  text = read(log)
  [line8] = [ln for ln in text.splitlines() if 'checkpoint step 8 cannot be read' in ln]
  [line6] = [ln for ln in text.splitlines() if 'checkpoint step 6 cannot be read' in ln]
  assert largest in line8 and 'not valid for value of size 100' in line8 and '8.corrupt-1' in line8
  assert '_METADATA: missing' in line6 and '6.corrupt-1' in line6
  assert 'resumed from step 4' in text
  for noise in ('Traceback', 'asyncio', 'tensorstore_spec', 'pytree structure'):
    assert noise not in text, noise
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '8.corrupt-1'))
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '6.corrupt-1'))
  assert_same_params(workdir, reference)


# -- config drift -----------------------------------------------------------------------------------

def test_changed_model_on_resume_names_fields_and_parameters(data_dir, reference, tmp_path):
  from qdformer_jax.training import train
  workdir = copy_of(reference, tmp_path)
  config_json = read(os.path.join(workdir, 'config.json'))
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(tiny_config(data_dir, model__hidden_dim=48), workdir)
  message = str(error.value)
  assert '\n' not in message
  assert 'model.hidden_dim: stored 32, requested 48' in message
  assert re.search(r'parameter\(s\) differ from the checkpoint: .*0\.\S+ stored shape \(\d+, 32\), requested \(\d+, 48\)',
                   message), message
  assert '--config.model.hidden_dim=32' in message and 'new --workdir' in message
  assert read(os.path.join(workdir, 'config.json')) == config_json  # untouched
  assert steps_in(workdir) == [4, 6, 8]


def test_config_differences_allow_schedule_and_cadence_changes():
  from qdformer_jax.training import resume
  stored = {'total_steps': 8, 'eval_every': 4, 'model': {'hidden_dim': 32, 'heads': 2}, 'eval': {'limit': 4},
            'data': {'data_dir': '/a', 'image_size': 32}, 'optim': {'learning_rate': 1e-4}}
  requested = {'total_steps': 16, 'eval_every': 2, 'model': {'hidden_dim': 32, 'heads': 4}, 'eval': {'limit': 0},
               'data': {'data_dir': '/b', 'image_size': 32}, 'optim': {'learning_rate': 1e-3}, 'nonfinite': 'skip'}
  fixed, free = resume.config_differences(stored, requested)
  assert [f for f, _, _ in fixed] == ['model.heads', 'optim.learning_rate']
  assert [f for f, _, _ in free] == ['data.data_dir', 'eval.limit', 'eval_every', 'nonfinite', 'total_steps']


# -- another process count --------------------------------------------------------------------------

ELASTIC = dict(evals=NO_EVAL)


def _record_batches(patcher, out: list):
  """Wraps pipeline.device_batch: appends each train batch's clips (fingerprints of their log-mel)."""
  from qdformer_jax.data import pipeline
  original = pipeline.device_batch

  def recording(batch):
    if 'clip_valid' not in batch:  # train batches only
      out.append([_fingerprint(x) for x in batch['log_mel']])
    return original(batch)
  patcher.setattr(pipeline, 'device_batch', recording)


def _fingerprint(log_mel) -> str:
  import hashlib
  return hashlib.sha1(np.ascontiguousarray(log_mel).tobytes()).hexdigest()[:12]


def test_elastic_resume_and_synchronised_preemption(data_dir, reference, tmp_path, monkeypatch, caplog):
  """The reference run (1 process, 8 steps) is resumed by 2 processes on loopback; SIGTERM to one of
  them (JAX's preemption notice) stops both at the same step N, which both save; 1 process resumes
  from N for 2 more steps. Every global batch is the one an uninterrupted single-process pipeline
  yields: the 8 steps of 2 clips were one epoch of the 16 clips, the next ones continue it without
  skipping or repeating a clip."""
  from qdformer_jax.data import pipeline
  from qdformer_jax.training import train
  workdir = copy_of(reference, tmp_path)
  results = run_two_processes(tmp_path, sigterm_after=f'step {TOTAL + 2}/', data_dir=data_dir, workdir=workdir,
                              total_steps=TOTAL + 40)
  stops = []
  for r in results:
    assert r['exit'] == 143, r['log'][-3000:]
    assert r['log'].count(f'checkpoint written by 1 processes, resumed by 2 at global batch {TOTAL}') == 1
    stops += [int(n) for n in re.findall(r'stopped by preemption notice at step (\d+)', r['log'])]
  assert len(stops) == 2 and stops[0] == stops[1], stops
  stopped = stops[0]
  assert TOTAL + 2 <= stopped < TOTAL + 40 and stopped in steps_in(workdir)
  seen = [a + b for a, b in zip(results[0]['batches'], results[1]['batches'])]  # process 0's rows first
  assert len(seen) == stopped - TOTAL
  meta = json.loads(read(os.path.join(workdir, 'checkpoints', str(stopped), 'meta', 'metadata')))
  assert (meta['global_batch'], meta['process_count']) == (stopped, 2)

  _record_batches(monkeypatch, seen)
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(tiny_config(data_dir, **ELASTIC, total_steps=stopped + 2), workdir)
  assert f'checkpoint written by 2 processes, resumed by 1 at global batch {stopped}' in caplog.text
  config = tiny_config(data_dir)
  single = pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed)
  expected = [[_fingerprint(x) for x in next(single)['log_mel']] for _ in range(stopped + 2)]
  assert seen == expected[TOTAL:]
  epochs = [clip for batch in expected for clip in batch]
  assert len(set(epochs[:16])) == 16 and len(set(epochs[16:32])) == len(epochs[16:32])  # no repeat within an epoch


def run_two_processes(tmp_path, sigterm_after: str | None = None, **kwargs) -> list[dict]:
  """Runs train_and_evaluate in 2 JAX processes on loopback (1 CPU device each); with
  ``sigterm_after``, sends SIGTERM to process 1 once its log shows that text."""
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs, logs, outs = [], [], []
  for i in range(2):
    outs.append(str(tmp_path / f'process{i}.json'))
    logs.append(str(tmp_path / f'process{i}.log'))
    spec = json.dumps(dict(kwargs, process_id=i, port=port, out=outs[-1]))
    with open(logs[-1], 'w') as log:
      procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), spec], cwd=REPO,
                                    env=worker_processes.worker_env(1), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True))
  try:
    deadline = time.time() + RUN_TIMEOUT_S
    if sigterm_after:
      wait_until(procs[1], lambda: sigterm_after in read(logs[1]))
      procs[1].send_signal(signal.SIGTERM)
    while any(p.poll() is None for p in procs) and time.time() < deadline:
      if any(p.poll() not in (None, 0, 143) for p in procs):
        deadline = min(deadline, time.time() + 30)  # the peer of a failed worker gets 30 s
      time.sleep(0.2)
  finally:
    for p in procs:
      worker_processes.kill(p)
  results = worker_processes.worker_results(procs, outs, logs, ok_codes=(0, 143))
  for result, log in zip(results, logs):
    result['log'] = read(log)
  return results


def _worker(spec: dict) -> None:
  """One of the two processes: resume ``workdir`` to ``total_steps``, recording its train batches."""
  import jax
  try:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{spec["port"]}', num_processes=2,
                               process_id=spec['process_id'], initialization_timeout=120)
  except Exception as e:  # noqa: BLE001  (the parent skips only when gloo is missing)
    if 'gloo' not in str(e).lower():
      raise
    with open(spec['out'], 'w') as f:
      json.dump({worker_processes.GLOO_UNAVAILABLE: str(e)}, f)
    return
  from qdformer_jax import console
  from qdformer_jax.training import preemption, train

  class Patch:
    setattr = staticmethod(setattr)
  batches: list = []
  _record_batches(Patch, batches)
  console.setup(0)
  code = 0
  try:
    train.train_and_evaluate(tiny_config(spec['data_dir'], **ELASTIC, total_steps=spec['total_steps']),
                             spec['workdir'])
  except preemption.Preempted as e:
    code = e.code
  with open(spec['out'], 'w') as f:
    json.dump({'batches': batches, 'exit': code}, f)
  jax.distributed.shutdown()
  sys.exit(code)


# -- bad inputs -------------------------------------------------------------------------------------

def test_eval_checkpoint_choice_is_checked(data_dir, reference):
  from qdformer_jax.training import checkpoint, eval_mode
  config = tiny_config(data_dir)
  config.mode = 'eval'
  config.eval.checkpoint = 'bets'
  with pytest.raises(ValueError, match=r"config.eval.checkpoint must be 'latest', 'best' or a step number .*'bets'"):
    eval_mode.evaluate_checkpoint(config, reference)
  config.eval.checkpoint = '5'
  with pytest.raises(FileNotFoundError, match=r'no checkpoint step 5 .*\(steps: 4, 6, 8\)'):
    eval_mode.evaluate_checkpoint(config, reference)
  assert checkpoint.parse_checkpoint_choice(' Best ') == ('best', None)
  assert checkpoint.parse_checkpoint_choice(1200) == ('latest', 1200)


def test_nonfinite_eval_metric_never_ranks_as_best():
  """best_step ignores a step whose metric is NaN or inf, whichever the mode, and steps without metrics."""
  from qdformer_jax.training import checkpoint

  class Manager:  # the two calls best_step makes of an Orbax CheckpointManager
    table = {2: {'mIoU': 0.3}, 4: {'mIoU': float('nan')}, 6: {'mIoU': float('inf')}, 8: None, 10: {'mIoU': 0.2}}

    def all_steps(self):
      return list(self.table)

    def metrics(self, step):
      return self.table[step]

  assert checkpoint.best_step(Manager(), 'mIoU') == 2
  assert checkpoint.best_step(Manager(), 'mIoU', mode='min') == 10
  assert checkpoint.metric_rank({'mIoU': float('nan')}, 'mIoU') == checkpoint.metric_rank({}, 'mIoU') == -float('inf')


def test_predict_refuses_nonfinite_audio(reference):
  from qdformer_jax import inference
  predictor = inference.load(reference)
  frames = np.zeros((2, 32, 32, 3), np.uint8)
  audio = np.zeros((2, 96, 64), np.float32)
  audio[1, 3, 5] = np.nan
  with pytest.raises(ValueError, match=r'audio holds non-finite values \(NaN or inf\) in 1 of 2 frames'):
    predictor.predict(frames, audio)
  wave = np.zeros(32000, np.float32)
  wave[100] = np.inf
  with pytest.raises(ValueError, match=r'non-finite values'):
    predictor.predict(frames, wave, sample_rate=16000)


if __name__ == '__main__':
  _worker(json.loads(sys.argv[1]))
