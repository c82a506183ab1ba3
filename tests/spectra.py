"""The check behind "every projection is POET": its spectrum stayed W0's."""
import numpy as np

import tolerance


def singular_values(matrix) -> np.ndarray:
  """Singular values of a (*stack, m, n) matrix (float64), per stack index."""
  return np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)


def assert_spectrum_kept(after, before, block_size: int, merges: int):
  """The (*stack, m, n) matrix `after` has the singular values of `before`.

  R W0 P with R, P orthogonal has W0's singular values (spec section 1).
  What may move them: float32 rounding of every product with a block
  (about 2b rounded terms per element) and of the W0 product (m terms),
  once per cycle (merges + 1), and the Neumann series' truncation, whose
  orthogonality error ~ ||Q||^(k+2) is far below that for the small
  steps of a test. A dense (AdamW) update of the same size moves them by
  about the learning rate, which this fails.
  """
  m = np.shape(before)[-2]
  tolerance.assert_close(singular_values(after), singular_values(before),
                         terms=(merges + 1) * (2 * block_size + m),
                         scale=float(np.abs(singular_values(before)).max()))
