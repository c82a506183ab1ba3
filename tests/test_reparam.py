"""reparameterize: the optax transformation that owns POET's generators."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import poet_jax
from poet_jax import orthogonal

import tolerance

B = 4


class Net(nnx.Module):
  """A POET layer and a dense head: POET and base leaves together."""

  def __init__(self, rngs):
    self.poet = poet_jax.POETLinear(8, 12, block_size=B, rngs=rngs)
    self.head = nnx.Linear(12, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.poet(x)))


X = jax.random.normal(jax.random.key(1), (16, 8))
Y = jax.random.normal(jax.random.key(2), (16, 3))


def split():
  graphdef, params, rest = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


GRAPHDEF, PARAMS, REST = split()


def loss(params, x=X, y=Y):
  return jnp.mean((nnx.merge(GRAPHDEF, params, REST)(x) - y) ** 2)


def with_generators(params, u_in, u_out):
  """params with the POET layer's blocks = map(generators)."""
  p = jax.tree.map(lambda a: a, params)
  p['poet']['in_blocks'] = orthogonal.orthogonal_blocks(u_in, B)
  p['poet']['out_blocks'] = orthogonal.orthogonal_blocks(u_out, B)
  return p


def random_generators(seed, scale=0.1):
  k1, k2 = jax.random.split(jax.random.key(seed))
  n = orthogonal.num_generator_params(B)
  return scale * jax.random.normal(k1, (2, n)), scale * jax.random.normal(
      k2, (3, n))


@functools.partial(jax.jit, static_argnums=0)
def step(tx, params, state, x=X, y=Y):
  value, grads = jax.value_and_grad(loss)(params, x, y)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, value


GRADIENT = 2 * (2 * B + 8 + 12 + 3) + 16 * 3 + 16 + 4 * B + 10


def test_generator_gradient_is_the_gradient_through_the_map():
  # With an identity inner optimizer the generators move by their gradient:
  # that of the old layer, which built its blocks from generators.
  u_in, u_out = random_generators(0)
  params = with_generators(PARAMS, u_in, u_out)
  tx = poet_jax.reparameterize(optax.identity())
  state = tx.init(params)
  state = state._replace(generators={**state.generators, 'poet': {
      'in_blocks': u_in, 'out_blocks': u_out}})
  new_params, state, _ = step(tx, params, state)

  def old_loss(u_in, u_out):
    return loss(with_generators(PARAMS, u_in, u_out))

  g_in, g_out = jax.grad(old_loss, argnums=(0, 1))(u_in, u_out)
  got = state.generators['poet']
  # Forward and back through the blocks, W0 (8, 12) and the head (12, 3),
  # the loss's mean over 16 x 3, the sum over the 16 rows and the map's VJP
  # (4 products of 4 x 4): GRADIENT terms; u + g then rounds at |u|.
  for side, u, g in (('in_blocks', u_in, g_in), ('out_blocks', u_out, g_out)):
    tolerance.assert_close(got[side] - u, g, GRADIENT, scale=max(
        float(jnp.abs(u).max()), float(jnp.abs(g).max())))
  # The blocks become map(new generators): the map's 4 products of 4 x 4,
  # and one rounding of the addition, at the blocks' size (1).
  tolerance.assert_close(new_params['poet']['in_blocks'],
                         orthogonal.orthogonal_blocks(got['in_blocks'], B),
                         4 * B + 2, scale=1.0)
  assert state.generators['head'] == {'bias': None, 'kernel': None}


def test_a_global_norm_clip_sees_every_gradient():
  limit = 1e-3
  tx = poet_jax.reparameterize(optax.clip_by_global_norm(limit))
  state = tx.init(PARAMS)
  new_params, state, _ = step(tx, PARAMS, state)
  plain = poet_jax.reparameterize(optax.identity())
  _, unclipped, _ = step(plain, PARAMS, plain.init(PARAMS))
  grads = jax.grad(loss)(PARAMS)
  base_norm_sq = sum(float(jnp.sum(g ** 2)) for g in
                     jax.tree.leaves(grads['head']))
  gen_norm_sq = sum(float(jnp.sum(u ** 2)) for u in
                    jax.tree.leaves(unclipped.generators))
  factor = limit / np.sqrt(base_norm_sq + gen_norm_sq)
  assert factor < 0.5  # the clip acts, on the norm of both groups together
  # The clip: the global norm of the 69 gradient entries, its root, a
  # division and a product; on top of the gradients' own GRADIENT terms.
  clip = 69 + 3
  jax.tree.map(lambda a, b: tolerance.assert_close(
      a, factor * b, GRADIENT + clip), state.generators,
               unclipped.generators)
  # p + u - p rounds twice at the parameters' size.
  kernel = PARAMS['head']['kernel']
  tolerance.assert_close(new_params['head']['kernel'] - kernel,
                         factor * grads['head']['kernel'], GRADIENT + clip + 2,
                         scale=float(jnp.abs(kernel).max()))


def make_tx(merge_every=None, **kw):
  return poet_jax.reparameterize(
      optax.chain(poet_jax.clip_by_global_norm(1.0),
                  poet_jax.poet(1e-2, 1e-1, weight_decay=0.0)),
      merge_every=merge_every, **kw)


def test_multisteps_maps_once_per_update():
  # Two micro-batches through MultiSteps equal one update on their mean:
  # the transformation (and its map) runs once, on the accumulated gradient.
  halves = [(X[:8], Y[:8]), (X[8:], Y[8:])]
  tx = optax.MultiSteps(make_tx(), every_k_schedule=2)
  params, state = PARAMS, tx.init(PARAMS)
  for x, y in halves:
    params, state, _ = step(tx, params, state, x, y)
  assert int(poet_jax.update_count(state)) == 1
  one = make_tx()
  grads = jax.tree.map(lambda a, b: (a + b) / 2,
                       *[jax.grad(loss)(PARAMS, x, y) for x, y in halves])
  updates, ref_state = jax.jit(one.update)(grads, one.init(PARAMS), PARAMS)
  # The two sides sum the gradient in another order; each block is then
  # the Neumann polynomial (num_terms + 1 products of b x b blocks) of the
  # new generators, the head an Adam step: rounded terms per element about
  # 16 tokens + 12 features + (3 + 1) * B.
  jax.tree.map(lambda a, b: tolerance.assert_close(a, b, 16 + 12 + 4 * B),
               params, optax.apply_updates(PARAMS, updates))


def test_merges_reset_on_the_counter():
  tx = make_tx(merge_every=2)
  params, state = PARAMS, tx.init(PARAMS)
  params, state, _ = step(tx, params, state)
  assert not bool(poet_jax.merge_due(state))
  assert float(jnp.abs(state.generators['poet']['in_blocks']).max()) > 0
  base = state.inner_state[1].inner_states['base']
  params, state, _ = step(tx, params, state)
  assert bool(poet_jax.merge_due(state))
  assert int(poet_jax.merge_count(state)) == 1
  assert all(float(jnp.abs(u).max()) == 0.0
             for u in jax.tree.leaves(state.generators))
  assert int(poet_jax.optim.poet_step_count(state)) == 0
  assert all(float(jnp.abs(m).max()) == 0.0 for m in jax.tree.leaves(
      state.inner_state[1].inner_states['poet']))
  # The base group's Adam state went on (count 2), untouched by the reset.
  assert int(base.inner_state[0].count) + 1 == int(
      state.inner_state[1].inner_states['base'].inner_state[0].count)
  # Inside MultiSteps a merging update is due only on the call that made it.
  ms = optax.MultiSteps(make_tx(merge_every=1), every_k_schedule=2)
  s = ms.init(PARAMS)
  _, s, _ = step(ms, PARAMS, s)
  assert not bool(poet_jax.merge_due(s))
  _, s, _ = step(ms, PARAMS, s)
  assert bool(poet_jax.merge_due(s))
  _, s, _ = step(ms, PARAMS, s)
  assert not bool(poet_jax.merge_due(s))


def test_max_q_norm_caps_every_block():
  tx = poet_jax.reparameterize(optax.sgd(100.0), max_q_norm=0.5)
  params, state, _ = step(tx, PARAMS, tx.init(PARAMS))
  norms = jax.tree.leaves(poet_jax.generator_norms(state))
  # The norm of 6 entries, its root, the rescaling, and the norm again.
  tolerance.assert_close(max(float(n.max()) for n in norms), 0.5, 2 * 8)
  # The map (4 products of 4 x 4) and the addition, at the blocks' size.
  tolerance.assert_close(
      params['poet']['out_blocks'],
      orthogonal.orthogonal_blocks(state.generators['poet']['out_blocks'], B),
      4 * B + 2, scale=1.0)


def test_state_survives_an_orbax_round_trip(tmp_path):
  tx = make_tx(merge_every=3)
  params, state, _ = step(tx, PARAMS, tx.init(PARAMS))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'state', state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(
      tmp_path / 'state', jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                       state))
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  jax.tree.map(np.testing.assert_array_equal, step(tx, params, state),
               step(tx, params, restored))


def test_refusals():
  with pytest.raises(ValueError, match='no POET leaf'):
    make_tx().init({'kernel': jnp.ones((4, 4))})
  with pytest.raises(ValueError, match='orthogonal_map'):
    poet_jax.reparameterize(optax.identity(), orthogonal_map='cayley')
  with pytest.raises(ValueError, match='merge_every'):
    poet_jax.reparameterize(optax.identity(), merge_every=0)
  with pytest.raises(ValueError, match='ReparameterizeState'):
    poet_jax.merge_due(optax.adam(1e-3).init(PARAMS))


def test_the_map_of_a_stack_runs_one_layer_at_a_time():
  """Compiled update of a stack of 64 layers' blocks: its temporaries stay
  under one float32 copy of the stacked blocks. The map and its VJP of the
  whole stack at once keep several (Q and its powers for every block; at
  llama_8b they were 8.5 GiB of the dry-run peak, docs/benchmarks.md)."""
  layers, k = 64, 2
  params = {'layer': {'in_blocks': jnp.broadcast_to(
      jnp.eye(B), (layers, k, B, B))}, 'head': jnp.zeros((4, 4))}
  tx = poet_jax.reparameterize(optax.sgd(0.1))
  update = jax.jit(tx.update, donate_argnums=1)
  mem = update.lower(params, tx.init(params), params).compile(
  ).memory_analysis()
  assert mem.temp_size_in_bytes < layers * k * B * B * 4
