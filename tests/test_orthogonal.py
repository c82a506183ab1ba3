import jax
import jax.numpy as jnp
import numpy as np
import pytest

from poet_jax import orthogonal
import tolerance


def random_skew(key, shape, b, norm):
  """Skew blocks (..., b, b) with operator norm `norm`."""
  a = jax.random.normal(key, (*shape, b, b), jnp.float32)
  q = a - jnp.swapaxes(a, -1, -2)
  return q * (norm / jnp.linalg.norm(q, ord=2, axis=(-2, -1), keepdims=True))


def explicit_product_form(q, k):
  """(I+Q)(I+Q+...+Q^k), evaluated naively in float64 numpy."""
  q = np.asarray(q, np.float64)
  eye = np.eye(q.shape[-1])
  series, power = eye.copy(), eye.copy()
  for _ in range(k):
    power = power @ q
    series = series + power
  return (eye + q) @ series


def test_skew_round_trip():
  u = jax.random.normal(jax.random.key(0), (3, orthogonal.num_generator_params(6)))
  q = orthogonal.skew_from_params(u, 6)
  np.testing.assert_array_equal(q, -jnp.swapaxes(q, -1, -2))
  np.testing.assert_array_equal(orthogonal.params_from_skew(q), u)


def test_skew_rejects_wrong_length():
  with pytest.raises(ValueError, match='needs 10'):
    orthogonal.skew_from_params(jnp.zeros((7,)), 5)


@pytest.mark.parametrize('k', [1, 2, 3, 4])
def test_cayley_neumann_is_the_product_polynomial(k):
  q = random_skew(jax.random.key(k), (2,), 16, 0.5)
  got = orthogonal.cayley_neumann(q, k)
  # k + 1 products of 16-term sums, and the sums of the series.
  tolerance.assert_close(got, explicit_product_form(q, k), (k + 1) * 16 + k)


def test_three_terms_expand_with_coefficient_one_on_q4():
  q32 = random_skew(jax.random.key(9), (), 8, 0.7)
  q = np.asarray(q32, np.float64)
  eye = np.eye(8)
  q2 = q @ q
  expected = eye + 2 * q + 2 * q2 + 2 * q2 @ q + q2 @ q2
  # Up to three products of 8-term sums, and five sums.
  tolerance.assert_close(orthogonal.cayley_neumann(q32, 3), expected,
                         3 * 8 + 5)
  taylor = expected + q2 @ q2
  tolerance.assert_close(orthogonal.cayley_neumann(q32, 3, taylor=True),
                         taylor, 3 * 8 + 5)


def count_matmuls(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args)
  return sum(e.primitive.name == 'dot_general' for e in jaxpr.eqns)


@pytest.mark.parametrize('k,products', [(1, 1), (2, 2), (3, 2), (4, 3)])
def test_fewest_matrix_products(k, products):
  q = jnp.zeros((4, 4))
  assert count_matmuls(lambda q: orthogonal.cayley_neumann(q, k), q) == products


def test_more_terms_approach_exact_cayley():
  q = random_skew(jax.random.key(1), (4,), 32, 0.4)
  exact = orthogonal.cayley_exact(q)
  dist = [float(jnp.linalg.norm(orthogonal.cayley_neumann(q, k) - exact))
          for k in range(1, 6)]
  assert all(a > b for a, b in zip(dist, dist[1:])), dist


def test_exact_cayley_is_orthogonal():
  q = random_skew(jax.random.key(2), (3,), 64, 0.9)
  err = orthogonal.orthogonality_error(orthogonal.cayley_exact(q))
  assert err.shape == (3,)
  # A solve of a well-conditioned system (I - Q has singular values in
  # [1, 1.35]) and the product G G^T: about 3 x 64 roundings per entry;
  # the error is a Frobenius norm over sqrt(64) = ||I||_F: at most 8 x the
  # largest entry's.
  assert float(err.max()) < 4 * 3 * 64 * tolerance.EPS32 * np.sqrt(64)


def test_taylor_form_is_more_orthogonal_for_small_q():
  q = random_skew(jax.random.key(3), (), 32, 0.3)
  paper = orthogonal.orthogonality_error(orthogonal.cayley_neumann(q, 3))
  taylor = orthogonal.orthogonality_error(
      orthogonal.cayley_neumann(q, 3, taylor=True))
  assert float(taylor) < float(paper)


def test_orthogonality_error_of_identity_and_of_scaled_identity():
  assert float(orthogonal.orthogonality_error(jnp.eye(5))) == 0.0
  # G = 2I: G G^T - I = 3I, so the error is 3.
  tolerance.assert_close(orthogonal.orthogonality_error(2 * jnp.eye(5)), 3.0,
                         5)  # sums of 5, a root and a division
