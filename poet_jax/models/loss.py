"""Cross-entropy over the vocabulary without the whole batch's logits.

At the papers' batch (512 x 256 tokens, vocabulary 32000) the float32 logits
alone are 16.8 GB, and a plain backward keeps them (or their softmax) alive.
Here the output head and the cross-entropy run over chunks of tokens in a
`lax.scan` whose body is `jax.checkpoint`-ed: the forward keeps only each
chunk's summed loss, and the backward recomputes one chunk's logits at a
time. Same loss and gradients as the plain form to float32 rounding
(tests/test_loss.py).
"""
import jax
import jax.numpy as jnp


def _chunk_loss(hidden, kernel, labels, weights, dtype):
  logits = jnp.dot(hidden.astype(dtype), kernel.astype(dtype)).astype(
      jnp.float32)
  picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  losses = jax.nn.logsumexp(logits, axis=-1) - picked
  return jnp.sum(losses * weights)


def cross_entropy_sum(hidden: jax.Array, kernel: jax.Array,
                      labels: jax.Array, weights: jax.Array | None = None, *,
                      chunk_tokens: int = 0, dtype=None) -> jax.Array:
  """sum_t weights[t] * CE(softmax(hidden[t] @ kernel), labels[t]).

  Args:
    hidden: (B, T, D) features before the output head.
    kernel: (D, V) output head.
    labels: (B, T) int target ids in [0, V).
    weights: (B, T) float per-token weights (a mask), or None for ones.
    chunk_tokens: about this many tokens per chunk (0, or at least B * T:
      all logits at once). Chunks cut the sequence axis, every row in each:
      a batch sharded over devices stays sharded, each device computing
      its own rows' chunk.
    dtype: the head's compute dtype (None: hidden's); the logits and the
      loss are float32 whatever it is.
  Returns:
    () float32, the weighted sum of the token losses.
  """
  dtype = dtype or hidden.dtype
  b, t = labels.shape
  weights = (jnp.ones((b, t), jnp.float32) if weights is None else
             weights.astype(jnp.float32))
  if not chunk_tokens or chunk_tokens >= b * t:
    flat = lambda x: x.reshape((b * t,) + x.shape[2:])
    return _chunk_loss(flat(hidden), kernel, flat(labels), flat(weights),
                       dtype)
  width = max(1, chunk_tokens // b)
  chunks = -(-t // width)
  pad = chunks * width - t

  def split(x):
    # Padded positions get weight 0 (and label 0): they add nothing.
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((b, chunks, width) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0).reshape((chunks, b * width) + x.shape[3:])

  @jax.checkpoint
  def body(total, xs):
    h, y, w = xs
    return total + _chunk_loss(h, kernel, y, w, dtype), None

  total, _ = jax.lax.scan(body, jnp.zeros([], jnp.float32),
                          (split(hidden), split(labels), split(weights)))
  return total
