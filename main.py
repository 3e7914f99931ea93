"""QDFormer-JAX entry point: flags, then a library call.

  python main.py --config configs/synthetic.py --workdir /tmp/qdf
  python main.py --config configs/avss.py --workdir gs://bucket/avss --config.data.data_dir=...
  python main.py --config configs/synthetic.py --workdir /tmp/qdf --config.mode=eval

--verbosity=1 shows third-party (Orbax, TFDS, JAX) logs too; --debug keeps tracebacks of user errors.
"""
from __future__ import annotations

import re
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from qdformer_jax import console

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard logs and reports.', required=True)
flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() (multi-host TPU / GPU clusters).')
flags.DEFINE_bool('debug', False, 'Show the traceback of errors a user can cause (bad value, missing file).')
config_flags.DEFINE_config_file('config', None, 'Task config file (configs/*.py[:args]).', lock_config=True)


def _debug_requested(argv) -> bool:
  """--debug / --debug=true|1 on the command line (read before absl has parsed it)."""
  return any(a == '--debug' or a.lower() in ('--debug=true', '--debug=1') for a in argv)


def parse_flags(argv):
  """absl's flag parsing, but a bad flag or config argument is one line (the error, not the traceback
  ml_collections wraps it in), exit code 2; --debug keeps the whole message."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if _debug_requested(argv) or not lines:
      raise
    print(f'error: {lines[-1]}', file=sys.stderr)
    print('(see --helpshort for the flags; rerun with --debug for the traceback)', file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError) as e:  # ml_collections: a --config.<field> the config does not have
    if _debug_requested(argv):
      raise
    text = str(e).replace('\\n', ' ')
    name = re.search(r"'\\?'?([\w.]+)", text)
    hint = re.search(r'Did you mean "([\w.]+)"', text)
    print(f"error: the config has no field {name.group(1) if name else text!r} (named by a --config.* "
          f"override){'; did you mean ' + repr(hint.group(1)) if hint else ''}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  del argv
  console.setup(FLAGS.verbosity)
  if FLAGS.multihost:
    jax.distributed.initialize()
  from qdformer_jax.training import eval_mode, train
  config = FLAGS.config
  with console.interrupted(FLAGS.workdir), console.user_errors(FLAGS.debug):
    if config.mode == 'train':
      train.train_and_evaluate(config, FLAGS.workdir,
                               config_arg=config_flags.get_config_filename(FLAGS['config']))
    elif config.mode == 'eval':
      eval_mode.evaluate_checkpoint(config, FLAGS.workdir)
    else:
      raise ValueError(f"config.mode must be 'train' or 'eval', got {config.mode!r}")


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=parse_flags)
