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

from poet_jax import config as config_lib
from poet_jax import model as model_lib
from poet_jax import optimizers


def model_config(c, vocab_size: int) -> model_lib.LlamaConfig:
  dtypes = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
  return model_lib.LlamaConfig(
      vocab_size=vocab_size, dim=c.model.dim, num_layers=c.model.num_layers,
      num_heads=c.model.num_heads, ffn_dim=config_lib.ffn_dim(c),
      dtype=dtypes[c.model.dtype], remat=c.model.remat,
      loss_chunk_tokens=c.model.loss_chunk_tokens,
      linear='poet' if c.optimizer.name == 'poet' else 'dense',
      poet=model_lib.POETConfig(
          variant=c.poet.variant, block_size=config_lib.block_size(c),
          compute=c.poet.compute, init=c.poet.init,
          neumann_terms=c.poet.neumann_terms,
          orthogonal_map=c.poet.orthogonal_map,
          # 'int8' passes through: POET-XQ's 8-bit W0 (poet_jax/quant.py).
          w0_dtype=dtypes.get(c.model.w0_dtype, c.model.w0_dtype),
          w0_group_size=c.model.w0_group_size,
          memory_budget=c.poet.auto_memory_budget))


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


def init_state(c, vocab_size: int) -> tuple[Setup, dict]:
  """A fresh state (on the default device) and what the step needs."""
  model = model_lib.Llama(model_config(c, vocab_size),
                          rngs=nnx.Rngs(params=c.seed))
  graphdef, params, frozen = _split(model)
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
  """(trainable, frozen) numbers of parameters; frozen counts W0 only."""
  size = lambda tree: sum(int(np.prod(np.shape(x))) for x in
                          jax.tree.leaves(tree)
                          if jnp.issubdtype(x.dtype, jnp.floating))
  # W0 by name: an 8-bit W0 is uint8 codes plus float scales and zero points.
  w0 = jax.tree_util.tree_leaves_with_path(state['frozen'])
  frozen = sum(int(np.prod(np.shape(x))) for p, x in w0
               if str(getattr(p[-1], 'key', '')) == 'w0')
  return size(state['params']), frozen
