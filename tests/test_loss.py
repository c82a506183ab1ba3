"""Chunked cross-entropy: the plain loss and gradients, without the logits."""
import jax
import jax.numpy as jnp
import optax

from poet_jax.models import loss as loss_lib
import tolerance


def plain(hidden, kernel, labels, weights):
  logits = (hidden @ kernel).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(losses * weights)


def inputs(n=300, d=16, v=40):
  keys = jax.random.split(jax.random.key(0), 4)
  hidden = jax.random.normal(keys[0], (3, n // 3, d))
  kernel = jax.random.normal(keys[1], (d, v)) * 0.3
  labels = jax.random.randint(keys[2], (3, n // 3), 0, v)
  weights = (jax.random.uniform(keys[3], (3, n // 3)) > 0.2).astype(
      jnp.float32)
  return hidden, kernel, labels, weights


def test_chunked_equals_plain_in_loss_and_gradients():
  hidden, kernel, labels, weights = inputs()
  want, want_grads = jax.value_and_grad(plain, argnums=(0, 1))(
      hidden, kernel, labels, weights)
  # 3 rows of 100: 64 and 77 tokens leave a padded last chunk.
  for chunk in (0, 3, 64, 77, 300, 1000):
    got, grads = jax.value_and_grad(
        lambda h, k: loss_lib.cross_entropy_sum(
            h, k, labels, weights, chunk_tokens=chunk), argnums=(0, 1))(
                hidden, kernel)
    # Per token: the logits' 16-term sums, the log-sum-exp over 40, then
    # the sum over the 300 tokens (in another order per chunk size); the
    # terms are positive, so the loss itself is their magnitude.
    tolerance.assert_close(got, want, 16 + 40 + 300 + 4)
    for g, w in zip(grads, want_grads):
      # Back through the softmax (40) and, for the kernel, summed over the
      # 300 tokens: rounding relative to the largest entries.
      tolerance.assert_close(g, w, 16 + 2 * 40 + 300 + 4)


def test_the_whole_batch_logits_are_never_kept():
  """Compiled temp memory of loss + gradients: the plain form holds the
  (tokens x vocab) logits; chunks of 256 tokens hold a 16th of them."""
  hidden = jax.ShapeDtypeStruct((8, 512, 64), jnp.float32)
  kernel = jax.ShapeDtypeStruct((64, 4096), jnp.float32)
  labels = jax.ShapeDtypeStruct((8, 512), jnp.int32)

  def temp_bytes(chunk):
    fn = jax.jit(jax.grad(lambda h, k, y: loss_lib.cross_entropy_sum(
        h, k, y, chunk_tokens=chunk), argnums=(0, 1)))
    return fn.lower(hidden, kernel, labels).compile().memory_analysis(
    ).temp_size_in_bytes

  logits_bytes = 4096 * 4096 * 4
  assert temp_bytes(0) >= logits_bytes
  assert temp_bytes(256) < logits_bytes / 4
