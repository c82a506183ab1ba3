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
rounding does not accumulate. Step 1 checks that (the map's value comes with
its VJP) and warns when the blocks are further off: a merge the model did
not take, or a transformation after this one that changed its output.

With optax.MultiSteps around it, the map and its VJP run once per optimizer
update (the VJP is linear, so the accumulated blocks' gradient gives the
accumulated generators' gradient).
"""
import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from poet_jax import drift
from poet_jax import optim
from poet_jax import orthogonal
from poet_jax import targets


class ReparameterizeState(NamedTuple):
  """State of `reparameterize`; `generators` is None at non-POET leaves."""
  count: jax.Array   # updates applied; a merge follows every merge_every-th
  generators: Any    # (..., k, b(b-1)/2) float32 per POET leaf
  inner_state: Any
  merge_every: jax.Array  # () int32 of the last update; 0: no merges


def is_none(x) -> bool:
  return x is None


def swap(selected, tree, replacement):
  """`tree` with every selected leaf replaced by `replacement`'s."""
  return jax.tree.map(lambda s, x, r: r if s else x, selected, tree,
                      replacement, is_leaf=is_none)


def step_generators(inner, selected, gen_grads, updates, params, generators,
                    inner_state, **extra_args):
  """Steps 2 and 3 of the module docstring, shared with poet_kernels.

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
  whole model's were: 8.5 GiB at llama_8b, docs/benchmarks.md issue 12).
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


def _cap(u, max_norm):
  """Scales each block's generator so that ||Q||_F = sqrt(2)||u|| <= max."""
  norm = jnp.sqrt(2.0) * jnp.linalg.norm(u, axis=-1, keepdims=True)
  return u * jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))


def _concrete_int(x):
  """x as a Python int when it is not traced (None stays None)."""
  if x is None or isinstance(x, jax.core.Tracer):
    return x
  return int(x)


def reparameterize(inner: optax.GradientTransformation, *, num_terms=3,
                   orthogonal_map: str = 'neumann', merge_every=None,
                   max_q_norm=None, check_blocks: bool = True
                   ) -> optax.GradientTransformationExtraArgs:
  """Trains POET layers' orthogonal blocks through their generators.

  Args:
    inner: the optimizer of the generators and every other leaf, typically
      `optax.chain(poet_jax.clip_by_global_norm(0.1), poet_jax.poet(lr,
      poet_lr))`. It sees each POET leaf as its generators, float32
      (..., k, b(b-1)/2), under the leaf's own path, and gets the extra
      arguments of `update` (such as `value=` for
      optax.contrib.reduce_on_plateau).
    num_terms: k of the Neumann series (spec section 2; paper 3).
    orthogonal_map: 'neumann' (paper: (I+Q)(I+...+Q^k)), 'taylor' (the
      degree-(k+1) Taylor polynomial of the Cayley map) or 'exact' (Cayley
      by a linear solve).
    merge_every: updates between merges (spec section 5; paper 400), or
      None for no merges. At a merge this transformation zeroes its
      generators and resets the POET state of `inner`
      (optim.reset_poet_state); the model merges after the same update,
      reading merge_every from this state (merge.merge_if_due,
      merge_model_if_due).
    max_q_norm: if set, every block's ||Q||_F is capped at this after each
      update (the series converges while ||Q||_2 < 1).
    check_blocks: warn (RuntimeWarning, once a kind, from inside jit) when
      the blocks given to `update` are not map(generators) within the
      rounding (poet_jax.drift): the model skipped a merge, or something
      after this transformation changed its output (docs/method.md).

  Every argument may also come from optax.inject_hyperparams: numbers
  arrive as arrays (num_terms then picks its map by a lax.switch, and
  merge_every may change between updates).

  Returns:
    An optax.GradientTransformationExtraArgs; `update` needs `params` (the
    current blocks). Its state is a ReparameterizeState.

  Raises:
    ValueError: for an unknown orthogonal_map or merge_every < 1; from
      `init`, when `params` has no POET leaf; from `update` without params.
  """
  block_map(3, orthogonal_map, 2)  # validates orthogonal_map
  num_terms, merge_every = _concrete_int(num_terms), _concrete_int(
      merge_every)
  if isinstance(merge_every, int) and merge_every < 1:
    raise ValueError(f'merge_every={merge_every} must be >= 1 or None')
  make = lambda b: block_map(num_terms, orthogonal_map, b)
  period = lambda: jnp.asarray(0 if merge_every is None else merge_every,
                               jnp.int32)

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
                               inner.init(swap(selected, params, generators)),
                               period())

  def new_blocks_update(u, p):
    return layerwise(lambda u, p: make(p.shape[-1])(u).astype(p.dtype) - p,
                     u, p)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(optim.no_params_message('reparameterize'))
    params = nnx.as_pure(params)
    # POET leaves are where the state holds generators: chosen at init.
    selected = jax.tree.map(lambda u: u is not None, state.generators,
                            is_leaf=is_none)
    gen_grads, gaps = generator_gradients(updates, state.generators, params,
                                          num_terms, orthogonal_map)
    inner_updates, new, inner_state = step_generators(
        inner, selected, gen_grads, updates, params, state.generators,
        state.inner_state, **extra_args)
    if max_q_norm is not None:
      new = jax.tree.map(lambda u: _cap(u, max_q_norm), new)
    out = jax.tree.map(
        lambda s, d, u, p: new_blocks_update(u, p) if s else d, selected,
        inner_updates, new, params, is_leaf=is_none)
    if check_blocks:
      drift.warn_if_changed(
          state.count, jnp.max(jnp.stack(jax.tree.leaves(gaps))),
          state.merge_every)
    count = optax.safe_increment(state.count)
    every = period()
    state = ReparameterizeState(count, new, inner_state, every)
    if merge_every is not None:
      state = _reset_if(_due(count, every), state)
    return out, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _due(count, merge_every):
  """count is a positive multiple of merge_every (never when it is 0)."""
  return (merge_every > 0) & (count > 0) & (
      count % jnp.maximum(merge_every, 1) == 0)


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
  if not found:
    raise ValueError(
        'opt_state holds no ReparameterizeState: train a POET model with '
        'poet_jax.reparameterize(inner) (a plain optax optimizer moves its '
        'blocks off the orthogonal group)')
  if len(found) > 1:
    raise ValueError(f'opt_state holds {len(found)} ReparameterizeState; '
                     'expected one')
  return found[0]


def update_count(opt_state) -> jax.Array:
  """() int32: updates `reparameterize` has applied (its counter)."""
  return _find(opt_state)[0].count


def deprecated_merge_every(where: str, merge_every) -> None:
  """The former merge_every argument: warned about and ignored."""
  if merge_every is not None:
    warnings.warn(
        f'{where}: the merge_every argument is ignored and will be removed; '
        "the merge reads it from reparameterize's state (one source)",
        FutureWarning, stacklevel=3)


def merge_every_of(opt_state) -> jax.Array:
  """() int32: the merge period of the last update (0: no merges)."""
  return _find(opt_state)[0].merge_every


def merge_count(opt_state, merge_every=None) -> jax.Array:
  """() int32: merges so far on the counter: count // merge_every (0 with
  no merges). merge_every comes from the state (the argument is
  deprecated and ignored)."""
  deprecated_merge_every('merge_count', merge_every)
  state, _ = _find(opt_state)
  return state.count // jnp.maximum(state.merge_every, 1) * (
      state.merge_every > 0)


def merge_due(opt_state, merge_every=None) -> jax.Array:
  """() bool: the update just applied was a merging one.

  True when the counter is a positive multiple of the state's merge_every
  and, inside optax.MultiSteps, that update was applied by the call that
  produced this state (mini_step back at 0). Call it on the state right
  after an applied update: a state rolled back to one that merged would
  say True again. (The merge_every argument is deprecated and ignored.)
  """
  deprecated_merge_every('merge_due', merge_every)
  state, outer = _find(opt_state)
  due = _due(state.count, state.merge_every)
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
