"""What one step computes: the train step (micro-batch accumulation, the
non-finite guard, the merge), the evaluation step, the POET diagnostics, and
their compilation with explicit shardings.

A train step is two jax.jit programs, each donating the state: the update,
and the merge, which runs when the optimizer's update counter says so
(merge.merge_if_due) and moves nothing otherwise.
"""
import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from poet_jax import generator_map
from poet_jax import merge as merge_lib
from poet_jax import platform
from poet_jax import reparam
from poet_jax.models import llama as model_lib
from poet_jax.train import metrics as metrics_lib
from poet_jax.train import config as config_lib
from poet_jax.train import optimizers
from poet_jax.train import sharding as sharding_lib
from poet_jax.train import state as train_state


def _where(pred, new, old):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def _micro_batches(batch: jax.Array, k: int) -> jax.Array:
  """(B, T+1) -> (k, B/k, T+1); micro-batch j holds rows j, j+k, j+2k, ...

  Strided rows keep every micro-batch split over the batch devices as the
  batch is (the row axis stays the sharded one), so nothing moves.
  """
  return batch.reshape(batch.shape[0] // k, k, -1).swapaxes(0, 1)


def _accumulate(fn, params, batch: jax.Array, k: int):
  """The sum of fn(params, micro_batch) over k micro-batches (float32).

  A lax.scan: the compiled step keeps one micro-batch's activations.
  """
  if k == 1:
    return fn(params, batch)
  micro = _micro_batches(batch, k)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                       jax.eval_shape(fn, params, micro[0]))

  def body(total, tokens):
    out = jax.tree.map(lambda x: x.astype(jnp.float32), fn(params, tokens))
    return jax.tree.map(jnp.add, total, out), None

  return jax.lax.scan(body, zeros, micro)[0]


def update_step(setup: train_state.Setup, state: dict, batch: jax.Array):
  """One optimizer step over train.grad_accum_steps micro-batches, without
  the merge (merge_step): after the update that makes reparameterize's
  counter a multiple of poet.merge_every, the optimizer has zeroed its
  generators and POET state, and the model is still to merge."""
  c = setup.config

  def loss_fn(params, tokens):
    model = nnx.merge(setup.graphdef, params, state['frozen'])
    return model_lib.next_token_loss(model, tokens)

  k = c.train.grad_accum_steps
  loss, grads = _accumulate(jax.value_and_grad(loss_fn), state['params'],
                            batch, k)
  if k > 1:
    # Equal micro-batches: the mean of their mean losses and gradients is
    # the whole batch's, to float32 rounding.
    loss, grads = jax.tree.map(lambda x: x / k, (loss, grads))
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = setup.tx.update(grads, state['opt_state'],
                                       state['params'])
  params = optax.apply_updates(state['params'], updates)
  # A non-finite loss or gradient drops the whole update; detected here, on
  # device, and reported with the next logged metrics.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if c.optimizer.name == 'poet':
    # Logged: the norm the clip sees (and the reference logs), of the
    # generators' gradient, not of the blocks'. Its VJP is the update's
    # own: XLA computes it once (the compiled step has no extra loop).
    grad_norm = optax.tree.norm(generator_map.generator_gradients(
        grads, reparam.generators(state['opt_state']), state['params'],
        c.poet.neumann_terms, c.poet.orthogonal_map)[0])
  params = _where(finite, params, state['params'])
  opt_state = _where(finite, opt_state, state['opt_state'])
  step = state['step'] + 1
  new_state = {'params': params, 'frozen': state['frozen'],
               'opt_state': opt_state, 'step': step,
               'nonfinite': state['nonfinite'] + (~finite).astype(jnp.int32),
               'nonfinite_step': jnp.where(finite, state['nonfinite_step'],
                                           step)}
  metrics = {'train_loss': loss, 'grad_norm': grad_norm, 'finite': finite,
             **optimizers.applied_rates(
                 c, state['step'] - state['nonfinite'])}
  return new_state, metrics


def merge_step(setup: train_state.Setup, state: dict) -> dict:
  """The model's merge after update_step, when that update was a merging
  one (merge.merge_if_due; a dropped update, state['nonfinite_step'] ==
  state['step'], is not). Reads and writes no W0 otherwise. The state of
  a method without merges comes back as it is."""
  c = setup.config
  if c.optimizer.name != 'poet':
    return state
  params, frozen = merge_lib.merge_if_due(
      setup.graphdef, state['params'], state['frozen'], state['opt_state'],
      jax.random.key(c.seed), applied=state['nonfinite_step'] != state['step'])
  return {**state, 'params': params, 'frozen': frozen}


def train_step(setup: train_state.Setup, state: dict, batch: jax.Array):
  """update_step then merge_step, in one function (the trainer runs them
  as two compiled steps, CompiledSteps.train)."""
  state, metrics = update_step(setup, state, batch)
  return merge_step(setup, state), metrics


def eval_step(setup: train_state.Setup, state: dict, batch: jax.Array):
  """Summed token loss and token count of one evaluation batch (taken in
  train.grad_accum_steps micro-batches, like the train step)."""
  model = nnx.merge(setup.graphdef, state['params'], state['frozen'])

  def summed(_, tokens):
    losses = optax.softmax_cross_entropy_with_integer_labels(
        model(tokens[:, :-1]), tokens[:, 1:])
    return losses.sum(), jnp.asarray(losses.size, jnp.float32)

  return _accumulate(summed, None, batch, setup.config.train.grad_accum_steps)


def diagnostics(setup: train_state.Setup, state: dict) -> dict:
  """metrics_lib.poet_diagnostics, and under 'layers' the per-layer
  metrics_lib.poet_layer_health behind the numerical warnings."""
  model = nnx.merge(setup.graphdef, state['params'], state['frozen'])
  generators = reparam.generators(state['opt_state'])
  return {**metrics_lib.poet_diagnostics(model, generators),
          'layers': metrics_lib.poet_layer_health(model, generators)}


def weight_diagnostics(setup: train_state.Setup, state: dict) -> dict:
  """metrics_lib.weight_diagnostics of the model (spec section 10), logged
  at evaluation steps: SVDs of every layer cost too much for every log
  step."""
  model = nnx.merge(setup.graphdef, state['params'], state['frozen'])
  return metrics_lib.weight_diagnostics(model)


@dataclasses.dataclass
class CompiledSteps:
  """The jitted steps of a run. `update` and `merge` (both donate the
  state; no merge but for POET) make one train step; `train(state, batch)`
  runs the two."""
  update: Callable
  merge: Callable | None
  eval: Callable
  diagnostics: Callable
  state_sharding: Any
  batch_sharding: Any
  weights: Callable  # weight_diagnostics

  def train(self, state, batch):
    """One train step: (new state, metrics), the merge done when due.

    Two compiled programs rather than one: the update's carries no merge
    (whose presence changed how XLA:GPU schedules, and copies, the
    optimizer state), and the merge's moves nothing when none is due.
    """
    state, metrics = self.update(state, batch)
    return (self.merge(state) if self.merge else state), metrics


def _layer_bytes(c) -> int:
  """Bytes of one transformer block's linear weights in float32: the most
  one layer's weight all-gather or gradient reduction moves."""
  d, heads = c.model.dim, c.model.num_heads
  kv = (c.model.num_kv_heads or heads) * (d // heads)
  return 4 * (2 * d * d + 2 * d * kv + 3 * d * config_lib.ffn_dim(c))


def gpu_compiler_options(c) -> dict:
  """XLA:GPU options of the steps (docs/scaling.md, "The attention core
  and XLA's options on GPUs").

  The latency-hiding scheduler overlaps the asynchronous collectives with
  compute; pipelining the all-gather, reduce-scatter and all-reduce of the
  layer scan starts the next layer's weight gathers (FSDP) and the previous
  layer's gradient reductions while this layer computes; and collectives are
  combined up to one layer's weights, as JAX's GPU performance guide
  advises, so that a layer's parameters move in one collective rather than
  one per matrix. With one device there are no collectives and only the
  scheduler acts.
  """
  pipelined = 'COLLECTIVE_PIPELINING_MODE_ON'
  layer = _layer_bytes(c)
  return {
      'xla_gpu_enable_latency_hiding_scheduler': True,
      'xla_gpu_pipeline_all_gather': pipelined,
      'xla_gpu_pipeline_reduce_scatter': pipelined,
      'xla_gpu_pipeline_all_reduce': pipelined,
      'xla_gpu_all_gather_combine_threshold_bytes': layer,
      'xla_gpu_reduce_scatter_combine_threshold_bytes': layer,
      'xla_gpu_all_reduce_combine_threshold_bytes': layer,
  }


def user_xla_flags(env: str | None = None) -> set[str]:
  """Names of the options set in XLA_FLAGS (`env`, or the environment's):
  '--name=value' or '--name' gives 'name'."""
  env = os.environ.get('XLA_FLAGS', '') if env is None else env
  return {token[2:].split('=', 1)[0] for token in env.split()
          if token.startswith('--')}


def compiler_options(c) -> dict:
  """XLA options of the steps, for the platform compiled for, less any that
  the user's XLA_FLAGS sets: an option passed to jax.jit would override
  the environment's, and the user's choice wins.

  On CPU, for bf16 runs: XLA:CPU multiplies bf16 matrices by converting them
  to f32, and its loop-invariant code motion then hoists those converts out
  of the layer scan: an f32 copy of every layer's W0 at once (about 2x the
  model's bf16 weights, measured at llama_8b). That pass is turned off so
  each layer converts its own slice (accelerators multiply bf16 natively).
  On GPU: gpu_compiler_options.
  """
  backend = platform.platform()
  options = {}
  if backend == 'gpu':
    options = gpu_compiler_options(c)
  elif backend == 'cpu' and 'bfloat16' in (c.model.dtype, c.model.w0_dtype):
    options = {'xla_disable_hlo_passes': 'while-loop-invariant-code-motion'}
  user = user_xla_flags()
  return {name: value for name, value in options.items() if name not in user}


def compile_steps(setup: train_state.Setup, abstract: Any,
                  mesh) -> CompiledSteps:
  """jax.jit of every step with explicit shardings; the state is donated."""
  options = compiler_options(setup.config)
  state_sh = sharding_lib.state_shardings(mesh, abstract)
  batch_sh = sharding_lib.batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  update = jax.jit(lambda s, b: update_step(setup, s, b),
                   in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, replicated), donate_argnums=0,
                   compiler_options=options)
  merge = jax.jit(lambda s: merge_step(setup, s), in_shardings=(state_sh,),
                  out_shardings=state_sh, donate_argnums=0,
                  compiler_options=options) if (
                      setup.config.optimizer.name == 'poet') else None
  evaluate = jax.jit(lambda s, b: eval_step(setup, s, b),
                     in_shardings=(state_sh, batch_sh),
                     out_shardings=replicated)
  diag = jax.jit(lambda s: diagnostics(setup, s), in_shardings=(state_sh,),
                 out_shardings=replicated)
  weights = jax.jit(lambda s: weight_diagnostics(setup, s),
                    in_shardings=(state_sh,), out_shardings=replicated)
  return CompiledSteps(update, merge, evaluate, diag, state_sh, batch_sh,
                       weights)


def abstract_batch(c, steps: CompiledSteps) -> jax.ShapeDtypeStruct:
  """The (batch_size, seq_len + 1) int32 token batch the steps take, laid
  out as they take it; nothing allocated."""
  return jax.ShapeDtypeStruct((c.train.batch_size, c.train.seq_len + 1),
                              jnp.int32, sharding=steps.batch_sharding)


def _abstract(abstract: Any, steps: CompiledSteps):
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, steps.state_sharding)


def trace_train(c, steps: CompiledSteps, abstract: Any) -> jax.stages.Traced:
  """The update step (the train step less its merge) traced on the abstract
  state (train_state.abstract_state) and batch, for a dry run: `.jaxpr` for
  FLOPs, `.lower().compile()` for memory, without allocating the state."""
  return steps.update.trace(_abstract(abstract, steps),
                            abstract_batch(c, steps))


def trace_merge(steps: CompiledSteps, abstract: Any) -> jax.stages.Traced:
  """The merge step traced on the abstract state, as trace_train."""
  return steps.merge.trace(_abstract(abstract, steps))


def compile_ahead(c, steps: CompiledSteps, state):
  """Compiles the update, merge, eval and diagnostics steps now (jax.jit
  keeps the executables), so that the clocks of tokens/s and of the time
  left, started after this, leave compilation out. Returns the compiled
  update step."""
  batch = abstract_batch(c, steps)
  update = steps.update.lower(state, batch).compile()
  steps.eval.lower(state, batch).compile()
  steps.weights.lower(state).compile()
  if c.optimizer.name == 'poet':
    steps.merge.lower(state).compile()
    steps.diagnostics.lower(state).compile()
  return update
