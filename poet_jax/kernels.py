"""POET for any parameter pytree, with optax only: the materialized route.

`poet_kernels(inner, ...)` is a gradient transformation for models that are
not POET models at all (flax.linen, equinox, plain dicts). Every selected
2-D kernel K of the model is reparameterized as K = R W0 P (spec sections 1,
3.1, original POET's materialized path of section 4): W0, the permutations
and the generators live in the transformation's state, and the model keeps
its dense kernel. Each update

  1. maps the kernel's gradient through the VJP of u -> K(u) to the
     generators u (the Cayley–Neumann map, section 2);
  2. runs `inner` on the whole tree with each selected kernel replaced by
     {'in_blocks': u_in, 'out_blocks': u_out}, so a global-norm clip sees
     every gradient and `poet_jax.poet` routes the generators to its POET
     group (as `poet_jax.reparameterize` does for POET layers, whose steps
     this shares);
  3. applies inner's update to the generators and emits K(u_new) - K for
     each kernel (the other leaves get inner's updates as they are);
  4. every `merge_every` updates folds R and P into W0, draws new
     permutations from fold_in(key, merge number), zeroes the generators and
     resets the POET optimizer state (section 5) - one counter for all.

Memory per m x n kernel: the kernel and W0 (2mn) plus the generators and
their Adam moments, against AdamW's 3mn. W0 is the kernel as it was at
`init` (kept as is: initialize the model's kernels with the W0 you want,
for example `poet_jax.init_w0`).
"""
import fnmatch
import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from poet_jax import optim
from poet_jax import orthogonal
from poet_jax import reparam
from poet_jax import spo

DEFAULT_EXCLUDE = ('*embed*', '*lm_head*', '*head*')


class PoetKernelsState(NamedTuple):
  """State of `poet_kernels`; None at every leaf that is not selected."""
  count: jax.Array   # updates applied; a merge follows every merge_every-th
  w0: Any            # (in, out) W0 in the permutation frame (spo)
  in_place: Any      # (in,) int32 input gather
  out_place: Any     # (out,) int32 output gather
  generators: Any    # {'in_blocks': (in/b, b(b-1)/2), 'out_blocks': ...}
  inner_state: Any


def path_name(path) -> str:
  """'a/b/0/kernel' for a jax key path: what the patterns match."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(
      k, 'idx', k)))) for k in path)


def select_kernels(params, block_size: int, *, target=('*',),
                   exclude=DEFAULT_EXCLUDE, on_indivisible: str = 'raise'):
  """Which leaves of `params` `poet_kernels` reparameterizes (a bool tree).

  A leaf is selected when it is 2-D, its path (as `path_name`) matches one
  of the `target` glob patterns and none of `exclude` (the output head and
  embeddings by default: spec section 7). A selected kernel whose sizes
  `block_size` does not divide raises ValueError naming it
  (on_indivisible='raise', the default), or is left out with a warning
  listing every such path (on_indivisible='skip'); never silently.
  """
  if on_indivisible not in ('raise', 'skip'):
    raise ValueError(f"on_indivisible={on_indivisible!r}: use 'raise' or "
                     "'skip'")
  skipped = []

  def choose(path, x):
    name = path_name(path)
    if jnp.ndim(x) != 2:
      return False
    if not any(fnmatch.fnmatch(name, p) for p in target):
      return False
    if any(fnmatch.fnmatch(name, p) for p in exclude):
      return False
    if any(s % block_size for s in jnp.shape(x)):
      if on_indivisible == 'raise':
        raise ValueError(
            f'{name}: block_size={block_size} does not divide its shape '
            f'{tuple(jnp.shape(x))}; choose another block size, exclude '
            "it, or pass on_indivisible='skip'")
      skipped.append(name)
      return False
    return True

  selected = jax.tree_util.tree_map_with_path(choose, params)
  if skipped:
    warnings.warn(f'poet_kernels: block_size={block_size} does not divide '
                  f'these kernels, left dense: {", ".join(skipped)}',
                  stacklevel=2)
  if not any(jax.tree.leaves(selected)):
    raise ValueError('poet_kernels: no 2-D kernel selected (target='
                     f'{target}, exclude={exclude}); nothing to train with '
                     'POET')
  return selected


def _kernel_map(w0, in_place, out_place, block_size, num_terms, method):
  """u -> K(u) = R W0 P as a function of the generators."""
  make = reparam.block_map(num_terms, method, block_size)

  def kernel(gen):
    g_in, g_out = make(gen['in_blocks']), make(gen['out_blocks'])
    return spo.block_kernel(w0, g_in.astype(w0.dtype), g_out.astype(w0.dtype),
                            in_place, out_place)
  return kernel


def _zero_generators(shape, block_size):
  n = orthogonal.num_generator_params(block_size)
  return {'in_blocks': jnp.zeros((shape[0] // block_size, n), jnp.float32),
          'out_blocks': jnp.zeros((shape[1] // block_size, n), jnp.float32)}


_is_none = reparam.is_none
_swap = reparam.swap


class _Pair(NamedTuple):
  """(in, out) permutations of one kernel; a type of its own so that the
  tuples of a tree (optim.per_layer's, say) are not taken for one."""
  inputs: Any
  outputs: Any


def _draw_pair(key, shape):
  k_in, k_out = jax.random.split(key)
  return _Pair(spo.draw_permutation(k_in, shape[0]),
               spo.draw_permutation(k_out, shape[1]))


def _placements(key, shapes, selected):
  """(in_place, out_place) trees of fresh permutations, None unselected."""
  keys = iter(jax.random.split(key, len(jax.tree.leaves(selected))))
  pairs = jax.tree.map(
      lambda s, x: _draw_pair(next(keys), x.shape) if s else _Pair(None, None),
      selected, shapes, is_leaf=_is_none)
  pick = lambda i: jax.tree.map(lambda p: p[i], pairs,
                                is_leaf=lambda p: isinstance(p, _Pair))
  return pick(0), pick(1)


def _merge(state, selected, key, make):
  """W0 <- R W0 P in new frames drawn from `key`, generators <- 0, POET
  state reset; make: generators -> blocks."""
  new_in, new_out = _placements(key, state.w0, selected)

  def fold(s, w0, i, o, gen, ni, no):
    if not s:
      return None
    dtype = jnp.promote_types(w0.dtype, jnp.float32)
    return spo.block_merge(
        w0.astype(dtype), make(gen['in_blocks']).astype(dtype),
        make(gen['out_blocks']).astype(dtype), i, o, ni, no
    ).astype(w0.dtype)

  w0 = jax.tree.map(fold, selected, state.w0, state.in_place,
                    state.out_place, state.generators, new_in, new_out,
                    is_leaf=_is_none)
  zeros = jax.tree.map(jnp.zeros_like, state.generators)
  return PoetKernelsState(state.count, w0, new_in, new_out, zeros,
                          optim.reset_poet_state(state.inner_state))


def poet_kernels(inner: optax.GradientTransformation, *, block_size: int,
                 merge_every: int, key: jax.Array, target=('*',),
                 exclude=DEFAULT_EXCLUDE, on_indivisible: str = 'raise',
                 neumann_terms: int = 3, orthogonal_map: str = 'neumann'
                 ) -> optax.GradientTransformation:
  """POET-BS on the 2-D kernels of any parameter pytree (module docstring).

  Args:
    inner: the optimizer of the generators and the other leaves, typically
      `optax.chain(poet_jax.clip_by_global_norm(...), poet_jax.poet(...))`.
      It sees each selected kernel as {'in_blocks': u_in,
      'out_blocks': u_out}, the generators of each side.
    block_size: b, dividing both sizes of every selected kernel.
    merge_every: updates between merges (spec section 5; paper 400).
    key: PRNG key of the permutations; merge i uses fold_in(key, i) and
      kernel j of that fold_in(., j), so every replica draws the same.
    target, exclude, on_indivisible: which kernels; see `select_kernels`.
    neumann_terms, orthogonal_map: the Cayley–Neumann map (section 2):
      'neumann' (paper), 'taylor' or 'exact'.

  `update` needs `params` (the current kernels). Raises ValueError from
  `init` when nothing is selected or a size is not divisible.
  """
  if merge_every < 1:
    raise ValueError(f'merge_every={merge_every} must be >= 1')
  kernel_fn = functools.partial(_kernel_map, block_size=block_size,
                                num_terms=neumann_terms, method=orthogonal_map)
  select = functools.partial(select_kernels, block_size=block_size,
                             target=target, exclude=exclude,
                             on_indivisible=on_indivisible)

  def init_fn(params):
    selected = select(params)
    in_place, out_place = _placements(jax.random.fold_in(key, 0), params,
                                      selected)
    w0 = jax.tree.map(
        lambda s, x, i, o: spo.to_block_frame(x, i, o) if s else None,
        selected, params, in_place, out_place, is_leaf=_is_none)
    generators = jax.tree.map(
        lambda s, x: _zero_generators(x.shape, block_size) if s else None,
        selected, params)
    inner_state = inner.init(_swap(selected, params, generators))
    return PoetKernelsState(jnp.zeros([], jnp.int32), w0, in_place,
                            out_place, generators, inner_state)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(optax.NO_PARAMS_MSG)
    # Selected where the state holds a W0: chosen once, at init.
    selected = jax.tree.map(lambda w: w is not None, state.w0,
                            is_leaf=_is_none)
    leaf = _is_none

    def generator_grad(s, g, w0, i, o, gen):
      if not s:
        return None
      _, vjp = jax.vjp(kernel_fn(w0, i, o), gen)
      return vjp(g.astype(w0.dtype))[0]

    gen_grads = jax.tree.map(generator_grad, selected, updates, state.w0,
                             state.in_place, state.out_place,
                             state.generators, is_leaf=leaf)
    inner_updates, new, inner_state = reparam.step_generators(
        inner, selected, gen_grads, updates, params, state.generators,
        state.inner_state)
    count = optax.safe_increment(state.count)
    kernels = jax.tree.map(
        lambda s, w0, i, o, gen: kernel_fn(w0, i, o)(gen) if s else None,
        selected, state.w0, state.in_place, state.out_place, new,
        is_leaf=leaf)
    out = jax.tree.map(
        lambda s, u, k, p: (k - p).astype(p.dtype) if s else u,
        selected, inner_updates, kernels, params, is_leaf=leaf)
    state = PoetKernelsState(count, state.w0, state.in_place,
                             state.out_place, new, inner_state)
    merge = lambda s: _merge(
        s, selected, jax.random.fold_in(key, s.count // merge_every),
        reparam.block_map(neumann_terms, orthogonal_map, block_size))
    state = jax.lax.cond(count % merge_every == 0, merge, lambda s: s, state)
    return out, state

  return optax.GradientTransformation(init_fn, update_fn)
