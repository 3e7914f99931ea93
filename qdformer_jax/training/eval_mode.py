"""``config.mode = 'eval'``: one checkpoint's model, restored alone (no optimizer), through every
evaluation entry of the config."""
from __future__ import annotations

import logging
import shutil

import jax

from qdformer_jax import sharding
from qdformer_jax import workdir as workdir_lib
from qdformer_jax.evaluation import evals, reports
from qdformer_jax.training import full_disk
from qdformer_jax.training.checkpoint import Checkpoints, parse_checkpoint_choice, restore_model
from qdformer_jax.training.startup import enable_compilation_cache, resolved_config
from qdformer_jax.training.state import abstract_model


def evaluate_checkpoint(config, workdir: str) -> dict:
  """Restores the model of the latest/best/<step> checkpoint (``config.eval.checkpoint``) and runs
  every evaluation entry of the config on it (``evals.entries(config, mode='eval')``); returns the
  metrics of the ``config.best_eval`` entry (all reports are under ``<workdir>/reports``)."""
  config = resolved_config(config, mode='eval')
  enable_compilation_cache(config)
  mesh = sharding.make_mesh(config)
  graphdef, abstract = abstract_model(config)
  abstract = sharding.shard_abstract(mesh, abstract)
  ckpt = Checkpoints(workdir, keep=config.keep_checkpoints, best_metric=config.best_metric)
  try:
    which, step = parse_checkpoint_choice(config.eval.checkpoint)
    if step is None:
      step = ckpt.best_step() if which == 'best' else ckpt.latest_step()
    steps = ', '.join(map(str, ckpt.all_steps())) or 'none'
    if step is None and which == 'best':
      raise FileNotFoundError(f'{workdir} has no evaluated checkpoint to pick the best from (steps: {steps}); '
                              'use --config.eval.checkpoint=latest')
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {ckpt.directory}: train first, or pass the workdir of a run')
    if step not in ckpt.all_steps():
      raise FileNotFoundError(f'no checkpoint step {step} in {ckpt.directory} (steps: {steps})')
    state = restore_model(ckpt.step_dir(step) / workdir_lib.STATE_ITEM, abstract)
  finally:
    ckpt.close()
  logging.info('evaluating the model of checkpoint step %d', step)
  writer = _eval_writer(workdir) if jax.process_index() == 0 else None
  # Nothing was written before the restore; with no space left the evaluation still runs and prints
  # its metrics, then one error says that its reports could not be written.
  evaluations = evals.Evaluations(config, mesh, graphdef, workdir, writer=writer, mode='eval')
  with full_disk.quiet_writes():
    try:
      results = evaluations.run(state, step, full_disk_ok=True)
    finally:
      if writer is not None:
        _close_eval_writer(writer, workdir)
  for line in evaluations.summary_lines():
    logging.info(line.strip())
  return results.get(config.best_eval) or next(iter(results.values()), {})


def _close_eval_writer(writer, workdir: str) -> None:
  try:
    writer.close()
  except OSError as e:
    if e.errno not in full_disk.FULL_ERRNOS:
      raise
    logging.warning('the TensorBoard events of this evaluation could not be written under %s: %s',
                    workdir_lib.tensorboard_dir(workdir), e.strerror or e)


def _eval_writer(workdir: str, min_free_bytes: int = 2 ** 20):
  """Eval mode's TensorBoard writer, or None when the workdir has (almost) no space left: the writer
  writes from a thread, whose failure could only print a traceback (reports say it in one line)."""
  try:
    if shutil.disk_usage(workdir).free < min_free_bytes:
      return None
    return reports.make_writer(workdir)
  except OSError as e:
    if e.errno not in full_disk.FULL_ERRNOS:
      raise
    return None
