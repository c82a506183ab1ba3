"""poetize on a user's NNX model."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import poet_jax


class UserMLP(nnx.Module):
  """Not the project's Llama: biases, and a head the block does not divide."""

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(16, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 24, rngs=rngs)
    self.odd = nnx.Linear(24, 12, rngs=rngs)
    self.head = nnx.Linear(12, 4, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.fc1(x))
    x = jax.nn.relu(self.fc2(x))
    return self.head(jax.nn.relu(self.odd(x)))


def test_indivisible_layer_raises_by_default():
  with pytest.raises(ValueError, match='odd.*block_size=8 does not divide'):
    poet_jax.poetize(UserMLP(nnx.Rngs(0)), block_size=8, rngs=nnx.Rngs(1))


def test_poetize_keeps_the_function_and_reports_what_it_skipped(caplog):
  model = UserMLP(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (5, 16))
  before = model(x)
  with caplog.at_level(logging.WARNING):
    skipped = poet_jax.poetize(model, block_size=8, on_indivisible='skip',
                               rngs=nnx.Rngs(1))
  assert skipped == ['odd']
  assert 'odd' in caplog.text
  assert isinstance(model.fc1, poet_jax.BiasedPOETLinear)
  assert isinstance(model.odd, nnx.Linear)   # left dense, and said so
  assert isinstance(model.head, nnx.Linear)  # excluded by default
  # W0 is the kernel and R = P = I: the same function before training.
  np.testing.assert_allclose(model(x), before, rtol=1e-5, atol=1e-6)
  # The bias is frozen by default: not a parameter the optimizer sees.
  params = nnx.state(model, nnx.Param)
  assert 'bias' not in params['fc1']
  assert 'in_blocks' in params['fc1']['linear']


def test_poetized_model_trains_with_poet():
  model = UserMLP(nnx.Rngs(0))
  poet_jax.poetize(model, block_size=8, on_indivisible='skip',
                   trainable_bias=True, rngs=nnx.Rngs(1))
  assert 'bias' in nnx.state(model, nnx.Param)['fc1']
  optimizer = nnx.Optimizer(
      model, poet_jax.reparameterize(poet_jax.poet(1e-2, 2e-2)), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(2), (64, 16))
  y = jnp.tanh(x[:, :4])

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(
        lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(20)]
  assert losses[-1] < 0.8 * losses[0], losses
