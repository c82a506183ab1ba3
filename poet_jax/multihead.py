"""POET versions of nnx.Einsum and nnx.LinearGeneral (multi-axis projections).

`poetize` replaces such a layer by one of these: a POETLinear on the
flattened (inputs x outputs) matrix of its kernel (poet_jax.layout: roles
'i', 'o', 's' per kernel axis), stacked over the declared stack axes, with
the layer's bias and call signature. The forward is the layer's einsum
with the POET matrix product inside it: the activations' input axes are
moved last and flattened (an einsum transpose), the POETLinear applies its
blocks and W0 there (any compute path, spec section 4), and the output axes
are unflattened and moved where the layer's equation puts them. An
equation that cannot be routed so (a diagonal, an input axis summed away)
runs the layer's own einsum on the POET kernel (`kernel()`).
"""
import string
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from poet_jax import layers
from poet_jax import layout as layout_lib


def _expand_ellipsis(lhs: str, out: str, ndim: int, used: str):
  """lhs and out with '...' replaced by letters not in `used`."""
  if '...' not in lhs:
    return lhs, out
  count = ndim - (len(lhs) - 3)
  free = [c for c in string.ascii_letters if c not in used][:count]
  fill = ''.join(free)
  return lhs.replace('...', fill), out.replace('...', fill)


class _Projection(nnx.Module):
  """A POETLinear on the matrix of a multi-axis kernel, plus its bias."""

  def __init__(self, linear: layers.POETLinear,
               layout: layout_lib.KernelLayout, kernel_shape, bias,
               trainable_bias: bool):
    self.linear = linear
    self.layout = layout
    self.kernel_shape = tuple(kernel_shape)  # declared: no vmap axes
    if bias is None:
      self.bias = nnx.data(None)
    else:
      kind = nnx.Param if trainable_bias else layers.FrozenWeight
      self.bias = kind(jnp.asarray(bias))

  def kernel(self) -> jax.Array:
    """The dense kernel in the replaced layer's layout (leading stack axes
    of a vmapped layer first): R W0 P of every matrix, reshaped."""
    w = self.linear.effective_weight()
    extra = w.ndim - 2 - self.layout.roles.count('s')
    return self.layout.from_matrix(w, w.shape[:extra] + self.kernel_shape)

  def _project(self, x: jax.Array, equation: str, out_sharding) -> jax.Array:
    lhs, rhs, out = layout_lib.split_einsum(equation)
    if len(rhs) != len(self.kernel_shape):
      raise ValueError(f'einsum {equation!r} does not fit this layer\'s '
                       f'kernel of shape {self.kernel_shape}')
    lhs, out = _expand_ellipsis(lhs, out, x.ndim, lhs + rhs + out)
    role = dict(zip(rhs, self.layout.roles))
    stack, ins, outs = (''.join(c for c in rhs if role[c] == r)
                        for r in 'sio')
    rest = ''.join(c for c in lhs if c not in rhs)
    # The axes of the matrix are the equation's own inputs and outputs
    # (given roles may differ: then the kernel is built), with no diagonal
    # and nothing summed away.
    routable = (layout_lib.einsum_roles(equation) == self.layout.roles
                and len(set(lhs)) == len(lhs) and len(set(out)) == len(out)
                and sorted(out) == sorted(stack + rest + outs))
    dtype = self.linear.dtype or jnp.result_type(x)
    x = jnp.asarray(x, dtype)
    if routable:
      h = jnp.einsum(f'{lhs}->{stack}{rest}{ins}', x)
      h = h.reshape(h.shape[:len(stack) + len(rest)] + (-1,))
      y = self.linear.call_stack(h)
      sizes = dict(zip(rhs, self.kernel_shape))
      y = y.reshape(y.shape[:-1] + tuple(sizes[c] for c in outs))
      y = jnp.einsum(f'{stack}{rest}{outs}->{out}', y)
    else:
      y = jnp.einsum(f'{lhs},{rhs}->{out}', x, self.kernel().astype(dtype))
    if self.bias is not None:
      sizes = dict(zip(rhs, self.kernel_shape))
      shape = [sizes.get(c, 1) for c in out]
      y = y + jnp.reshape(self.bias[...], shape).astype(y.dtype)
    return layers.reshard(y, out_sharding)


class POETEinsum(_Projection):
  """nnx.Einsum with a POET kernel; called as nnx.Einsum is.

  `einsum_str` is the replaced layer's (None: given at each call, as
  nnx.Einsum allows).
  """

  def __init__(self, linear, layout, kernel_shape, bias,
               trainable_bias: bool = False, einsum_str: str | None = None):
    super().__init__(linear, layout, kernel_shape, bias, trainable_bias)
    self.einsum_str = einsum_str

  def __call__(self, inputs: jax.Array, einsum_str: str | None = None,
               out_sharding: Any = None) -> jax.Array:
    equation = einsum_str or self.einsum_str
    if equation is None:
      raise ValueError('POETEinsum: no einsum_str, at construction or in the '
                       'call (as nnx.Einsum)')
    return self._project(inputs, equation, out_sharding)


class POETLinearGeneral(_Projection):
  """nnx.LinearGeneral with a POET kernel; called as nnx.LinearGeneral is."""

  def __init__(self, linear, layout, kernel_shape, bias,
               trainable_bias: bool = False, *, axis=(-1,),
               batch_axis=()):
    super().__init__(linear, layout, kernel_shape, bias, trainable_bias)
    self.axis = tuple(axis)
    self.batch_axis = tuple(batch_axis)

  def __call__(self, inputs: jax.Array, out_sharding: Any = None
               ) -> jax.Array:
    return self._project(inputs, self._equation(inputs.ndim), out_sharding)

  def _equation(self, ndim: int) -> str:
    """LinearGeneral's dot_general as an einsum: output = batch axes, the
    input's free axes in order, then the output features."""
    norm = lambda axes: tuple(a % ndim for a in axes)
    axis, batch = norm(self.axis), norm(self.batch_axis)
    letters = string.ascii_letters
    lhs = letters[:ndim]
    num_out = self.layout.roles.count('o')
    new = letters[ndim:ndim + num_out]
    kernel = (''.join(lhs[a] for a in batch) + ''.join(lhs[a] for a in axis)
              + new)
    free = ''.join(lhs[a] for a in range(ndim) if a not in axis + batch)
    return f'{lhs},{kernel}->{"".join(lhs[a] for a in batch)}{free}{new}'
