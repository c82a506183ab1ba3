"""Merge-then-reinitialize: fold R and P into W0 every merge_every updates.

One counter decides, the one of `poet_jax.reparameterize` (its state's
count of applied updates): after the update that makes it a multiple of
merge_every, the transformation zeroes its generators and resets the POET
optimizer state, and the model merges here: W0 <- R W0 P, blocks <- I, and
new permutations drawn from fold_in(key, count // merge_every), so merge
number i draws the same everywhere and data-parallel copies stay identical.
With optax.MultiSteps or gradient accumulation the counter counts optimizer
updates, never micro-batches.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from poet_jax import control_flow
from poet_jax import layers
from poet_jax import reparam


def poet_layers(model: nnx.Module) -> list[tuple[tuple, layers.POETLinear]]:
  """Every POETLinear of the model with its path, in a fixed order."""
  return [(path, node) for path, node in nnx.iter_graph(model)
          if isinstance(node, layers.POETLinear)]


def merge_model(model: nnx.Module, key: jax.Array) -> None:
  """Merge every POET layer of the model in place (jittable); layer i of
  poet_layers' order draws from fold_in(key, i)."""
  for i, (_, layer) in enumerate(poet_layers(model)):
    layer.merge(jax.random.fold_in(key, i))


def merge_key(key: jax.Array, merge_count) -> jax.Array:
  """Key of merge number `merge_count` (1 for the first merge)."""
  return jax.random.fold_in(key, merge_count)


def merge_and_reset(model: nnx.Module, optimizer: nnx.Optimizer,
                    key: jax.Array) -> None:
  """Merge the model now and reset its optimizer state, both in place.

  For a merge at a time of one's choosing; the optimizer state is left as
  `reparam.reset_after_merge` gives it (generators and POET state zeroed),
  which is what `reparameterize` does itself at the merges it counts.
  """
  merge_model(model, key)
  reset = reparam.reset_after_merge(nnx.as_pure(optimizer.opt_state))
  nnx.update(optimizer.opt_state, nnx.state(reset))


def merge_states(graphdef, params, frozen, opt_state, key):
  """Pure form of merge_and_reset on split model states and an optax state.

  params and frozen are the pure (nnx.as_pure) states of
  nnx.split(model, nnx.Param, ...); the same comes back, merged, with the
  optimizer state after reparam.reset_after_merge.
  """
  params, frozen = merge_params(graphdef, params, frozen, key)
  return params, frozen, reparam.reset_after_merge(opt_state)


def merge_params(graphdef, params, frozen, key):
  """merge_model on split pure states: (params, frozen), merged."""
  model = nnx.merge(graphdef, params, frozen)
  merge_model(model, key)
  _, params, frozen = nnx.split(model, nnx.Param, ...)
  return nnx.as_pure(params), nnx.as_pure(frozen)


def _is_period(x) -> bool:
  """An integer scalar that is not a PRNG key: a former merge_every."""
  if isinstance(x, bool):
    return False
  if isinstance(x, int):
    return True
  dtype = getattr(x, 'dtype', None)
  return (dtype is not None and jnp.ndim(x) == 0
          and jnp.issubdtype(dtype, jnp.integer))


def _arguments(where: str, args: tuple, key, applied=True):
  """(key, applied) from the positional arguments after the state: (key,
  applied) now, (merge_every, key, applied) formerly (merge_every is then
  warned about and ignored)."""
  if len(args) >= 2 and _is_period(args[0]):
    reparam.deprecated_merge_every(where, args[0])
    args = args[1:]
  if len(args) > 2 or (args and key is not None):
    raise TypeError(f'{where}: too many arguments; give the key (merge_every '
                    "is read from reparameterize's state)")
  if args:
    key = args[0]
  if len(args) == 2:
    applied = args[1]
  if key is None:
    raise TypeError(f'{where}: the key of the merges is missing')
  return key, applied


def merge_if_due(graphdef, params, frozen, opt_state, *args, key=None,
                 applied=True):
  """The model's half of a merge, keyed on reparameterize's counter.

  merge_if_due(graphdef, params, frozen, opt_state, key, applied=True).
  Merges (merge_params with merge_key(key, count // merge_every)) when
  `reparam.merge_due(opt_state)` and `applied` (pass False for an update
  that was dropped, whose state was rolled back); else returns (params,
  frozen) unchanged. merge_every is the transformation's own, read from
  its state (a merge_every before the key is the former signature: warned
  about and ignored). No host round trip, one compiled step for both
  cases, and nothing copied when no merge is due. The optimizer state
  needs nothing: the transformation reset it in the same update.
  """
  key, applied = _arguments('merge_if_due', args, key, applied)
  due = reparam.merge_due(opt_state) & jnp.asarray(applied)
  merge_number = reparam.merge_count(opt_state)

  def do(args):
    return merge_params(graphdef, *args, merge_key(key, merge_number))
  return control_flow.apply_if(due, do, (params, frozen))


def merge_model_if_due(model: nnx.Module, optimizer: nnx.Optimizer, *args,
                       key=None) -> None:
  """merge_if_due for an NNX model and its nnx.Optimizer, in place.

  merge_model_if_due(model, optimizer, key). Call it right after
  `optimizer.update(model, grads)`, inside nnx.jit or not: the model
  merges when the update just applied was a merging one of the
  optimizer's `reparameterize` (on its merge_every).
  """
  key, _ = _arguments('merge_model_if_due', args, key)
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  params, frozen = merge_if_due(graphdef, nnx.as_pure(params),
                                nnx.as_pure(frozen),
                                nnx.as_pure(optimizer.opt_state), key)
  nnx.update(model, params, frozen)
