"""POET composes like any optax transformation, or says what to do.

optax.inject_hyperparams around poet and reparameterize, extra update
arguments (reduce_on_plateau's value=), an update without params, and the
warnings when the blocks are not what reparameterize made them (a merge the
model skipped, a transformation chained after it).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import poet_jax
from poet_jax import drift

X = jax.random.normal(jax.random.key(0), (32, 16))
Y = jnp.sin(X[:, :4])


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.fc = nnx.Linear(16, 16, rngs=rngs)
    self.head = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.fc(x)))


def poet_mlp():
  model = MLP(nnx.Rngs(0))
  poet_jax.poetize(model, block_size=8, rngs=nnx.Rngs(1))
  return model


def loss_fn(model):
  return jnp.mean((model(X) - Y) ** 2)


def train(tx, steps, merge=True, **extra):
  """(model, optimizer, losses) after `steps` updates; merges on the
  transformation's counter unless merge=False."""
  model = poet_mlp()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, **({'value': loss} if extra else {}))
    if merge:
      poet_jax.merge_model_if_due(model, optimizer, jax.random.key(2))
    return loss

  losses = [float(step(model, optimizer)) for _ in range(steps)]
  jax.effects_barrier()  # the warnings' callbacks have run
  return model, optimizer, losses


def test_inject_hyperparams_on_poet_changes_each_group_at_run_time():
  """Both groups' rates (a schedule and a number) are hyperparameters of
  the state; zeroing the POET rate freezes the generators only."""
  tx = poet_jax.reparameterize(optax.inject_hyperparams(poet_jax.poet)(
      learning_rate=optax.linear_schedule(1e-2, 1e-3, 10),
      poet_learning_rate=1e-2), merge_every=100)
  model, optimizer, losses = train(tx, 3)
  assert losses[-1] < losses[0]
  inject = optimizer.opt_state.inner_state
  assert float(inject.hyperparams['learning_rate'][...]) < 1e-2  # scheduled
  inject.hyperparams['poet_learning_rate'][...] = 0.0
  generators = jax.tree.map(np.array, nnx.as_pure(
      optimizer.opt_state.generators))
  head = np.array(model.head.kernel[...])
  grads = nnx.grad(loss_fn)(model)
  optimizer.update(model, grads)
  jax.tree.map(np.testing.assert_array_equal, generators,
               nnx.as_pure(optimizer.opt_state.generators))
  assert not np.array_equal(head, model.head.kernel[...])


def test_inject_hyperparams_on_reparameterize_moves_the_merges():
  """merge_every as a hyperparameter: the transformation's state carries
  it, so the model merges on whatever it is now."""
  tx = optax.inject_hyperparams(poet_jax.reparameterize)(
      poet_jax.poet(1e-2, 1e-2), merge_every=3)
  model, optimizer, losses = train(tx, 3)
  state = nnx.as_pure(optimizer.opt_state)
  assert bool(poet_jax.merge_due(state))
  assert int(poet_jax.merge_every_of(state)) == 3
  # The model merged after update 3: its blocks are the identity again.
  np.testing.assert_array_equal(model.fc.linear.in_blocks[...],
                                jnp.broadcast_to(jnp.eye(8), (2, 8, 8)))
  optimizer.opt_state.hyperparams['merge_every'][...] = 2
  step = nnx.jit(lambda m, o: (o.update(m, nnx.grad(loss_fn)(m)),
                               poet_jax.merge_model_if_due(
                                   m, o, jax.random.key(2))))
  step(model, optimizer)
  state = nnx.as_pure(optimizer.opt_state)
  assert int(poet_jax.update_count(state)) == 4 and bool(
      poet_jax.merge_due(state))
  np.testing.assert_array_equal(model.fc.linear.in_blocks[...],
                                jnp.broadcast_to(jnp.eye(8), (2, 8, 8)))
  assert losses[-1] < losses[0]


def test_extra_arguments_reach_reduce_on_plateau():
  """value= passes through reparameterize (and poet_kernels) to the inner
  transformation: a loss that never improves cuts the scale."""
  plateau = lambda: optax.contrib.reduce_on_plateau(patience=1, factor=0.5)
  tx = poet_jax.reparameterize(optax.chain(poet_jax.poet(1e-2, 1e-2),
                                           plateau()))
  _, optimizer, losses = train(tx, 4, value=True)
  # optax.chain's state: (poet's, reduce_on_plateau's); the losses fall,
  # and the plateau saw them: its best is the last.
  plateau_state = nnx.as_pure(optimizer.opt_state).inner_state[1]
  assert float(plateau_state.best_value) == pytest.approx(losses[-1])
  params = {'w': jnp.ones((8, 8)), 'head': jnp.ones((8, 2))}
  tx = poet_jax.poet_kernels(optax.chain(poet_jax.poet(1e-2, 1e-2),
                                         plateau()),
                             block_size=4, merge_every=10,
                             key=jax.random.key(0))
  update = jax.jit(lambda s: tx.update(jax.tree.map(jnp.ones_like, params),
                                       s, params, value=jnp.asarray(1.0))[1])
  state = tx.init(params)
  for _ in range(4):
    state = update(state)
  assert float(state.inner_state[1].scale) < 1.0


@pytest.mark.parametrize('name', ['reparameterize', 'poet_kernels', 'poet'])
def test_an_update_without_params_says_what_to_do(name):
  model = poet_mlp()
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  tx = {'reparameterize': lambda: poet_jax.reparameterize(
            poet_jax.poet(1e-2, 1e-2)),
        'poet_kernels': lambda: poet_jax.poet_kernels(
            poet_jax.poet(1e-2, 1e-2), block_size=4, merge_every=10,
            key=jax.random.key(0)),
        'poet': lambda: optax.chain(poet_jax.reparameterize(
            optax.identity()), poet_jax.poet(1e-2, 1e-2))}[name]()
  if name == 'poet_kernels':
    params = {'w': jnp.ones((8, 8))}
  elif name == 'poet':   # poet() itself, on generators
    params = {'fc': {'in_blocks': jnp.zeros((2, 28))}, 'b': jnp.ones((3, 3))}
    tx = poet_jax.poet(1e-2, 1e-2)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r'call tx\.update\(grads, opt_state, '
                     r'params\)'):
    tx.update(params, state)


@pytest.fixture
def fresh_warnings(monkeypatch):
  """The drift warnings are given once per kind and process."""
  monkeypatch.setattr(drift, '_WARNED', set())


def test_a_skipped_merge_is_warned_about(fresh_warnings):
  tx = poet_jax.reparameterize(poet_jax.poet(1e-2, 1e-2), merge_every=2)
  with pytest.warns(RuntimeWarning, match='update 2 was a merging one.*'
                    'merge_model_if_due'):
    train(tx, 4, merge=False)


def test_a_transformation_after_reparameterize_is_warned_about(
    fresh_warnings):
  tx = optax.chain(poet_jax.reparameterize(poet_jax.poet(1e-2, 1e-2)),
                   optax.scale(0.5))
  with pytest.warns(RuntimeWarning, match='changed them outside '
                    'reparameterize'):
    train(tx, 3)


def test_a_correct_loop_says_nothing(fresh_warnings, recwarn):
  tx = poet_jax.reparameterize(
      optax.chain(poet_jax.clip_by_global_norm(1.0),
                  poet_jax.poet(1e-2, 1e-2)), merge_every=2)
  train(tx, 5)
  assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_merging_without_reparameterize_is_refused():
  """Blocks trained by a plain optax optimizer leave the orthogonal group;
  the merge, which needs reparameterize's counter, says so."""
  model = poet_mlp()
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  with pytest.raises(ValueError, match='no ReparameterizeState.*'
                     'poet_jax.reparameterize'):
    poet_jax.merge_model_if_due(model, optimizer, jax.random.key(0))
