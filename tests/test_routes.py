"""One trajectory, three routes.

A tiny Llama trained 30 steps with 2 merges, from the same W0, placements
and other weights, through
  (i)   POET layers ('fast', input-centric) + poet_jax.reparameterize,
  (ii)  POET layers ('materialize') + poet_jax.reparameterize,
  (iii) the dense Llama + poet_jax.poet_kernels, optax only (the stacked
        kernels (L, in, out) declared as such: kernel_axes 'sio'),
gives the same losses to float32 rounding (tolerance.training_terms).
Route (iii) draws the permutations of its merges itself; the POET models
merge, on their transformation's counter, with the ones it drew (inject).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import poet_jax
import tolerance

B, STEPS, MERGE_EVERY = 8, 30, 12
LINEARS = ('attention.q', 'attention.k', 'attention.v', 'attention.o',
           'mlp.gate', 'mlp.up', 'mlp.down')
TOKENS = jax.random.randint(jax.random.key(0), (4, 17), 0, 64)


CFG = poet_jax.LlamaConfig(vocab_size=64, dim=16, num_layers=2, num_heads=2,
                           ffn_dim=32)


def inner():
  return optax.chain(poet_jax.clip_by_global_norm(1.0),
                     poet_jax.poet(1e-2, 5e-2))


def module(model, name):
  part, leaf = name.split('.')
  return getattr(getattr(model.blocks, part), leaf)


def kernels_state(opt_state):
  (state,) = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda s: isinstance(s, poet_jax.PoetKernelsState))
              if isinstance(s, poet_jax.PoetKernelsState)]
  return state


def placements(state, name):
  """Route (iii)'s (in, out) permutations of one linear, stacked (L, .)."""
  part, leaf = name.split('.')
  pick = lambda tree: tree['blocks'][part][leaf]['kernel']
  return pick(state.in_place), pick(state.out_place)


def dense_route():
  model = poet_jax.Llama(CFG, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  tx = poet_jax.poet_kernels(
      inner(), block_size=B, merge_every=MERGE_EVERY, key=jax.random.key(7),
      exclude=('*embed*', '*head*', '*norm*'),
      kernel_axes={'blocks.*': 'sio'})
  return model, graphdef, params, tx


def poet_route(compute, dense, kernel_state):
  """A POET Llama with the dense model's weights as W0 and route (iii)'s
  initial permutations; its embeddings, norms and head copied."""
  model = poet_jax.Llama(CFG, rngs=nnx.Rngs(1))
  poet_jax.poetize(model, block_size=B, compute=compute,
                   target=('blocks.*',), rngs=nnx.Rngs(2))
  for name in LINEARS:
    poet_jax.set_poet_layer(module(model, name),
                            module(dense, name).kernel[...],
                            *placements(kernel_state, name))
  model.embed.embedding[...] = dense.embed.embedding[...]
  model.lm_head.kernel[...] = dense.lm_head.kernel[...]
  model.norm.scale[...] = dense.norm.scale[...]
  for norm in ('attention_norm', 'mlp_norm'):
    getattr(model.blocks, norm).scale[...] = getattr(
        dense.blocks, norm).scale[...]
  tx = poet_jax.reparameterize(inner(), merge_every=MERGE_EVERY)
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def poet_step(model, optimizer):
  loss, grads = nnx.value_and_grad(poet_jax.next_token_loss)(model, TOKENS)
  optimizer.update(model, grads)
  return loss, poet_jax.merge_due(nnx.as_pure(optimizer.opt_state))


@nnx.jit
def poet_merge(model, new_placements):
  for name, (new_in, new_out) in new_placements.items():
    poet_jax.merge_with_placements(module(model, name), new_in, new_out)


@functools.partial(jax.jit, static_argnums=(0, 1))
def dense_step(graphdef, tx, params, opt_state):
  def loss_fn(params):
    return poet_jax.next_token_loss(nnx.merge(graphdef, params), TOKENS)
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def test_three_routes_are_one_trajectory():
  dense, graphdef, params, tx = dense_route()
  opt_state = tx.init(params)
  routes = [poet_route(c, dense, kernels_state(opt_state))
            for c in ('fast', 'materialize')]
  losses = {'fast': [], 'materialize': [], 'kernels': []}
  merges = 0
  for _ in range(STEPS):
    params, opt_state, loss = dense_step(graphdef, tx, params, opt_state)
    losses['kernels'].append(float(loss))
    new = {name: placements(kernels_state(opt_state), name)
           for name in LINEARS}
    for (model, optimizer), key in zip(routes, ('fast', 'materialize')):
      loss, due = poet_step(model, optimizer)
      losses[key].append(float(loss))
      if due:
        poet_merge(model, new)
    merges += int(due)
  assert merges == 2
  ref = np.array(losses['kernels'])
  assert ref[-1] < 0.8 * ref[0]  # it trains, through both merges
  # Rounding in each route's order along the run's chain.
  terms = tolerance.training_terms(
      CFG, TOKENS.shape[1] - 1, TOKENS.shape[0], B,
      sum(x.size for x in jax.tree.leaves(params)), STEPS)
  for key in ('fast', 'materialize'):
    tolerance.assert_close_probably(losses[key], ref, terms)
  # The POET layer's kernel is route (iii)'s dense kernel.
  fast_model = routes[0][0]
  tolerance.assert_close_probably(
      module(fast_model, 'mlp.down').effective_weight(),
      params['blocks']['mlp']['down']['kernel'], terms)
