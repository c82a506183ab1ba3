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


def _check(actual, desired, factor: float, scale, what: str) -> None:
  """|actual - desired| <= factor * scale, elementwise; scale a number, an
  array of desired's shape (each element's own magnitude), or None: the
  largest |desired| element."""
  actual, desired = np.asarray(actual), np.asarray(desired)
  if scale is None:
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
  bound = factor * np.asarray(scale, np.float64)
  excess = np.abs(actual.astype(np.float64) - desired) - bound
  worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.size \
      else ()
  assert not excess.size or excess[worst] <= 0, (
      f'|difference| {abs(float(actual[worst]) - float(desired[worst])):.3g} '
      f'at {worst} above {float(np.broadcast_to(bound, excess.shape)[worst]):.3g}'
      f' = {what} x scale')


def assert_close(actual, desired, terms: int, scale=None, eps=EPS32):
  """|actual - desired| <= 4 * terms * eps * scale, elementwise.

  Args:
    actual, desired: arrays of one shape.
    terms: how many rounded operations feed one element along its longest
      chain (the lengths of its sums plus the number of products chained),
      as counted at the call.
    scale: the terms' magnitude; by default the largest |desired| element;
      an array gives each element its own.
    eps: the unit roundoff of the arithmetic (float32 by default).
  """
  _check(actual, desired, 4 * terms * eps, scale,
         f'4 x {terms} terms x eps {eps:.3g}')


# Long chains (a model's forward and backward, a run of training steps):
# the worst case above grows as n and says nothing past n ~ 1 / (4 eps), while
# two CPUs' roundings differ like independent zero-mean errors, whose sum
# grows as sqrt(n) (Higham and Mary, "A new approach to probabilistic
# rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019, Theorem 2.4:
# the bound below fails with probability at most 2 exp(-LAMBDA^2 / 2),
# 3e-14, per operation).
LAMBDA = 8.0


def probable(terms, eps=EPS32) -> float:
  """2 * LAMBDA * sqrt(terms) * eps: the relative difference two programs'
  roundings make along a chain of `terms` operations, but for a chance of
  about 3e-14 per operation (2: two programs, each off by its own)."""
  return 2 * LAMBDA * np.sqrt(terms) * eps


def assert_close_probably(actual, desired, terms: int, scale=None,
                          eps=EPS32):
  """|actual - desired| <= probable(terms, eps) * scale, elementwise.

  For chains too long for assert_close: terms counted as there (a run of k
  steps: k times one step's; to first order each step carries the earlier
  steps' differences forward without growing them); scale as there.
  """
  _check(actual, desired, probable(terms, eps), scale,
         f'2 x {LAMBDA} x sqrt({terms} terms) x eps {eps:.3g}')


def llama_terms(cfg, seq_len: int, block_size: int = 0) -> int:
  """Rounded operations along the longest chain of a Llama forward pass,
  tokens to logits (cfg: a poet_jax.LlamaConfig; block_size: of its POET
  layers, 0 for dense ones).

  Per block: the two RMS norms' sums (2 dim), the q, o and gate products
  (dim each) and the down product (ffn_dim), the scores (head_dim), the
  softmax's sum and the weighted values (seq_len each), the two block
  products of each of those four POET kernels (2 block_size each), and ten
  elementwise steps (rotary, exp, SiLU, residual adds...); then the final
  norm and the head (dim each). A loss adds its sums over the vocabulary
  and the tokens; a backward pass is about twice a forward.
  """
  per_block = (5 * cfg.dim + cfg.ffn_dim + cfg.head_dim + 2 * seq_len +
               8 * block_size + 10)
  return cfg.num_layers * per_block + 2 * cfg.dim + 10


def training_terms(cfg, seq_len: int, batch: int, block_size: int,
                   num_params: int, steps: int) -> int:
  """A training run's chain to its last step: per step the loss
  (llama_terms, the log-sum-exp over the vocabulary, the mean over the
  batch's tokens), a backward of twice that, the clip's global norm over
  the num_params trained numbers and Adam; times the steps."""
  loss = (llama_terms(cfg, seq_len, block_size) + cfg.vocab_size +
          batch * seq_len)
  return steps * (3 * loss + num_params + 10)
