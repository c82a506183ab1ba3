"""poetize: turn the nnx.Linear layers of any Flax NNX model into POET layers.

As the official package's model wrapper does for torch modules, but never
silently: a layer the block size does not divide raises, or is skipped and
reported, by the caller's explicit choice (spec section 3.1).
"""
import fnmatch
import logging
from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from poet_jax import inject
from poet_jax import layers

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


def _parent(model, path):
  node = model
  for key in path[:-1]:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def _replace(model, path, new) -> None:
  parent, key = _parent(model, path), path[-1]
  if isinstance(key, int):
    parent[key] = new
  else:
    setattr(parent, key, new)


def _w0(kernel: jnp.ndarray, choice: str, rngs: nnx.Rngs) -> jnp.ndarray:
  """W0 from the dense kernel (in, out): spec section 6's options."""
  if choice == 'keep':       # finetuning with orthogonal factors (OFT)
    return kernel
  if choice == 'normalize':  # every output neuron to unit norm
    return kernel / jnp.linalg.norm(kernel, axis=0, keepdims=True)
  return layers.init_w0(rngs.params(), *kernel.shape, 'normalized',
                        kernel.dtype)


def poetize(model: nnx.Module, *, block_size, variant: str = 'block',
            target: Sequence[str] = ('*',),
            exclude: Sequence[str] = DEFAULT_EXCLUDE, w0: str = 'keep',
            trainable_bias: bool = False, on_indivisible: str = 'raise',
            compute: str = 'fast', rngs: nnx.Rngs) -> list[str]:
  """Replaces the model's nnx.Linear layers by POET layers, in place.

  Args:
    model: any nnx.Module; its nnx.Linear submodules with 2-D kernels are
      candidates, named by their dotted path ('mlp.fc1', 'layers.0.q').
    block_size, variant, compute: of the new layers (see
      layers.POETLinear); the orthogonal map is a setting of the optimizer
      (poet_jax.reparameterize).
    target, exclude: glob patterns on the dotted path; a layer is replaced
      when it matches a target and no exclude (the output head and
      embeddings are excluded by default, spec section 7).
    w0: 'keep' (W0 is the layer's kernel: R = P = I, so the model computes
      what it did; finetuning), 'normalize' (the kernel with unit-norm
      output neurons) or 'redraw' (a fresh normalized Gaussian W0, the
      papers' pretraining init).
    trainable_bias: a replaced layer's bias is frozen unless this is True.
    on_indivisible: 'raise' (default) on a layer whose sizes block_size
      does not divide, or 'skip': leave it dense, log and return its path.
    rngs: draws the permutations (and W0 for w0='redraw').

  Returns:
    The paths of the layers left dense because of their sizes.
  Raises:
    ValueError: a bad choice, a size the block does not divide (with
      on_indivisible='raise'), a stacked kernel, or no layer replaced.
  """
  if w0 not in W0_CHOICES:
    raise ValueError(f'w0={w0!r}: use one of {W0_CHOICES}')
  if on_indivisible not in ('raise', 'skip'):
    raise ValueError(f"on_indivisible={on_indivisible!r}: 'raise' or 'skip'")
  found = [(path, node) for path, node in nnx.iter_graph(model)
           if isinstance(node, nnx.Linear)]
  replaced, skipped = [], []
  for path, dense in found:
    name = _name(path)
    if not any(fnmatch.fnmatch(name, p) for p in target) or any(
        fnmatch.fnmatch(name, p) for p in exclude):
      continue
    kernel = dense.kernel[...]
    if kernel.ndim != 2:
      raise ValueError(f'{name}: kernel of shape {kernel.shape} is stacked; '
                       'poetize replaces unstacked nnx.Linear layers')
    try:
      layer = layers.POETLinear(
          *kernel.shape, block_size=block_size, variant=variant,
          compute=compute, dtype=dense.dtype,
          w0_dtype=kernel.dtype, name=name, rngs=rngs)
    except ValueError:
      if on_indivisible == 'raise' or variant != 'block':
        raise
      skipped.append(name)
      continue
    inject.set_poet_layer(layer, _w0(kernel, w0, rngs), layer.in_place[...],
                          layer.out_place[...])
    if dense.bias is not None:
      layer = BiasedPOETLinear(layer, dense.bias[...], trainable_bias)
    _replace(model, path, layer)
    replaced.append(name)
  if skipped:
    logging.warning('poetize: block_size=%s does not divide these layers, '
                    'left dense: %s', block_size, ', '.join(skipped))
  if not replaced:
    raise ValueError(f'poetize: no nnx.Linear replaced among {len(found)} '
                     f'(target={list(target)}, exclude={list(exclude)}, '
                     f'skipped={skipped})')
  return skipped

