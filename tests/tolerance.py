"""Tolerances from the arithmetic, not from one machine's rounding.

A sum of n float32 products is within about n * eps of the exact sum,
relative to the sum of the terms' magnitudes (Higham, Accuracy and
Stability of Numerical Algorithms, section 3.1). Two programs that compute
the same quantity in different orders (another compute path, another
association of the products, fused or not) may each be off by that much,
and which way each rounds depends on the CPU's instructions (FMA, vector
width), so their difference is bounded by the same scale, not by a fraction
of each element: an element that is small because its terms cancel carries
the rounding of the large terms.
"""
import numpy as np

EPS32 = float(np.finfo(np.float32).eps)


def assert_close(actual, desired, terms: int, scale=None, eps=EPS32):
  """|actual - desired| <= 4 * terms * eps * scale, elementwise.

  Args:
    actual, desired: arrays of one shape.
    terms: how many rounded operations feed one element along its longest
      chain (the lengths of its sums plus the number of products chained),
      as counted at the call.
    scale: the terms' magnitude; by default the largest |desired| element.
    eps: the unit roundoff of the arithmetic (float32 by default).
  """
  actual, desired = np.asarray(actual), np.asarray(desired)
  if scale is None:
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
  bound = 4 * terms * eps * scale
  err = float(np.max(np.abs(actual - desired))) if desired.size else 0.0
  assert err <= bound, (
      f'max |difference| {err:.3g} above {bound:.3g} = 4 x {terms} terms x '
      f'eps {eps:.3g} x scale {scale:.3g}')
