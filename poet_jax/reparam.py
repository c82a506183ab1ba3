"""POET's Cayley–Neumann parameterization as an optax transformation.

A POET layer (layers.POETLinear) holds its orthogonal blocks G (..., k, b, b)
and multiplies by them directly. What keeps them orthogonal is here:
`reparameterize(inner, ...)` owns the generators u (..., k, b(b-1)/2), the
strict upper triangles of the skew-symmetric Q with G = map(Q) (spec section
2: Neumann with k terms, its Taylor form, or the exact Cayley map). Each
update

  1. maps the blocks' gradient through the VJP of u -> map(u) at the current
     generators, to the generators' gradient;
  2. runs `inner` on the whole tree with every POET leaf replaced by its
     generators (gradients and params), so a global-norm clip sees every
     gradient and `poet_jax.poet` finds the POET group by the leaf's name;
  3. applies inner's update to the generators (each block's ||Q||_F capped at
     `max_q_norm` if given);
  4. emits map(u_new) - G for every POET leaf, inner's update elsewhere;
  5. with `merge_every`: after the update that makes count % merge_every == 0,
     zeroes the generators and resets the POET optimizer state (section 5,
     steps 2 and 4). The model merges on the same counter (`merge_due`,
     `merge_count`; poet_jax.merge.merge_if_due).

The blocks then equal map(u) up to one rounding of the addition p + (map - p)
in the blocks' dtype: each update is taken against the current blocks, so the
rounding does not accumulate.

With optax.MultiSteps around it, the map and its VJP run once per optimizer
update (the VJP is linear, so the accumulated blocks' gradient gives the
accumulated generators' gradient).
"""
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from poet_jax import optim
from poet_jax import orthogonal
from poet_jax import targets


class ReparameterizeState(NamedTuple):
  """State of `reparameterize`; `generators` is None at non-POET leaves."""
  count: jax.Array   # updates applied; a merge follows every merge_every-th
  generators: Any    # (..., k, b(b-1)/2) float32 per POET leaf
  inner_state: Any


def is_none(x) -> bool:
  return x is None


def swap(selected, tree, replacement):
  """`tree` with every selected leaf replaced by `replacement`'s."""
  return jax.tree.map(lambda s, x, r: r if s else x, selected, tree,
                      replacement, is_leaf=is_none)


def step_generators(inner, selected, gen_grads, updates, params, generators,
                    inner_state):
  """Steps 2 and 3 of the module docstring, shared with poet_kernels.

  Returns (inner's updates, new generators (None where not selected), new
  inner state).
  """
  inner_updates, inner_state = inner.update(
      swap(selected, updates, gen_grads), inner_state,
      swap(selected, params, generators))
  new = jax.tree.map(lambda s, u, d: optax.apply_updates(u, d) if s else None,
                     selected, generators, inner_updates, is_leaf=is_none)
  return inner_updates, new, inner_state


def block_map(num_terms: int, method: str, block_size: int):
  """u (..., b(b-1)/2) -> orthogonal blocks (..., b, b)."""
  if method not in orthogonal.METHODS:
    raise ValueError(f'unknown orthogonal_map {method!r}; use one of '
                     f'{orthogonal.METHODS}')
  return functools.partial(orthogonal.orthogonal_blocks,
                           block_size=block_size, num_terms=num_terms,
                           method=method)


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
  leading (layer) axes; fn maps one layer's (k, ...) arrays to a (k, ...)
  array. A loop over the flattened leading axes: the map's float32
  intermediates (Q and its powers, b x b per block, kept for its VJP) then
  take one layer's memory, not the model's, and cannot be scheduled early
  and held across the model's forward and backward (as the whole model's
  were: 8.5 GiB at llama_8b, docs/benchmarks.md issue 12). Each block goes
  through the same products either way.
  """
  lead = u.shape[:-2]
  if not lead:
    return fn(u, *blocks)
  args = tuple(x.reshape((-1,) + x.shape[len(lead):]) for x in (u,) + blocks)
  shape = jax.eval_shape(fn, *(x[0] for x in args))
  # The loop overwrites every layer of its output buffer. That buffer is
  # filled from the inputs (times 0) rather than made as constant zeros:
  # XLA:CPU's scheduler starts constant buffers with the step, and this one
  # would then be held across the forward and backward (1.3 GiB at
  # llama_8b for each of the two uses).
  fill = sum(x.ravel()[0].astype(jnp.float32) for x in args) * 0
  out = jnp.full((args[0].shape[0],) + shape.shape, fill, shape.dtype)
  out = jax.lax.fori_loop(
      0, out.shape[0], lambda i, out: out.at[i].set(fn(*(x[i] for x in args))),
      out)
  return out.reshape(lead + out.shape[1:])


def _cap(u, max_norm):
  """Scales each block's generator so that ||Q||_F = sqrt(2)||u|| <= max."""
  norm = jnp.sqrt(2.0) * jnp.linalg.norm(u, axis=-1, keepdims=True)
  return u * jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))


def reparameterize(inner: optax.GradientTransformation, *, num_terms: int = 3,
                   orthogonal_map: str = 'neumann', merge_every=None,
                   max_q_norm=None) -> optax.GradientTransformation:
  """Trains POET layers' orthogonal blocks through their generators.

  Args:
    inner: the optimizer of the generators and every other leaf, typically
      `optax.chain(poet_jax.clip_by_global_norm(0.1), poet_jax.poet(lr,
      poet_lr))`. It sees each POET leaf as its generators, float32
      (..., k, b(b-1)/2), under the leaf's own path.
    num_terms: k of the Neumann series (spec section 2; paper 3).
    orthogonal_map: 'neumann' (paper: (I+Q)(I+...+Q^k)), 'taylor' (the
      degree-(k+1) Taylor polynomial of the Cayley map) or 'exact' (Cayley
      by a linear solve).
    merge_every: updates between merges (spec section 5; paper 400), or
      None for no merges. At a merge this transformation zeroes its
      generators and resets the POET state of `inner`
      (optim.reset_poet_state); the model must merge after the same update
      (merge.merge_if_due, or `merge_due` and `merge_count`).
    max_q_norm: if set, every block's ||Q||_F is capped at this after each
      update (the series converges while ||Q||_2 < 1).

  Returns:
    An optax.GradientTransformation; `update` needs `params` (the current
    blocks). Its state is a ReparameterizeState.

  Raises:
    ValueError: for an unknown orthogonal_map or merge_every < 1; from
      `init`, when `params` has no POET leaf.
  """
  block_map(num_terms, orthogonal_map, 2)  # validates orthogonal_map
  if merge_every is not None and merge_every < 1:
    raise ValueError(f'merge_every={merge_every} must be >= 1 or None')
  make = lambda b: block_map(num_terms, orthogonal_map, b)

  def init_fn(params):
    params = nnx.as_pure(params)
    selected = poet_leaves(params)
    if not any(jax.tree.leaves(selected)):
      raise ValueError(
          'reparameterize: no POET leaf (a variable named one of '
          f'{optim.BLOCK_NAMES}, shaped (..., k, b, b)) among the '
          f'{len(jax.tree.leaves(params))} parameters; build the model with '
          'POET layers (poet_jax.poetize), or use poet_jax.poet_kernels')
    generators = jax.tree.map(
        lambda s, x: jnp.zeros(jnp.shape(x)[:-2] + (
            orthogonal.num_generator_params(jnp.shape(x)[-1]),), jnp.float32)
        if s else None, selected, params)
    return ReparameterizeState(jnp.zeros([], jnp.int32), generators,
                               inner.init(swap(selected, params, generators)))

  def generator_grad(s, g, u):
    if not s:
      return None

    def one_layer(u, g):
      _, vjp = jax.vjp(make(g.shape[-1]), u)
      return vjp(g.astype(u.dtype))[0]
    return layerwise(one_layer, u, g)

  def new_blocks_update(u, p):
    return layerwise(lambda u, p: make(p.shape[-1])(u).astype(p.dtype) - p,
                     u, p)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(optax.NO_PARAMS_MSG)
    params = nnx.as_pure(params)
    # POET leaves are where the state holds generators: chosen at init.
    selected = jax.tree.map(lambda u: u is not None, state.generators,
                            is_leaf=is_none)
    gen_grads = jax.tree.map(generator_grad, selected, updates,
                             state.generators, is_leaf=is_none)
    inner_updates, new, inner_state = step_generators(
        inner, selected, gen_grads, updates, params, state.generators,
        state.inner_state)
    if max_q_norm is not None:
      new = jax.tree.map(lambda u: _cap(u, max_q_norm), new)
    out = jax.tree.map(
        lambda s, d, u, p: new_blocks_update(u, p) if s else d, selected,
        inner_updates, new, params, is_leaf=is_none)
    count = optax.safe_increment(state.count)
    state = ReparameterizeState(count, new, inner_state)
    if merge_every is not None:
      state = _reset_if(count % merge_every == 0, state)
    return out, state

  return optax.GradientTransformation(init_fn, update_fn)


def _reset_if(due, state):
  """reset_after_merge(state) where `due`, else state.

  A select on accelerators: it fuses into the update that writes the state
  anyway, so a step that does not merge moves nothing more, where the
  operands a lax.cond's untaken branch returns are copied (the generators
  and POET moments, every step). XLA:CPU keeps the lax.cond: the select
  fuses differently there and would change a run's last bits.
  """
  if targets.platform() == 'cpu':
    return jax.lax.cond(due, reset_after_merge, lambda s: s, state)
  return jax.tree.map(functools.partial(jnp.where, due),
                      reset_after_merge(state), state)


def _is_state(x) -> bool:
  return isinstance(x, ReparameterizeState)


def _is_target(x) -> bool:
  return isinstance(x, (ReparameterizeState, optax.MultiStepsState))


def reset_after_merge(opt_state: Any) -> Any:
  """The optimizer state as a merge leaves it (spec section 5).

  Zeroes the generators of every ReparameterizeState and resets the POET
  optimizer state everywhere (optim.reset_poet_state: Adam moments and
  count, and MultiSteps' accumulated POET gradients). Pure; jittable;
  idempotent.
  """
  def zero(s):
    if _is_state(s):
      return s._replace(generators=jax.tree.map(jnp.zeros_like, s.generators))
    return s
  return optim.reset_poet_state(jax.tree.map(zero, opt_state,
                                             is_leaf=_is_state))


def _find(opt_state):
  """(the ReparameterizeState, the MultiStepsState around it or None)."""
  found = []

  def visit(s, outer):
    for x in jax.tree.leaves(s, is_leaf=_is_target):
      if _is_state(x):
        found.append((x, outer))
      elif isinstance(x, optax.MultiStepsState):
        visit(x.inner_opt_state, x)

  visit(opt_state, None)
  if len(found) != 1:
    raise ValueError(f'opt_state holds {len(found)} ReparameterizeState; '
                     'expected one (build it with poet_jax.reparameterize)')
  return found[0]


def update_count(opt_state) -> jax.Array:
  """() int32: updates `reparameterize` has applied (its counter)."""
  return _find(opt_state)[0].count


def merge_count(opt_state, merge_every: int) -> jax.Array:
  """() int32: merges so far on the counter: count // merge_every."""
  return update_count(opt_state) // merge_every


def merge_due(opt_state, merge_every: int) -> jax.Array:
  """() bool: the update just applied was a merging one.

  True when the counter is a positive multiple of merge_every and, inside
  optax.MultiSteps, that update was applied by the call that produced this
  state (mini_step back at 0). Call it on the state right after an applied
  update: a state rolled back to one that merged would say True again.
  """
  state, outer = _find(opt_state)
  due = (state.count > 0) & (state.count % merge_every == 0)
  if outer is not None:
    due = due & (outer.mini_step == 0)
  return due


def generators(opt_state) -> Any:
  """The generator tree of the ReparameterizeState inside opt_state:
  (..., k, b(b-1)/2) float32 per POET leaf, None elsewhere."""
  return _find(opt_state)[0].generators


def generator_norms(opt_state) -> Any:
  """||Q||_F of every block, (..., k) per POET leaf (None elsewhere)."""
  return jax.tree.map(lambda u: jnp.sqrt(2.0) * jnp.linalg.norm(u, axis=-1),
                      generators(opt_state))
