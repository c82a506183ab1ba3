"""Command lines of the after-training tools (generate, evaluate, export).

Flags are absl flags on a fresh FlagValues per call, so `main(argv)` can be
called more than once in a process. Bad input is one line on stderr and exit
code 2 (docs/reliability.md), raised by the tools as one of USER_ERRORS.
"""
import os
import sys
from typing import Callable

from absl import flags

from poet_jax.data import pipeline as data_lib
from poet_jax.data import tokenizer as tokenizer_lib
from poet_jax.train import config as config_lib
from poet_jax.train import flag_errors
from poet_jax.train import workdir as workdir_lib

EXIT_BAD_INPUT = 2
PATH_FLAGS = ('workdir', 'out')  # ~ expanded


class UsageError(ValueError):
  """A flag value that cannot be used; one line."""


def error(message: str) -> None:
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr,
        flush=True)


def run(doc: str, define: Callable[[flags.FlagValues], None],
        body: Callable[[flags.FlagValues], int], argv, user_errors=()) -> int:
  """Parse argv (sys.argv if None) with the flags `define` adds, run body.

  Returns body's exit code, 0 after --help, or EXIT_BAD_INPUT after printing
  one line for a bad flag or an error of USER_ERRORS or `user_errors`.
  """
  argv = list(sys.argv if argv is None else argv)
  flag_values = flags.FlagValues()
  define(flag_values)
  if any(a in ('-h', '--help', '--helpfull') for a in argv[1:]):
    print(doc)
    print(flag_values.get_help())
    return 0
  try:
    rest = flag_values(argv)
  except flags.Error as e:
    error(flag_errors.bad_value_message(e, flag_values) or e)
    return EXIT_BAD_INPUT
  if rest[1:]:
    error(f'unexpected argument {rest[1]!r}; flags look like --name=value '
          '(see --help)')
    return EXIT_BAD_INPUT
  for name in PATH_FLAGS:  # a shell leaves the ~ of --workdir=~/x as it is
    if name in flag_values and isinstance(flag_values[name].value, str):
      flag_values[name].value = os.path.expanduser(flag_values[name].value)
  from poet_jax.train.plan import targets  # pylint: disable=g-import-not-at-top
  targets.quiet_plugin_without_gpu()
  try:
    return body(flag_values) or 0
  except USER_ERRORS + tuple(user_errors) as e:
    error(e)
    return EXIT_BAD_INPUT


USER_ERRORS = (UsageError, config_lib.ConfigError, data_lib.DataError,
               tokenizer_lib.TokenizerError, workdir_lib.WorkdirError,
               FileNotFoundError, NotADirectoryError, PermissionError)
