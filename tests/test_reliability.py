"""Reliability: kills, preemption, non-finite values, bad files, determinism.

The subprocess runs train the tiny model for 8 steps (checkpoints every 2,
merges at 3 and 6) and are compared with one uninterrupted reference run.
Faults are injected at deterministic points with tests/faults.py
(POET_JAX_FAULT, test-only). Where a subprocess is not needed (a file that
cannot be read, a config that cannot run) train.main runs in-process.
"""
import errno
import hashlib
import math
import os
import select
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from poet_jax import cli as train
from poet_jax import checkpoint as checkpoint_lib
from poet_jax import config as config_lib
from poet_jax import data as data_lib
from poet_jax import layers
from poet_jax import metrics as metrics_lib
from poet_jax import optim
from poet_jax import optimizers
from poet_jax import orthogonal
from poet_jax import steps as steps_lib
from poet_jax import tokenizer as tokenizer_lib
from poet_jax import train_lib
from poet_jax import train_state
from poet_jax import workdir as workdir_lib
from train_util import (ROOT, numeric, read_metrics, run_train,
                        train_command, train_env)

pytestmark = pytest.mark.filterwarnings(
    'ignore:the load_module:DeprecationWarning')  # ml_collections

STEPS = 8
SHORT = (f'--config.train.steps={STEPS}', '--config.log_every=1',
         '--config.eval_every=4', '--config.checkpoint_every=2',
         '--config.poet.merge_every=3')
KEYS = ('train_loss', 'learning_rate', 'grad_norm', 'eval_loss', 'eval_ppl',
        'tokens_seen', 'nonfinite_steps', 'orth_error_max', 'q_norm_max',
        'sv_rel_change_max')


def complete_steps(workdir):
  """Steps with a committed checkpoint (orbax renames a step dir when done)."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def partial_saves(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(n for n in os.listdir(directory) if 'orbax-checkpoint-tmp' in n)


def snapshot(directory):
  """{relative path: sha256} of every file below directory."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(
            f.read()).hexdigest()
  return out


def steps_of(entries):
  return [e['step'] for e in entries]


def assert_one_error_line(stderr, *expected):
  lines = stderr.strip().splitlines()
  assert len(lines) == 1, stderr[-3000:]
  assert lines[0].startswith('error: '), lines
  for text in expected:
    assert text in lines[0], (text, lines[0])
  return lines[0]


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('reference'))
  result = run_train(workdir, *SHORT)
  assert result.returncode == 0, result.stderr[-3000:]
  # orbax notes a slow earlier save on a loaded machine; nothing else.
  assert [l for l in result.stderr.splitlines()
          if 'Waiting for previous save to complete' not in l] == []
  return workdir


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
  for key in ('train_loss', 'eval_loss', 'learning_rate', 'tokens_seen',
              'q_norm_max'):
    np.testing.assert_allclose([e.get(key, 0) for e in got],
                               [e.get(key, 0) for e in want], rtol=1e-4,
                               atol=1e-6, err_msg=key)


# ----------------------------------------------------- non-finite values


def test_nan_policy_stop_then_skip(reference, tmp_path):
  """Step 5 gets a NaN loss. 'stop' stops before saving anything after it;
  run again with 'skip', the run drops that update, counts it and goes on."""
  workdir = str(tmp_path)
  fault = {'POET_JAX_FAULT': 'nan@5'}
  # Logged every 4 steps: the check before the save of step 6 finds it.
  stopped = run_train(workdir, *SHORT, '--config.nan_policy=stop',
                      '--config.log_every=4', env=fault)
  assert stopped.returncode == train_lib.EXIT_NONFINITE, stopped.stderr
  assert_one_error_line(stopped.stderr, 'at step 5', 'nan_policy=stop',
                        'last good checkpoint is step 4')
  assert complete_steps(workdir) == [2, 4]
  assert steps_of(read_metrics(workdir)) == [0, 4]

  # nan_policy and log_every may change on resume (they change nothing
  # that is computed).
  skipped = run_train(workdir, *SHORT, '--config.nan_policy=skip', env=fault)
  assert skipped.returncode == 0, skipped.stderr[-3000:]
  assert 'at step 4' in skipped.stdout
  assert 'non-finite loss or gradient at step 5' in skipped.stdout
  entries = {e['step']: e for e in read_metrics(workdir)}
  assert sorted(entries) == [0, 4, 5, 6, 7, 8]
  assert math.isnan(entries[5]['train_loss'])
  assert [entries[s]['nonfinite_steps'] for s in (4, 5, 6, 7, 8)] == [
      0, 1, 1, 1, 1]
  assert all(math.isfinite(entries[s]['train_loss']) for s in (4, 6, 7, 8))
  assert math.isfinite(entries[8]['eval_loss'])
  # The update of step 5 was dropped: the generators after step 5 are those
  # after step 4 (no merge in between), bit for bit.
  assert entries[5]['q_norm_max'] == entries[4]['q_norm_max'] > 0
  # Up to the bad step the run is the reference run.
  ref = {e['step']: e for e in read_metrics(reference)}
  assert numeric([entries[4]], KEYS) == numeric([ref[4]], KEYS)


def tiny_config():
  c = config_lib.base_config()
  c.model.dim, c.model.num_layers, c.model.num_heads = 32, 2, 2
  c.model.ffn_dim, c.poet.block_size = 64, 8.0
  c.train.batch_size, c.train.seq_len = 4, 32
  c.poet.merge_every = 100
  return c


def test_jitted_step_drops_a_non_finite_update_and_counts_it():
  """In the compiled step itself (AdamW on a smaller model: it compiles in
  seconds; the check does not depend on the method, and the POET run above
  shows it there)."""
  c = tiny_config()
  c.optimizer.name = 'adamw'
  c.model.dim, c.model.num_layers, c.model.ffn_dim = 16, 1, 32
  c.train.batch_size, c.train.seq_len = 2, 8
  vocab = 64
  setup, state = train_state.init_state(c, vocab)
  step = jax.jit(lambda s, b: steps_lib.train_step(setup, s, b))
  good = np.random.default_rng(0).integers(0, vocab, (2, 9), np.int32)
  bad = good.copy()
  bad[1, 5] = vocab  # outside the vocabulary: the embedding gives NaN
  after_bad, m = step(state, bad)
  assert not bool(m['finite']) and not np.isfinite(float(m['train_loss']))
  for key in ('params', 'opt_state', 'frozen'):
    for a, b in zip(jax.tree.leaves(state[key]), jax.tree.leaves(after_bad[key])):
      np.testing.assert_array_equal(a, b)
  assert int(after_bad['nonfinite']) == 1
  assert int(after_bad['nonfinite_step']) == 1
  after_good, m = step(after_bad, good)
  assert bool(m['finite'])
  assert int(after_good['nonfinite']) == 1
  assert int(after_good['nonfinite_step']) == 1
  changed = [not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(after_bad['params']),
      jax.tree.leaves(after_good['params']))]
  assert any(changed)


def test_logged_learning_rates_are_the_applied_ones():
  """With b1 = b2 = 0 and no clipping or decay, Adam moves every parameter
  with a gradient by the learning rate itself: the largest change of a base
  parameter is the applied learning_rate, of a generator the applied
  poet_learning_rate. Step 2 is non-finite and dropped; the schedule follows
  the updates applied, so the logged rates after it are those applied."""
  c = tiny_config()
  c.model.dim, c.model.num_layers, c.model.ffn_dim = 16, 1, 32
  c.train.batch_size, c.train.seq_len, c.train.steps = 2, 8, 5
  c.optimizer.b1 = c.optimizer.b2 = 0.0
  c.train.grad_clip = c.train.weight_decay = 0.0
  c.poet.lr = 1e-2
  vocab = 64
  setup, state = train_state.init_state(c, vocab)
  step = jax.jit(lambda s, b: steps_lib.train_step(setup, s, b))
  labels = optim.poet_param_labels(state['params'])
  largest = lambda a, b, group: max(
      float(jnp.abs(x - y).max()) for x, y, l in zip(
          jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(labels))
      if l == group)
  rng = np.random.default_rng(0)
  rates = []
  for i in range(1, 6):
    batch = rng.integers(0, vocab, (2, 9), np.int32)
    if i == 2:
      batch[0, 3] = vocab  # out of the vocabulary: the loss is NaN
    before = jax.tree.map(np.asarray, state['params'])
    state, m = step(state, batch)
    if i == 2:
      assert not bool(m['finite'])
      continue
    np.testing.assert_allclose(
        largest(state['params'], before, 'base'), m['learning_rate'],
        rtol=1e-3)
    np.testing.assert_allclose(
        largest(state['params'], before, 'poet'), m['poet_learning_rate'],
        rtol=1e-3)
    rates.append(float(m['learning_rate']))
  # Four updates were applied: the schedule went through its first four
  # values, without a gap at the dropped step.
  lr = optimizers.schedule(c, c.train.lr)
  np.testing.assert_allclose(rates, [lr(i) for i in range(4)], rtol=1e-6)


# ------------------------------------------------------- divergence guard


def _generator_run(max_q_norm: float, steps: int = 300):
  """Fit one POETLinear to a target it cannot reach, with a big POET step
  and no merge; the largest orthogonality error and ||Q||_F per step."""
  layer = layers.POETLinear(32, 32, block_size=8, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (64, 32))
  y = x @ jax.random.normal(kw, (32, 32))
  tx = optax.chain(optim.scale_by_poet(scale=1.0), optax.scale(-0.02))

  def loss(p):
    return jnp.mean((nnx.merge(graphdef, p, rest)(x) - y) ** 2)

  def body(carry, _):
    p, s = carry
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    p = optax.apply_updates(p, updates)
    if max_q_norm:
      p = optim.clip_generator_norms(p, max_q_norm)
    model = nnx.merge(graphdef, p, rest)
    err = jnp.max(jnp.stack([orthogonal.orthogonality_error(g).max()
                             for g in model.orthogonal_blocks()]))
    qnorm = jnp.max(jnp.stack([jnp.sqrt(2.0) * jnp.linalg.norm(
        u[...], axis=-1).max() for u in (model.q_in, model.q_out)]))
    return (p, s), (err, qnorm)

  params = nnx.as_pure(params)
  run = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), None,
                                       length=steps)[1])
  return jax.device_get(run(params))


def test_max_q_norm_keeps_the_orthogonality_error_bounded():
  free_err, free_q = _generator_run(0.0)
  held_err, held_q = _generator_run(0.5)
  # With the guard every block stays at ||Q||_F <= 0.5, where the 3-term
  # series is close to orthogonal (measured: below 0.01) for the whole run.
  assert held_q.max() <= 0.5 * (1 + 1e-6)
  assert held_err.max() < 0.02
  # Without it ||Q|| passes 1 (the series' radius) and the error explodes.
  assert free_q[-1] > 2.0
  assert free_err[-1] > 1.0 > 50 * held_err.max()


def test_numerical_trouble_is_warned_once_with_the_step_and_layer():
  c = tiny_config()
  setup, state = train_state.init_state(c, 257)
  model = lambda: nnx.merge(setup.graphdef, state['params'], state['frozen'])
  names = metrics_lib.poet_layer_names(model())
  assert len(names) == len(set(names)) == 7 * c.model.num_layers
  warned = set()
  healthy = metrics_lib.poet_layer_health(model())
  assert metrics_lib.numerical_warnings(3, names, healthy, warned) == []
  # Layer 1's up projection: one input block with ||Q||_F = 1.5.
  q = state['params']['blocks']['mlp']['up']['q_in']
  u = np.zeros(q.shape[-1], np.float32)
  u[:2] = 1.5 / np.sqrt(2) / np.sqrt(2)
  state['params']['blocks']['mlp']['up']['q_in'] = q.at[1, 0].set(u)
  health = metrics_lib.poet_layer_health(model())
  np.testing.assert_allclose(health['q_norm'].max(), 1.5, rtol=1e-5)
  lines = metrics_lib.numerical_warnings(7, names, health, warned)
  assert len(lines) == 2, lines
  for line, what in zip(lines, ('||Q||_F 1.5', 'orthogonality error')):
    assert line.startswith('warning: at step 7 a block of blocks.mlp.up[1]')
    assert what in line and 'poet.max_q_norm' in line and 'poet.lr' in line
  assert metrics_lib.numerical_warnings(8, names, health, warned) == []


def test_a_diverging_run_warns(tmp_path):
  """poet.lr=0.5 without the guard: ||Q|| passes 1 in the first step."""
  result = run_train(str(tmp_path), '--config.poet.lr=0.5',
                     '--config.poet.max_q_norm=0', '--config.train.steps=3',
                     '--config.log_every=1', '--config.eval_every=3')
  assert result.returncode == 0, result.stderr[-3000:]
  warnings = [l for l in result.stdout.splitlines() if 'warning' in l]
  assert len(warnings) == 2, result.stdout
  assert all(l.startswith('warning: at step 1 a block of blocks.')
             for l in warnings), warnings
  # The default guard (poet.max_q_norm=0.9) holds the same run in range.
  guarded = run_train(str(tmp_path / 'guarded'), '--config.poet.lr=0.5',
                      '--config.train.steps=3', '--config.log_every=1',
                      '--config.eval_every=3')
  assert guarded.returncode == 0, guarded.stderr[-3000:]
  assert 'warning' not in guarded.stdout
  q_norms = [e['q_norm_max'] for e in read_metrics(str(tmp_path / 'guarded'))
             if 'q_norm_max' in e]
  assert len(q_norms) == 3 and max(q_norms) <= 0.9 * (1 + 1e-6)


# ------------------------------------------------------------------ files


def _main(argv, capsys):
  """train.main in-process: (exit code, stdout, stderr)."""
  capsys.readouterr()  # what the test printed before
  code = train.main(['train.py', *argv])
  out, err = capsys.readouterr()
  return code, out, err


# In-process runs see the 8 simulated devices of conftest.py: a batch of 8.
INPROC = ('--config.model.dim=32', '--config.model.num_layers=2',
          '--config.model.num_heads=2', '--config.model.ffn_dim=64',
          '--config.poet.block_size=8', '--config.train.batch_size=8',
          '--config.train.seq_len=32', '--config.eval_tokens=256',
          '--no_progress')


@pytest.fixture
def read_only_dir(tmp_path):
  """A directory holding a file, that this process cannot write to."""
  path = tmp_path / 'ro'
  path.mkdir()
  (path / 'keep.txt').write_text('earlier results')
  if os.geteuid() != 0:
    path.chmod(0o555)
    yield str(path)
    path.chmod(0o755)
    return
  # root ignores permissions: a read-only bind mount of it.
  ok = subprocess.run(['mount', '--bind', str(path), str(path)]).returncode == 0
  ok = ok and subprocess.run(['mount', '-o', 'remount,ro,bind', str(path),
                              str(path)]).returncode == 0
  if not ok:
    subprocess.run(['umount', str(path)], stderr=subprocess.DEVNULL)
    pytest.skip('cannot make a read-only directory here')
  try:
    yield str(path)
  finally:
    subprocess.run(['umount', str(path)], check=True)


def test_unwritable_workdir_is_one_line_and_changes_nothing(
    read_only_dir, tmp_path, capsys):
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  for workdir in (read_only_dir, str(a_file), str(a_file / 'sub')):
    before = snapshot(tmp_path)
    code, _, err = _main([f'--workdir={workdir}', *INPROC], capsys)
    assert code == 2, err
    assert_one_error_line(err, 'work directory', 'cannot be written')
    assert snapshot(tmp_path) == before


@pytest.fixture
def no_compile(monkeypatch):
  """Fails a test whose run gets as far as building or compiling a step."""
  def refuse(*args, **kwargs):
    raise AssertionError('the run got as far as building the model')
  monkeypatch.setattr(train_state, 'abstract_state', refuse)
  monkeypatch.setattr(steps_lib, 'compile_steps', refuse)


def _corpus_of(directory, sizes):
  """A directory of .txt files of the given sizes (bytes)."""
  os.makedirs(directory)
  rng = np.random.default_rng(0)
  for name, size in sizes.items():
    with open(os.path.join(directory, name), 'w') as f:
      f.write(''.join(rng.choice(list('abcdefgh \n'), size=size)))
  return str(directory)


@pytest.mark.parametrize('override,expected', [
    ('--config.train.seq_len=200000', 'fewer than one batch'),
    ('--config.model.vocab_size=200', 'model.vocab_size=200'),
    ('--config.train.batch_size=12', 'mesh data x fsdp = 8'),
    ('--config.train.grad_accum_steps=2', 'micro-batch'),
    ('--config.data.max_tokens=200', 'raise data.max_tokens=200'),
])
def test_a_refused_start_leaves_the_work_directory_as_it_was(
    override, expected, tmp_path, capsys, no_compile):
  """Before anything is written or compiled: a new work directory is not
  created; an existing one, holding config.json of another config and no
  checkpoint (no run to protect), is left as it was and does not refuse."""
  new = tmp_path / 'new'
  code, _, err = _main([f'--workdir={new}', *INPROC, override], capsys)
  assert code == 2
  assert_one_error_line(err, expected)
  assert not new.exists()
  old = tmp_path / 'old'
  old.mkdir()
  (old / 'config.json').write_text('{"seed": 7}')
  (old / 'metrics.jsonl').write_text('')
  before = snapshot(str(old))
  code, _, err = _main([f'--workdir={old}', *INPROC, override], capsys)
  assert code == 2
  assert_one_error_line(err, expected)
  assert snapshot(str(old)) == before


def test_empty_files_are_never_held_out(tmp_path):
  """The issue's directory: by the hash rule a.txt (empty) is held out."""
  texts = _corpus_of(tmp_path / 'texts', {'a.txt': 0, 'b.txt': 64_000,
                                          'c.txt': 99_000})
  split = data_lib.split_files(data_lib.text_files(texts))
  assert [rel for rel, _ in split['validation']] == ['c.txt']
  _, held_out = data_lib.open_train_and_eval(
      texts, str(tmp_path / 'tfds'), tokenizer_lib.ByteTokenizer(), 32,
      progress=False)
  assert held_out.num_examples * 33 > 90_000


def test_a_held_out_split_too_small_names_its_files_and_the_fix(
    tmp_path, capsys, no_compile):
  texts = _corpus_of(tmp_path / 'texts', {'a.txt': 0, 'b.txt': 64_000,
                                          'c.txt': 99_000})
  (held_out, path), = data_lib.split_files(
      data_lib.text_files(texts))['validation']
  with open(path, 'w') as f:
    f.write('x' * 200)  # with EOS, 6 examples of 33 tokens
  data_lib.open_documents(texts, 'train', str(tmp_path / 'tfds'))  # prepared
  workdir = tmp_path / 'run'
  code, _, err = _main([f'--workdir={workdir}', *INPROC,
                        f'--config.data.name={texts}',
                        f'--config.data.data_dir={tmp_path / "tfds"}'], capsys)
  assert code == 2
  line = assert_one_error_line(err, 'validation', 'fewer than one batch of 8',
                               f'{held_out} (200 bytes)',
                               'train.batch_size to at most 6',
                               'train.seq_len to at most 24')
  assert not workdir.exists(), line


@pytest.fixture
def small_tmpfs(tmp_path):
  """A 700 KiB tmpfs: room for one checkpoint of the tiny model, not two."""
  path = tmp_path / 'tmpfs'
  path.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=700k', 'tmpfs',
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


def _tiny_target():
  """The tiny run's state as restore targets on one device."""
  _, abstract = train_state.abstract_state(tiny_config(), 257)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      abstract)


def _overwrite_data_files(step_dir, how):
  for root, _, files in os.walk(os.path.join(step_dir, 'state')):
    for name in files:
      if os.sep + 'd' in root:  # the array data of the OCDBT store
        path = os.path.join(root, name)
        size = os.path.getsize(path)
        with open(path, 'r+b') as f:
          if how == 'truncate':
            f.truncate(size // 2)
          else:
            f.write(np.random.default_rng(0).bytes(size))


CORRUPTIONS = {
    'data truncated': lambda d: _overwrite_data_files(d, 'truncate'),
    'data overwritten': lambda d: _overwrite_data_files(d, 'garbage'),
    'index garbage': lambda d: open(os.path.join(d, 'state', 'manifest.ocdbt'),
                                    'wb').write(b'\x00' * 8),
    'metadata missing': lambda d: os.remove(os.path.join(d, 'state',
                                                         '_METADATA')),
    'state missing': lambda d: shutil.rmtree(os.path.join(d, 'state')),
    'empty step directory': lambda d: [shutil.rmtree(d), os.mkdir(d)],
}


# orbax gives up the reads still in flight; their callbacks then meet a
# closed event loop (train.py drops that noise on the command line).
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('kind', sorted(CORRUPTIONS))
def test_corrupted_checkpoint_is_a_one_line_error(kind, reference, tmp_path):
  directory = str(tmp_path / 'checkpoints')
  shutil.copytree(os.path.join(reference, 'checkpoints'), directory)
  CORRUPTIONS[kind](os.path.join(directory, '8'))
  ckpt = checkpoint_lib.Checkpointer(directory)
  try:
    assert ckpt.latest_step() == 8
    with pytest.raises(checkpoint_lib.CorruptCheckpointError) as e:
      ckpt.restore(8, _tiny_target())
    message = str(e.value)
    assert '\n' not in message and 'cannot be read' in message
    assert f'mv {directory}/8 {directory}/8.bad' in message
    assert 'resume from step 6' in message
    # The one before is untouched and restores.
    state, meta = ckpt.restore(6, _tiny_target())
    assert meta['step'] == 6 and int(state['step']) == 6
  finally:
    ckpt.abandon()


def test_corrupted_checkpoint_on_the_command_line(reference, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  _overwrite_data_files(os.path.join(workdir, 'checkpoints', '8'), 'garbage')
  before = snapshot(workdir)
  result = run_train(workdir, *SHORT)
  assert result.returncode == 2, result.stderr[-3000:]
  assert_one_error_line(result.stderr, 'checkpoints/8 cannot be read',
                        'resume from step 6')
  assert snapshot(workdir) == before
  # Following the advice, the earlier checkpoint is used.
  checkpoints = os.path.join(workdir, 'checkpoints')
  os.rename(os.path.join(checkpoints, '8'), os.path.join(checkpoints, '8.bad'))
  ckpt = checkpoint_lib.Checkpointer(checkpoints)
  try:
    assert ckpt.latest_step() == 6
    assert int(ckpt.restore(6, _tiny_target())[0]['step']) == 6
  finally:
    ckpt.abandon()


def _write_corpus(directory):
  os.makedirs(directory)
  rng = np.random.default_rng(0)
  words = ['alpha', 'beta', 'gamma', 'delta', 'héllo', 'wörld']
  for i in range(12):
    with open(os.path.join(directory, f'doc{i:02d}.txt'), 'w') as f:
      f.write(' '.join(rng.choice(words, size=400)) + '\n')


def _prepared_corpus(root):
  """A small text corpus, prepared (ArrayRecord and token streams)."""
  texts, data_dir = str(root / 'texts'), str(root / 'tfds')
  _write_corpus(texts)
  data_lib.open_train_and_eval(texts, data_dir, tokenizer_lib.ByteTokenizer(),
                               32, progress=False)
  return texts, data_dir


def _run_dir_with_checkpoint(workdir, argv, meta=None):
  """A work directory as a run of argv leaves it: config.json and a
  checkpoint (a stand-in state: these runs fail before restoring it)."""
  command = train.parse_command_line(['train.py', *argv])
  assert not isinstance(command, str), command
  os.makedirs(workdir)
  workdir_lib.write_config(workdir, command.config)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'))
  ckpt.save(2, {'w': jnp.arange(4.0)}, {'step': 2, **(meta or {})})
  ckpt.close()
  return snapshot(workdir)


def _files(directory, pattern):
  return sorted(os.path.join(root, n) for root, _, names in os.walk(directory)
                for n in names if pattern in n)


def test_truncated_token_stream(tmp_path, capsys):
  texts, data_dir = _prepared_corpus(tmp_path)
  argv = (*INPROC, f'--workdir={tmp_path / "run"}', f'--config.data.name={texts}',
          f'--config.data.data_dir={data_dir}')
  before = _run_dir_with_checkpoint(str(tmp_path / 'run'), argv)
  (stream,) = [p for p in _files(data_dir, '.npy') if '.train.' in p]
  with open(stream, 'r+b') as f:
    f.truncate(os.path.getsize(stream) - 100)
  code, _, err = _main(argv, capsys)
  assert code == 2
  assert_one_error_line(err, stream, 'truncated or corrupt', 'delete it')
  assert snapshot(str(tmp_path / 'run')) == before


@pytest.mark.parametrize('cut', ['block boundary', 'mid-chunk'])
def test_truncated_arrayrecord_file(cut, tmp_path, capsys):
  """Cut at a block boundary, ArrayRecord reads records without text; cut
  elsewhere, it raises: both are one line, never a silently short corpus."""
  texts, data_dir = _prepared_corpus(tmp_path)
  argv = (*INPROC, f'--workdir={tmp_path / "run"}', f'--config.data.name={texts}',
          f'--config.data.data_dir={data_dir}')
  before = _run_dir_with_checkpoint(str(tmp_path / 'run'), argv)
  shutil.rmtree(os.path.join(data_dir, 'poet_jax_streams'))  # read it again
  (records,) = _files(data_dir, 'train.array_record')
  size = os.path.getsize(records)
  with open(records, 'r+b') as f:
    f.truncate(65536 if cut == 'block boundary' else size - 1000)
  assert os.path.getsize(records) < size
  code, _, err = _main(argv, capsys)
  assert code == 2
  assert_one_error_line(err, 'truncated or corrupt', 'delete that directory')
  assert snapshot(str(tmp_path / 'run')) == before


def _sentencepiece(root, name, vocab_size):
  import sentencepiece  # pylint: disable=g-import-not-at-top
  sentencepiece.SentencePieceTrainer.train(
      input=str(root / 'texts' / 'doc00.txt'), model_prefix=str(root / name),
      vocab_size=vocab_size, hard_vocab_limit=False, minloglevel=2)
  return str(root / f'{name}.model')


@pytest.fixture(scope='module')
def sentencepiece_models(tmp_path_factory):
  """Two different small SentencePiece models."""
  root = tmp_path_factory.mktemp('sp')
  _write_corpus(str(root / 'texts'))
  return _sentencepiece(root, 'a', 40), _sentencepiece(root, 'b', 30)


@pytest.mark.parametrize('damage', ['overwritten', 'truncated', 'empty',
                                    'replaced'])
def test_corrupted_tokenizer_file(damage, sentencepiece_models, tmp_path,
                                  capsys):
  texts, data_dir = _prepared_corpus(tmp_path)
  model = str(tmp_path / 'tok.model')
  shutil.copy(sentencepiece_models[0], model)
  argv = (*INPROC, f'--workdir={tmp_path / "run"}', f'--config.data.name={texts}',
          f'--config.data.data_dir={data_dir}', f'--config.data.tokenizer={model}')
  identity = tokenizer_lib.load_tokenizer(model).identity
  before = _run_dir_with_checkpoint(str(tmp_path / 'run'), argv,
                                    meta={'tokenizer': identity})
  expected = {'overwritten': 'is not a SentencePiece model',
              'truncated': 'is not a SentencePiece model',
              'empty': 'is empty',
              # Another valid model: only the identity the checkpoint
              # recorded tells it from the one the run was trained with.
              'replaced': 'the tokenizer differs from the one checkpoint'}
  if damage == 'replaced':
    shutil.copy(sentencepiece_models[1], model)
  else:
    with open(model, 'r+b') as f:
      if damage == 'overwritten':
        f.write(b'\xff' * 64)
      else:
        f.truncate(os.path.getsize(model) // 2 if damage == 'truncated' else 0)
  code, _, err = _main(argv, capsys)
  assert code == 2
  assert_one_error_line(err, model if damage != 'replaced' else '',
                        expected[damage])
  assert snapshot(str(tmp_path / 'run')) == before


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
    states.append(ckpt.restore(STEPS, _tiny_target())[0])
    ckpt.abandon()
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
