"""The command line and config validation: anything gives either a valid
config or one clear line (exit code 2), never a traceback.

In-process: train.parse_command_line is the parsing train.py does, with the
8 simulated devices of conftest.py for the mesh check.
"""
import contextlib
import io
import os

import jax
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from poet_jax.train import cli as train
from poet_jax.train import config as config_lib
from poet_jax.train import config_checks
from train_util import ROOT

pytestmark = pytest.mark.filterwarnings(
    'ignore:the load_module:DeprecationWarning')  # ml_collections

DEFAULTS = config_checks._leaves(config_lib.base_config())  # pylint: disable=protected-access
DEVICES = jax.devices()


def parse(*args, devices=DEVICES):
  return train.parse_command_line(['train.py', *args], devices=devices)


def run_main(*args):
  """train.main in-process (only for command lines that fail before any
  work): (exit code, stderr)."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(
      io.StringIO()):
    code = train.main(['train.py', *args])
  return code, err.getvalue()


def assert_one_clear_line(line):
  assert isinstance(line, str) and line.strip(), line
  assert '\n' not in line and '\r' not in line, line
  assert 'Traceback' not in line and len(line) <= 400, line


# ------------------------------------------------------------ strategies

ODD_KEYS = ['no_such_key', 'model', 'model.dim.x', 'train..lr', '', 'x.',
            'MODEL.DIM', 'model.nope', 'poet', 'data.name.x']
ODD_VALUES = ['', ' ', 'True', 'False', 'None', 'nan', '-nan', 'inf', '-inf',
              '1e400', '0x10', '0b11', '(1, 2)', '[1]', '{}', "'x'", '"x"',
              '1_000', '2**31', '-1', '0', '1', '0.5', '8', '32', '256',
              '2147483648', '-2147483649', '1e-9', 'skip', 'stop', 'poet',
              'adamw', 'galore', 'muon', 'block', 'full', 'bfloat16',
              'materialize', '/no/such/path', './no/such/dir', '~/nothing',
              'byte', 'python_stdlib', 'c4/en', '127.0.0.1:1234', 'gloo',
              'a=b', '--config.seed=1', '\x00', 'é✓']
CONFIG_FILES = ['configs/llama_tiny.py', 'configs/llama_60m.py',
                'configs/llama_13b.py', '/no/such/config.py', 'README.md',
                '', 'configs/llama_tiny.py:arg', 'configs']

keys = st.one_of(st.sampled_from(sorted(DEFAULTS)), st.sampled_from(ODD_KEYS),
                 st.text('abcdefghijklmnopqrstuvwxyz_.', max_size=12))
values = st.one_of(
    st.sampled_from(ODD_VALUES),
    st.integers(-2**40, 2**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=16))


@st.composite
def typed_override(draw):
  """A known key with a value of its type, in or out of range."""
  key = draw(st.sampled_from(sorted(DEFAULTS)))
  default = DEFAULTS[key]
  if isinstance(default, bool):
    value = draw(st.sampled_from(['True', 'False', 'true', '0', '1']))
  elif isinstance(default, int):
    value = str(draw(st.one_of(st.integers(-3, 300), st.integers(-2**33,
                                                                  2**33))))
  elif isinstance(default, float):
    value = repr(draw(st.one_of(st.floats(-2.0, 2.0), st.floats())))
  else:
    value = draw(values)
  return f'--config.{key}={value}'


arguments = st.one_of(
    typed_override(), typed_override(),
    st.builds(lambda k, v: f'--config.{k}={v}', keys, values),
    st.builds(lambda k, v: f'--config.{k}={v}', st.sampled_from(
        sorted(DEFAULTS)), values),
    keys.map(lambda k: f'--config.{k}'),
    keys.map(lambda k: f'--noconfig.{k}'),
    st.sampled_from(CONFIG_FILES).map(lambda f: f'--config={f}'),
    values.map(lambda v: f'--workdir={v}'),
    values.map(lambda v: f'--dry_run={v}'),
    st.sampled_from(['--no_progress', '--bogus', '-x', 'positional', '--',
                     '--config', '--workdir']),
)


# ------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(arguments, max_size=6))
def test_any_command_line_is_a_config_or_one_clear_line(args):
  result = parse(*args)
  if isinstance(result, train.Command):
    config_checks.validate(result.config)  # and it stays valid
    assert result.workdir.strip()
    return
  assert_one_clear_line(result)
  # What train.py prints for it: that line on stderr, exit code 2. (The
  # mesh is checked against the devices in loop.train; skip those.)
  if isinstance(parse(*args, devices=None), str):
    code, err = run_main(*args)
    assert code == 2
    assert err == f'error: {result}\n'


@st.composite
def valid_overrides(draw):
  """Overrides that are all within range, with the values they must give."""
  steps = draw(st.integers(1, 10**6))
  chosen = {
      'seed': draw(st.integers(0, 2**31 - 1)),
      'train.steps': steps,
      'train.warmup_steps': draw(st.integers(0, steps - 1)),
      'train.lr': draw(st.floats(1e-6, 1.0)),
      'train.grad_clip': draw(st.floats(0.0, 10.0)),
      'log_every': draw(st.integers(1, 10**4)),
      'keep_checkpoints': draw(st.integers(1, 100)),
      'nan_policy': draw(st.sampled_from(['skip', 'stop'])),
      'optimizer.name': draw(st.sampled_from(config_lib.METHODS)),
      'optimizer.b2': draw(st.floats(0.0, 0.9999)),
      'poet.max_q_norm': draw(st.floats(0.0, 10.0)),
      'poet.merge_every': draw(st.integers(1, 10**4)),
      'train.grad_accum_steps': draw(st.sampled_from([1, 2])),
      'model.remat': draw(st.booleans()),
      'model.dtype': draw(st.sampled_from(config_lib.DTYPES)),
      'mesh.data': draw(st.sampled_from([-1, 1, 2, 4, 8])),
  }
  subset = draw(st.lists(st.sampled_from(sorted(chosen)), unique=True))
  if 'train.warmup_steps' in subset:
    subset.append('train.steps')
  return {k: chosen[k] for k in subset}


@settings(max_examples=100, deadline=None)
@given(valid_overrides())
def test_valid_overrides_give_exactly_those_values(overrides):
  args = [f'--config.{k}={v!r}' if isinstance(v, float) else
          f'--config.{k}={v}' for k, v in overrides.items()]
  # The default batch of 16 divides every data-parallel mesh of 8 devices.
  result = parse(*args)
  assert isinstance(result, train.Command), (args, result)
  got = config_checks._leaves(result.config)  # pylint: disable=protected-access
  for key, value in overrides.items():
    assert got[key] == value and type(got[key]) is type(value), key


# ---------------------------------------------- every key, type and range


def wrong_type(default):
  """A value of another type than the default's."""
  if isinstance(default, bool):
    return 1
  if isinstance(default, (int, float)):
    return 'seven'
  return 7


@pytest.mark.parametrize('key', sorted(DEFAULTS))
def test_every_key_is_type_checked(key):
  """A config file can put any type anywhere; validate names the key."""
  c = config_lib.base_config()
  node = c
  *parents, leaf = key.split('.')
  for part in parents:
    node = node[part]
  with node.ignore_type():
    node[leaf] = wrong_type(DEFAULTS[key])
  with pytest.raises(config_lib.ConfigError, match=f'^{key}='):
    config_checks.validate(c)


@pytest.mark.parametrize('key', sorted(
    k for k, v in DEFAULTS.items() if not isinstance(v, str)))
def test_every_non_string_key_refuses_a_word_on_the_command_line(key):
  result = parse(f'--config.{key}=seven')
  assert_one_clear_line(result)
  assert key in result


@pytest.mark.parametrize('override,expected', [
    ('--config.seed=-1', 'seed=-1'),
    ('--config.train.steps=0', 'train.steps=0'),
    ('--config.train.steps=2147483648', 'below 2**31'),
    ('--config.train.lr=nan', 'finite'),
    ('--config.train.lr=-0.1', 'train.lr'),
    ('--config.train.warmup_steps=300', 'train.warmup_steps'),
    ('--config.optimizer.b1=1.0', 'optimizer.b1'),
    ('--config.optimizer.galore_rank=0', 'optimizer.galore_rank'),
    ('--config.optimizer.galore_scale=0', 'optimizer.galore_scale'),
    ('--config.model.ffn_dim=-2', 'model.ffn_dim'),
    ('--config.model.ffn_dim_block=0', 'model.ffn_dim_block'),
    ('--config.poet.block_size=7', 'does not divide'),
    ('--config.poet.block_size=1', 'blocks of 1, which have no rotation'),
    ('--config.data.decode_errors=ignore', 'data.decode_errors'),
    ('--config.poet.neumann_terms=9', 'poet.neumann_terms'),
    ('--config.poet.max_q_norm=-1', 'poet.max_q_norm'),
    ('--config.model.dim=100', 'model.dim'),
    ('--config.model.num_kv_heads=3', 'model.num_kv_heads=3 must divide '
     'model.num_heads=4'),
    ('--config.model.rope_theta=0', 'model.rope_theta'),
    ('--config.model.norm_eps=-1e-5', 'model.norm_eps'),
    ('--config.data.max_tokens=-5', 'data.max_tokens'),
    ('--config.data.name=/no/such/dir', '/no/such/dir'),
    ('--config.data.tokenizer=/no/such/tok.model', '/no/such/tok.model'),
    ('--config.data.data_dir=' + os.path.join(ROOT, 'train.py'),
     'not a directory'),
    ('--config.mesh.data=16', 'needs 16 devices'),
    ('--config.mesh.data=3', 'not divisible by mesh data x fsdp = 3'),
    ('--config.mesh.data=0', 'mesh.data'),
    ('--config.train.batch_size=12', 'not divisible'),
    ('--config.train.grad_accum_steps=3',
     'train.batch_size=16 is not divisible by train.grad_accum_steps=3'),
    ('--config.train.grad_accum_steps=0', 'train.grad_accum_steps=0'),
    # 16 / 4 = 4 sequences per micro-batch cannot split over 8 devices.
    ('--config.train.grad_accum_steps=4', 'micro-batch'),
    ('--config.distributed.process_id=3', 'distributed.process_id'),
    ('--config.model.remat=maybe', 'model.remat'),
    # Unparsable numbers name the flag and the type it takes.
    ('--config.train.steps=abc', '--config.train.steps=abc is not an '
     'integer; give --config.train.steps an integer, such as 300'),
    ('--config.train.lr=1e', '--config.train.lr=1e is not a number; give '
     '--config.train.lr a number, such as 0.01'),
    ('--config.model.remat=maybe', '--config.model.remat=maybe is not true '
     'or false; give --config.model.remat true or false, such as false'),
    ('--config.no_such_key=1', "unknown config key 'no_such_key'"),
    ('--config=/no/such/config.py', 'does not exist'),
    ('--workdir=', '--workdir'),
    ('stray', "unexpected argument 'stray'"),
])
def test_range_divisibility_mesh_and_paths(override, expected):
  result = parse(override)
  assert_one_clear_line(result)
  assert expected in result, result


def test_poet_blocks_must_divide_the_key_value_width():
  # 4 heads of 32 share one key/value head: k and v are 32 wide.
  result = parse('--config.model.num_kv_heads=1',
                 '--config.poet.block_size=64')
  assert_one_clear_line(result)
  assert 'does not divide the key/value width=32' in result, result


@pytest.mark.parametrize('override,kind', [
    ('--config.train.steps=abc', 'an integer'),
    ('--config.train.steps=1e3', 'an integer'),
    ('--config.train.lr=1e', 'a number'),
    ('--config.poet.block_size=', 'a number'),
])
def test_an_unparsable_number_is_one_line_and_creates_nothing(override, kind,
                                                              tmp_path):
  workdir = tmp_path / 'run'
  code, err = run_main(f'--workdir={workdir}', override)
  assert code == 2
  flag, value = override.split('=', 1)
  assert err == f'error: {flag}={value} is not {kind}; give {flag} {kind}, ' \
      f'such as {DEFAULTS[flag[len("--config."):]]}\n'
  assert not workdir.exists()


def test_a_runs_config_json_given_as_config_says_what_to_do(tmp_path):
  """A newcomer reruns a run from its config.json: not Python (false, null
  are names there); the line says what --config takes and how to resume."""
  path = tmp_path / 'config.json'
  path.write_text(config_lib.base_config().to_json())
  message = train.parse_command_line(['train.py', f'--config={path}'])
  assert isinstance(message, str) and 'is a JSON file' in message, message
  assert 'configs/llama_60m.py' in message and '--workdir' in message


def test_a_config_file_that_raises_is_one_line(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('def get_config():\n  return undefined_name\n')
  result = parse(f'--config={bad}')
  assert_one_clear_line(result)
  assert str(bad) in result and 'NameError' in result


def test_mesh_that_fits_the_devices():
  for args in (['--config.mesh.data=4', '--config.mesh.fsdp=2'],
               ['--config.mesh.data=-1', '--config.mesh.fsdp=4'],
               ['--config.mesh.data=2', '--config.train.batch_size=2']):
    assert isinstance(parse(*args), train.Command), args


def test_help_exits_0():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert train.main(['train.py', '--help']) == 0
  assert 'Exit codes' in out.getvalue() and '--workdir' in out.getvalue()


def _number_keys(prefixes):
  from train_util import tiny_config  # pylint: disable=g-import-not-at-top
  return sorted(k for k, v in config_checks._leaves(tiny_config()).items()
                if k.startswith(prefixes) and isinstance(v, (int, float))
                and not isinstance(v, bool))


@pytest.mark.parametrize('key', _number_keys(('model.', 'poet.',
                                              'optimizer.', 'train.')))
def test_a_smallest_value_the_checks_accept_builds_the_run(key):
  """0 and 1, where sizes and counts degenerate (blocks of 1, one layer,
  no warm-up): refused in one line by validate, or the model and the
  optimizer are built from them (abstractly), never a traceback later."""
  from poet_jax.train import state as train_state  # pylint: disable=g-import-not-at-top
  from train_util import tiny_config  # pylint: disable=g-import-not-at-top
  for value in (0, 1):
    c = tiny_config()
    *path, last = key.split('.')
    node = c
    for part in path:
      node = node[part]
    node[last] = type(node[last])(value)
    try:
      config_checks.validate(c)
    except config_lib.ConfigError:
      continue
    train_state.abstract_state(c, 257)
