"""Kills, preemption and resume: nothing is lost, and a resumed run ends
exactly like an uninterrupted one; the same config and seed give the same
run bit for bit.

The subprocess runs train the tiny model for 8 steps (checkpoints every 2,
merges at 3 and 6; train_util.SHORT) and are compared with one uninterrupted
reference run (tests/conftest.py). Faults are injected at deterministic
points with tests/faults.py (POET_JAX_FAULT, test-only).
"""
import errno
import os
import select
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from poet_jax.train import checkpoint as checkpoint_lib
from poet_jax.train import loop as train_lib
from poet_jax.train import state as train_state
import tolerance
from train_util import (KEYS, ROOT, SHORT, STEPS, assert_one_error_line,
                        complete_steps, numeric, read_metrics, run_train,
                        steps_of, tiny_config, tiny_target, train_command,
                        train_env)

pytestmark = pytest.mark.filterwarnings(
    'ignore:the load_module:DeprecationWarning')  # ml_collections


def partial_saves(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(n for n in os.listdir(directory) if 'orbax-checkpoint-tmp' in n)


# -------------------------------------------------- kills and preemption


def _wait_for_output(proc, text: str, timeout: float = 300) -> bytes:
  """Reads proc's stdout until `text` appears (or the process ends)."""
  out, fd = b'', proc.stdout.fileno()
  deadline = time.monotonic() + timeout
  while text.encode() not in out:
    if time.monotonic() > deadline:
      break
    ready, _, _ = select.select([fd], [], [], 0.1)
    if ready:
      chunk = os.read(fd, 1 << 16)
      if not chunk:
        break
      out += chunk
  return out


def _run_with_sigint_when_paused(workdir, step):
  """A run that pauses after `step` (fault hook) and gets SIGINT from here."""
  proc = subprocess.Popen(
      train_command(workdir, *SHORT), cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      env=train_env({'POET_JAX_FAULT': f'pause@{step}'}))
  head = _wait_for_output(proc, f'paused after step {step}')
  if proc.poll() is None:
    proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  return subprocess.CompletedProcess(proc.args, proc.returncode,
                                     (head + out).decode(), err.decode())


@pytest.fixture(scope='module')
def interrupted(tmp_path_factory):
  """One work directory through every kind of interruption, in step order.

  Each stage is run again with the same command; returns the workdir and
  {stage: (CompletedProcess, committed checkpoint steps, metrics,
  temporary checkpoint directories)}, each as the stage left them.
  """
  workdir = str(tmp_path_factory.mktemp('interrupted'))
  stages = {}

  def run(name, fault=None, result=None):
    if result is None:
      env = {'POET_JAX_FAULT': fault} if fault else None
      result = run_train(workdir, *SHORT, env=env)
    metrics = (read_metrics(workdir)
               if os.path.exists(os.path.join(workdir, 'metrics.jsonl'))
               else [])
    stages[name] = (result, complete_steps(workdir), metrics,
                    partial_saves(workdir))

  run('sigterm_at_startup', 'term@0')        # before the first step
  run('sigkill_in_step_1', 'kill@1')         # before any checkpoint
  run('sigterm_in_step_3', 'term@3')         # between periodic checkpoints
  run('sigkill_in_save_of_4', 'kill_save@4')  # written, not committed
  run('sigint_after_step_5', result=_run_with_sigint_when_paused(workdir, 5))
  run('sigkill_in_merge_step_6', 'kill@6')   # 6 % merge_every == 0
  run('final')
  return workdir, stages


def test_sigterm_during_startup_exits_3_and_saves_nothing(interrupted):
  result, ckpts, metrics, _ = interrupted[1]['sigterm_at_startup']
  assert result.returncode == train_lib.EXIT_INTERRUPTED, result.stderr
  assert 'SIGTERM during start-up' in result.stdout
  assert result.stderr == ''
  assert ckpts == [] and metrics == []


def test_sigterm_and_sigint_finish_the_step_save_and_exit_3(interrupted):
  stages = interrupted[1]
  for name, sig, step in (('sigterm_in_step_3', 'SIGTERM', 3),
                          ('sigint_after_step_5', 'SIGINT', 5)):
    result, ckpts, metrics, _ = stages[name]
    assert result.returncode == train_lib.EXIT_INTERRUPTED, result.stderr
    assert result.stderr == '', result.stderr
    assert f'{sig}: checkpoint at step {step} written' in result.stdout
    # 3 and 5 are no periodic checkpoint steps: the signal wrote them, after
    # finishing the step (its metrics are flushed, nothing later is).
    assert ckpts[-1] == step, ckpts
    assert steps_of(metrics)[-1] == step
  assert 'resumed from' in stages['sigint_after_step_5'][0].stdout


def test_a_signal_during_an_evaluation_stops_it_and_saves(tmp_path):
  """SIGINT during step 4, whose evaluation follows: the evaluation stops
  at its next batch instead of running to its end (it is not logged), and
  the run saves step 4 and exits 3 as for any signal."""
  workdir = str(tmp_path)
  result = run_train(workdir, *SHORT, env={'POET_JAX_FAULT': 'int@4'})
  assert result.returncode == train_lib.EXIT_INTERRUPTED, result.stderr
  assert 'SIGINT: the evaluation of step 4 was stopped' in result.stdout
  assert 'step 4: eval loss' not in result.stdout
  assert 'SIGINT: checkpoint at step 4 written' in result.stdout
  metrics = read_metrics(workdir)
  assert steps_of(metrics)[-1] == 4 and 'eval_loss' not in metrics[-1]
  assert complete_steps(workdir)[-1] == 4


def test_sigkill_restarts_from_the_last_complete_checkpoint(interrupted):
  stages = interrupted[1]
  for name in ('sigkill_in_step_1', 'sigkill_in_save_of_4',
               'sigkill_in_merge_step_6'):
    assert stages[name][0].returncode == -signal.SIGKILL, name
  # Killed in step 1: no checkpoint; the restart begins afresh.
  assert stages['sigkill_in_step_1'][1] == []
  assert 'resumed from' not in stages['sigterm_in_step_3'][0].stdout
  # Killed in the save of step 4 after orbax wrote it, before its commit:
  # a partial directory is left and step 4 is no checkpoint...
  assert stages['sigkill_in_save_of_4'][1] == [2, 3]
  assert [n.split('.')[0] for n in stages['sigkill_in_save_of_4'][3]] == ['4']
  # ...so the next run resumes from step 3 and never loads it.
  assert 'resumed from' in stages['sigint_after_step_5'][0].stdout
  assert 'at step 3' in stages['sigint_after_step_5'][0].stdout
  # Killed while dispatching the merge step 6: resumed from step 5.
  assert 'at step 5' in stages['final'][0].stdout


def test_metrics_have_no_duplicated_or_missing_steps(interrupted):
  stages = interrupted[1]
  for name, (_, _, metrics, _) in stages.items():
    steps = steps_of(metrics)
    assert steps == sorted(set(steps)), (name, steps)
  final = stages['final'][2]
  assert steps_of(final) == list(range(STEPS + 1))
  assert [e['step'] for e in final if 'eval_loss' in e] == [0, 4, 8]


def test_interrupted_run_ends_exactly_like_an_uninterrupted_one(
    interrupted, reference):
  workdir, stages = interrupted
  result = stages['final'][0]
  assert result.returncode == 0, result.stderr[-3000:]
  assert numeric(read_metrics(workdir), KEYS) == numeric(
      read_metrics(reference), KEYS)


def test_grad_accumulation_resumes_mid_run_like_the_whole_batch(
    reference, tmp_path):
  """2 micro-batches per step, killed after step 5 (merges at 3 and 6):
  resumed, the run ends like the whole-batch reference to float32 rounding,
  with one logged line, merge and checkpoint per optimizer step."""
  workdir = str(tmp_path)
  accum = (*SHORT, '--config.train.grad_accum_steps=2')
  killed = run_train(workdir, *accum, env={'POET_JAX_FAULT': 'kill@5'})
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  resumed = run_train(workdir, *accum)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from' in resumed.stdout
  got, want = read_metrics(workdir), read_metrics(reference)
  assert steps_of(got) == steps_of(want)
  assert complete_steps(workdir) == complete_steps(reference)
  # Micro-batches sum the gradient in another order: rounding along the
  # run's chain, each series to its own magnitude.
  c = tiny_config()
  _, abstract = train_state.abstract_state(c, 257)
  terms = tolerance.training_terms(
      train_state.model_config(c, 257), c.train.seq_len, c.train.batch_size,
      int(c.poet.block_size),
      sum(x.size for x in jax.tree.leaves(abstract['params'])), STEPS)
  for key in ('train_loss', 'eval_loss', 'learning_rate', 'tokens_seen',
              'q_norm_max'):
    tolerance.assert_close_probably([e.get(key, 0) for e in got],
                                    [e.get(key, 0) for e in want], terms)


def _disk_bytes(root: str) -> int:
  """Bytes the files under root take on disk (whole blocks)."""
  return sum(os.stat(os.path.join(d, f)).st_blocks * 512
             for d, _, files in os.walk(root) for f in files)


@pytest.fixture
def small_tmpfs(reference, tmp_path):
  """A tmpfs with room for one checkpoint of the tiny model, not two.

  Sized from the reference run: its largest checkpoint 1.5 times (the
  sizes of its checkpoints differ by about a fifth) and twice everything
  else (metrics and the loss plot are rewritten while the run saves), so
  neither the checkpoints' spread nor a rewrite can fill it before the
  second save.
  """
  checkpoints = os.path.join(reference, 'checkpoints')
  largest = max(_disk_bytes(os.path.join(checkpoints, step))
                for step in os.listdir(checkpoints))
  rest = _disk_bytes(reference) - _disk_bytes(checkpoints)
  size = (3 * largest // 2 + 2 * rest) // 4096 * 4096
  path = tmp_path / 'tmpfs'
  path.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs',
                     str(path)], stderr=subprocess.DEVNULL).returncode:
    yield None
    return
  try:
    yield str(path)
  finally:
    subprocess.run(['umount', '-l', str(path)], check=True)


def test_disk_full_during_a_save(small_tmpfs, reference, tmp_path):
  """The save of step 4 runs out of space (a real full tmpfs where mount
  works, else the save fails with ENOSPC by fault injection)."""
  if small_tmpfs:
    workdir, env = os.path.join(small_tmpfs, 'run'), None
  else:
    workdir, env = str(tmp_path / 'run'), {'POET_JAX_FAULT': 'enospc@4'}
  result = run_train(workdir, *SHORT, env=env)
  assert result.returncode == train_lib.EXIT_IO_ERROR, result.stderr[-3000:]
  assert_one_error_line(result.stderr, 'could not write checkpoint',
                        os.strerror(errno.ENOSPC), 'resume from step 2')
  assert complete_steps(workdir) == [2]
  # Step 2 is intact: moved to a disk with room, the run resumes from it
  # and ends as the reference run did.
  moved = str(tmp_path / 'moved')
  shutil.copytree(workdir, moved)
  resumed = run_train(moved, *SHORT)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'at step 2' in resumed.stdout
  assert numeric(read_metrics(moved), KEYS) == numeric(
      read_metrics(reference), KEYS)


# ------------------------------------------------------------ determinism


def test_same_config_and_seed_give_bit_identical_runs(reference, tmp_path):
  """A second run, in its own process: every metric (timings aside) and
  the final state are identical bit for bit."""
  workdir = str(tmp_path)
  result = run_train(workdir, *SHORT)
  assert result.returncode == 0, result.stderr[-3000:]
  timing = ('step_time_s', 'tokens_per_s')
  strip = lambda entries: [{k: v for k, v in e.items() if k not in timing}
                           for e in entries]
  assert strip(read_metrics(workdir)) == strip(read_metrics(reference))
  states = []
  for run in (workdir, reference):
    ckpt = checkpoint_lib.Checkpointer(os.path.join(run, 'checkpoints'))
    states.append(ckpt.restore(STEPS, tiny_target())[0])
    ckpt.abandon()
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
