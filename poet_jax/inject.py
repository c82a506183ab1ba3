"""Setting a POET layer's state from outside: W0, placements, given merges.

A run of another implementation (the official PyTorch code, whose golden
numbers are in shared/fidelity/) can be replayed exactly only with its W0,
its permutations and the permutations of each of its merges. These helpers
set them on a POETLinear without using any random stream of poet_jax. They
work on one layer or on a stack of layers (leading axes on every array, as
in the Llama's scanned blocks).
"""
import jax
import jax.numpy as jnp
from flax import nnx

from poet_jax import layers
from poet_jax import quant
from poet_jax import spo


def _store_w0(layer: layers.POETLinear, w) -> None:
  """W0 as the layer stores it: cast, or 8-bit codes (POET-XQ)."""
  if layer.w0_quantized:
    q = quant.quantize(w, layer.w0_group_size)
    layer.w0[...], layer.w0_scale[...], layer.w0_zero[...] = q
  else:
    layer.w0[...] = w.astype(layer.w0[...].dtype)


def set_poet_layer(layer: layers.POETLinear, kernel, in_place,
                   out_place) -> None:
  """Sets `layer` so that layer(x) == x @ kernel (R = P = I).

  Args:
    layer: a POETLinear, possibly stacked (its variables with leading axes).
    kernel: (..., in, out) float, the kernel at R = P = I in Flax layout
      (what `layer.base_weight()` then returns); stored in W0's dtype.
    in_place, out_place: (..., in) and (..., out) int32 gathers for
      variant='block' (spec section 3.1: x[..., in_place] feeds the input
      blocks, the output blocks' result is gathered by out_place), or index
      sets (..., b_in), (..., b_out) for variant='full' (section 3.2).
  The orthogonal blocks are set to the identity. An 8-bit W0 (POET-XQ) stores the
  kernel's codes. Raises ValueError on shapes that do not match the layer.
  """
  kernel = jnp.asarray(kernel)
  in_place = jnp.asarray(in_place, jnp.int32)
  out_place = jnp.asarray(out_place, jnp.int32)
  shapes = [(kernel.shape, layer.w0[...].shape),
            (in_place.shape, layer.in_place[...].shape),
            (out_place.shape, layer.out_place[...].shape)]
  for given, expected in shapes:
    if given != expected:
      raise ValueError(f'inject: shape {given} does not match the layer\'s '
                       f'{expected}')
  lead = kernel.ndim - 2
  if layer.variant == 'block':
    kernel = layers.over_leading_axes(spo.to_block_frame, lead)(kernel, in_place, out_place)
  _store_w0(layer, kernel)
  layer.in_place[...] = in_place
  layer.out_place[...] = out_place
  layer.reset_blocks()


def merge_with_placements(layer: layers.POETLinear, new_in_place,
                          new_out_place) -> None:
  """`layer.merge`, with the new placements given instead of drawn.

  W0 <- R W0 P (computed in float32, or float64 for a float64 W0; spec
  section 5), the blocks <- I, and the placements <- the given ones
  (shapes as in `set_poet_layer`). The optimizer state is not touched: its
  generators must be zero too (`poet_jax.reparameterize` zeroes them at the
  merges it counts; otherwise `poet_jax.reset_after_merge`).
  """
  dtype = layer.work_dtype
  w0 = quant.dense(layer.stored_w0(), dtype)
  g_in, g_out = layer.orthogonal_blocks()
  new_in = jnp.asarray(new_in_place, jnp.int32)
  new_out = jnp.asarray(new_out_place, jnp.int32)
  old = (layer.in_place[...], layer.out_place[...])
  lead = w0.ndim - 2
  if layer.variant == 'block':
    w = layers.over_leading_axes(spo.block_merge, lead)(
        w0, g_in.astype(dtype), g_out.astype(dtype), *old,
        new_in, new_out)
  else:
    w = layers.over_leading_axes(spo.full_kernel, lead)(
        w0, g_in[..., 0, :, :].astype(dtype),
        g_out[..., 0, :, :].astype(dtype), *old)
  _store_w0(layer, w)
  layer.in_place[...] = new_in
  layer.out_place[...] = new_out
  layer.reset_blocks()


def layer_at(stack: nnx.Module, index: int) -> nnx.Module:
  """Layer `index` of a stack of layers, as an ordinary module (a copy).

  The Llama keeps its blocks stacked for the scan over layers (every
  variable has a leading layer axis), so `model.blocks` is one module, not a
  list: `layer_at(model.blocks, 3).attention.q` is block 3's q layer, which
  can be called, inspected (`effective_weight()`) and changed, then written
  back with `set_layer_at`. Raises IndexError for an index out of range.
  """
  graphdef, state = nnx.split(stack)
  size = jax.tree.leaves(state)[0].shape[0]
  if not -size <= index < size:
    raise IndexError(f'layer {index} of a stack of {size}')
  return nnx.merge(graphdef, jax.tree.map(lambda x: x[index], state))


def set_layer_at(stack: nnx.Module, index: int, layer: nnx.Module) -> None:
  """Writes `layer` (as from `layer_at`) back as layer `index` of `stack`."""
  state = nnx.state(stack)
  new = jax.tree.map(lambda s, x: s.at[index].set(x), state,
                     nnx.state(layer))
  nnx.update(stack, new)
