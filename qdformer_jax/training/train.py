"""The training loop, top to bottom: mesh, data, sharded state, jitted step, checkpoints, evals.

Importable from Colab: ``train_and_evaluate(config, workdir)`` runs the job ``main.py`` runs. The
pieces live beside it, one job a module: ``state`` (the sharded model and optimizer), ``step`` (the
jitted update and its on-device health sums), ``resume`` (config drift, missing evaluations),
``preemption`` (SIGTERM, Ctrl-C), ``checkpoint`` (Orbax), ``eval_mode`` (``config.mode='eval'``);
the evaluations are ``qdformer_jax.evaluation``'s, the progress line is ``console.Progress``.
"""
from __future__ import annotations

import importlib
import logging
import os
import time
from concurrent import futures

import jax
import numpy as np

from qdformer_jax import console, sharding
from qdformer_jax import workdir as workdir_lib
from qdformer_jax.data import pipeline, registry
from qdformer_jax.evaluation import evals, reports
from qdformer_jax.training import full_disk, optim, resume
from qdformer_jax.training.checkpoint import Checkpoints
from qdformer_jax.training.preemption import Preempted, StopRequest
from qdformer_jax.training.startup import enable_compilation_cache, resolved_config
from qdformer_jax.training.state import abstract_train_state, init_train_state, load_pretrained, model_part
from qdformer_jax.training.step import accumulate, check_finite, make_train_step, new_accumulator


def train_and_evaluate(config, workdir: str, *, config_arg: str | None = None) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the last evaluation
  (the metrics of the ``config.best_eval`` entry; every entry's reports are under ``<workdir>/reports``).
  ``config_arg``: the ``--config`` argument the run was started with, for the commands of the summary.

  What survives what: SIGTERM (or Ctrl-C) saves the current step and raises :class:`Preempted`
  (exit 143, or 130 after Ctrl-C); a rerun resumes there. A non-finite update is never applied nor
  saved (``config.nonfinite``). An unreadable latest checkpoint is moved aside and the previous one
  restored. A config that differs from the run's ``config.json`` in a field that cannot change raises
  ValueError before anything is written. An evaluation missing at the resumed step runs first. A full
  disk raises :class:`full_disk.DiskFull` (one line: directory, free space, checkpoint size, remedies)
  after the partial save is removed; earlier checkpoints are kept."""
  started = time.time()
  os.makedirs(workdir, exist_ok=True)
  config = resolved_config(config)  # every check a config can fail, before anything starts
  enable_compilation_cache(config)
  is_chief = jax.process_index() == 0
  ckpt = Checkpoints(workdir, keep=config.keep_checkpoints, best_metric=config.best_metric)
  try:
    with full_disk.quiet_writes():  # a failed async save's thread noise stays off the terminal
      try:
        return _train(config, workdir, ckpt, is_chief, started, config_arg)
      finally:
        ckpt.close()  # the saving threads end here, before partial saves are removed
  except Exception as e:
    if not full_disk.is_full(e):
      raise
    raise full_disk.report(workdir, workdir_lib.checkpoints_dir(workdir), e,
                           keep_checkpoints=config.keep_checkpoints, clean=is_chief) from e


def _train(config, workdir, ckpt, is_chief, started, config_arg):
  stored_config = workdir_lib.read_config(workdir) if ckpt.all_steps() else None
  if stored_config is None and is_chief:
    resume.write_run_config(config, workdir)  # a new run: the config is on record at once
  mesh = sharding.make_mesh(config)
  logging.info('mesh %s over %d devices (%d processes)', dict(mesh.shape), jax.device_count(), jax.process_count())
  train_source = _open_train_split(config)  # builds on first use, in a thread, while the step compiles
  steps_per_epoch = 0 if config.total_steps > 0 else max(1, len(train_source.result()) // config.batch_size)
  total_steps, drop_steps = optim.total_and_drop_steps(config, steps_per_epoch)
  graphdef, abstract_state = abstract_train_state(config, mesh, drop_steps)

  # Resume: configs and shapes are compared before anything is restored or written.
  start_step, meta = 0, {}
  if ckpt.all_steps():
    resume.check_drift(workdir, stored_config, config, ckpt, abstract_state)
    state, meta, start_step, _ = ckpt.restore_latest(abstract_state)
    logging.info('resumed from step %d', start_step)
  else:
    state = init_train_state(optim.resolve_warmup(config, total_steps), abstract_state, drop_steps)
    state = load_pretrained(config, state, graphdef)
  if is_chief:
    resume.write_run_config(config, workdir)

  spec = pipeline.batch_spec(config.data, config.batch_size, mesh)
  if start_step < total_steps:  # compiled ahead of time, from shapes, once
    t0 = time.perf_counter()
    train_step = make_train_step(graphdef, config, jax.tree.map(lambda x: x.sharding, abstract_state),
                                 mesh).lower(abstract_state, spec).compile()
    logging.info('compiled the train step in %.1f s', time.perf_counter() - t0)

  train_source.result()  # re-raises a failed build here, naming the dataset
  data_start = int(meta.get('global_batch', start_step))  # the run's global position, any process count
  train_iter = pipeline.make_train_iterator(
      config.data, global_batch_size=config.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(), start_batch=data_start)
  if meta and int(meta.get('process_count', jax.process_count())) != jax.process_count():
    logging.info('checkpoint written by %d processes, resumed by %d at global batch %d',
                 meta['process_count'], jax.process_count(), data_start)
  skipped_before = int(meta.get('skipped_updates', 0))
  writer = reports.make_writer(workdir) if is_chief else None
  evaluations = evals.Evaluations(config, mesh, model_part(graphdef, abstract_state)[0], workdir, writer=writer)
  stop = StopRequest(where=workdir_lib.checkpoints_dir(workdir))
  progress, acc, step = console.Progress(total_steps), None, start_step
  try:
    pending = start_step and resume.unevaluated(workdir, evaluations.entries, start_step, total_steps, config, ckpt)
    if pending:
      logging.info('evaluating step %d (its evaluation was missing: %s)', start_step, ', '.join(pending))
      _evaluate(evaluations, graphdef, state, start_step, pending, ckpt)
    while step < total_steps:
      t0 = time.perf_counter()
      host_batch = pipeline.device_batch(next(train_iter))
      if step == start_step:
        pipeline.check_batch(host_batch, spec, config.data)
      state, metrics = train_step(state, pipeline.to_global(host_batch, mesh))
      step += 1
      acc = accumulate(acc if acc is not None else new_accumulator(metrics, step - 1), metrics)
      if step == start_step + 1:
        jax.block_until_ready(acc)
        logging.info('first train step (and its first batch) in %.1f s', time.perf_counter() - t0)
        progress.start(step)
      stopping = stop.requested(step)
      due = evaluations.due(step, total_steps)
      save = step % config.checkpoint_every == 0 or bool(due) or step == total_steps or stopping
      log = step % config.log_every == 0 or step == total_steps
      if log or save:
        acc = jax.device_get(acc)
        check_finite(acc['health'], config, ckpt.latest_step(), skipped_before)
      if log:
        _log_interval(progress, step, acc, skipped_before, writer, workdir)
        acc = dict(acc, sums=jax.tree.map(np.zeros_like, acc['sums']), good=np.zeros((), np.int32))
      if save:
        ckpt.save(step, state, train_iter, {
            'step': step, 'config': config.name, 'global_batch': data_start + step - start_step,
            'global_batch_size': config.batch_size, 'process_count': jax.process_count(),
            'skipped_updates': skipped_before + int(acc['health']['bad'])})
      if stopping:
        ckpt.wait()
        message = (f'stopped by {stop.reason} at step {step}: checkpoint {step} saved in '
                   f'{workdir_lib.checkpoints_dir(workdir)}; rerun the same command to resume from it')
        logging.warning(message)
        raise Preempted(message, stop.code)
      if due:
        t0 = time.perf_counter()
        _evaluate(evaluations, graphdef, state, step, due, ckpt)
        progress.exclude(time.perf_counter() - t0)
    ckpt.wait()
  finally:
    stop.close()
    if writer is not None:
      writer.close()

  final = evaluations.last.get(config.best_eval) or dict(ckpt.metrics(step) or {})
  if is_chief:
    for line in summary(config, workdir, step - start_step, time.time() - started, final, ckpt.best_step(),
                        config_arg, evaluations):
      logging.info(line)
  return final


def _evaluate(evaluations, graphdef, state, step: int, entries: dict, ckpt) -> None:
  """Runs ``entries`` on the model of ``state`` at ``step`` (already saved) and ranks the step by the
  ``best_eval`` entry."""
  results = evaluations.run(model_part(graphdef, state)[1], step, entries)
  if evaluations.config.best_eval in results:
    ckpt.record_metrics(step, results[evaluations.config.best_eval])


def _open_train_split(config) -> futures.Future:
  """Opens the train split in a thread (the synthetic dataset is built on first use, ~20 s here; the
  compiler needs no data and the build no program). The builder module (and TFDS with it) is
  imported here first: TFDS runs some of its own imports under etils' lazy-import hook, which patches
  builtins.__import__ for the whole process while it runs, so a first import in the main thread at
  that moment got a lazy placeholder ("'LazyModule' object is not callable")."""
  importlib.import_module(registry.get(config.data.name).builder_module)
  pool = futures.ThreadPoolExecutor(1, thread_name_prefix='open_data')
  source = pool.submit(registry.open_source, config.data, config.data.train_split)
  pool.shutdown(wait=False)  # nothing else is submitted; the thread ends with the build
  return source


def _log_interval(progress, step: int, acc: dict, skipped_before: int, writer, workdir: str) -> None:
  good = int(acc['good'])
  means = {k: float(v) / good for k, v in acc['sums'].items()} if good else {}
  line = progress.line(step, means)
  skipped = skipped_before + int(acc['health']['bad'])
  if skipped:
    line += f' | {skipped} non-finite update(s) skipped so far (first at step {int(acc["health"]["first_step"])})'
    means['skipped_updates'] = float(skipped)
  logging.info(line)
  if writer is not None:
    for k, v in means.items():
      writer.add_scalar(f'train/{k}', v, step)
    writer.flush()
    reports.append_train_log(workdir, step, means)


def summary(config, workdir: str, steps: int, seconds: float, final: dict, best_step: int | None,
            config_arg: str | None, evaluations=None) -> list[str]:
  """The closing lines of a run: what it reached, a line per evaluation whose kind has one (e.g. the
  negative-audio FPRs), and where everything is."""
  metric = config.best_metric
  value = final.get(metric)
  reached = f'{metric} {value:.4f}' if isinstance(value, float) else 'no evaluation'
  lines = [f'done: {steps} steps in {seconds / 60:.1f} min; final {reached}; best checkpoint: step {best_step}',
           *(evaluations.summary_lines() if evaluations is not None else []),
           f'  reports      {workdir_lib.reports_dir(workdir)}',
           f'  checkpoints  {workdir_lib.checkpoints_dir(workdir)}',
           f'  tensorboard  tensorboard --logdir {workdir_lib.tensorboard_dir(workdir)}']
  config_flag = f'--config {config_arg}' if config_arg else '--config <the same config>'
  lines.append(f'  test split   python main.py {config_flag} --workdir {workdir} --config.mode=eval '
               '--config.eval.split=test --config.eval.checkpoint=best')
  lines.append(f'  your video   python -m qdformer_jax.predict --workdir {workdir} --video CLIP.mp4 --out OUT')
  return lines
