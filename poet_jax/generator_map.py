"""A POET leaf's generators: their map to orthogonal blocks and back.

The generators u (..., k, b(b-1)/2) are the strict upper triangles of the
skew-symmetric Q of each block, and the blocks are G = map(Q) (spec section
2: Neumann with k terms, its Taylor form, or the exact Cayley map). What
the two POET transformations share is here: `block_map` (the map, with a
traced number of terms), `generator_gradients` (the blocks' gradient taken
through the map's VJP to the generators', one layer of a stack at a time),
and `step_generators` (the inner optimizer's step on the generators, every
selected leaf swapped for them). poet_jax.reparameterize applies them to
POET layers' blocks, poet_jax.poet_kernels to any model's dense kernels.
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from poet_jax import drift
from poet_jax import optim
from poet_jax import orthogonal


def is_none(x) -> bool:
  return x is None


def swap(selected, tree, replacement):
  """`tree` with every selected leaf replaced by `replacement`'s."""
  return jax.tree.map(lambda s, x, r: r if s else x, selected, tree,
                      replacement, is_leaf=is_none)


def step_generators(inner, selected, gen_grads, updates, params, generators,
                    inner_state, **extra_args):
  """Steps 2 and 3 of reparameterize (poet_jax.reparam's docstring), shared
  with poet_kernels: `inner` on the tree with the selected leaves replaced
  by their generators, and its update applied to them.

  `extra_args` (optax's, such as `value=` for reduce_on_plateau) go to
  inner. Returns (inner's updates, new generators (None where not
  selected), new inner state).
  """
  inner_updates, inner_state = optax.with_extra_args_support(inner).update(
      swap(selected, updates, gen_grads), inner_state,
      swap(selected, params, generators), **extra_args)
  new = jax.tree.map(lambda s, u, d: optax.apply_updates(u, d) if s else None,
                     selected, generators, inner_updates, is_leaf=is_none)
  return inner_updates, new, inner_state


MAX_TERMS = 8  # the most Cayley–Neumann terms a traced num_terms may pick


def block_map(num_terms, method: str, block_size: int):
  """u (..., b(b-1)/2) -> orthogonal blocks (..., b, b).

  num_terms is normally a Python int. A traced one (what
  optax.inject_hyperparams hands over) picks its polynomial with a
  lax.switch over 1 .. MAX_TERMS terms: each branch is the static map.
  """
  if method not in orthogonal.METHODS:
    raise ValueError(f'unknown orthogonal_map {method!r}; use one of '
                     f'{orthogonal.METHODS}')
  make = lambda k: functools.partial(orthogonal.orthogonal_blocks,
                                     block_size=block_size, num_terms=k,
                                     method=method)
  if method == 'exact' or not isinstance(num_terms, jax.core.Tracer):
    return make(int(num_terms))
  branches = [make(k) for k in range(1, MAX_TERMS + 1)]
  return lambda u: jax.lax.switch(
      jnp.clip(num_terms - 1, 0, MAX_TERMS - 1), branches, u)


def poet_leaves(params) -> Any:
  """True at each POET leaf of `params` (a bool tree).

  A POET leaf is named like a layers.OrthogonalBlocks variable
  (optim.is_poet_path) and shaped (..., k, b, b).
  """
  def pick(path, x):
    shape = jnp.shape(x)
    return (optim.is_poet_path(path) and len(shape) >= 3
            and shape[-1] == shape[-2])
  return jax.tree_util.tree_map_with_path(pick, params)


def layerwise(fn, u, *blocks):
  """fn(u, *blocks) computed one layer of a stack at a time.

  u is (..., k, b(b-1)/2) and each of `blocks` (..., k, b, b), with the same
  leading (layer) axes; fn maps one layer's (k, ...) arrays to an array or
  a tuple of arrays. A loop over the flattened leading axes: the map's
  float32 intermediates (Q and its powers, b x b per block, kept for its
  VJP) then take one layer's memory, not the model's, and cannot be
  scheduled early and held across the model's forward and backward (as the
  whole model's were: 8.5 GiB at llama_8b in the dry run).
  Each block goes through the same products either way.
  """
  lead = u.shape[:-2]
  if not lead:
    return fn(u, *blocks)
  args = tuple(x.reshape((-1,) + x.shape[len(lead):]) for x in (u,) + blocks)
  shapes = jax.eval_shape(fn, *(x[0] for x in args))
  # The loop overwrites every layer of its output buffers. They are filled
  # from the inputs (times 0) rather than made as constant zeros: XLA:CPU's
  # scheduler starts constant buffers with the step, and this one would
  # then be held across the forward and backward (1.3 GiB at llama_8b for
  # each of the two uses).
  fill = sum(x.ravel()[0].astype(jnp.float32) for x in args) * 0
  out = jax.tree.map(
      lambda s: jnp.full((args[0].shape[0],) + s.shape, fill, s.dtype), shapes)
  out = jax.lax.fori_loop(
      0, args[0].shape[0], lambda i, out: jax.tree.map(
          lambda o, v: o.at[i].set(v), out, fn(*(x[i] for x in args))), out)
  return jax.tree.map(lambda o: o.reshape(lead + o.shape[1:]), out)


def generator_gradients(grads, generators, params, num_terms: int,
                        orthogonal_map: str) -> tuple[Any, Any]:
  """The gradient `reparameterize`'s inner transformation sees (step 1).

  grads: the model's gradient tree; generators: the state's
  (ReparameterizeState.generators, or `generators(opt_state)`), None at
  non-POET leaves; params: the model's parameters (the blocks). Every POET
  leaf's blocks' gradient (..., k, b, b) becomes its generators' gradient
  (..., k, b(b-1)/2) float32, through the VJP of the map at the current
  generators; other leaves are passed through. Its global norm is the one
  the inner clip sees (spec section 7). Jittable.

  Returns:
    (that gradient tree, and per POET leaf the largest distance of its
    blocks from map(generators) in drift.tolerance units, None elsewhere;
    the map's value comes with its VJP, so the check costs a subtraction).
  """
  def one_leaf(u, g, p):
    if u is None:
      return g
    make = block_map(num_terms, orthogonal_map, g.shape[-1])

    def one_layer(u, g, p):
      blocks, vjp = jax.vjp(make, u)
      gap = jnp.max(jnp.abs(blocks - p.astype(blocks.dtype)))
      return vjp(g.astype(u.dtype))[0], gap
    grad, gap = layerwise(one_layer, u, g, p)
    return grad, jnp.max(gap) / drift.tolerance(p.dtype, p.shape[-1])

  selected = jax.tree.map(lambda u: u is not None, generators,
                          is_leaf=is_none)
  both = jax.tree.map(one_leaf, generators, grads, params, is_leaf=is_none)
  grads = jax.tree.map(lambda s, x: x[0] if s else x, selected, both)
  gaps = jax.tree.map(lambda s, x: x[1] if s else None, selected, both)
  return grads, gaps
