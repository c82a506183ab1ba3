"""POET-XQ: the frozen W0 stored in 8 bits (spec, section 4).

Pure functions. A kernel W (..., in, out) is cut into groups of `group_size`
consecutive rows (along the input dimension) for every output column; each
group g is stored as uint8 codes q with a float32 scale s_g and zero point
z_g (asymmetric, min-max calibrated):

    s_g = (max_g - min_g) / 255,   z_g = -min_g / s_g,
    q = round(W / s_g + z_g) in [0, 255],   W ~ (q - z_g) * s_g.

The zero point is kept in float, not rounded to an integer: the group's
minimum and maximum then map exactly onto codes 0 and 255, nothing is
clipped, and every element is within half a step, |W - W~| <= s_g / 2 (plus
float32 rounding). An integer zero point (exact zero, which activations need
and weights do not) would cost up to a whole step at the ends of the range.

We do not use qwix or aqt for this (docs/scaling.md, "POET-XQ" says why).
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

DTYPE = 'int8'          # the value of model.w0_dtype / POETLinear's w0_dtype
DEFAULT_GROUP_SIZE = 256
LEVELS = 255            # uint8 codes 0..255


class Quantized(NamedTuple):
  """An 8-bit kernel: codes (..., in, out) uint8; scale and zero point
  (..., in // group_size, out) float32."""
  codes: jax.Array
  scale: jax.Array
  zero: jax.Array

  @property
  def group_size(self) -> int:
    return self.codes.shape[-2] // self.scale.shape[-2]


def check_group_size(in_features: int, group_size: int,
                     name: str = 'W0') -> None:
  """Raise ValueError (one line, with a fix) unless group_size divides in."""
  if isinstance(group_size, bool) or not isinstance(group_size, int) or (
      group_size < 1):
    raise ValueError(f'{name}: the W0 quantization group size must be a '
                     f'positive integer, got {group_size!r}')
  if in_features % group_size:
    fits = [d for d in range(1, min(group_size, in_features) + 1)
            if in_features % d == 0]
    raise ValueError(
        f'{name}: W0 quantization group size {group_size} does not divide '
        f'in_features={in_features}; choose one that divides it, such as '
        f'{fits[-1]}')


def _grouped(w: jax.Array, group_size: int) -> jax.Array:
  """(..., in, out) -> (..., in // group_size, group_size, out)."""
  *lead, m, n = w.shape
  return w.reshape(*lead, m // group_size, group_size, n)


def quantize(w: jax.Array, group_size: int = DEFAULT_GROUP_SIZE) -> Quantized:
  """8-bit per-group codes of a float kernel w (..., in, out).

  Computed in float32 (or w's dtype if wider). Raises ValueError when
  group_size does not divide the input dimension.
  """
  check_group_size(w.shape[-2], group_size)
  work = jnp.promote_types(w.dtype, jnp.float32)
  g = _grouped(w.astype(work), group_size)
  low = g.min(axis=-2, keepdims=True)
  high = g.max(axis=-2, keepdims=True)
  # A constant group has no range: any positive scale stores it exactly.
  scale = jnp.where(high > low, (high - low) / LEVELS, 1.0)
  zero = -low / scale
  codes = jnp.clip(jnp.round(g / scale + zero), 0, LEVELS)
  return Quantized(codes.astype(jnp.uint8).reshape(w.shape),
                   scale.squeeze(-2).astype(jnp.float32),
                   zero.squeeze(-2).astype(jnp.float32))


def dequantize(q: Quantized, dtype: Any = jnp.float32) -> jax.Array:
  """The kernel (..., in, out) in dtype: (codes - zero) * scale.

  The arithmetic is float32 and rounds once, to dtype, at the end; under jit
  it fuses into the one elementwise pass that produces the dtype array.
  """
  g = _grouped(q.codes, q.group_size).astype(jnp.float32)
  w = (g - q.zero[..., None, :]) * q.scale[..., None, :]
  return w.reshape(q.codes.shape).astype(dtype)


def error_bound(q: Quantized) -> jax.Array:
  """Largest |W - dequantize(q)| of each group (..., in // g, out): s / 2."""
  return q.scale / 2


def dense(w, dtype: Any) -> jax.Array:
  """W0 as a dtype array: dequantized if Quantized, else cast."""
  if isinstance(w, Quantized):
    return dequantize(w, dtype)
  return w.astype(dtype)


def storage_dtype(w) -> Any:
  """The float dtype W0 carries: its own, or float32 for Quantized."""
  return w.scale.dtype if isinstance(w, Quantized) else w.dtype
