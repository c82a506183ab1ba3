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
import difflib
import logging
import os
import re
import sys
import threading

from absl import flags
from ml_collections import config_flags

from poet_jax import flag_errors
from poet_jax import keys as keys_lib


def _config_dir() -> str:
  """configs/: installed as the package poet_jax.configs (pyproject.toml),
  or beside the package in a checkout that is not installed."""
  try:
    from poet_jax import configs  # pylint: disable=g-import-not-at-top
    return os.path.dirname(os.path.abspath(configs.__file__))
  except ImportError:
    return os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), 'configs')


CONFIG_DIR = _config_dir()
_DEFAULT_CONFIG = os.path.join(CONFIG_DIR, 'llama_tiny.py')
EXIT_BAD_INPUT = 2
# poet_jax.targets.TARGETS, here without importing JAX for --help.
TARGETS = ('cpu', 'h100', 'h200', 'a100')


@dataclasses.dataclass
class Command:
  """A parsed and validated command line."""
  config: object  # ml_collections.ConfigDict
  workdir: str
  dry_run: bool
  progress: bool
  compilation_cache: str = ''  # '' : no persistent compilation cache
  allow_data_change: bool = False
  target: str | None = None    # the dry run's device (poet_jax.targets)


def define_flags(flag_values: flags.FlagValues, argv):
  """The flags, on their own FlagValues so that parsing can be repeated.

  config_flags reads the --config.* overrides when the flag is defined, so
  this raises for a bad override or config file.
  """
  config = config_flags.DEFINE_config_file(
      'config', _DEFAULT_CONFIG, 'Python config file (configs/*.py), or '
      'the name of an installed one (llama_60m).',
      flag_values=flag_values, lock_config=True, sys_argv=list(argv))
  flags.DEFINE_string(
      'workdir', None, 'Where checkpoints and metrics go; default '
      'runs/<config name>_<optimizer>. A workdir that holds a checkpoint is '
      'resumed.', flag_values=flag_values)
  flags.DEFINE_bool(
      'dry_run', False, 'Compile the train step abstractly, report its '
      'memory and FLOPs to <workdir>/memory.json, and exit without training.',
      flag_values=flag_values)
  flags.DEFINE_enum(
      'target', None, TARGETS, 'With --dry_run: compile for this device '
      'instead of this machine\'s; a GPU needs none here, only JAX\'s CUDA '
      "plugin (pip install -e '.[plan]').", flag_values=flag_values)
  flags.DEFINE_bool('no_progress', False, 'Hide the progress bar.',
                    flag_values=flag_values)
  flags.DEFINE_bool(
      'allow_data_change', False, "Resume although the data's identity "
      "differs from the checkpoint's (a harmless change: a fixed typo, "
      'files added); the run continues on the new data.',
      flag_values=flag_values)
  flags.DEFINE_string(
      'compilation_cache', None, "JAX's persistent compilation cache: a "
      'restarted or repeated run loads its compiled steps instead of '
      'compiling them again. Default: $JAX_COMPILATION_CACHE_DIR, else '
      f'{DEFAULT_COMPILATION_CACHE}; empty: off.', flag_values=flag_values)
  return config


DEFAULT_COMPILATION_CACHE = '~/.cache/poet_jax/xla'


def compilation_cache_dir(flag_value: str | None) -> str:
  """The persistent compilation cache directory ('' : none)."""
  if flag_value is None:
    flag_value = os.environ.get('JAX_COMPILATION_CACHE_DIR',
                                DEFAULT_COMPILATION_CACHE)
  return os.path.expanduser(flag_value) if flag_value.strip() else ''


def use_compilation_cache(directory: str) -> None:
  """Points JAX's persistent compilation cache at directory ('' : off)."""
  import jax  # pylint: disable=g-import-not-at-top
  if directory:
    jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_enable_compilation_cache', bool(directory))


def _one_line(text, limit: int = 400) -> str:
  text = ' '.join(str(text).split())
  return text if len(text) <= limit else text[:limit - 3] + '...'


def _message(e: BaseException) -> str:
  """The error's text on one line, a traceback inside it cut to its end."""
  text = str(e)
  if 'Traceback (most recent call last)' in text:
    head = text.split('Traceback (most recent call last)')[0]
    text = f'{head} {[l for l in text.splitlines() if l.strip()][-1]}'
  return _one_line(text) or type(e).__name__


def _is_override(arg: str) -> bool:
  return re.match(r'-{1,2}(no)?config\.', arg) is not None


def _config_without_overrides(argv):
  """The config file's config, the overrides left out; None if it fails."""
  argv = [a for a in argv if not _is_override(a)]
  sys.modules.pop('config_config', None)
  try:
    flag_values = flags.FlagValues()
    config = define_flags(flag_values, argv)
    flag_values(argv)
    config.value.to_dict()
    return config.value
  except Exception:  # pylint: disable=broad-except
    return None


def _override_keys(argv) -> list[str]:
  """The dotted keys the --config.KEY[=VALUE] arguments name."""
  keys = []
  for a in argv:
    if _is_override(a):
      key = a.split('=')[0].lstrip('-')
      keys.append(key.split('config.', 1)[1])
  return keys


def unknown_key_message(argv, config) -> str | None:
  """One line for the first override that names no key of config, with the
  nearest key as a suggestion; None if every override names a key."""
  leaves = keys_lib.defaults(config)
  nodes = {k.rsplit('.', i)[0] for k in leaves for i in range(k.count('.') + 1)}
  for key in _override_keys(argv):
    if key in nodes:
      continue
    # The same name in another section first ('optimizer.lr' is 'train.lr'
    # or 'poet.lr'), then the nearest spelling.
    name = key.rsplit('.', 1)[-1]
    close = ([k for k in leaves if k.rsplit('.', 1)[-1] == name][:3] or
             difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.6))
    if close:
      return (f'unknown config key {key!r}; did you mean '
              f'{" or ".join(repr(k) for k in close)}?')
    return f'unknown config key {key!r}; --help lists the keys'
  return None


def describe_flag_error(e: BaseException, argv, flag_values=None) -> str:
  """One line for an error raised while reading the command line (with the
  FlagValues being parsed, a value of the wrong type is named as such)."""
  refused = (flag_errors.bad_value_message(e, flag_values)
             if flag_values is not None else None)
  if refused:
    return refused
  text = _message(e)
  overrides = _override_keys(argv)
  base = _config_without_overrides(argv) if overrides else None
  if base is not None:
    unknown = unknown_key_message(argv, base)
    if unknown:
      return unknown
  files = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
  config_file = files[-1] if files else _DEFAULT_CONFIG
  if not config_file.split(':')[0].strip():
    return '--config is empty; give a config file such as configs/llama_60m.py'
  if isinstance(e, OSError) and 'No such file' in text:
    return (f'config file {config_file} does not exist; use one of '
            'configs/*.py')
  if config_file.split(':')[0].endswith('.json'):
    return (f'--config={config_file} is a JSON file; --config takes a Python '
            "config file such as configs/llama_60m.py (a run's config.json "
            'is what --workdir=<its directory> resumes with)')
  if isinstance(e, flags.Error):
    # absl quotes Python reprs; drop their memory addresses so the same
    # input always gives the same line.
    return re.sub(r' at 0x[0-9a-fA-F]+', '', text)
  if base is not None:
    return f'bad config override: {type(e).__name__}: {text}'
  return f'config file {config_file} failed: {type(e).__name__}: {text}'


def installed_config(path: str) -> str:
  """path, or the packaged config it names when path is not there.

  A bare name (llama_60m) or a path under configs/ that does not exist
  here (the command run outside a checkout) is the installed config of
  that name.
  """
  if os.path.exists(path) or os.path.dirname(path) not in ('', 'configs'):
    return path
  name = os.path.basename(path)
  name = name if name.endswith('.py') else name + '.py'
  candidate = os.path.join(CONFIG_DIR, name)
  return candidate if os.path.isfile(candidate) else path


def _with_installed_configs(argv) -> list[str]:
  out = []
  for a in argv:
    if a.startswith('--config='):
      path, sep, rest = a[len('--config='):].partition(':')
      if path.strip():
        a = f'--config={installed_config(path)}{sep}{rest}'
    out.append(a)
  return out


def parse_command_line(argv, devices=None):
  """argv -> Command, or the one line saying why it cannot run.

  Every config key is checked (poet_jax.config_checks.validate); with
  `devices` (a list of jax devices) the mesh is checked against them too
  (train.py itself does that in train_lib.train, after jax.distributed is
  up). Never raises for bad input.
  """
  argv = _with_installed_configs(argv)
  flag_values = flags.FlagValues()
  # config_flags loads every config file as module 'config_config' and reuses
  # a loaded one's namespace: start afresh, parsing may be repeated.
  sys.modules.pop('config_config', None)
  try:
    config = define_flags(flag_values, argv)
    rest = flag_values(list(argv))
    c = config.value
    c.to_dict()  # a config file that failed to load raises here
  except Exception as e:  # pylint: disable=broad-except
    return _one_line(describe_flag_error(e, argv, flag_values))
  if rest[1:]:
    return (f'unexpected argument {_one_line(rest[1], 60)!r}; flags look like '
            '--config.KEY=VALUE (see --help)')
  from poet_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from poet_jax import config_checks  # pylint: disable=g-import-not-at-top
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
    from poet_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    try:
      mesh = sharding_lib.make_mesh(c.mesh, devices)
      sharding_lib.check_batch(mesh, c.train.batch_size,
                               c.train.grad_accum_steps)
    except sharding_lib.MeshError as e:
      return _one_line(e)
  cache = compilation_cache_dir(flag_values.compilation_cache)
  from poet_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
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
  argv = [a for a in _with_installed_configs(argv)
          if a not in ('-h', '--help', '--helpfull')]
  config = _config_without_overrides(argv)
  flag_values = flags.FlagValues()
  define_flags(flag_values, argv[:1])
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
  from poet_jax import checkpoint as checkpoint_lib
  from poet_jax import stopping
  from poet_jax import train_lib
  # pylint: enable=g-import-not-at-top
  stderr, quiet = sys.stderr, _NoOrbaxErrors()
  sys.stderr = _DropClosedLoopNoise(stderr)
  logging.getLogger('absl').addFilter(quiet)
  use_compilation_cache(command.compilation_cache)
  from poet_jax import targets  # pylint: disable=g-import-not-at-top
  targets.quiet_plugin_without_gpu()
  try:
    if command.dry_run:
      from poet_jax import planner  # pylint: disable=g-import-not-at-top
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
