"""Evaluation of a checkpoint: the trainer's numbers, by command line.

In subprocesses with train.py's environment (one device, the same XLA
flags), as the trainer ran.
"""
import os
import shutil
import subprocess
import sys

import pytest

from poet_jax.tools import evaluate
from trained_runs import trained_run
from train_util import ROOT, train_env


def run_evaluate(*args):
  return subprocess.run(
      [sys.executable, '-m', 'poet_jax.evaluate', *args], capture_output=True,
      text=True, env=train_env(), timeout=600, cwd=ROOT)


def eval_lines(stdout):
  return [l for l in stdout.splitlines() if ': eval loss ' in l]


def test_latest_and_chosen_checkpoint_match_the_trainers_eval_lines(
    tmp_path_factory):
  workdir, train_stdout = trained_run(tmp_path_factory)
  trainer = eval_lines(train_stdout)
  latest = run_evaluate(f'--workdir={workdir}')
  assert latest.returncode == 0, latest.stderr[-2000:]
  assert eval_lines(latest.stdout) == trainer[-1:]
  chosen = run_evaluate(f'--workdir={workdir}', '--step=2',
                        '--split=train', '--eval_tokens=64')
  assert chosen.returncode == 0, chosen.stderr[-2000:]
  line, = eval_lines(chosen.stdout)
  assert line.startswith('step 2: eval loss ')
  assert line not in trainer   # another split


@pytest.mark.parametrize('args,expected', [
    (('--workdir={empty}',), 'has no config.json'),
    (('--workdir={run}', '--eval_tokens=0'), 'must be positive'),
    (('--workdir={run}', '--split=test'), 'split'),
    (('--workdir={run}', '--eval_tokens=1e'),
     '--eval_tokens=1e is not an integer; give --eval_tokens an integer'),
])
def test_bad_input_is_one_line_and_exit_code_2(args, expected, tmp_path,
                                               tmp_path_factory, capsys):
  workdir, _ = trained_run(tmp_path_factory)
  before = sorted(os.walk(workdir))
  args = [a.format(empty=tmp_path, run=workdir) for a in args]
  assert evaluate.main(['evaluate', *args]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: '), err
  assert expected in err[0], err
  assert sorted(os.walk(workdir)) == before


def test_a_damaged_checkpoint_is_refused_and_the_one_before_named(
    tmp_path, tmp_path_factory):
  # Step 4's arrays replaced by step 2's: a store that decodes, with step
  # 4's fingerprint (the after-training tools check it as the trainer does).
  workdir, _ = trained_run(tmp_path_factory)
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  checkpoints = os.path.join(copy, 'checkpoints')
  shutil.rmtree(os.path.join(checkpoints, '4', 'state'))
  shutil.copytree(os.path.join(checkpoints, '2', 'state'),
                  os.path.join(checkpoints, '4', 'state'))
  refused = run_evaluate(f'--workdir={copy}')
  assert refused.returncode == 2, refused.stderr[-2000:]
  err = refused.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: '), err
  assert 'checkpoints/4 cannot be used (damaged: ' in err[0], err
  assert '--step=2 reads the one before' in err[0], err
  assert run_evaluate(f'--workdir={copy}', '--step=2').returncode == 0
