"""A flag value its parser refused, said as one line naming the flag and the
type it takes, for every command line (train.py and the tools)."""
import re

from absl import flags

# absl's IllegalFlagValueError text for a value its parser refused.
_REFUSED_VALUE = re.compile(r'flag --([\w.]+)=(.*?): ', re.DOTALL)
_KINDS = {'int': 'an integer', 'float': 'a number', 'bool': 'true or false'}


def one_line(text, limit: int = 400) -> str:
  """str(text) on one line, cut to `limit` characters."""
  text = ' '.join(str(text).split())
  return text if len(text) <= limit else text[:limit - 3] + '...'


def bad_value_message(e: BaseException,
                      flag_values: flags.FlagValues) -> str | None:
  """One line for a value that an integer, float or boolean flag (a
  --config.KEY override of ml_collections included) cannot parse: the flag,
  the type it takes and its default. None for any other error.

  absl's own text carries the parser's Python error ("invalid literal for
  int() with base 10: 'abc'"); this line says instead what to give.
  """
  match = _REFUSED_VALUE.match(str(e))
  if not (isinstance(e, flags.IllegalFlagValueError) and match):
    return None
  name, value = match.groups()
  if name not in flag_values:
    return None
  flag = flag_values[name]
  kind = _KINDS.get(flag.parser.flag_type())
  if kind is None:
    return None
  default = flag.default
  if isinstance(default, bool):
    default = str(default).lower()  # as absl spells them
  example = f', such as {default}' if default is not None else ''
  return one_line(f'--{name}={one_line(value, 40)} is not {kind}; give '
                   f'--{name} {kind}{example}', 400)
