"""Merge-then-reinitialize: fold R and P into W0 every merge_every steps.

One counter decides: after optimizer step `step` (1-based), a merge is due
when step % merge_every == 0, and merge number step // merge_every draws its
permutations from fold_in(key, merge number). Every replica derives the same
key, so data-parallel copies stay identical.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from poet_jax import layers
from poet_jax import optim


def poet_layers(model: nnx.Module) -> list[tuple[tuple, layers.POETLinear]]:
  """Every POETLinear of the model with its path, in a fixed order."""
  return [(path, node) for path, node in nnx.iter_graph(model)
          if isinstance(node, layers.POETLinear)]


def merge_model(model: nnx.Module, key: jax.Array) -> None:
  """Merge every POET layer of the model in place (jittable)."""
  for i, (_, layer) in enumerate(poet_layers(model)):
    layer.merge(jax.random.fold_in(key, i))


def merge_key(key: jax.Array, merge_count) -> jax.Array:
  """Key of merge number `merge_count` (1 for the first merge)."""
  return jax.random.fold_in(key, merge_count)


def merge_and_reset(model: nnx.Module, optimizer: nnx.Optimizer, key: jax.Array) -> None:
  """Merge the model and reset the POET optimizer state, both in place."""
  merge_model(model, key)
  reset = optim.reset_poet_state(nnx.as_pure(optimizer.opt_state))
  nnx.update(optimizer.opt_state, nnx.state(reset))


def merge_states(graphdef, params, frozen, opt_state, key):
  """Pure form of a merge on split model states and an optax state.

  params and frozen are the pure (nnx.as_pure) states of
  nnx.split(model, nnx.Param, ...); the same comes back, merged.
  """
  model = nnx.merge(graphdef, params, frozen)
  merge_model(model, key)
  _, params, frozen = nnx.split(model, nnx.Param, ...)
  return (nnx.as_pure(params), nnx.as_pure(frozen),
          optim.reset_poet_state(opt_state))


def merge_if_due(graphdef, params, frozen, opt_state, step, merge_every: int,
                 key):
  """merge_states after step `step` when step % merge_every == 0, else no-op.

  A lax.cond: no host round trip, one compiled step for both cases.
  """
  def do(args):
    return merge_states(graphdef, *args,
                        merge_key(key, step // merge_every))
  return jax.lax.cond(jnp.asarray(step) % merge_every == 0, do,
                      lambda args: args, (params, frozen, opt_state))
