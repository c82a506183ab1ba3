"""train.py end to end, in subprocesses, on the embedded corpus."""
import os

import pytest

import tolerance
from train_util import SHORT, STEPS, numeric, read_metrics, run_train


@pytest.fixture(scope='module')
def poet_run(short_run):
  """(workdir, CompletedProcess) of a finished run of SHORT: the run the
  reliability tests compare with (tests/conftest.py), made once."""
  return short_run


@pytest.mark.parametrize('method', ['poet', 'adamw'])
def test_cli_trains_and_writes_metrics_and_checkpoints(method, poet_run,
                                                       tmp_path):
  if method == 'poet':
    workdir, result = poet_run
  else:
    workdir = str(tmp_path)
    result = run_train(workdir, *SHORT, '--config.optimizer.name=adamw')
    assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.abspath(workdir) in result.stdout
  entries = read_metrics(workdir)
  train = [e for e in entries if 'train_loss' in e]
  assert [e['step'] for e in train] == list(range(1, STEPS + 1))
  for key in ('train_loss', 'learning_rate', 'tokens_seen', 'step_time_s',
              'tokens_per_s'):
    assert all(key in e for e in train), key
  if method == 'poet':
    assert all('orth_error_max' in e and 'sv_rel_change_max' in e
               for e in train)
  evals = [e for e in entries if 'eval_loss' in e]
  assert [e['step'] for e in evals] == [0, 4, 8]
  assert all('eval_ppl' in e for e in evals)
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir,
                                                         'checkpoints')))
  assert steps[-1] == STEPS
  assert os.path.exists(os.path.join(workdir, 'loss.png'))


def test_validation_perplexity_falls(poet_run):
  evals = [e for e in read_metrics(poet_run[0]) if 'eval_ppl' in e]
  assert evals[-1]['eval_ppl'] < 0.5 * evals[0]['eval_ppl'], evals


def test_killed_run_resumes_with_identical_metrics(poet_run, tmp_path):
  """Killed (SIGKILL) after step 4 of 8, merges at 3 and 6, then resumed."""
  workdir = str(tmp_path)
  killed = run_train(workdir, *SHORT, env={'POET_JAX_KILL_AT_STEP': '4'})
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert max(e['step'] for e in read_metrics(workdir)) == 4
  resumed = run_train(workdir, *SHORT)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from' in resumed.stdout
  assert numeric(read_metrics(workdir)) == numeric(read_metrics(poet_run[0]))


@pytest.mark.parametrize('override,expected', [
    ('--config.no_such_key=1', "unknown config key 'no_such_key'"),
    ('--config.optimizer.name=sgd', 'optimizer.name'),
    ('--config.poet.block_size=7', 'does not divide'),
    ('--config.data.name=/no/such/dir', '/no/such/dir'),
    ('--config.data.tokenizer=/no/such/tok.model', '/no/such/tok.model'),
])
def test_bad_input_is_one_line_and_exit_code_2(override, expected, tmp_path):
  result = run_train(str(tmp_path / 'w'), override)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('error: ') and expected in lines[0], lines


# ------------------------------------------------- in-process train steps


def small_config(**train):
  """A POET model that compiles in seconds."""
  from poet_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.model.dim, c.model.num_layers, c.model.num_heads = 16, 1, 2
  c.model.ffn_dim, c.poet.block_size = 32, 8.0
  c.train.batch_size, c.train.seq_len, c.train.steps = 4, 8, 6
  c.poet.merge_every = 2
  for key, value in train.items():
    c.train[key] = value
  return c


def _run_steps(c, batches):
  import jax  # pylint: disable=g-import-not-at-top
  from poet_jax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from poet_jax.train import state as train_state  # pylint: disable=g-import-not-at-top
  setup, state = train_state.init_state(c, 64)
  step = jax.jit(lambda s, b: steps_lib.train_step(setup, s, b))
  evaluate = jax.jit(lambda s, b: steps_lib.eval_step(setup, s, b))
  losses = []
  for batch in batches:
    state, m = step(state, batch)
    losses.append(float(m['train_loss']))
  return losses, state, [float(x) for x in evaluate(state, batches[0])]


def test_grad_accumulation_equals_the_whole_batch():
  """4 micro-batches give the losses, evaluation and parameters of the
  whole batch at once, to float32 rounding, across merges (at 2, 4, 6)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from poet_jax.train import state as train_state  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 64, (4, 9), np.int32) for _ in range(6)]
  whole = _run_steps(small_config(), batches)
  # The merges changed W0: the comparison covers them.
  initial = train_state.init_state(small_config(), 64)[1]
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(initial['frozen']), jax.tree.leaves(whole[1]['frozen'])))
  losses, state, evaluation = _run_steps(small_config(grad_accum_steps=4),
                                         batches)
  # The gradient summed in another order (micro-batches), along the run's
  # chain; each array to its own magnitude.
  c = small_config()
  terms = tolerance.training_terms(
      train_state.model_config(c, 64), c.train.seq_len, c.train.batch_size,
      int(c.poet.block_size),
      sum(x.size for x in jax.tree.leaves(state['params'])), len(batches))
  tolerance.assert_close_probably(losses, whole[0], terms)
  tolerance.assert_close_probably(evaluation, whole[2], terms)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(whole[1])):
    tolerance.assert_close_probably(a, b, terms)


def test_trainable_count_is_the_generators_and_the_dense_leaves():
  """count_params counts a POET layer's blocks by their generators (what
  the optimizer trains), every other float parameter whole."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from poet_jax import optim  # pylint: disable=g-import-not-at-top
  from poet_jax import reparam  # pylint: disable=g-import-not-at-top
  from poet_jax.train import state as train_state  # pylint: disable=g-import-not-at-top
  _, state = train_state.abstract_state(small_config(), 64)
  size = lambda x: int(np.prod(x.shape))
  dense = sum(size(x) for p, x in jax.tree_util.tree_leaves_with_path(
      state['params']) if str(p[-1].key) not in optim.BLOCK_NAMES)
  generators = sum(size(u) for u in jax.tree.leaves(
      reparam.generators(state['opt_state'])))
  assert generators > 0
  assert train_state.count_params(state)[0] == dense + generators
