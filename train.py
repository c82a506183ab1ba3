"""Train a Llama with POET (or a baseline) from the command line.

  python train.py                                  # tiny default, embedded data
  python train.py --config=configs/llama_60m.py --workdir=runs/60m \
      --config.poet.block_size=128

Exit codes: 0 done; 2 bad input (one line on stderr); 3 interrupted by
SIGTERM/SIGINT after writing a checkpoint (run the same command to resume);
4 stopped on a non-finite loss or gradient (nan_policy='stop').
"""
import os
import sys

from absl import flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               'configs', 'llama_tiny.py')


def define_flags():
  # Defined at run time, not import time: config_flags reads the overrides
  # on definition, and a bad one must become a one-line error, not a trace.
  config = config_flags.DEFINE_config_file(
      'config', _DEFAULT_CONFIG, 'Python config file (see configs/).',
      lock_config=True)
  flags.DEFINE_string(
      'workdir', None, 'Where checkpoints and metrics go; default '
      'runs/<config name>_<optimizer>. A workdir that holds a checkpoint is '
      'resumed.')
  flags.DEFINE_bool(
      'dry_run', False, 'Compile the train step abstractly, report its '
      'memory and FLOPs to <workdir>/memory.json, and exit without training.')
  flags.DEFINE_bool('no_progress', False, 'Hide the progress bar.')
  return config


def describe_flag_error(e: Exception, argv) -> str:
  """One line for an error raised while reading the command line."""
  text = ' '.join(str(e).split())
  overrides = [a.split('=')[0][2:] for a in argv if a.startswith('--config.')]
  if isinstance(e, (KeyError, AttributeError)):
    bad = [o for o in overrides if f"'{o.split('.')[-1]}'" in text]
    key = bad[0][len('config.'):] if bad else text
    return (f'unknown config key {key!r}; the keys are listed in README.md '
            'and poet_jax/config.py')
  if isinstance(e, OSError) and 'No such file' in text:
    files = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
    return (f'config file {files[0] if files else "?"} does not exist; use '
            'one of configs/*.py')
  return text


def fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv) -> int:
  try:
    config = define_flags()
    flags.FLAGS(argv)
    c = config.value
    c.to_dict()  # a config file that failed to load raises here
  except (flags.Error, ValueError, TypeError, AttributeError, KeyError,
          SyntaxError, OSError) as e:
    fail(describe_flag_error(e, argv))
  # JAX is imported only once the command line is known to be good.
  from poet_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from poet_jax import train_lib  # pylint: disable=g-import-not-at-top
  try:
    config_lib.validate(c)
  except config_lib.ConfigError as e:
    fail(str(e))
  config_file = config_flags.get_config_filename(flags.FLAGS['config'])
  stem = os.path.splitext(os.path.basename(config_file))[0]
  workdir = flags.FLAGS.workdir or os.path.join('runs',
                                           f'{stem}_{c.optimizer.name}')
  try:
    if flags.FLAGS.dry_run:
      from poet_jax import planner  # pylint: disable=g-import-not-at-top
      planner.dry_run(c, workdir)
      return 0
    return train_lib.train(c, workdir, progress=not flags.FLAGS.no_progress)
  except train_lib.USER_ERRORS as e:
    fail(' '.join(str(e).split()))


if __name__ == '__main__':
  sys.exit(main(sys.argv))
