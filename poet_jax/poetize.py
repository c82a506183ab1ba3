"""poetize: turn the nnx.Linear layers of any Flax NNX model into POET layers.

As the official package's model wrapper does for torch modules, but never
silently: a layer the block size does not divide raises, or is skipped and
reported, by the caller's explicit choice (spec section 3.1). A stack of
layers (an nnx.Linear made under nnx.vmap, kernel (L, in, out), as the
Llama's scanned blocks) becomes one stacked POETLinear: every variable has
the leading axis L and every layer its own W0 and permutations, so a scan
over the stack and the merges work as on any POET layer.
"""
import fnmatch
import logging
import math
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from poet_jax import inject
from poet_jax import layers
from poet_jax import quant

DEFAULT_EXCLUDE = ('*lm_head*', '*head*', '*embed*')
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

  def __call__(self, x):
    y = self.linear(x)
    return y + self.bias[...].astype(y.dtype)


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


def _selected(model, target, exclude) -> tuple[list, int]:
  """(path, name, layer) of the nnx.Linear layers the patterns select, and
  how many nnx.Linear layers there are."""
  found = [(path, node) for path, node in nnx.iter_graph(model)
           if isinstance(node, nnx.Linear)]
  chosen = []
  for path, dense in found:
    name = _name(path)
    if any(fnmatch.fnmatch(name, p) for p in target) and not any(
        fnmatch.fnmatch(name, p) for p in exclude):
      chosen.append((path, name, dense))
  return chosen, len(found)


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


def _poet_layer(dense: nnx.Linear, name: str, key: jax.Array, w0: str,
                init: str, options: dict) -> layers.POETLinear:
  """The POET layer (stacked like `dense`'s kernel) that replaces `dense`.

  A stack of n layers is built by layers.POETLinear's own constructor under
  nnx.vmap, with n keys split from `key`: independent W0 and permutations.
  """
  kernel = dense.kernel[...]
  lead = kernel.shape[:-2]
  options = {'dtype': dense.dtype, 'w0_dtype': kernel.dtype, **options}

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


def _check_choices(w0, init, on_indivisible) -> None:
  if w0 not in W0_CHOICES:
    raise ValueError(f'w0={w0!r}: use one of {W0_CHOICES}')
  if init not in layers.INITS:
    raise ValueError(f'init={init!r}: use one of {layers.INITS}')
  if on_indivisible not in ('raise', 'skip'):
    raise ValueError(f"on_indivisible={on_indivisible!r}: 'raise' or 'skip'")


def _divisible(chosen, variant, block_size, on_indivisible):
  """(the layers to replace, the paths skipped for their sizes)."""
  todo, skipped = [], []
  for path, name, dense in chosen:
    try:
      layers.resolve_block_sizes(name, *dense.kernel[...].shape[-2:], variant,
                                 block_size)
    except ValueError:
      if on_indivisible == 'raise' or variant != 'block':
        raise
      skipped.append(name)
      continue
    todo.append((path, name, dense))
  return todo, skipped


def poetize(model: nnx.Module, *, block_size, variant: str = 'block',
            target: Sequence[str] = ('*',),
            exclude: Sequence[str] = DEFAULT_EXCLUDE, w0: str = 'keep',
            init: str = 'normalized', trainable_bias: bool = False,
            on_indivisible: str = 'raise', compute: str = 'fast',
            memory_budget: int = 0, dtype: Any = None, w0_dtype: Any = None,
            w0_group_size: int = quant.DEFAULT_GROUP_SIZE,
            rngs: nnx.Rngs) -> list[str]:
  """Replaces the model's nnx.Linear layers by POET layers, in place.

  Args:
    model: any nnx.Module; its nnx.Linear submodules are candidates, named
      by their dotted path ('mlp.fc1', 'layers.0.q', 'blocks.attention.q').
      A kernel with leading axes (..., in, out), as made under nnx.vmap,
      becomes one POETLinear with those leading axes on every variable.
    block_size, variant, compute, memory_budget, w0_group_size: of the new
      layers (layers.POETLinear). The orthogonal map (Cayley–Neumann terms)
      is a setting of the optimizer: poet_jax.reparameterize.
    target, exclude: glob patterns on the dotted path; a layer is replaced
      when it matches a target and no exclude (the output head and
      embeddings are excluded by default, spec section 7).
    w0: 'keep' (W0 is the layer's kernel: R = P = I, so the model computes
      what it did; finetuning), 'normalize' (the kernel with unit-norm
      output neurons) or 'redraw' (a fresh W0 drawn with `init`: the papers'
      pretraining, spec section 6).
    init: for w0='redraw', one of layers.INITS ('normalized' is the papers'
      default).
    trainable_bias: a replaced layer's bias is frozen unless this is True.
    on_indivisible: 'raise' (default) on a layer whose sizes block_size
      does not divide, or 'skip': leave it dense, log and return its path.
    dtype: compute dtype of the new layers (None: the replaced layer's).
    w0_dtype: storage of W0 (None: the kernel's dtype; 'int8': POET-XQ).
    rngs: one key is drawn from rngs.params(); the layer at path p uses
      layer_key(key, p), split into one key per layer of a stack, for its
      permutations (and W0 with w0='redraw').

  Returns:
    The paths of the layers left dense because of their sizes.
  Raises:
    ValueError: a bad choice or option, a size the block does not divide
      (with on_indivisible='raise'), or no layer replaced; the model is
      then unchanged.
  """
  _check_choices(w0, init, on_indivisible)
  chosen, num_linear = _selected(model, target, exclude)
  todo, skipped = _divisible(chosen, variant, block_size, on_indivisible)
  if not todo:
    raise ValueError(f'poetize: no nnx.Linear replaced among {num_linear} '
                     f'(target={list(target)}, exclude={list(exclude)}, '
                     f'skipped={skipped})')
  options = {'block_size': block_size, 'variant': variant,
             'compute': compute, 'memory_budget': memory_budget,
             'w0_group_size': w0_group_size}
  options.update({k: v for k, v in (('dtype', dtype), ('w0_dtype', w0_dtype))
                  if v is not None})
  key = rngs.params()
  # Every new layer is built before any is put in: an error leaves the model
  # as it was.
  new = []
  for path, name, dense in todo:
    layer = _poet_layer(dense, name, layer_key(key, name), w0, init, options)
    if dense.bias is not None:
      layer = BiasedPOETLinear(layer, dense.bias[...], trainable_bias)
    new.append((path, layer))
  for path, layer in new:
    _replace(model, path, layer)
  if skipped:
    logging.warning('poetize: block_size=%s does not divide these layers, '
                    'left dense: %s', block_size, ', '.join(skipped))
  return skipped
