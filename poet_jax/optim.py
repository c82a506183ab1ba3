"""The POET optax transformation and the baselines.

Built like optax.contrib.muon: `scale_by_poet` is the Adam step of the
generator leaves, with a state type of its own so that a merge can find and
reset it anywhere inside a chain, a partition or MultiSteps; `poet` routes
generator leaves to it and every other trainable leaf to AdamW with
optax.partition.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from poet_jax import layers


class ScaleByPoetState(NamedTuple):
  """Adam moments of the generators; count restarts at every merge."""
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_poet(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                  scale: float = 1.0) -> optax.GradientTransformation:
  """Adam (with bias correction) on generator leaves, times `scale`.

  The reference implementation multiplies the POET learning rate by 0.5
  (its `poet_scale`); `scale` makes that factor explicit.
  """

  def init_fn(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return ScaleByPoetState(jnp.zeros([], jnp.int32), zeros, zeros)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    out = jax.tree.map(lambda m, v: scale * m / (jnp.sqrt(v) + eps),
                       mu_hat, nu_hat)
    return out, ScaleByPoetState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def _is_poet_state(x) -> bool:
  return isinstance(x, ScaleByPoetState)


def reset_poet_state(opt_state: Any) -> Any:
  """Zero every ScaleByPoetState (moments and count) inside opt_state.

  Every other state (AdamW of the base parameters, schedules, MultiSteps
  counters) is returned unchanged.
  """
  return jax.tree.map(
      lambda s: jax.tree.map(jnp.zeros_like, s) if _is_poet_state(s) else s,
      opt_state, is_leaf=_is_poet_state)


def poet_step_count(opt_state: Any) -> jax.Array:
  """Bias-correction count of the POET group (steps since the last merge)."""
  found = [s.count for s in jax.tree.leaves(opt_state, is_leaf=_is_poet_state)
           if _is_poet_state(s)]
  if not found:
    raise ValueError('opt_state holds no ScaleByPoetState')
  return found[0]


def _path_names(path) -> list[str]:
  return [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]


def poet_param_labels(params) -> Any:
  """'poet' for generator leaves, 'base' for every other leaf.

  Routed by the variable name (layers.GENERATOR_NAMES) rather than the
  Variable type, because nnx.Optimizer hands optax plain arrays.
  """
  def label(path, _):
    names = [n for n in _path_names(path) if n != 'value']
    return 'poet' if names and names[-1] in layers.GENERATOR_NAMES else 'base'
  return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params) -> Any:
  """Weight decay on tensors of 2 or more dimensions (not norms, biases).

  Stacked layers carry a leading layer axis, so a RMSNorm scale stacked over
  layers is 2-D; it is recognized by its variable path instead.
  """
  def mask(path, x):
    if any(n.endswith('norm') for n in _path_names(path)):
      return False
    return jnp.ndim(x) >= 2
  return jax.tree_util.tree_map_with_path(mask, params)


def poet(learning_rate: optax.ScalarOrSchedule,
         poet_learning_rate: optax.ScalarOrSchedule,
         *, poet_scale: float = 0.5, b1: float = 0.9, b2: float = 0.999,
         poet_eps: float = 1e-6, weight_decay: float = 0.01,
         param_labels=poet_param_labels) -> optax.GradientTransformation:
  """POET: Adam on the generators, AdamW on the other trainable leaves.

  Args:
    learning_rate: base learning rate (embeddings, norms, output head).
    poet_learning_rate: learning rate of the generators (before poet_scale).
    poet_scale: explicit factor on the POET step (reference: 0.5).
    weight_decay: AdamW decay of base tensors with 2+ dimensions.
    param_labels: pytree or callable giving 'poet' or 'base' per leaf.
  """
  return optax.partition(
      {
          'poet': optax.chain(
              scale_by_poet(b1, b2, poet_eps, poet_scale),
              optax.scale_by_learning_rate(poet_learning_rate)),
          'base': optax.adamw(learning_rate, b1, b2,
                              weight_decay=weight_decay, mask=decay_mask),
      },
      param_labels)


def clip_generator_norms(params, max_norm: float):
  """Scale each block's generator so that ||Q||_F <= max_norm.

  ||Q||_F bounds the operator norm, and the Cayley–Neumann series converges
  while that is below 1. For Q = U - U^T, ||Q||_F = sqrt(2) ||u||.
  """
  labels = poet_param_labels(params)

  def clip(label, u):
    if label != 'poet':
      return u
    norm = jnp.sqrt(2.0) * jnp.linalg.norm(u, axis=-1, keepdims=True)
    return u * jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))

  return jax.tree.map(clip, labels, params)


def per_layer(inner: optax.GradientTransformation,
              ndim: int = 3) -> optax.GradientTransformation:
  """Runs `inner` with each stacked (L, ...) leaf split into L leaves.

  The model keeps its layers stacked for the scan, so a block kernel is
  (L, in, out). Transformations written for one matrix per leaf (GaLore's
  projection, whose optax version takes no batch axis) see L matrices of
  their own this way; leaves of another rank pass through whole.
  """
  split = lambda tree: jax.tree.map(
      lambda x: tuple(jnp.unstack(x)) if jnp.ndim(x) == ndim else x, tree)

  def init_fn(params):
    return inner.init(split(params))

  def update_fn(updates, state, params=None):
    params = None if params is None else split(params)
    out, state = inner.update(split(updates), state, params)
    # `updates` gives the structure: a leaf of rank `ndim` there is a tuple
    # of slices in `out`.
    return jax.tree.map(lambda u, o: jnp.stack(o) if jnp.ndim(u) == ndim
                        else o, updates, out), state

  return optax.GradientTransformation(init_fn, update_fn)
