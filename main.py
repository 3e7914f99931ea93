"""QDFormer-JAX entry point: flags, then a library call.

  python main.py --config configs/synthetic.py --workdir /tmp/qdf
  python main.py --config configs/avss.py --workdir gs://bucket/avss --config.data.data_dir=...
  python main.py --config configs/synthetic.py --workdir /tmp/qdf --config.mode=eval
"""
from __future__ import annotations

import logging

import jax
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard logs and reports.', required=True)
flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() (multi-host TPU / GPU clusters).')
config_flags.DEFINE_config_file('config', None, 'Task config file (configs/*.py[:args]).', lock_config=True)


def main(argv):
  del argv
  if FLAGS.multihost:
    jax.distributed.initialize()
  logging.getLogger().setLevel(logging.INFO)
  from qdformer_jax.training import train
  config = FLAGS.config
  if config.mode == 'train':
    train.train_and_evaluate(config, FLAGS.workdir)
  elif config.mode == 'eval':
    train.evaluate_checkpoint(config, FLAGS.workdir)
  else:
    raise ValueError(f"config.mode must be 'train' or 'eval', got {config.mode!r}")


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
