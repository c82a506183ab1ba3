"""Train a Llama with POET (or a baseline) from the command line.

  poet-jax-train                                   # tiny default, embedded data
  poet-jax-train --config=configs/llama_60m.py --workdir=runs/60m \\
      --config.poet.block_size=128

(`python train.py` in a checkout is the same command.) --config takes a
config file; a name such as llama_60m, or a path under configs/ that does
not exist where you are, is the config installed with the package.

Exit codes (docs/reliability.md):
  0  done.
  2  bad input: a flag, config value, path, data or tokenizer file, or a
     checkpoint that cannot be read, or a work directory another trainer
     is using; one line on stderr says what and how to fix it. Nothing in
     the work directory was changed.
  3  interrupted by SIGTERM/SIGINT; the step in flight was finished and a
     checkpoint written (or, during start-up, nothing was lost). Run the
     same command to resume.
  4  nan_policy='stop' met a non-finite loss or gradient; the message names
     the step and the last good checkpoint.
  5  a file could not be written (disk full, I/O): a checkpoint, the
     metrics, the prepared data; the line names it, and the earlier
     checkpoints are intact. Fix it and run the same command.
"""
import dataclasses
import logging
import os
import sys
import threading

from absl import flags
from ml_collections import config_flags

from poet_jax.train import arguments
from poet_jax.train import flag_errors
from poet_jax.train import keys as keys_lib

EXIT_BAD_INPUT = 2
_one_line = flag_errors.one_line


@dataclasses.dataclass
class Command:
  """A parsed and validated command line."""
  config: object  # ml_collections.ConfigDict
  workdir: str
  dry_run: bool
  progress: bool
  compilation_cache: str = ''  # '' : no persistent compilation cache
  allow_data_change: bool = False
  target: str | None = None    # the dry run's device (plan.targets)


def use_compilation_cache(directory: str) -> None:
  """Points JAX's persistent compilation cache at directory ('' : off)."""
  import jax  # pylint: disable=g-import-not-at-top
  if directory:
    jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_enable_compilation_cache', bool(directory))


def parse_command_line(argv, devices=None):
  """argv -> Command, or the one line saying why it cannot run.

  Every config key is checked (config_checks.validate); with `devices` (a
  list of jax devices) the mesh is checked against them too (train.py
  itself does that in loop.train, after jax.distributed is up). Never
  raises for bad input.
  """
  argv = arguments.with_installed_configs(argv)
  flag_values = flags.FlagValues()
  # config_flags loads every config file as module 'config_config' and reuses
  # a loaded one's namespace: start afresh, parsing may be repeated.
  sys.modules.pop('config_config', None)
  try:
    config = arguments.define_flags(flag_values, argv)
    rest = flag_values(list(argv))
    c = config.value
    c.to_dict()  # a config file that failed to load raises here
  except Exception as e:  # pylint: disable=broad-except
    return _one_line(arguments.describe_flag_error(e, argv, flag_values))
  if rest[1:]:
    return (f'unexpected argument {_one_line(rest[1], 60)!r}; flags look like '
            '--config.KEY=VALUE (see --help)')
  from poet_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from poet_jax.train import config_checks  # pylint: disable=g-import-not-at-top
  try:
    config_checks.validate(c)
  except config_lib.ConfigError as e:
    return _one_line(e)
  workdir = flag_values.workdir
  if workdir is None:
    config_file = config_flags.get_config_filename(flag_values['config'])
    stem = os.path.splitext(os.path.basename(config_file))[0]
    workdir = os.path.join('runs', f'{stem}_{c.optimizer.name}')
  if not workdir.strip():
    return '--workdir is empty; give a directory for checkpoints and metrics'
  workdir = os.path.expanduser(workdir)  # a shell leaves --workdir=~/x as is
  if flag_values.target and not flag_values.dry_run:
    return (f'--target={flag_values.target} compiles for another device: it '
            'goes with --dry_run')
  # Last: the only check that needs the devices, so a line found without
  # them is the same with them.
  if devices is not None:
    from poet_jax.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    try:
      mesh = sharding_lib.make_mesh(c.mesh, devices)
      sharding_lib.check_batch(mesh, c.train.batch_size,
                               c.train.grad_accum_steps)
    except sharding_lib.MeshError as e:
      return _one_line(e)
  cache = arguments.compilation_cache_dir(flag_values.compilation_cache)
  from poet_jax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  try:
    if cache:
      workdir_lib.check_outside_runs(cache, '--compilation_cache')
  except workdir_lib.WorkdirError as e:
    return _one_line(e)
  return Command(c, workdir, flag_values.dry_run, not flag_values.no_progress,
                 cache, flag_values.allow_data_change, flag_values.target)


class _DropClosedLoopNoise:
  """sys.stderr, less one kind of noise.

  When a checkpoint read or write fails, orbax gives up on the others in
  flight and closes its event loop; tensorstore then prints a
  'RuntimeError: Event loop is closed' traceback from its own threads for
  each of them. The trainer reports the failure itself, in one line, so
  those tracebacks are dropped (held per thread until complete); everything
  else passes through unchanged.
  """
  _HEADER = 'Traceback (most recent call last):'
  _NOISE = 'RuntimeError: Event loop is closed'

  def __init__(self, stream):
    self.stream = stream
    self._held = {}

  def write(self, text: str) -> int:
    ident = threading.get_ident()
    held = self._held.pop(ident, None)
    if held is None and not text.startswith(self._HEADER):
      return self.stream.write(text)
    held = (held or '') + text
    lines = held.split('\n')
    for i in range(1, len(lines) - 1):  # complete lines after the header
      if lines[i] and not lines[i].startswith(' '):
        if lines[i].strip() != self._NOISE:
          self.stream.write('\n'.join(lines[:i + 1]) + '\n')
        rest = '\n'.join(lines[i + 1:])
        if rest:
          self.write(rest)
        return len(text)
    self._held[ident] = held
    return len(text)

  def flush(self):
    self.stream.flush()

  def __getattr__(self, name):
    return getattr(self.stream, name)


class _NoOrbaxErrors(logging.Filter):
  """Drops orbax's own ERROR records (it logs a failed save with a traceback
  from its thread before raising it to us; we report it in one line)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and
                f'{os.sep}orbax{os.sep}' in record.pathname)


def _error(message: str) -> None:
  print(f'error: {_one_line(message, 1000)}', file=sys.stderr, flush=True)


def write_failure(e: OSError, workdir: str) -> str:
  """One line for a file the run could not write (disk full, I/O error):
  which file, why, what to do, and what of the run is safe."""
  if e.strerror is None:  # a message of ours, with its fix
    text = str(e)
  else:
    what = e.filename or 'a file'
    text = f'could not write {what} ({e.strerror}); free space or fix the disk'
  checkpoints = os.path.join(workdir, 'checkpoints')
  saved = os.path.isdir(checkpoints) and any(
      name.isdigit() for name in os.listdir(checkpoints))
  return text + (', then run the same command to resume; the earlier '
                 'checkpoints are intact' if saved else
                 ', then run the same command (no checkpoint had been '
                 'written yet)')


def help_text(argv) -> str:
  """The module doc, the flags, and every config key of the chosen config
  file with its value and meaning."""
  argv = [a for a in arguments.with_installed_configs(argv)
          if a not in ('-h', '--help', '--helpfull')]
  config = arguments.config_without_overrides(argv)
  flag_values = flags.FlagValues()
  arguments.define_flags(flag_values, argv[:1])
  return '\n'.join([__doc__, flag_values.get_help(), '',
                    keys_lib.help_text(config)])


def main(argv=None) -> int:
  """Runs the command line; returns the exit code (see the module doc)."""
  argv = sys.argv if argv is None else argv
  if any(a in ('-h', '--help', '--helpfull') for a in argv[1:]):
    print(help_text(argv))
    return 0
  command = parse_command_line(argv)
  if isinstance(command, str):
    _error(command)
    return EXIT_BAD_INPUT
  # pylint: disable=g-import-not-at-top
  from poet_jax.train import checkpoint as checkpoint_lib
  from poet_jax.train import stopping
  from poet_jax.train import loop as train_lib
  # pylint: enable=g-import-not-at-top
  stderr, quiet = sys.stderr, _NoOrbaxErrors()
  sys.stderr = _DropClosedLoopNoise(stderr)
  logging.getLogger('absl').addFilter(quiet)
  from poet_jax.train.plan import targets  # pylint: disable=g-import-not-at-top
  # A compile-only GPU's executable cannot be read back from the cache (JAX
  # warns at every hit): a dry run for a GPU target compiles afresh.
  use_compilation_cache('' if command.target in targets.GPU_TARGETS
                        else command.compilation_cache)
  targets.quiet_plugin_without_gpu()
  try:
    if command.dry_run:
      from poet_jax.train.plan import planner  # pylint: disable=g-import-not-at-top
      targets.use_cpu_runtime(command.target)
      planner.dry_run(command.config, command.workdir, command.target)
      return 0
    return train_lib.train(command.config, command.workdir,
                           progress=command.progress,
                           allow_data_change=command.allow_data_change)
  except train_lib.USER_ERRORS as e:
    _error(str(e))
    return EXIT_BAD_INPUT
  except stopping.Interrupted as e:
    print(f'{e} during start-up, before the first step: nothing new to save; '
          'run the same command to resume', flush=True)
    return train_lib.EXIT_INTERRUPTED
  except checkpoint_lib.SaveError as e:
    _error(str(e))
    return train_lib.EXIT_IO_ERROR
  except OSError as e:
    _error(write_failure(e, command.workdir))
    return train_lib.EXIT_IO_ERROR
  finally:
    logging.getLogger('absl').removeFilter(quiet)
    sys.stderr = stderr


def run() -> None:
  """The console entry point (poet-jax-train, python train.py): main, then
  exit with its code."""
  code = main(sys.argv)
  sys.stdout.flush()
  sys.stderr.flush()
  if code in (EXIT_BAD_INPUT, 5):
    # A failed checkpoint read or write can leave orbax and tensorstore
    # threads behind whose interpreter shutdown is noisy; all is reported.
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


if __name__ == '__main__':
  run()
