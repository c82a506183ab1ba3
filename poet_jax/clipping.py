"""Gradient clipping as the POET reference does it, as optax transformations.

`clip_by_global_norm` is optax's with the two differences of the reference's
torch.nn.utils.clip_grad_norm_ (an eps in the denominator, a threshold that
may be a schedule), and `post_merge_clip_ramp` is the reference's schedule:
a lower threshold in the first updates after each merge (spec section 7).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class ClipByGlobalNormState(NamedTuple):
  """Updates seen, for a scheduled clipping threshold."""
  count: jax.Array


def clip_by_global_norm(max_norm: optax.ScalarOrSchedule, eps: float = 1e-6
                        ) -> optax.GradientTransformation:
  """Scales the updates by min(1, max_norm / (||g|| + eps)).

  Like optax.clip_by_global_norm, with two differences the reference's
  torch.nn.utils.clip_grad_norm_ has: `eps` in the denominator, and
  `max_norm` may be a schedule of the update count (for the post-merge
  ramp, `post_merge_clip_ramp`). ||g|| is the L2 norm over all leaves.
  """

  def init_fn(params):
    del params
    return ClipByGlobalNormState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    limit = max_norm(state.count) if callable(max_norm) else max_norm
    factor = jnp.minimum(1.0, limit / (optax.tree.norm(updates) + eps))
    out = jax.tree.map(lambda g: (g * factor).astype(g.dtype), updates)
    return out, ClipByGlobalNormState(optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def post_merge_clip_ramp(max_norm: float, merge_every: int,
                         ramp_steps: int = 10, min_ratio: float = 0.1,
                         until_step: int = 2000) -> optax.Schedule:
  """The reference's clipping threshold after each merge (spec section 7).

  For update number `count` (0-based, the updates applied before this one):
  after each merge, i.e. count = k * merge_every + j with k >= 1 and
  j < ramp_steps, the threshold ramps linearly from min_ratio * max_norm
  (j = 0) towards max_norm; before the first merge, after `until_step`
  updates, and for j >= ramp_steps it is max_norm. ramp_steps = 0 gives
  a constant max_norm.
  """

  def schedule(count):
    j = count % merge_every
    ramping = ((count >= merge_every) & (count <= until_step)
               & (j < ramp_steps))
    ratio = min_ratio + (1.0 - min_ratio) * j / max(1, ramp_steps)
    return jnp.where(ramping, ratio * max_norm, max_norm).astype(jnp.float32)

  return schedule
