"""The trainer's command-line arguments: its flags, the config file they
name (a file, or a config installed with the package), and a refused
command line said as one line (the key an override misspells, the file that
does not load). Nothing here imports JAX, so `--help` stays fast.
"""
import difflib
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

from poet_jax.train import flag_errors
from poet_jax.train import keys as keys_lib


_one_line = flag_errors.one_line


def _config_dir() -> str:
  """configs/: installed as the package poet_jax.configs (pyproject.toml),
  or beside the package in a checkout that is not installed."""
  try:
    from poet_jax import configs  # pylint: disable=g-import-not-at-top
    return os.path.dirname(os.path.abspath(configs.__file__))
  except ImportError:
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(os.path.dirname(package), 'configs')


CONFIG_DIR = _config_dir()
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, 'llama_tiny.py')
# poet_jax.train.plan.targets.TARGETS, here without importing JAX.
TARGETS = ('cpu', 'h100', 'h200', 'a100')


def define_flags(flag_values: flags.FlagValues, argv):
  """The flags, on their own FlagValues so that parsing can be repeated.

  config_flags reads the --config.* overrides when the flag is defined, so
  this raises for a bad override or config file.
  """
  config = config_flags.DEFINE_config_file(
      'config', DEFAULT_CONFIG, 'Python config file (configs/*.py), or '
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


def _message(e: BaseException) -> str:
  """The error's text on one line, a traceback inside it cut to its end."""
  text = str(e)
  if 'Traceback (most recent call last)' in text:
    head = text.split('Traceback (most recent call last)')[0]
    text = f'{head} {[l for l in text.splitlines() if l.strip()][-1]}'
  return _one_line(text) or type(e).__name__


def _is_override(arg: str) -> bool:
  return re.match(r'-{1,2}(no)?config\.', arg) is not None


def config_without_overrides(argv):
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
  base = config_without_overrides(argv) if overrides else None
  if base is not None:
    unknown = unknown_key_message(argv, base)
    if unknown:
      return unknown
  files = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
  config_file = files[-1] if files else DEFAULT_CONFIG
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


def with_installed_configs(argv) -> list[str]:
  out = []
  for a in argv:
    if a.startswith('--config='):
      path, sep, rest = a[len('--config='):].partition(':')
      if path.strip():
        a = f'--config={installed_config(path)}{sep}{rest}'
    out.append(a)
  return out
