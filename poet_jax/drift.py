"""Are the weights a POET transformation trains the ones it made them?

`reparameterize` emits map(u_new) - G for each POET leaf and
`poet_kernels` K(u_new) - K for each kernel: applied as they are, the
weights at the next update are map(u) (K(u)) up to one rounding. Each
update compares (the map's value comes with its VJP, at no extra products)
and warns when they are further off: the model skipped a merge, or a
transformation chained after the POET one, another optimizer or a write to
the model changed them (docs/method.md, "What may be chained after
reparameterize"). The warning comes from inside jit through a
jax.debug.callback that runs only then.
"""
import functools
import warnings

import jax
import jax.numpy as jnp

from poet_jax import platform


def tolerance(dtype, block_size: int) -> float:
  """How far trained weights may be from what the transformation made
  them, relative to their magnitude (1 for orthogonal blocks).

  One rounding of p + (map(u) - p) in the weights' dtype, plus two float32
  evaluations of the map that may differ by the rounding of b-term sums
  (tests/tolerance.py's bound).
  """
  return 4 * float(jnp.finfo(dtype).eps) + 4 * block_size * float(
      jnp.finfo(jnp.float32).eps)


_WARNED = set()


def _warn(count, excess, merge_every, who: str) -> None:
  """The host side of warn_if_changed (one warning per kind)."""
  count, merge_every = int(count), int(merge_every)
  missed = merge_every > 0 and count > 0 and count % merge_every == 0
  kind = (who, missed)
  if kind in _WARNED:
    return
  _WARNED.add(kind)
  if missed:
    text = (f'update {count} was a merging one (merge_every={merge_every}) '
            'but the model did not merge: call poet_jax.merge_model_if_due('
            'model, optimizer, key) (or merge_if_due) after every update')
  else:
    text = (f'after update {count} the weights it trains are '
            f'{float(excess):.3g} times the rounding away from what it made '
            f'them: something changed them outside {who} (a transformation '
            'chained after it, another optimizer); see docs/method.md')
  warnings.warn(f'{who}: {text}', RuntimeWarning, stacklevel=1)


def warn_if_changed(count, excess, merge_every,
                    who: str = 'reparameterize') -> None:
  """Warns (once per kind) when excess > 1.

  Args:
    count: () int32, the updates applied before this one.
    excess: () float32, the largest distance of the weights given to this
      update from what the transformation made them, in tolerances.
    merge_every: () int32 (0: no merges); after a merging update the
      warning says the model did not merge.
    who: the transformation, for the message.

  Nothing is emitted when compiling for a device this machine lacks
  (platform.runs_here): that executable never runs.
  """
  if not platform.runs_here():
    return
  jax.lax.cond(excess > 1.0,
               lambda: jax.debug.callback(
                   functools.partial(_warn, who=who), count, excess,
                   merge_every),
               lambda: None)
