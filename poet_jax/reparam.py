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
from poet_jax import generator_map
from poet_jax import optim
from poet_jax import orthogonal
from poet_jax import platform


class ReparameterizeState(NamedTuple):
  """State of `reparameterize`; `generators` is None at non-POET leaves."""
  count: jax.Array   # updates applied; a merge follows every merge_every-th
  generators: Any    # (..., k, b(b-1)/2) float32 per POET leaf
  inner_state: Any
  merge_every: jax.Array  # () int32 of the last update; 0: no merges


_is_none = generator_map.is_none


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
  generator_map.block_map(3, orthogonal_map, 2)  # validates orthogonal_map
  merge_every = _concrete_int(merge_every)
  if isinstance(merge_every, int) and merge_every < 1:
    raise ValueError(f'merge_every={merge_every} must be >= 1 or None')
  settings = _Settings(inner, _concrete_int(num_terms), orthogonal_map,
                       merge_every, max_q_norm, check_blocks)
  return optax.GradientTransformationExtraArgs(
      functools.partial(_init, settings), functools.partial(_update, settings))


class _Settings(NamedTuple):
  """reparameterize's arguments, as its init and update read them."""
  inner: optax.GradientTransformation
  num_terms: Any
  orthogonal_map: str
  merge_every: Any       # None: no merges
  max_q_norm: Any
  check_blocks: bool

  def period(self) -> jax.Array:
    """() int32: the merge period the state records (0: no merges)."""
    return jnp.asarray(0 if self.merge_every is None else self.merge_every,
                       jnp.int32)


def _init(settings: _Settings, params) -> ReparameterizeState:
  """Zero generators for every POET leaf; the inner state on the tree with
  the leaves swapped for them."""
  params = nnx.as_pure(params)
  selected = generator_map.poet_leaves(params)
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
  inner_state = settings.inner.init(
      generator_map.swap(selected, params, generators))
  return ReparameterizeState(jnp.zeros([], jnp.int32), generators,
                             inner_state, settings.period())


def _update(settings: _Settings, updates, state: ReparameterizeState,
            params=None, **extra_args):
  """Steps 1 to 5 of the module docstring."""
  if params is None:
    raise ValueError(optim.no_params_message('reparameterize'))
  params = nnx.as_pure(params)
  # POET leaves are where the state holds generators: chosen at init.
  selected = jax.tree.map(lambda u: u is not None, state.generators,
                          is_leaf=_is_none)
  gen_grads, gaps = generator_map.generator_gradients(
      updates, state.generators, params, settings.num_terms,
      settings.orthogonal_map)
  inner_updates, new, inner_state = generator_map.step_generators(
      settings.inner, selected, gen_grads, updates, params, state.generators,
      state.inner_state, **extra_args)
  if settings.max_q_norm is not None:
    new = jax.tree.map(lambda u: _cap(u, settings.max_q_norm), new)

  def blocks_update(u, p):
    make = generator_map.block_map(settings.num_terms,
                                   settings.orthogonal_map, p.shape[-1])
    return generator_map.layerwise(lambda u, p: make(u).astype(p.dtype) - p,
                                   u, p)

  out = jax.tree.map(lambda s, d, u, p: blocks_update(u, p) if s else d,
                     selected, inner_updates, new, params, is_leaf=_is_none)
  if settings.check_blocks:
    drift.warn_if_changed(
        state.count, jnp.max(jnp.stack(jax.tree.leaves(gaps))),
        state.merge_every)
  count = optax.safe_increment(state.count)
  every = settings.period()
  state = ReparameterizeState(count, new, inner_state, every)
  if settings.merge_every is not None:
    state = _reset_if(_due(count, every), state)
  return out, state


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
  if platform.platform() == 'cpu':
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
