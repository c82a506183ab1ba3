"""A work directory's files belong to its run: no tool writes among them, one
live trainer at a time owns it (a killed one does not keep it), and a
config.json that is not the run's is refused, never overwritten."""
import json
import os
import shutil
import signal
import subprocess

import pytest

from poet_jax.tools import export
from poet_jax.train import cli as train
from poet_jax.train import plot
from poet_jax.train import workdir as workdir_lib
from train_util import (ROOT, SHORT, assert_one_error_line, run_train,
                        snapshot, train_command, train_env)

pytestmark = pytest.mark.filterwarnings(
    'ignore:the load_module:DeprecationWarning')  # ml_collections


def _refused(main, argv, capsys, *expected):
  capsys.readouterr()
  code = main(argv)
  assert code == 2
  return assert_one_error_line(capsys.readouterr().err, *expected)


def test_no_tool_writes_among_a_runs_files(reference, tmp_path, capsys):
  """Every path a tool or the trainer would write (export's and plot's
  --out, a new --workdir, data.data_dir, the compilation cache) is refused
  at a run's work directory or among its files, and nothing there
  changes; a new name beside them is allowed (a run's directory may hold
  other runs)."""
  run = str(tmp_path / 'run')
  shutil.copytree(reference, run)
  before = snapshot(run)
  checkpoints = os.path.join(run, 'checkpoints')
  for out in (run, os.path.join(checkpoints, 'hf')):
    _refused(export.main, ['export', f'--workdir={run}', f'--out={out}'],
             capsys, f'--out={out}', f'the run {run}')
  for out in (os.path.join(run, 'loss.png'),
              os.path.join(checkpoints, 'x.png')):
    _refused(plot.main, [run, f'--out={out}'], capsys, f'--out={out}',
             'one of the files of the run')
  inside = os.path.join(checkpoints, 'x')
  new = str(tmp_path / 'new')
  for argv, expected in [
      ([f'--workdir={inside}'], f'--workdir={inside} is inside the files'),
      ([f'--workdir={new}', f'--config.data.data_dir={inside}'],
       f'data.data_dir={inside}'),
      ([f'--workdir={new}', f'--config.data.data_dir={new}/checkpoints'],
       f'data.data_dir={new}/checkpoints'),
      ([f'--workdir={new}', f'--compilation_cache={inside}'],
       '--compilation_cache'),
  ]:
    _refused(train.main, ['train.py', '--no_progress', *argv], capsys,
             *expected)
  assert snapshot(run) == before
  assert not os.path.exists(new)
  beside = os.path.join(run, 'compare.png')
  capsys.readouterr()
  assert plot.main([run, f'--out={beside}']) == 0 and os.path.isfile(beside)


def test_a_config_json_that_is_not_the_runs_is_refused(reference, tmp_path,
                                                       capsys):
  """A damaged config.json beside checkpoints, and a Hugging Face export
  given as --workdir: one line, and nothing changes."""
  run = str(tmp_path / 'run')
  shutil.copytree(reference, run)
  config = os.path.join(run, 'config.json')
  with open(config, 'r+') as f:
    f.truncate(10)
  hf = str(tmp_path / 'hf')
  os.makedirs(hf)
  with open(os.path.join(hf, 'config.json'), 'w') as f:
    json.dump({'model_type': 'llama', 'hidden_size': 32}, f)
  for workdir, expected in [(run, (config, 'cannot be read', 'delete it')),
                            (hf, ('not the config of a poet_jax run',))]:
    before = snapshot(workdir)
    _refused(train.main, ['train.py', f'--workdir={workdir}',
                          '--no_progress'], capsys, *expected)
    assert snapshot(workdir) == before


def test_a_work_directory_has_one_live_trainer(tmp_path):
  """A second trainer is refused while the first runs, changing nothing;
  once the first is killed (kill -9), the kernel has dropped its lock."""
  workdir = str(tmp_path / 'run')
  first = subprocess.Popen(
      train_command(workdir, *SHORT), cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True,
      env=train_env({'POET_JAX_FAULT': 'pause@2'}))
  try:
    for line in first.stdout:
      if 'paused after step 2' in line:
        break
    before = snapshot(workdir)
    second = run_train(workdir, *SHORT)
    assert second.returncode == 2, second.stderr[-3000:]
    assert_one_error_line(second.stderr, f'work directory {workdir} is in use',
                          f'(process {first.pid})')
    assert snapshot(workdir) == before
    with pytest.raises(workdir_lib.WorkdirError, match='in use'):
      workdir_lib.lock(workdir)
  finally:
    first.kill()
    first.wait()
  assert first.returncode == -signal.SIGKILL
  os.close(workdir_lib.lock(workdir))  # free: the next trainer may start
