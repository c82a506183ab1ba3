"""Non-finite values and the divergence guard: a NaN step is stopped on or
skipped, the applied learning rates are the logged ones, ||Q|| is held in
range and numerical trouble is warned about.

The subprocess runs train the tiny model for 8 steps (train_util.SHORT) and
are compared with one uninterrupted reference run (tests/conftest.py).
Faults are injected with tests/faults.py (POET_JAX_FAULT, test-only).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from poet_jax import layers
from poet_jax import optim
from poet_jax import orthogonal
from poet_jax import reparam
from poet_jax.train import loop as train_lib
from poet_jax.train import metrics as metrics_lib
from poet_jax.train import optimizers
from poet_jax.train import state as train_state
from poet_jax.train import steps as steps_lib
import tolerance
from train_util import (KEYS, SHORT, assert_one_error_line, complete_steps,
                        numeric, read_metrics, run_train, steps_of,
                        tiny_config)

pytestmark = pytest.mark.filterwarnings(
    'ignore:the load_module:DeprecationWarning')  # ml_collections


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


def test_nan_policy_stop_before_any_checkpoint_says_how_to_go_on(tmp_path):
  """Step 1 is non-finite: there is no good checkpoint to name; the line
  says how to go on instead."""
  workdir = str(tmp_path)
  stopped = run_train(workdir, *SHORT, '--config.nan_policy=stop',
                      env={'POET_JAX_FAULT': 'nan@1'})
  assert stopped.returncode == train_lib.EXIT_NONFINITE, stopped.stderr
  line = assert_one_error_line(stopped.stderr, 'at step 1',
                               'no checkpoint had been saved before it',
                               '--config.nan_policy=skip')
  assert 'None' not in line
  assert complete_steps(workdir) == []


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
  # Adam's eps far below every gradient: the step is exactly the rate.
  c.poet.eps = 1e-12
  vocab = 64
  setup, state = train_state.init_state(c, vocab)
  step = jax.jit(lambda s, b: steps_lib.train_step(setup, s, b))
  labels = optim.poet_param_labels(state['params'])
  largest = lambda a, b, group: max(
      float(jnp.abs(x - y).max()) for x, y, l in zip(
          jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(labels))
      if l == group)
  # The generators live in the optimizer (reparam.reparameterize).
  generators = lambda state: jax.tree.map(
      np.asarray, reparam.generators(state['opt_state']))
  largest_step = lambda a, b: max(float(np.abs(x - y).max()) for x, y in
                                  zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  rng = np.random.default_rng(0)
  rates = []
  for i in range(1, 6):
    batch = rng.integers(0, vocab, (2, 9), np.int32)
    if i == 2:
      batch[0, 3] = vocab  # out of the vocabulary: the loss is NaN
    before = jax.tree.map(np.asarray, state['params'])
    before_generators = generators(state)
    state, m = step(state, batch)
    if i == 2:
      assert not bool(m['finite'])
      continue
    # p + u - p rounds twice at the parameters' size; the update's own few
    # roundings at its own.
    for change, rate, old in (
        (largest(state['params'], before, 'base'), m['learning_rate'],
         before),
        (largest_step(generators(state), before_generators),
         m['poet_learning_rate'], before_generators)):
      size = max(float(np.abs(x).max()) for x in jax.tree.leaves(old))
      tolerance.assert_close(change, rate, 2 * size / rate + 5,
                             scale=float(rate))
    rates.append(float(m['learning_rate']))
  # Four updates were applied: the schedule went through its first four
  # values, without a gap at the dropped step.
  lr = optimizers.schedule(c, c.train.lr)
  # The cosine schedule in and out of the jitted step (about ten roundings).
  tolerance.assert_close(rates, [lr(i) for i in range(4)], 10)


# ------------------------------------------------------- divergence guard


# A block of 8 rescaled to the guard's norm, then measured: twice the norm
# of its 28 generators, the root, a division and a product.
GUARD_ROUNDING = 4 * 2 * 31 * tolerance.EPS32


def _generator_run(max_q_norm: float, steps: int = 300):
  """Fit one POETLinear to a target it cannot reach, with a big POET step
  and no merge; the largest orthogonality error and ||Q||_F per step."""
  layer = layers.POETLinear(32, 32, block_size=8, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (64, 32))
  y = x @ jax.random.normal(kw, (32, 32))
  tx = reparam.reparameterize(
      optax.chain(optim.scale_by_poet(scale=1.0), optax.scale(-0.02)),
      max_q_norm=max_q_norm or None)

  def loss(p):
    return jnp.mean((nnx.merge(graphdef, p, rest)(x) - y) ** 2)

  def body(carry, _):
    p, s = carry
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    p = optax.apply_updates(p, updates)
    model = nnx.merge(graphdef, p, rest)
    err = jnp.max(jnp.stack([orthogonal.orthogonality_error(g).max()
                             for g in model.orthogonal_blocks()]))
    qnorm = jnp.max(jnp.stack([n.max() for n in jax.tree.leaves(
        reparam.generator_norms(s))]))
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
  assert held_q.max() <= 0.5 * (1 + GUARD_ROUNDING)
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
  generators = reparam.generators(state['opt_state'])
  healthy = metrics_lib.poet_layer_health(model(), generators)
  assert metrics_lib.numerical_warnings(3, names, healthy, warned) == []
  # Layer 1's up projection: one input block with ||Q||_F = 1.5, its
  # generator in the optimizer and its block the map's image.
  q = generators['blocks']['mlp']['up']['in_blocks']
  u = np.zeros(q.shape[-1], np.float32)
  u[:2] = 1.5 / np.sqrt(2) / np.sqrt(2)
  generators['blocks']['mlp']['up']['in_blocks'] = q.at[1, 0].set(u)
  blocks = state['params']['blocks']['mlp']['up']['in_blocks']
  state['params']['blocks']['mlp']['up']['in_blocks'] = blocks.at[1, 0].set(
      orthogonal.orthogonal_blocks(jnp.asarray(u), blocks.shape[-1]))
  health = metrics_lib.poet_layer_health(model(), generators)
  # sqrt(2) x the norm of two entries: a few roundings.
  tolerance.assert_close(health['q_norm'].max(), 1.5, 5)
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
  assert len(q_norms) == 3 and max(q_norms) <= 0.9 * (1 + GUARD_ROUNDING)
