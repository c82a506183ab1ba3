"""What the train state is, and how it is built.

The train state is a dict of pure pytrees:
  params     trainable variables (nnx.Param, POET generators included)
  frozen     everything else of the model (W0, permutations)
  opt_state  the optax state
  step       optimizer steps taken (also the data position)
  nonfinite  steps whose update was dropped for a non-finite loss/gradient
  nonfinite_step  the last such step (0: none)
Its shardings are sharding.state_shardings (applied in steps.compile_steps).
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from poet_jax import optim
from poet_jax.models import llama as model_lib
from poet_jax.poetize import poetize
from poet_jax.train import config as config_lib
from poet_jax.train import optimizers


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def model_config(c, vocab_size: int) -> model_lib.LlamaConfig:
  """The Llama of config c: the same dense model for every method."""
  return model_lib.LlamaConfig(
      vocab_size=vocab_size, dim=c.model.dim, num_layers=c.model.num_layers,
      num_heads=c.model.num_heads, ffn_dim=config_lib.ffn_dim(c),
      num_kv_heads=c.model.num_kv_heads, norm_eps=c.model.norm_eps,
      rope_theta=c.model.rope_theta, tie_embeddings=c.model.tie_embeddings,
      dtype=DTYPES[c.model.dtype], remat=c.model.remat,
      remat_policy=c.model.remat_policy,
      loss_chunk_tokens=c.model.loss_chunk_tokens)


def attention_args(c) -> tuple:
  """(compute dtype, head dimension) of config c's model: the arguments of
  attention.implementation and attention.describe."""
  return DTYPES[c.model.dtype], c.model.dim // c.model.num_heads


def poet_options(c) -> dict:
  """poetize's arguments for a POET run of config c (its poet.* keys).

  The seven block linears of every layer, with W0 drawn by poet.init (the
  papers' pretraining, spec section 6); the output head and the
  embeddings stay dense (section 7).
  """
  return dict(
      target=('blocks.*',), w0='redraw', init=c.poet.init,
      variant=c.poet.variant, block_size=config_lib.block_size(c),
      compute=c.poet.compute, memory_budget=c.poet.auto_memory_budget,
      # 'int8' passes through: POET-XQ's 8-bit W0 (poet_jax/quant.py).
      w0_dtype=DTYPES.get(c.model.w0_dtype, c.model.w0_dtype),
      w0_group_size=c.model.w0_group_size)


def build_model(c, vocab_size: int) -> model_lib.Llama:
  """The run's model: the dense Llama, poetized when optimizer.name=poet.

  AdamW, GaLore, Muon and POET runs build the same Llama from the same
  seed (so the same embeddings, norms and head); a POET run then replaces
  its block linears by POET layers, drawing from the same key stream.
  """
  rngs = nnx.Rngs(params=c.seed)
  model = model_lib.Llama(model_config(c, vocab_size), rngs=rngs)
  if c.optimizer.name == 'poet':
    poetize(model, **poet_options(c), rngs=rngs)
  return model


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the step functions close over; all static."""
  graphdef: Any
  tx: optax.GradientTransformation
  lr: optax.Schedule
  config: Any


def _split(model):
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.as_pure(params), nnx.as_pure(frozen)


def dense_params_as(params, dtype):
  """params with every leaf AdamW trains (all but POET's orthogonal blocks,
  optim.is_poet_path) stored as `dtype` (model.param_dtype)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.astype(dtype) if jnp.issubdtype(
          x.dtype, jnp.floating) and not optim.is_poet_path(path) else x,
      params)


def init_state(c, vocab_size: int) -> tuple[Setup, dict]:
  """A fresh state (on the default device) and what the step needs."""
  graphdef, params, frozen = _split(build_model(c, vocab_size))
  params = dense_params_as(params, DTYPES[c.model.param_dtype])
  tx = optimizers.optimizer(c)
  state = {'params': params, 'frozen': frozen, 'opt_state': tx.init(params),
           'step': jnp.zeros([], jnp.int32),
           'nonfinite': jnp.zeros([], jnp.int32),
           'nonfinite_step': jnp.zeros([], jnp.int32)}
  return Setup(graphdef, tx, optimizers.schedule(c, c.train.lr), c), state


def abstract_state(c, vocab_size: int) -> tuple[Setup, Any]:
  """The state's shapes and dtypes, with nothing allocated."""
  box = {}

  def build():
    setup, state = init_state(c, vocab_size)
    box['setup'] = setup
    return state

  shapes = jax.eval_shape(build)
  return box['setup'], shapes


def count_params(state) -> tuple[int, int]:
  """(trainable, frozen) numbers of parameters; frozen counts W0 only.

  A POET layer's orthogonal blocks (..., k, b, b) count as what the
  optimizer trains: their generators, b(b-1)/2 per block (spec section 2).
  """
  def trainable(path, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return 0
    shape = np.shape(x)
    if str(getattr(path[-1], 'key', '')) in optim.BLOCK_NAMES:
      b = shape[-1]
      return int(np.prod(shape[:-2])) * b * (b - 1) // 2
    return int(np.prod(shape))
  params = jax.tree_util.tree_leaves_with_path(state['params'])
  # W0 by name: an 8-bit W0 is uint8 codes plus float scales and zero points.
  w0 = jax.tree_util.tree_leaves_with_path(state['frozen'])
  frozen = sum(int(np.prod(np.shape(x))) for p, x in w0
               if str(getattr(p[-1], 'key', '')) == 'w0')
  return sum(trainable(p, x) for p, x in params), frozen
