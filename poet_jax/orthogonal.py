"""Orthogonal maps from skew-symmetric generators: pure functions.

A b x b orthogonal block is parameterized by the strict upper triangle of a
skew-symmetric matrix Q (b(b-1)/2 numbers). All functions are batched over any
leading axes.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np


def num_generator_params(block_size: int) -> int:
  """Numbers that parameterize one b x b skew-symmetric block."""
  return block_size * (block_size - 1) // 2


def block_size_from_params(num_params: int) -> int:
  b = int(round((1 + math.sqrt(1 + 8 * num_params)) / 2))
  if num_generator_params(b) != num_params:
    raise ValueError(f'{num_params} is not b(b-1)/2 for any block size b')
  return b


def _skew_gather_index(b: int) -> tuple[jax.Array, jax.Array]:
  """Index into [0, u_0, u_1, ...] and sign that rebuild Q = U - U^T.

  Built from iotas inside the trace, not as NumPy arrays: JAX passes a
  captured NumPy constant to the executable as an argument, one b x b
  buffer per use.
  """
  row = jax.lax.broadcasted_iota(jnp.int32, (b, b), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (b, b), 1)
  lo, hi = jnp.minimum(row, col), jnp.maximum(row, col)
  # 1 + the position of (lo, hi) in np.triu_indices(b, k=1)'s row-major order.
  position = lo * (2 * b - lo - 1) // 2 + (hi - lo - 1) + 1
  return (jnp.where(row == col, 0, position),
          jnp.sign(col - row).astype(jnp.float32))


def skew_from_params(u: jax.Array, block_size: int) -> jax.Array:
  """(..., b(b-1)/2) strict-upper-triangle values -> (..., b, b) skew Q."""
  if u.shape[-1] != num_generator_params(block_size):
    raise ValueError(
        f'generator has {u.shape[-1]} values; a {block_size}x{block_size} '
        f'block needs {num_generator_params(block_size)}')
  index, sign = _skew_gather_index(block_size)
  # A gather (not a scatter) so the forward is one fused op; its gradient
  # is the matching scatter-add.
  padded = jnp.concatenate([jnp.zeros_like(u[..., :1]), u], axis=-1)
  return jnp.take(padded, index, axis=-1) * sign.astype(u.dtype)


def params_from_skew(q: jax.Array) -> jax.Array:
  """(..., b, b) skew Q -> (..., b(b-1)/2) strict upper triangle."""
  rows, cols = np.triu_indices(q.shape[-1], k=1)
  return q[..., rows, cols]


def _eval_polynomial(coeffs, q: jax.Array) -> jax.Array:
  """sum_i coeffs[i] Q^i with the fewest matrix products.

  Paterson–Stockmeyer: precompute Q^2..Q^s, then Horner in Y = Q^s over
  chunks of s coefficients (the top chunk may use Y itself). The chunk size s
  is chosen at trace time to minimize products; degree 4 takes two.
  """
  degree = len(coeffs) - 1
  eye = jnp.eye(q.shape[-1], dtype=q.dtype)
  if degree == 0:
    return coeffs[0] * jnp.broadcast_to(eye, q.shape)

  def cost(s):
    return (s - 1) + (math.ceil(degree / s) - 1)

  s = min(range(1, degree + 1), key=cost)
  powers = [eye, q]
  for _ in range(2, s + 1):
    powers.append(powers[-1] @ q)

  def chunk(lo, hi):  # sum_{i=lo}^{hi} coeffs[i] Q^(i-lo), with hi - lo <= s
    out = coeffs[lo] * eye
    for i in range(lo + 1, hi + 1):
      if coeffs[i]:
        out = out + coeffs[i] * powers[i - lo]
    return out

  num_chunks = math.ceil(degree / s)
  # The top chunk covers coefficients [(num_chunks-1)s, degree].
  result = chunk((num_chunks - 1) * s, degree)
  for j in range(num_chunks - 2, -1, -1):
    result = chunk(j * s, j * s + s - 1) + powers[s] @ result
  return result


def neumann_coefficients(num_terms: int, taylor: bool = False) -> list[int]:
  """Coefficients of (I+Q)(I+Q+...+Q^k), or of the degree-(k+1) Taylor form.

  (I+Q)(I+...+Q^k) = I + 2Q + ... + 2Q^k + Q^(k+1); the Taylor polynomial of
  the exact Cayley map has 2 on Q^(k+1) as well.
  """
  if num_terms < 0:
    raise ValueError(f'num_terms must be >= 0, got {num_terms}')
  return [1] + [2] * num_terms + [2 if taylor else 1]


def cayley_neumann(q: jax.Array, num_terms: int = 3,
                   taylor: bool = False) -> jax.Array:
  """Cayley map with the inverse replaced by a k-term Neumann series.

  Returns (I+Q)(I+Q+...+Q^k); with k=3: I + 2Q + 2Q^2 + 2Q^3 + Q^4 (two
  matrix products). taylor=True gives I + 2Q + ... + 2Q^(k+1) instead.
  Orthogonal only approximately; the series needs ||Q||_2 < 1.
  """
  return _eval_polynomial(neumann_coefficients(num_terms, taylor), q)


def cayley_exact(q: jax.Array) -> jax.Array:
  """Exact Cayley map (I+Q)(I-Q)^-1 by a linear solve.

  (I+Q) and (I-Q)^-1 commute, so G = solve(I-Q, I+Q).
  """
  eye = jnp.eye(q.shape[-1], dtype=q.dtype)
  return jnp.linalg.solve(eye - q, eye + q)


METHODS = ('neumann', 'taylor', 'exact')


def orthogonal_from_skew(q: jax.Array, num_terms: int = 3,
                         method: str = 'neumann') -> jax.Array:
  """Dispatch on method: 'neumann' (paper), 'taylor', or 'exact'."""
  if method == 'neumann':
    return cayley_neumann(q, num_terms)
  if method == 'taylor':
    return cayley_neumann(q, num_terms, taylor=True)
  if method == 'exact':
    return cayley_exact(q)
  raise ValueError(
      f"unknown orthogonal map {method!r}; use 'neumann', 'taylor' or 'exact'")


def orthogonal_blocks(u: jax.Array, block_size: int, num_terms: int = 3,
                      method: str = 'neumann') -> jax.Array:
  """Generator values (..., b(b-1)/2) -> orthogonal blocks (..., b, b)."""
  return orthogonal_from_skew(skew_from_params(u, block_size), num_terms,
                              method)


def orthogonality_error(g: jax.Array) -> jax.Array:
  """||G G^T - I||_F / ||I||_F over the last two axes."""
  b = g.shape[-1]
  gram = g @ jnp.swapaxes(g, -1, -2)
  return jnp.linalg.norm(gram - jnp.eye(b, dtype=g.dtype),
                         axis=(-2, -1)) / jnp.sqrt(jnp.asarray(b, g.dtype))
