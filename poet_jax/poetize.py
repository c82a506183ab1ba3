"""poetize: turn the projections of any Flax NNX model into POET layers.

As the official package's model wrapper does for torch modules, but never
silently: a layer the block size does not divide raises, or is skipped and
reported, by the caller's explicit choice (spec section 3.1), and every
projection left dense is returned and logged with the reason.
Multi-axis projections (nnx.Einsum, nnx.LinearGeneral) are POET on their
flattened matrix (poet_jax.layout, poet_jax.multihead). A stack of
layers (an nnx.Linear made under nnx.vmap, kernel (L, in, out), as the
Llama's scanned blocks) becomes one stacked POETLinear: every variable has
the leading axis L and every layer its own W0 and permutations, so a scan
over the stack and the merges work as on any POET layer.
"""
import math
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from poet_jax import inject
from poet_jax import layers
from poet_jax import layout as layout_lib
from poet_jax import multihead
from poet_jax import quant

DEFAULT_EXCLUDE = layout_lib.DEFAULT_EXCLUDE
W0_CHOICES = ('keep', 'normalize', 'redraw')


class BiasedPOETLinear(nnx.Module):
  """A POETLinear plus the bias of the nnx.Linear it replaced.

  The bias is frozen (a layers.FrozenWeight: no gradient, no optimizer
  state) unless `trainable_bias`, then an nnx.Param of the base group.
  """

  def __init__(self, linear: layers.POETLinear, bias: jnp.ndarray,
               trainable_bias: bool = False):
    self.linear = linear
    kind = nnx.Param if trainable_bias else layers.FrozenWeight
    self.bias = kind(jnp.asarray(bias))

  def __call__(self, x, out_sharding=None):
    """As nnx.Linear's call (out_sharding: layers.POETLinear's)."""
    y = self.linear(x)
    return layers.reshard(y + self.bias[...].astype(y.dtype), out_sharding)


def _name(path) -> str:
  return '.'.join(str(p) for p in path)


def _replace(model, path, new) -> None:
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if isinstance(path[-1], int):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


PROJECTIONS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


def _layout(node, name: str, kernel_axes) -> layout_lib.KernelLayout:
  """The kernel's roles: given in kernel_axes, else read from the module;
  ValueError (the reason it stays dense) for an einsum that is not a
  projection or roles that do not fit the kernel."""
  given = layout_lib.roles_for(name, kernel_axes)
  if isinstance(node, nnx.Linear):
    roles = 'io'
  elif given is not None:
    roles = given
  elif isinstance(node, nnx.LinearGeneral):
    roles = layout_lib.dense_general_roles(
        len(node.batch_axis), len(node.in_features), len(node.out_features))
  else:
    roles = layout_lib.einsum_roles(node.einsum_str)
  result = layout_lib.KernelLayout(roles)
  result.check(node.kernel[...].shape, name)
  return result


def _selected(model, target, exclude, kernel_axes):
  """([(path, name, layer, layout)] to replace, {name: why not} for every
  other projection (nnx.Linear, LinearGeneral, Einsum))."""
  chosen, dense = [], {}
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, PROJECTIONS):
      continue
    name = _name(path)
    why = layout_lib.is_chosen(name, target, exclude)
    if why:
      dense[name] = why
      continue
    try:
      chosen.append((path, name, node, _layout(node, name, kernel_axes)))
    except ValueError as e:
      dense[name] = str(e)
  return chosen, dense


def _kept_w0(kernel: jax.Array, choice: str) -> jax.Array:
  """W0 from the dense kernel (..., in, out) for 'keep' and 'normalize'."""
  if choice == 'keep':       # finetuning with orthogonal factors (OFT)
    return kernel
  # Every output neuron (a kernel column) to unit L2 norm (spec section 6).
  return kernel / jnp.linalg.norm(kernel, axis=-2, keepdims=True)


def layer_key(key: jax.Array, name: str) -> jax.Array:
  """The key of the layer at dotted path `name`: fold_in(key, crc32(name)).

  A layer's draws depend on its path only, not on which other layers are
  selected or in what order they are found.
  """
  return jax.random.fold_in(key, zlib.crc32(name.encode()))


def _poet_layer(kernel: jax.Array, dtype, name: str, key: jax.Array,
                w0: str, init: str, options: dict) -> layers.POETLinear:
  """The POET layer of the matrix `kernel` (*stack, in, out), stacked
  like it.

  A stack of n layers is built by layers.POETLinear's own constructor under
  nnx.vmap, with n keys split from `key`: independent W0 and permutations.
  """
  lead = kernel.shape[:-2]
  options = {'dtype': dtype, 'w0_dtype': kernel.dtype, **options}

  def make(key):
    # With w0 != 'redraw' the drawn W0 is overwritten below: the cheapest
    # init is enough.
    return layers.POETLinear(
        *kernel.shape[-2:], init=init if w0 == 'redraw' else 'standard',
        name=name, rngs=nnx.Rngs(params=key), **options)

  keys = key
  if lead:
    keys = jax.random.split(key, math.prod(lead))
    keys = keys.reshape(lead + keys.shape[1:])
  for _ in lead:
    make = nnx.vmap(make, in_axes=0, out_axes=0)
  layer = make(keys)
  if w0 != 'redraw':
    inject.set_poet_layer(layer, _kept_w0(kernel, w0), layer.in_place[...],
                          layer.out_place[...])
  return layer


def _replacement(node, layer: layers.POETLinear,
                 layout: layout_lib.KernelLayout, trainable_bias: bool):
  """What takes `node`'s place: the POET layer with node's bias and call."""
  bias = None if node.bias is None else node.bias[...]
  if isinstance(node, nnx.Linear):
    return layer if bias is None else BiasedPOETLinear(layer, bias,
                                                       trainable_bias)
  # The declared kernel shape, without the axes of an nnx.vmap.
  shape = node.kernel[...].shape[-len(layout.roles):]
  if isinstance(node, nnx.LinearGeneral):
    return multihead.POETLinearGeneral(
        layer, layout, shape, bias, trainable_bias, axis=node.axis,
        batch_axis=tuple(node.batch_axis.keys()))
  return multihead.POETEinsum(layer, layout, shape, bias, trainable_bias,
                              einsum_str=node.einsum_str)


def _check_choices(w0, init, on_indivisible) -> None:
  if w0 not in W0_CHOICES:
    raise ValueError(f'w0={w0!r}: use one of {W0_CHOICES}')
  if init not in layers.INITS:
    raise ValueError(f'init={init!r}: use one of {layers.INITS}')
  if on_indivisible not in ('raise', 'skip'):
    raise ValueError(f"on_indivisible={on_indivisible!r}: 'raise' or 'skip'")


def _divisible(chosen, variant, block_size, on_indivisible, exclude):
  """(the layers to replace, {name: why} of those skipped for their
  sizes)."""
  todo, skipped = [], {}
  for path, name, node, layout in chosen:
    m, n = layout.matrix_shape(node.kernel[...].shape)[-2:]
    why = layout_lib.indivisible(name, m, n, variant, block_size, exclude,
                                 on_indivisible)
    if why:
      skipped[name] = why
    else:
      todo.append((path, name, node, layout))
  return todo, skipped


def poetize(model: nnx.Module, *, block_size, variant: str = 'block',
            target: Sequence[str] = ('*',),
            exclude: Sequence[str] = DEFAULT_EXCLUDE, kernel_axes=None,
            w0: str = 'keep', init: str = 'normalized',
            trainable_bias: bool = False, on_indivisible: str = 'raise',
            compute: str = 'fast', memory_budget: int = 0, dtype: Any = None,
            w0_dtype: Any = None,
            w0_group_size: int = quant.DEFAULT_GROUP_SIZE,
            rngs: nnx.Rngs) -> dict[str, str]:
  """Replaces the model's projections by POET layers, in place.

  Args:
    model: any nnx.Module; its nnx.Linear, nnx.LinearGeneral and nnx.Einsum
      submodules are candidates, named by their dotted path ('mlp.fc1',
      'blocks.attention.q'). nnx.Linear becomes a POETLinear (a
      BiasedPOETLinear with a bias), LinearGeneral and Einsum
      multihead.POETLinearGeneral / POETEinsum, called as the module was
      (multi-axis kernels and stacks of layers: the module docstring).
    block_size, variant, compute, memory_budget, w0_group_size: of the new
      layers (layers.POETLinear). The orthogonal map (Cayley–Neumann terms)
      is a setting of the optimizer: poet_jax.reparameterize.
    target, exclude: fnmatch globs on the dotted path (poet_kernels' too);
      a layer is replaced when it matches a target and no exclude (by
      default the output head and embeddings are excluded: spec section 7).
    kernel_axes: {glob: roles}, the roles ('i' input, 'o' output, 's'
      stack; one letter per kernel axis, as 'ioo' for (D, H, Dh)) of the
      LinearGeneral / Einsum layers it matches, instead of the module's (a
      stack axis where the module has an output axis, say; such a layer
      then multiplies by its kernel() in the module's einsum).
    w0: 'keep' (W0 is the layer's kernel: R = P = I, so the model computes
      what it did; finetuning), 'normalize' (the kernel with unit-norm
      output neurons) or 'redraw' (a fresh W0 drawn with `init`, one of
      layers.INITS, the papers' 'normalized' by default: their pretraining).
    trainable_bias: a replaced layer's bias is frozen unless this is True.
    on_indivisible: 'raise' (default) on a layer whose sizes block_size
      does not divide, or 'skip': leave it dense.
    dtype, w0_dtype: the new layers' compute dtype (None: the replaced
      layer's) and W0's storage (None: the kernel's dtype; 'int8': POET-XQ).
    rngs: one key is drawn from rngs.params(); the layer at path p uses
      layer_key(key, p), split into one key per layer of a stack, for its
      permutations (and W0 with w0='redraw').

  Returns:
    {path: reason} of every projection left dense (not targeted, excluded,
    axes unknown, sizes not divisible), also logged (a warning for those
    not left by a pattern).
  Raises:
    ValueError: a bad choice or option, a size the block does not divide
      (on_indivisible='raise'; the message names exclude= and
      on_indivisible='skip'), or no layer replaced; the model is unchanged.
  """
  _check_choices(w0, init, on_indivisible)
  todo, dense = _to_replace(model, target, exclude, kernel_axes, variant,
                            block_size, on_indivisible)
  options = dict(block_size=block_size, variant=variant, compute=compute,
                 memory_budget=memory_budget, w0_group_size=w0_group_size,
                 **{k: v for k, v in (('dtype', dtype), ('w0_dtype', w0_dtype))
                    if v is not None})
  _replace_all(model, todo, rngs.params(), w0, init, options, trainable_bias)
  layout_lib.log_dense('poetize', dense)
  return dense


def _to_replace(model, target, exclude, kernel_axes, variant, block_size,
                on_indivisible):
  """(the (path, name, node, layout) of each projection poetize replaces,
  {name: why} of those it leaves dense); ValueError when it would replace
  none."""
  if isinstance(model, PROJECTIONS):
    raise ValueError(f'poetize replaces the projections inside a model; '
                     f'this is one ({type(model).__name__}): put it in a '
                     'module')
  chosen, dense = _selected(model, target, exclude, kernel_axes)
  todo, skipped = _divisible(chosen, variant, block_size, on_indivisible,
                             exclude)
  dense.update(skipped)
  if not todo:
    raise ValueError(f'poetize: no projection replaced (target='
                     f'{list(target)}, exclude={list(exclude)}); left dense: '
                     f'{dense}')
  return todo, dense


def _replace_all(model, todo, key, w0: str, init: str, options: dict,
                 trainable_bias: bool) -> None:
  """Puts a POET layer in the place of each (path, name, node, layout) of
  `todo`. Every new layer is built before any is put in: an error leaves
  the model as it was."""
  new = []
  for path, name, node, layout in todo:
    layer = _poet_layer(layout.to_matrix(node.kernel[...]), node.dtype, name,
                        layer_key(key, name), w0, init, options)
    new.append((path, _replacement(node, layer, layout, trainable_bias)))
  for path, layer in new:
    _replace(model, path, layer)
