"""A projection's kernel as the matrix it is, and which layers are chosen.

A multi-axis projection (nnx.Einsum, nnx.LinearGeneral, linen DenseGeneral
and Einsum; attention's (D, H, Dh) and (H, Dh, D) kernels) is one linear
map from its input axes to its output axes. Its roles say which axis is
which, one letter per kernel axis:

  'i'  an input axis (contracted with the activations)
  'o'  an output axis
  's'  a stack axis: independent matrices, one per index (LinearGeneral's
       batch axes, an einsum letter in input, kernel and output)

so (D, H, Dh) is 'ioo' and (H, Dh, D) 'iio'. POET acts on the flattened
(prod inputs) x (prod outputs) matrix of each stack index (spec section 1);
`to_matrix` and `from_matrix` convert. Axes in front of the declared ones
(a layer made under nnx.vmap) are stack axes too.

Both routes (poet_jax.poetize on NNX modules, poet_jax.poet_kernels on
parameter trees) name a layer by its dotted path ('blocks.attn.q') and
choose layers with one glob syntax (`is_chosen`).
"""
import dataclasses
import fnmatch
import logging
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from poet_jax import layers

ROLES = 'ios'
DEFAULT_EXCLUDE = ('*lm_head*', '*head*', '*embed*')


@dataclasses.dataclass(frozen=True)
class KernelLayout:
  """The roles of a kernel's declared axes (module docstring)."""
  roles: str

  def check(self, shape: Sequence[int], name: str) -> None:
    """ValueError unless the roles fit a kernel of `shape` (with possible
    leading stack axes) and name at least one input and one output axis."""
    if set(self.roles) - set(ROLES) or 'i' not in self.roles or (
        'o' not in self.roles):
      raise ValueError(f"{name}: kernel axes {self.roles!r} must be letters "
                       "'i' (input), 'o' (output), 's' (stack), with at "
                       "least one 'i' and one 'o'")
    if len(shape) < len(self.roles):
      raise ValueError(f'{name}: kernel axes {self.roles!r} name '
                       f'{len(self.roles)} axes, the kernel has {len(shape)} '
                       f'({tuple(shape)})')

  def _order(self, ndim: int) -> list[int]:
    """Kernel axes in matrix order: leading, stack, input, output."""
    lead = ndim - len(self.roles)
    pick = lambda r: [lead + i for i, x in enumerate(self.roles) if x == r]
    return list(range(lead)) + pick('s') + pick('i') + pick('o')

  def matrix_shape(self, shape: Sequence[int]) -> tuple:
    """(*stack, m, n) of a kernel of `shape`."""
    lead = len(shape) - len(self.roles)
    size = lambda r: math.prod(shape[lead + i] for i, x in
                               enumerate(self.roles) if x == r)
    stack = tuple(shape[:lead]) + tuple(
        shape[lead + i] for i, x in enumerate(self.roles) if x == 's')
    return stack + (size('i'), size('o'))

  def to_matrix(self, kernel):
    """kernel (declared layout) -> (*stack, m, n)."""
    order = self._order(kernel.ndim)
    return jnp.transpose(kernel, order).reshape(self.matrix_shape(
        kernel.shape))

  def from_matrix(self, matrix, shape: Sequence[int]):
    """Inverse of to_matrix, for a kernel of `shape`."""
    order = self._order(len(shape))
    return jnp.transpose(matrix.reshape([shape[a] for a in order]),
                         [order.index(a) for a in range(len(shape))])


def einsum_roles(equation: str) -> str:
  """The kernel's roles in `equation` ('lhs,kernel->out'), or ValueError.

  A kernel letter in the input and the output is a stack axis, in the
  input only an input axis, in the output only an output axis.
  """
  lhs, rhs, out = split_einsum(equation)
  if '...' in rhs or len(set(rhs)) != len(rhs):
    raise ValueError(f'einsum {equation!r}: the kernel operand must name each '
                     'axis once, without ...')
  roles = ''
  for letter in rhs:
    where = (letter in lhs, letter in out)
    if where == (False, False):
      raise ValueError(f'einsum {equation!r}: kernel axis {letter!r} is '
                       'summed away; this is not a projection')
    roles += {(True, True): 's', (True, False): 'i', (False, True): 'o'}[where]
  return roles


def split_einsum(equation: str) -> tuple[str, str, str]:
  """('lhs', 'kernel', 'out') of an explicit two-operand einsum."""
  equation = equation.replace(' ', '')
  if '->' not in equation or equation.count(',') != 1:
    raise ValueError(f'einsum {equation!r}: expected "input,kernel->output"')
  operands, out = equation.split('->')
  lhs, rhs = operands.split(',')
  return lhs, rhs, out


def dense_general_roles(num_batch: int, num_in: int, num_out: int) -> str:
  """Roles of a LinearGeneral / DenseGeneral kernel: batch, in, out."""
  return 's' * num_batch + 'i' * num_in + 'o' * num_out


def is_chosen(name: str, target: Sequence[str],
              exclude: Sequence[str]) -> str | None:
  """None if the layer at dotted path `name` is chosen, else the reason.

  Patterns are fnmatch globs on the dotted path ('blocks.*', '*attn.q');
  a '/' (the former syntax of poet_kernels, on leaf paths) is refused with
  the pattern to write instead.
  """
  for p in (*target, *exclude):
    if '/' in p:
      fixed = p.removesuffix('/kernel').replace('/', '.')
      raise ValueError(
          f"pattern {p!r}: layers are named by dotted module paths such as "
          f"'blocks.mlp.up' (no '/', no leaf name 'kernel'); write "
          f"{fixed!r}")
  if not any(fnmatch.fnmatch(name, p) for p in target):
    return f'not in target={list(target)}'
  hit = [p for p in exclude if fnmatch.fnmatch(name, p)]
  if hit:
    return f'excluded by {hit[0]!r}'
  return None


def roles_for(name: str, kernel_axes: dict | None) -> str | None:
  """The roles kernel_axes gives the layer `name` (first matching glob)."""
  for pattern, roles in (kernel_axes or {}).items():
    if fnmatch.fnmatch(name, pattern):
      return roles
  return None


def indivisible(name: str, m: int, n: int, variant: str, block_size,
                exclude: Sequence[str], on_indivisible: str) -> str | None:
  """None if block_size fits the m x n matrix of layer `name`; else, with
  on_indivisible='skip' (variant 'block'), the reason it stays dense.

  Raises ValueError (one line naming exclude= and on_indivisible='skip')
  otherwise; spec section 3.1: never silently dense.
  """
  try:
    layers.resolve_block_sizes(name, m, n, variant, block_size)
  except ValueError as e:
    if on_indivisible == 'raise' or variant != 'block':
      raise ValueError(f"{e}; or leave it dense: exclude="
                       f"{[*exclude, name]} or on_indivisible='skip'"
                       ) from None
    return f'block_size={block_size} does not divide {m} x {n}'
  return None


def log_dense(route: str, dense: dict) -> None:
  """Logs the projections a route leaves dense, with the reasons: a warning
  when one is left for another reason than the patterns."""
  if not dense:
    return
  chosen = all(why.startswith(('not in target', 'excluded by'))
               for why in dense.values())
  text = '; '.join(f'{name}: {why}' for name, why in dense.items())
  logging.log(logging.INFO if chosen else logging.WARNING,
              '%s: left dense: %s', route, text)


def linen_kernel_axes(module, *args, **kwargs) -> dict[str, str]:
  """{layer path: roles} of every linen DenseGeneral and Einsum of `module`.

  Read from the modules themselves (their batch_dims, axis, features, or
  einsum equation) while `module.init(key, *args, **kwargs)` is traced
  under jax.eval_shape (nothing is allocated or computed). The paths are
  those of params = variables['params'], for poet_kernels' kernel_axes.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  found = {}

  def intercept(call, call_args, call_kwargs, context):
    layer = context.module
    if context.method_name == '__call__' and isinstance(
        layer, (nn.DenseGeneral, nn.Einsum)):
      if isinstance(layer, nn.DenseGeneral):
        count = lambda a: len(a) if isinstance(a, (tuple, list)) else 1
        roles = dense_general_roles(count(layer.batch_dims),
                                    count(layer.axis), count(layer.features))
      else:
        given = call_args[1] if len(call_args) > 1 else call_kwargs.get(
            'einsum_str')
        roles = einsum_roles(given or layer.einsum_str)
      found['.'.join(layer.path)] = roles
    return call(*call_args, **call_kwargs)

  with nn.intercept_methods(intercept):
    jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  return found
