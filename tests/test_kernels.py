"""poet_kernels: POET through optax alone, on models that are not POET models."""
import functools
import logging

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import poet_jax
from poet_jax import kernels
import tolerance


class MLP(linen.Module):
  """A flax.linen model: two POET-able kernels, biases, and a head."""

  @linen.compact
  def __call__(self, x):
    x = jax.nn.gelu(linen.Dense(32, name='fc1')(x))
    x = jax.nn.gelu(linen.Dense(32, name='fc2')(x))
    return linen.Dense(4, name='head')(x)


def data():
  x = jax.random.normal(jax.random.key(1), (64, 16))
  y = jnp.sin(x[:, :4] * 2.0)
  return x, y


def loss_fn(params, x, y):
  return jnp.mean((MLP().apply({'params': params}, x) - y) ** 2)


def make_tx(merge_every=10, **kw):
  inner = optax.chain(poet_jax.clip_by_global_norm(1.0),
                      poet_jax.poet(1e-2, 5e-2, weight_decay=0.0))
  return kernels.poet_kernels(inner, block_size=8, merge_every=merge_every,
                              key=jax.random.key(0), **kw)


@functools.partial(jax.jit, static_argnums=0)
def step(tx, params, state, x, y):
  loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, loss


def train(tx, params, steps):
  x, y = data()
  state = tx.init(params)
  losses = []
  for _ in range(steps):
    params, state, loss = step(tx, params, state, x, y)
    losses.append(float(loss))
  return params, state, losses


def singular_values(k):
  return np.linalg.svd(np.asarray(k, np.float64), compute_uv=False)


@pytest.fixture(scope='module')
def linen_params():
  return MLP().init(jax.random.key(0), jnp.zeros((1, 16)))['params']


def test_trains_a_linen_model_and_keeps_every_spectrum(linen_params):
  # The exact Cayley map is orthogonal to rounding, so the spectrum must be
  # too (the Neumann series is off by its truncation at this large a step).
  tx = make_tx(merge_every=10, orthogonal_map='exact')
  params, state, losses = train(tx, linen_params, 25)
  assert losses[-1] < 0.7 * losses[0], losses
  for name in ('fc1', 'fc2'):
    before = singular_values(linen_params[name]['kernel'])
    after = singular_values(params[name]['kernel'])
    # The kernel is R W0 P of W0 folded at each of 2 merges and once more
    # (a solve of b = 8, two 8-term block sums), then float64 SVDs of
    # float32 kernels: rounding relative to the largest singular value.
    tolerance.assert_close(after, before, 3 * (3 * 8 + 2 * 8))
    assert not np.allclose(params[name]['kernel'],
                           linen_params[name]['kernel'], atol=1e-3)
  # The biases and the head train as base leaves; fc1's kernel is W0-backed.
  assert state.w0['head']['kernel'] is None
  assert state.w0['fc1']['bias'] is None
  assert not np.allclose(params['head']['kernel'],
                         linen_params['head']['kernel'])


def test_merge_keeps_the_kernel_and_restarts_the_generators(linen_params):
  tx = make_tx(merge_every=5)
  params4, state4, _ = train(tx, linen_params, 4)
  x, y = data()
  params5, state5, _ = step(tx, params4, state4, x, y)
  assert int(state5.count) == 5
  assert float(jnp.abs(state5.generators['fc1']['kernel']['in_blocks']).max()) == 0.0
  assert int(poet_jax.optim.poet_step_count(state5.inner_state)) == 0
  assert not np.array_equal(state5.in_place['fc1']['kernel'],
                            state4.in_place['fc1']['kernel'])
  # W0 in its new frame at zero generators is the kernel the step produced.
  eye = lambda k: jnp.broadcast_to(jnp.eye(8), (k, 8, 8))
  k = poet_jax.spo.block_kernel(
      state5.w0['fc1']['kernel'], eye(16 // 8), eye(32 // 8),
      state5.in_place['fc1']['kernel'], state5.out_place['fc1']['kernel'])
  # Identity blocks (two 8-term sums), and p + u - p's two roundings.
  tolerance.assert_close(k, params5['fc1']['kernel'], 2 * 8 + 2)


def test_equals_the_poet_layer_from_the_same_w0_and_placements():
  """The optax-only route and POETLinear (materialize) are one trajectory."""
  layer = poet_jax.POETLinear(16, 24, block_size=8, compute='materialize',
                              rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(2), (32, 16))
  target = jax.random.normal(jax.random.key(3), (32, 24))
  inner = lambda: poet_jax.poet(1e-2, 5e-2, weight_decay=0.0)
  # Route A: the layer, its blocks trained by reparameterize(poet()).
  opt = nnx.Optimizer(layer, poet_jax.reparameterize(inner()), wrt=nnx.Param)
  layer_step = nnx.jit(lambda m, o: o.update(m, nnx.grad(
      lambda m: jnp.mean((m(x) - target) ** 2))(m)))
  # Route B: a plain kernel, with the layer's W0 and placements injected.
  params = {'kernel': layer.base_weight()}
  tx = kernels.poet_kernels(inner(), block_size=8, merge_every=1000,
                            key=jax.random.key(0))
  state = tx.init(params)
  state = state._replace(w0={'kernel': layer.w0[...]},
                         in_place={'kernel': layer.in_place[...]},
                         out_place={'kernel': layer.out_place[...]})
  dense_loss = lambda p: jnp.mean((x @ p['kernel'] - target) ** 2)
  for _ in range(6):
    layer_step(layer, opt)
    grads = jax.grad(dense_loss)(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  # Six steps, each: the forward (16 + 2 x 8), the mean over 32 x 24, the
  # backward's sum over 32 rows, the maps' VJPs (4 products of 8 x 8 a
  # side) and Adam; in two orders.
  terms = 6 * (16 + 2 * 8 + 32 * 24 + 32 + 2 * 4 * 8 + 10)
  tolerance.assert_close(params['kernel'], layer.effective_weight(), terms)
  tolerance.assert_close(
      state.generators['kernel']['in_blocks'],
      nnx.as_pure(opt.opt_state).generators['in_blocks'], terms)


def test_multisteps_and_a_checkpoint_round_trip(linen_params, tmp_path):
  tx = optax.MultiSteps(make_tx(merge_every=3), every_k_schedule=2)
  params, state, losses = train(tx, linen_params, 6)
  assert losses[-1] < losses[0]
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'state', state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / 'state',
                                  jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                               state))
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  x, y = data()
  a = step(tx, params, state, x, y)
  b = step(tx, params, restored, x, y)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_selection_is_never_silent(linen_params, caplog):
  with pytest.raises(ValueError, match="block_size=5 does not divide.*"
                     "exclude=.*on_indivisible='skip'"):
    kernels.select_kernels(linen_params, 5, exclude=())
  with caplog.at_level(logging.INFO):
    layouts, dense = kernels.select_kernels(
        {'a': jnp.ones((16, 8)), 'b': jnp.ones((16, 6)),
         'c': {'kernel': jnp.ones((8, 2, 4))}, 'norm': {'scale': jnp.ones(
             (2, 8))}}, 8, on_indivisible='skip')
  assert layouts['a'].roles == 'io' and layouts['b'] is None
  assert layouts['c']['kernel'] is None    # 3-D, its axes not declared
  assert layouts['norm']['scale'] is None  # not a kernel: not reported
  assert dense['b'] == 'block_size=8 does not divide 16 x 6'
  assert 'no declared axes' in dense['c']
  assert sorted(dense) == ['b', 'c']
  assert 'b: block_size=8 does not divide' in caplog.text
  with pytest.raises(ValueError, match='no kernel selected'):
    kernels.select_kernels({'head': {'kernel': jnp.ones((8, 8))}}, 8)
  with pytest.raises(ValueError, match="write 'fc1'"):
    kernels.select_kernels(linen_params, 8, target=('fc1/kernel',))
