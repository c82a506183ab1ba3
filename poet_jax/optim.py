"""The POET optax transformations and the baselines' helpers.

Built like optax.contrib.muon: `scale_by_poet` is the Adam step of the
generator leaves, with a state type of its own so that a merge can find and
reset it anywhere inside a chain, a partition or MultiSteps; `poet` routes
generator leaves to it and every other trainable leaf to Adam with decoupled
weight decay, with optax.partition. The generators are what
`poet_jax.reparameterize` hands its inner optimizer in place of a POET
layer's orthogonal blocks, under the blocks' names (BLOCK_NAMES).

Two Adam conventions (docs/method.md has the table):
  'reference'  the official POET-X code's (spec section 7): the uncorrected
               first moment over sqrt(v) + eps, the bias correction
               sqrt(1 - b2^t) / (1 - b1^t) on the step size (Kingma & Ba
               2015, end of section 2, the form with epsilon-hat), and weight
               decay p <- p - lr * wd * p applied after the Adam step;
  'optax'      optax.scale_by_adam's: m_hat / (sqrt(v_hat) + eps), and
               optax.adamw's decay lr * wd * p added to the step.
They differ by an effective eps of eps / sqrt(1 - b2^t), which matters in
the first steps after every merge, when the POET state restarts.
"""
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from poet_jax import layers
from poet_jax import orthogonal

CONVENTIONS = ('reference', 'optax')
BLOCK_NAMES = layers.BLOCK_NAMES


class ScaleByPoetState(NamedTuple):
  """Adam moments of the generators; count restarts at every merge."""
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def no_params_message(name: str) -> str:
  """The error of an update that needs params and got none."""
  return (f'{name}: update needs the current parameters: call '
          'tx.update(grads, opt_state, params)')


def _one_minus_power(decay, count: jax.Array) -> jax.Array:
  """1 - decay**count in float32 without the cancellation of computing the
  power first (1 - 0.999**t loses 1e-5 relative at t = 1 that way); count
  >= 1, so decay 0 (no averaging) gives 1. decay may be an array (from
  optax.inject_hyperparams): log(0) = -inf gives the same 1."""
  count = count.astype(jnp.float32)
  if isinstance(decay, (int, float)):
    if decay == 0:
      return jnp.ones([], jnp.float32)
    return -jnp.expm1(count * math.log(decay))
  return -jnp.expm1(count * jnp.log(jnp.asarray(decay, jnp.float32)))


def adam_direction(mu, nu, count, b1: float, b2: float, eps: float,
                   convention: str = 'reference'):
  """The Adam step direction (before the learning rate) from the moments.

  Args:
    mu, nu: first and second moment pytrees, uncorrected (float32).
    count: () int32, steps since the moments were last zeroed (>= 1).
    b1, b2, eps: Adam's decays and epsilon.
    convention: 'reference' gives sqrt(1-b2^t)/(1-b1^t) * mu/(sqrt(nu)+eps);
      'optax' gives mu_hat/(sqrt(nu_hat)+eps) with the bias-corrected moments.

  Raises:
    ValueError: for an unknown convention.
  """
  bc1, bc2 = _one_minus_power(b1, count), _one_minus_power(b2, count)
  if convention == 'reference':
    step = jnp.sqrt(bc2) / bc1
    return jax.tree.map(lambda m, v: step * m / (jnp.sqrt(v) + eps), mu, nu)
  if convention == 'optax':
    return jax.tree.map(
        lambda m, v: (m / bc1) / (jnp.sqrt(v / bc2) + eps), mu, nu)
  raise ValueError(f'unknown Adam convention {convention!r}; use one of '
                   f'{CONVENTIONS}')


def _adam(b1, b2, eps, convention, scale, state_type, mu_dtype=None):
  """Adam with moments in a state of `state_type` (count, mu, nu); the
  first moment stored as mu_dtype (None: float32), updated in float32."""
  if convention not in CONVENTIONS:
    raise ValueError(f'unknown Adam convention {convention!r}; use one of '
                     f'{CONVENTIONS}')
  mu_dtype = jnp.dtype(mu_dtype or jnp.float32)

  def init_fn(params):
    zeros = lambda dtype: jax.tree.map(lambda p: jnp.zeros_like(p, dtype),
                                       params)
    return state_type(jnp.zeros([], jnp.int32), zeros(mu_dtype),
                      zeros(jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    mu = optax.tree.update_moment(
        updates, optax.tree.cast(state.mu, jnp.float32), b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    out = adam_direction(mu, nu, count, b1, b2, eps, convention)
    out = jax.tree.map(lambda u, g: (scale * u).astype(g.dtype), out, updates)
    return out, state_type(count, optax.tree.cast(mu, mu_dtype), nu)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_poet(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                  scale: float = 1.0, convention: str = 'reference',
                  mu_dtype=None) -> optax.GradientTransformation:
  """Adam (with bias correction) on generator leaves, times `scale`.

  The state is a ScaleByPoetState, which `reset_poet_state` zeroes at every
  merge (spec section 5, step 4). The reference implementation multiplies
  the POET learning rate by 0.5 (its `poet_scale`); `scale` makes that
  factor explicit. `convention` is 'reference' (default) or 'optax'; see
  the module docstring. mu_dtype stores the first moment (optax's
  `mu_dtype`; None: float32); the second stays float32.

  Raises:
    ValueError: for an unknown convention.
  """
  return _adam(b1, b2, eps, convention, scale, ScaleByPoetState, mu_dtype)


def scale_by_reference_adam(b1: float = 0.9, b2: float = 0.999,
                            eps: float = 1e-6, mu_dtype=None
                            ) -> optax.GradientTransformation:
  """Adam in the reference's convention, for leaves a merge does not reset.

  The state is an optax.ScaleByAdamState (count, mu, nu), so it is left
  alone by `reset_poet_state`; mu_dtype as scale_by_poet's.
  """
  return _adam(b1, b2, eps, 'reference', 1.0, optax.ScaleByAdamState,
               mu_dtype)


def decay_after_step(weight_decay: float, learning_rate: optax.ScalarOrSchedule
                     ) -> optax.GradientTransformation:
  """Decoupled weight decay applied after the step: p <- p' - lr wd p'.

  p' = p + u is the parameter after the (already scaled) update u, so the
  update becomes u - lr * wd * (p + u); this is the reference's
  `p.add_(p, alpha=-lr * wd)` after its Adam step. optax.adamw instead
  decays the parameter before the step (u - lr * wd * p). Needs `params`.
  """

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(no_params_message('decay_after_step'))
    lr = (learning_rate(state.count) if callable(learning_rate)
          else learning_rate)
    out = jax.tree.map(
        lambda u, p: (u - lr * weight_decay * (p + u)).astype(u.dtype),
        updates, params)
    return out, optax.ScaleByScheduleState(optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _is_poet_state(x) -> bool:
  return isinstance(x, ScaleByPoetState)


def _is_reset_target(x) -> bool:
  return isinstance(x, (ScaleByPoetState, optax.MultiStepsState))


def reset_poet_state(opt_state: Any) -> Any:
  """The optimizer state as a merge leaves it (spec section 5, step 4).

  Zeroes every ScaleByPoetState (moments and count) inside opt_state, and,
  inside optax.MultiSteps, the generator gradients accumulated so far:
  they were taken under the old W0 and permutations and would be applied
  to the new generators otherwise. Everything else (the base group's Adam
  state, schedules, clipping counts, MultiSteps counters, the base
  gradients accumulated) is returned unchanged. Pure; jittable.
  """
  def reset(s):
    if isinstance(s, ScaleByPoetState):
      return jax.tree.map(jnp.zeros_like, s)
    if isinstance(s, optax.MultiStepsState):
      labels = poet_param_labels(s.acc_grads)
      acc = jax.tree.map(
          lambda label, g: jnp.zeros_like(g) if label == 'poet' else g,
          labels, s.acc_grads)
      return s._replace(inner_opt_state=reset_poet_state(s.inner_opt_state),
                        acc_grads=acc)
    return s
  return jax.tree.map(reset, opt_state, is_leaf=_is_reset_target)


def poet_step_count(opt_state: Any) -> jax.Array:
  """Bias-correction count of the POET group (steps since the last merge)."""
  found = [s.count for s in jax.tree.leaves(opt_state, is_leaf=_is_poet_state)
           if _is_poet_state(s)]
  if not found:
    raise ValueError('opt_state holds no ScaleByPoetState')
  return found[0]


def _path_names(path) -> list[str]:
  return [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]


def is_poet_path(path) -> bool:
  """Whether a key path ends in a POET leaf's name (BLOCK_NAMES).

  By name rather than Variable type, because nnx.Optimizer hands optax
  plain arrays.
  """
  names = [n for n in _path_names(path) if n != 'value']
  return bool(names) and names[-1] in BLOCK_NAMES


def poet_param_labels(params) -> Any:
  """'poet' for POET leaves (is_poet_path), 'base' for every other leaf."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'poet' if is_poet_path(path) else 'base', params)


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


def _base_adamw(learning_rate, b1, b2, eps, weight_decay, convention,
                mu_dtype=None):
  if convention == 'optax':
    return optax.adamw(learning_rate, b1, b2, eps, mu_dtype=mu_dtype,
                       weight_decay=weight_decay, mask=decay_mask)
  return optax.chain(
      scale_by_reference_adam(b1, b2, eps, mu_dtype),
      optax.scale_by_learning_rate(learning_rate),
      optax.masked(decay_after_step(weight_decay, learning_rate), decay_mask))


def _is_generator_shape(shape) -> bool:
  """Generators end in b(b-1)/2 values per block; blocks in (b, b)."""
  try:
    return orthogonal.block_size_from_params(shape[-1]) > 1
  except ValueError:
    return False


def _require_poet_leaves(tx, param_labels):
  """Refuses a model with no generator (poet() would quietly be AdamW), and
  orthogonal blocks handed over directly (Adam would step off the group)."""

  def init_fn(params):
    labels = param_labels(params) if callable(param_labels) else param_labels
    pairs = zip(jax.tree.leaves(labels), jax.tree.leaves(params))
    poet_shapes = [jnp.shape(x) for label, x in pairs if label == 'poet']
    if not poet_shapes:
      raise ValueError(
          'poet(): no POET leaf (a variable named one of '
          f'{BLOCK_NAMES}) among the {len(jax.tree.leaves(params))}'
          ' parameters; build the model with POET layers, or use optax.adamw '
          'for a dense model')
    bad = [s for s in poet_shapes if not _is_generator_shape(s)]
    if bad:
      raise ValueError(
          f'poet(): POET leaves of shape {bad[0]} are orthogonal blocks, not '
          'generators; wrap the optimizer: poet_jax.reparameterize(poet(...))')
    return tx.init(params)

  return optax.GradientTransformationExtraArgs(
      init_fn, optax.with_extra_args_support(tx).update)


def poet(learning_rate: optax.ScalarOrSchedule,
         poet_learning_rate: optax.ScalarOrSchedule,
         *, poet_scale: float = 0.5, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-6, weight_decay: float = 0.01,
         poet_b1: float = 0.9, poet_b2: float = 0.999, poet_eps: float = 1e-6,
         adam_convention: str = 'reference', mu_dtype=None,
         param_labels=None) -> optax.GradientTransformationExtraArgs:
  """POET's optimizer: Adam on the generators, AdamW on the other leaves.

  The defaults are the official POET-X code's (spec section 7; its
  POETAdamW): eps 1e-6 in both groups, the 'reference' Adam convention (see
  the module docstring), decay after the step on base tensors of 2+ dims,
  none on generators. The generator group's state restarts at every merge
  (`reset_poet_state`); the base group's does not.

  Args:
    learning_rate: base learning rate (embeddings, norms, output head).
    poet_learning_rate: learning rate of the generators (before poet_scale).
    poet_scale: explicit factor on the POET step (reference: 0.5).
    b1, b2, eps: Adam hyperparameters of the base group.
    weight_decay: decoupled decay of base tensors with 2+ dimensions.
    poet_b1, poet_b2, poet_eps: Adam hyperparameters of the generators.
    adam_convention: 'reference' (default) or 'optax' (optax.scale_by_adam
      and optax.adamw).
    mu_dtype: storage of both groups' first moments (optax's `mu_dtype`;
      None: float32).
    param_labels: pytree or callable giving 'poet' or 'base' per leaf
      (None: poet_param_labels, by the leaves' names).

  Composes as optax's own optimizers do: optax.inject_hyperparams(poet)(
  learning_rate=..., poet_learning_rate=...) makes both groups' rates (and
  the betas, eps, decay and scale) hyperparameters that can change at run
  time, and extra update arguments pass through.

  Raises:
    ValueError: for an unknown adam_convention, and at init when no leaf is
      labelled 'poet'.
  """
  if adam_convention not in CONVENTIONS:
    raise ValueError(f'unknown adam_convention {adam_convention!r}; use one '
                     f'of {CONVENTIONS}')
  # None rather than the function as the default: optax.inject_hyperparams
  # takes every callable argument for a schedule.
  if param_labels is None:
    param_labels = poet_param_labels
  tx = optax.partition(
      {
          'poet': optax.chain(
              scale_by_poet(poet_b1, poet_b2, poet_eps, poet_scale,
                            adam_convention, mu_dtype),
              optax.scale_by_learning_rate(poet_learning_rate)),
          'base': _base_adamw(learning_rate, b1, b2, eps, weight_decay,
                              adam_convention, mu_dtype),
      },
      param_labels)
  return _require_poet_leaves(tx, param_labels)


def per_layer(inner: optax.GradientTransformation,
              stacked) -> optax.GradientTransformation:
  """Runs `inner` with each stacked (L, ...) leaf split into L leaves.

  The model keeps its layers stacked for the scan, so a block kernel is
  (L, in, out). Transformations written for one matrix per leaf (GaLore's
  projection, whose optax version takes no batch axis) see L matrices of
  their own this way.

  Args:
    inner: the transformation.
    stacked: (key path, leaf) -> bool: which leaves carry a leading stack
      axis. Declared, never guessed from the rank: a (D, H, Dh) attention
      kernel is one matrix, not D layers.
  """
  if not callable(stacked):
    raise ValueError('per_layer: stacked must be a function (key path, leaf)'
                     ' -> bool naming the leaves stacked on axis 0')
  marks = lambda tree: jax.tree_util.tree_map_with_path(stacked, tree)
  split = lambda tree, m: jax.tree.map(
      lambda s, x: tuple(jnp.unstack(x)) if s else x, m, tree)

  def init_fn(params):
    return inner.init(split(params, marks(params)))

  def update_fn(updates, state, params=None, **extra_args):
    m = marks(updates)
    params = None if params is None else split(params, m)
    out, state = optax.with_extra_args_support(inner).update(
        split(updates, m), state, params, **extra_args)
    # A stacked leaf is a tuple of slices in `out`.
    return jax.tree.map(lambda s, o: jnp.stack(o) if s else o, m,
                        out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
