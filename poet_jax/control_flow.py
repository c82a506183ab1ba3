"""A conditional that copies nothing when its branch is not taken."""
import jax
import jax.numpy as jnp


def apply_if(pred, fn, operand):
  """fn(operand) where pred, else operand, as a loop that runs once or not
  at all.

  A lax.cond would do the same, but XLA:GPU copies the operands its untaken
  branch returns unchanged (its output is a buffer of its own): for the
  merge, the whole model's W0 and orthogonal blocks, every step that does
  not merge. A loop updates its state in its buffer, so the step that does
  not take it reads and writes nothing of it.

  Args:
    pred: () bool, traced or not.
    fn: operand -> a pytree of the operand's structure, shapes and dtypes.
    operand: any pytree of arrays.
  """
  def once(carry):
    trips, value = carry
    return trips - 1, fn(value)
  _, out = jax.lax.while_loop(lambda carry: carry[0] > 0, once,
                              (jnp.asarray(pred).astype(jnp.int32), operand))
  return out
