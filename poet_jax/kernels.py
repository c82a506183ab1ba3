"""POET for any parameter pytree, with optax only: the materialized route.

`poet_kernels(inner, ...)` is a gradient transformation for models that are
not POET models at all (flax.linen, equinox, plain dicts). Every selected
projection kernel K of the model is reparameterized as K = R W0 P (spec
sections 1, 3.1, original POET's materialized path of section 4), on its
(inputs x outputs) matrix (a multi-axis kernel, such as linen
DenseGeneral's (D, H, Dh), flattened by its declared axes: poet_jax.layout;
one matrix per declared stack index): W0, the permutations and the
generators live in the transformation's state, and the model keeps its
dense kernel. Each update

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
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from poet_jax import drift
from poet_jax import generator_map
from poet_jax import layers
from poet_jax import layout as layout_lib
from poet_jax import optim
from poet_jax import orthogonal
from poet_jax import spo

DEFAULT_EXCLUDE = layout_lib.DEFAULT_EXCLUDE
# Leaves that are never a projection's kernel (when 2-D, a stacked norm or
# bias, or an embedding table).
NOT_KERNELS = ('scale', 'bias', 'embedding')


class PoetKernelsState(NamedTuple):
  """State of `poet_kernels`; None at every leaf that is not selected."""
  count: jax.Array   # updates applied; a merge follows every merge_every-th
  w0: Any            # (*stack, m, n) W0 in the permutation frame (spo)
  in_place: Any      # (*stack, m) int32 input gather
  out_place: Any     # (*stack, n) int32 output gather
  generators: Any    # {'in_blocks': (*stack, m/b, b(b-1)/2), 'out_blocks'}
  inner_state: Any


def _key_name(k) -> str:
  return str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))


def layer_name(path) -> str:
  """The dotted layer path of a leaf: 'blocks.mlp.up' for the key path
  blocks/mlp/up/kernel (a final 'kernel' names the leaf, not the layer),
  as poetize names the same layer of an NNX model."""
  names = [_key_name(k) for k in path]
  if len(names) > 1 and names[-1] == 'kernel':
    names = names[:-1]
  return '.'.join(names)


def _candidate(path, x, roles) -> bool:
  """A projection's kernel: not a norm, bias or embedding, and declared
  axes, or named 'kernel' with 2+ dimensions, or 2-D."""
  last = _key_name(path[-1]) if path else ''
  return last not in NOT_KERNELS and (
      roles is not None or jnp.ndim(x) == 2 or (
          jnp.ndim(x) > 2 and last == 'kernel'))


def _layout(name, shape, roles):
  """The kernel's KernelLayout, or ValueError saying why it stays dense."""
  if roles is None:
    if len(shape) != 2:
      raise ValueError(
          f'a {len(shape)}-D kernel {tuple(shape)} with no declared axes: '
          f"give kernel_axes={{{name!r}: roles}} ('i' input, 'o' output, "
          "'s' stack per axis; poet_jax.linen_kernel_axes reads them from a "
          'linen module)')
    roles = 'io'
  layout = layout_lib.KernelLayout(roles)
  layout.check(shape, name)
  if len(shape) != len(roles):
    raise ValueError(f'kernel_axes {roles!r} name {len(roles)} axes, the '
                     f'kernel has {len(shape)} ({tuple(shape)})')
  return layout


def select_kernels(params, block_size: int, *, target=('*',),
                   exclude=DEFAULT_EXCLUDE, kernel_axes=None,
                   on_indivisible: str = 'raise'):
  """Which leaves of `params` `poet_kernels` reparameterizes, and how.

  A candidate is a projection's kernel (a leaf named 'kernel' of 2 or more
  dimensions, any other 2-D leaf but norms, biases and embeddings, or one
  kernel_axes names). It is selected when its layer path (`layer_name`:
  'blocks.attn.q', the syntax of poetize) matches a `target` glob and no
  `exclude` (the output head and embeddings by default: spec section 7),
  and its axes are known: 2-D, or given by kernel_axes ({glob: roles}, one
  of 'i', 'o', 's' per axis: poet_jax.layout; poet_jax.linen_kernel_axes
  reads them from a linen model). A stack axis is one declared 's', never
  guessed.

  Returns:
    (layouts, dense): a tree with a layout.KernelLayout at each selected
    leaf and None elsewhere; {layer: reason} for every candidate left dense
    (also logged).
  Raises:
    ValueError: a selected kernel whose sizes `block_size` does not divide
      (on_indivisible='raise', the default; the message names exclude= and
      on_indivisible='skip'), or nothing selected.
  """
  if on_indivisible not in ('raise', 'skip'):
    raise ValueError(f"on_indivisible={on_indivisible!r}: use 'raise' or "
                     "'skip'")
  dense = {}

  def choose(path, x):
    name = layer_name(path)
    roles = layout_lib.roles_for(name, kernel_axes)
    if not _candidate(path, x, roles):
      return None
    why = layout_lib.is_chosen(name, target, exclude)
    if why:
      dense[name] = why
      return None
    try:
      layout = _layout(name, jnp.shape(x), roles)
    except ValueError as e:
      dense[name] = str(e)
      return None
    m, n = layout.matrix_shape(jnp.shape(x))[-2:]
    why = layout_lib.indivisible(name, m, n, 'block', block_size, exclude,
                                 on_indivisible)
    if why:
      dense[name] = why
      return None
    return layout

  layouts = jax.tree_util.tree_map_with_path(choose, params)
  layout_lib.log_dense('poet_kernels', dense)
  if not jax.tree.leaves(layouts, is_leaf=_is_layout):
    raise ValueError(f'poet_kernels: no kernel selected (target={target}, '
                     f'exclude={exclude}); left dense: {dense}')
  return layouts, dense


def _is_layout(x) -> bool:
  return isinstance(x, layout_lib.KernelLayout)


def _stacked(fn, w0):
  """fn over the stack axes in front of W0's two."""
  return layers.over_leading_axes(fn, w0.ndim - 2)


def _kernel_map(w0, in_place, out_place, layout, shape, block_size,
                num_terms, method):
  """u -> K(u): R W0 P of each matrix, in the kernel's own layout."""
  make = generator_map.block_map(num_terms, method, block_size)

  def matrix(w0, g_in, g_out, i, o):
    return spo.block_kernel(w0, g_in.astype(w0.dtype), g_out.astype(w0.dtype),
                            i, o)

  def kernel(gen):
    k = _stacked(matrix, w0)(w0, make(gen['in_blocks']),
                             make(gen['out_blocks']), in_place, out_place)
    return layout.from_matrix(k, shape)
  return kernel


def _zero_generators(matrix_shape, block_size):
  *stack, m, n = matrix_shape
  p = orthogonal.num_generator_params(block_size)
  zeros = lambda size: jnp.zeros((*stack, size // block_size, p), jnp.float32)
  return {'in_blocks': zeros(m), 'out_blocks': zeros(n)}


_is_none = generator_map.is_none
_swap = generator_map.swap


class _Pair(NamedTuple):
  """(in, out) permutations of one kernel; a type of its own so that the
  tuples of a tree are not taken for one."""
  inputs: Any
  outputs: Any


def _draw_pair(key, matrix_shape):
  """Permutations of one matrix, or of each of a stack (one key each)."""
  *stack, m, n = matrix_shape

  def draw(key):
    k_in, k_out = jax.random.split(key)
    return spo.draw_permutation(k_in, m), spo.draw_permutation(k_out, n)

  if not stack:
    return _Pair(*draw(key))
  keys = jax.random.split(key, math.prod(stack))
  ins, outs = jax.vmap(draw)(keys)
  return _Pair(ins.reshape(*stack, m), outs.reshape(*stack, n))


def _placements(key, matrices):
  """(in_place, out_place) trees of fresh permutations for the (*stack, m,
  n) matrices of the selected leaves, None elsewhere; selected kernel j
  draws from key j of a split into as many keys as the tree has leaves."""
  keys = iter(jax.random.split(key, len(jax.tree.leaves(
      matrices, is_leaf=_is_none))))
  pairs = jax.tree.map(
      lambda w: _Pair(None, None) if w is None else _draw_pair(
          next(keys), jnp.shape(w)), matrices, is_leaf=_is_none)
  pick = lambda i: jax.tree.map(lambda p: p[i], pairs,
                                is_leaf=lambda p: isinstance(p, _Pair))
  return pick(0), pick(1)


def _merge(state, key, make):
  """W0 <- R W0 P in new frames drawn from `key`, generators <- 0, POET
  state reset; make: generators -> blocks."""
  new_in, new_out = _placements(key, state.w0)

  def fold(w0, i, o, gen, ni, no):
    if w0 is None:
      return None
    dtype = jnp.promote_types(w0.dtype, jnp.float32)
    return _stacked(spo.block_merge, w0)(
        w0.astype(dtype), make(gen['in_blocks']).astype(dtype),
        make(gen['out_blocks']).astype(dtype), i, o, ni, no).astype(w0.dtype)

  w0 = jax.tree.map(fold, state.w0, state.in_place, state.out_place,
                    state.generators, new_in, new_out, is_leaf=_is_none)
  zeros = jax.tree.map(jnp.zeros_like, state.generators)
  return PoetKernelsState(state.count, w0, new_in, new_out, zeros,
                          optim.reset_poet_state(state.inner_state))


def poet_kernels(inner: optax.GradientTransformation, *, block_size: int,
                 merge_every: int, key: jax.Array, target=('*',),
                 exclude=DEFAULT_EXCLUDE, kernel_axes=None,
                 on_indivisible: str = 'raise', neumann_terms: int = 3,
                 orthogonal_map: str = 'neumann', check_kernels: bool = True
                 ) -> optax.GradientTransformationExtraArgs:
  """POET-BS on the projection kernels of any parameter pytree (module
  docstring).

  Args:
    inner: the optimizer of the generators and the other leaves, typically
      `optax.chain(poet_jax.clip_by_global_norm(...), poet_jax.poet(...))`.
      It sees each selected kernel as {'in_blocks': u_in,
      'out_blocks': u_out}, the generators of each side, and gets the extra
      arguments of `update` (`value=` for reduce_on_plateau, ...).
    block_size: b, dividing both sizes of every selected matrix.
    merge_every: updates between merges (spec section 5; paper 400).
    key: PRNG key of the permutations; merge i uses fold_in(key, i) and
      kernel j of that fold_in(., j), so every replica draws the same.
    target, exclude, kernel_axes, on_indivisible: which kernels, and the
      roles of a multi-axis kernel's axes (POET acts on its flattened
      (inputs x outputs) matrix, one per declared stack index); see
      `select_kernels`, which returns what stays dense and why.
    neumann_terms, orthogonal_map: the Cayley–Neumann map (section 2):
      'neumann' (paper), 'taylor' or 'exact'.
    check_kernels: warn (once, from inside jit) when a kernel given to
      `update` is not the one this transformation made: something after it
      changed its output (docs/method.md).

  `update` needs `params` (the current kernels). Raises ValueError from
  `init` when nothing is selected or a size is not divisible.
  """
  if merge_every < 1:
    raise ValueError(f'merge_every={merge_every} must be >= 1')
  select = functools.partial(select_kernels, block_size=block_size,
                             target=target, exclude=exclude,
                             kernel_axes=kernel_axes,
                             on_indivisible=on_indivisible)
  settings = _Settings(inner, block_size, merge_every, key, kernel_axes,
                       neumann_terms, orthogonal_map, check_kernels, select)
  return optax.GradientTransformationExtraArgs(
      functools.partial(_init, settings), functools.partial(_update, settings))


class _Settings(NamedTuple):
  """poet_kernels' arguments, as its init and update read them."""
  inner: optax.GradientTransformation
  block_size: int
  merge_every: int
  key: jax.Array
  kernel_axes: Any
  num_terms: int
  orthogonal_map: str
  check_kernels: bool
  select: Any        # params -> select_kernels' (layouts, dense)

  def block_map(self):
    """Generators -> blocks."""
    return generator_map.block_map(self.num_terms, self.orthogonal_map,
                                   self.block_size)


def _init(settings: _Settings, params) -> PoetKernelsState:
  """W0 of each selected kernel in the frame of its first placements, zero
  generators, and the inner state on the tree with them swapped in."""
  layouts, _ = settings.select(params)
  matrices = jax.tree.map(
      lambda lay, x: None if lay is None else lay.to_matrix(x), layouts,
      params, is_leaf=_is_none)
  in_place, out_place = _placements(jax.random.fold_in(settings.key, 0),
                                    matrices)
  w0 = jax.tree.map(
      lambda w, i, o: None if w is None else _stacked(
          spo.to_block_frame, w)(w, i, o),
      matrices, in_place, out_place, is_leaf=_is_none)
  generators = jax.tree.map(
      lambda w: None if w is None else _zero_generators(
          w.shape, settings.block_size), matrices, is_leaf=_is_none)
  selected = jax.tree.map(lambda w: w is not None, w0, is_leaf=_is_none)
  inner_state = settings.inner.init(_swap(selected, params, generators))
  return PoetKernelsState(jnp.zeros([], jnp.int32), w0, in_place,
                          out_place, generators, inner_state)


def _kernel_maps(settings: _Settings, state: PoetKernelsState, params):
  """u -> K(u) of every selected kernel (None elsewhere), in the layouts
  select_kernels gave at init (a selected kernel has a W0)."""
  layouts = jax.tree_util.tree_map_with_path(
      lambda path, w, x: None if w is None else layout_lib.KernelLayout(
          layout_lib.roles_for(layer_name(path), settings.kernel_axes)
          or 'io'),
      state.w0, params, is_leaf=_is_none)
  return jax.tree.map(
      lambda lay, w0, i, o, x: None if lay is None else _kernel_map(
          w0, i, o, lay, jnp.shape(x), settings.block_size,
          settings.num_terms, settings.orthogonal_map),
      layouts, state.w0, state.in_place, state.out_place, params,
      is_leaf=_is_none)


def _generator_grad(block_size: int, fn, g, gen, p):
  """(the generators' gradient, the kernel's distance from K(u) in
  drift tolerances); None where not selected."""
  if fn is None:
    return None
  kernel, vjp = jax.vjp(fn, gen)
  gap = jnp.max(jnp.abs(kernel - p.astype(kernel.dtype)))
  scale = jnp.maximum(jnp.max(jnp.abs(kernel)), 1e-30) * drift.tolerance(
      p.dtype, block_size)
  return vjp(g.astype(kernel.dtype))[0], gap / scale


def _update(settings: _Settings, updates, state: PoetKernelsState,
            params=None, **extra_args):
  """Steps 1 to 4 of the module docstring."""
  if params is None:
    raise ValueError(optim.no_params_message('poet_kernels'))
  selected = jax.tree.map(lambda w: w is not None, state.w0,
                          is_leaf=_is_none)
  maps = _kernel_maps(settings, state, params)
  both = jax.tree.map(
      functools.partial(_generator_grad, settings.block_size), maps,
      updates, state.generators, params, is_leaf=_is_none)
  pick = lambda i: jax.tree.map(lambda s, x: x[i] if s else None, selected,
                                both, is_leaf=_is_none)
  inner_updates, new, inner_state = generator_map.step_generators(
      settings.inner, selected, pick(0), updates, params, state.generators,
      state.inner_state, **extra_args)
  if settings.check_kernels:
    drift.warn_if_changed(
        state.count, jnp.max(jnp.stack(jax.tree.leaves(pick(1)))),
        jnp.asarray(0, jnp.int32), who='poet_kernels')
  out = jax.tree.map(
      lambda fn, u, gen, p: u if fn is None else (fn(gen) - p).astype(
          p.dtype), maps, inner_updates, new, params, is_leaf=_is_none)
  count = optax.safe_increment(state.count)
  state = PoetKernelsState(count, state.w0, state.in_place, state.out_place,
                           new, inner_state)
  every = settings.merge_every
  merge = lambda s: _merge(s, jax.random.fold_in(settings.key,
                                                 s.count // every),
                           settings.block_map())
  state = jax.lax.cond(count % every == 0, merge, lambda s: s, state)
  return out, state
