"""The transformer blocks of a whole model, forward and forward + backward.

This measures the blocks' backward against its forward and the blocks'
FLOP rate against the machine's matmul rate: here the model's features
(embedding, every block in the model's own scan, the final norm) of the
reference's batch, with a cotangent on the output; the gradients are of
every parameter and the FLOPs the jaxpr's matrix products (matmul_flops), so
the embedding and the norm add time but no FLOPs.
"""
import jax
import numpy as np
from flax import nnx

from poet_jax.bench.common import Sizes, interleaved, log
from poet_jax.bench.steps import step_config
from poet_jax.models import llama as model_lib
from poet_jax.train import state as train_state
from poet_jax.train.plan.flops import matmul_flops


def _calls(c, batch):
  """Jitted forward and forward + backward of the features, and their FLOPs."""
  model = model_lib.Llama(train_state.model_config(c, c.model.vocab_size),
                          rngs=nnx.Rngs(params=0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(0)
  tokens = [rng.integers(0, c.model.vocab_size, batch, dtype=np.int32)
            for _ in range(4)]
  dys = [rng.standard_normal((*batch, c.model.dim), np.float32)
         for _ in range(4)]

  def features(params, tokens):
    return nnx.merge(graphdef, params, rest).features(tokens)

  def both(params, tokens, dy):
    y, vjp = jax.vjp(lambda p: features(p, tokens), params)
    return y, vjp(dy)

  fwd, fwd_bwd = jax.jit(features), jax.jit(both)
  flops = {'forward': matmul_flops(fwd.trace(params, tokens[0]).jaxpr),
           'forward + backward': matmul_flops(
               fwd_bwd.trace(params, tokens[0], dys[0]).jaxpr)}
  calls = {'forward': lambda i: fwd(params, tokens[i % 4]),
           'forward + backward': lambda i: fwd_bwd(params, tokens[i % 4],
                                                   dys[i % 4])}
  return calls, flops


def bench_blocks(sizes: Sizes, reps: int, methods=('adamw',),
                 matmul_rate=None) -> list[dict]:
  """Rows of ms and GFLOP/s of the blocks, per method (dense for AdamW)."""
  rows = []
  size, batch = sizes.step_size, sizes.ref_batch
  for method, compute in methods:
    c = step_config(size, method, compute, batch)
    name = f'{method}-{compute}' if method == 'poet' else method
    log(f'blocks: {name} ({size}, batch {batch[0]} x {batch[1]})')
    calls, flops = _calls(c, batch)
    t = interleaved(calls, reps, warmup=1)
    forward = t['forward']['median_s']
    for part, timing in t.items():
      row = {'section': 'blocks', 'model': size, 'batch': list(batch),
             'method': name, 'layers': c.model.num_layers, 'part': part,
             **timing, 'ms': 1e3 * timing['median_s'], 'flops': flops[part],
             'gflops_per_s': flops[part] / timing['median_s'] / 1e9,
             'ratio_to_forward': timing['median_s'] / forward}
      if matmul_rate:
        row['fraction_of_matmul_rate'] = row['gflops_per_s'] / matmul_rate
      rows.append(row)
  return rows
