"""Start-up: a refused start changes nothing in the work directory, not even
a time stamp or the leftovers of a killed save; a train step too large for the device is warned about, once,
and the run goes on.

One tiny in-process run (one device, two steps) for the module.
"""
import contextlib
import io
import json
import os
import shutil

import jax
import jax.numpy as jnp
import pytest

from poet_jax.train import cli
from poet_jax.train import loop as train_lib
from poet_jax.train import startup
from poet_jax.train.plan import planner

pytestmark = pytest.mark.filterwarnings(
    'ignore:the load_module:DeprecationWarning')  # ml_collections

ARGS = ('--config.model.dim=32', '--config.model.num_layers=1',
        '--config.model.num_heads=2', '--config.model.ffn_dim=64',
        '--config.poet.block_size=8', '--config.train.batch_size=4',
        '--config.train.seq_len=16', '--config.eval_tokens=64',
        '--config.train.steps=2', '--config.mesh.data=1',
        '--config.eval_at_start=never', '--no_progress')
NO_MEMORY_GIB = 1e-6  # a device smaller than any step


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, stdout, the compiled train step's memory analysis) of a run
  on a device with no memory: it warns and trains on."""
  workdir = str(tmp_path_factory.mktemp('startup') / 'run')
  command = cli.parse_command_line(['train.py', f'--workdir={workdir}',
                                    *ARGS])
  assert isinstance(command, cli.Command), command
  analyses, warning = [], startup.memory_warning

  def spy(c, compiled, data_parallel):
    analyses.append(compiled.memory_analysis())
    return warning(c, compiled, data_parallel)

  out = io.StringIO()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(planner, 'device_memory_gib',
                  lambda devices=None: NO_MEMORY_GIB)
    patch.setattr(startup, 'memory_warning', spy)
    with contextlib.redirect_stdout(out):
      code = train_lib.train(command.config, workdir, progress=False)
  assert code == 0, out.getvalue()[-2000:]
  assert len(analyses) == 1  # the trainer's own compile, read once
  return workdir, out.getvalue(), analyses[0]


def test_a_step_too_large_for_the_device_warns_once_and_trains(run):
  workdir, out, mem = run
  lines = [l for l in out.splitlines() if l.startswith('warning: ')]
  assert len(lines) == 1, out
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes -
          mem.alias_size_in_bytes + mem.temp_size_in_bytes) / planner.GIB
  assert peak > NO_MEMORY_GIB
  for text in (f'needs {peak:.3g} GiB per device', f'{NO_MEMORY_GIB:.3g} GiB',
               '--dry_run', '--config.train.grad_accum_steps=2',
               '--config.model.remat=True'):
    assert text in lines[0], (text, lines[0])
  # Not refused: it trained to the end and saved.
  assert 'step 2: eval loss' in out
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['2']


def test_a_step_that_fits_says_nothing(monkeypatch):
  compiled = jax.jit(lambda x: x @ x).lower(
      jax.ShapeDtypeStruct((64, 64), jnp.float32)).compile()
  c = cli.parse_command_line(['train.py', *ARGS]).config
  assert startup.memory_warning(c, compiled) is None  # the real device
  monkeypatch.setattr(planner, 'device_memory_gib',
                      lambda devices=None: NO_MEMORY_GIB)
  assert startup.memory_warning(c, compiled).startswith('warning: ')
  c.unlock()
  c.model.remat = True   # already on: not suggested again
  assert 'remat' not in startup.memory_warning(c, compiled)
  # Micro-batches only where twice as many still split the batch over the
  # data-parallel devices (a fresh user got a suggestion the trainer refuses).
  assert 'grad_accum_steps=2 ' in startup.memory_warning(c, compiled, 1)
  c.train.batch_size = 1
  assert 'grad_accum' not in startup.memory_warning(c, compiled, 1)
  c.train.batch_size = 4
  assert 'grad_accum' not in startup.memory_warning(c, compiled, 4)

  class NoAnalysis:  # a backend without a memory analysis
    def memory_analysis(self):
      return None
  assert startup.memory_warning(c, NoAnalysis()) is None


def time_stamps(directory):
  """{relative path: (st_mtime_ns, size)} of the directory itself and of
  every directory and file below it."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for name in ['.', *dirs, *files]:
      path = os.path.join(root, name)
      stat = os.stat(path)
      out[os.path.relpath(path, directory)] = (stat.st_mtime_ns,
                                               stat.st_size)
  return out


@pytest.mark.parametrize('override,expected', [
    ('--config.seed=1', 'holds a run with a different config (seed)'),
    ('--config.model.vocab_size=200', 'model.vocab_size=200'),
    ('--config.train.steps=abc', 'is not an integer'),
    ('--config.data.tokenizer=' + os.path.abspath(__file__),
     'not a SentencePiece model'),
])
def test_a_refused_start_changes_no_time_stamp(run, override, expected,
                                               tmp_path):
  workdir = _copy_with_leftover(run[0], tmp_path)
  _assert_refused_unchanged(workdir, [override], expected)


def test_a_damaged_checkpoint_is_refused_before_anything_changes(run,
                                                                 tmp_path):
  # Found by a tester: the fingerprint was checked only after config.json
  # was rewritten and the leftovers of killed saves removed.
  workdir = _copy_with_leftover(run[0], tmp_path)
  path = os.path.join(workdir, 'checkpoints', '2', 'meta', 'metadata')
  with open(path) as f:
    record = json.load(f)
  first = sorted(record['fingerprint'])[0]
  record['fingerprint'][first] ^= 1
  with open(path, 'w') as f:
    json.dump(record, f)
  _assert_refused_unchanged(workdir, [], 'differs from the fingerprint')


def _copy_with_leftover(workdir, tmp_path):
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  # What a save killed before its commit leaves: a resumed run removes it,
  # a refused one does not.
  leftover = os.path.join(copy, 'checkpoints',
                          '3.orbax-checkpoint-tmp-1764519000000000')
  shutil.copytree(os.path.join(copy, 'checkpoints', '2'), leftover)
  os.remove(os.path.join(leftover, 'commit_success.txt'))
  return copy


def _assert_refused_unchanged(workdir, overrides, expected):
  before = time_stamps(workdir)
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(
      io.StringIO()):
    code = cli.main(['train.py', f'--workdir={workdir}', *ARGS, *overrides,
                     '--compilation_cache='])
  assert code == 2
  lines = err.getvalue().strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  assert expected in lines[0], lines[0]
  assert time_stamps(workdir) == before
