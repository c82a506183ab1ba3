"""One POET layer's compute paths against a dense layer, forward + backward."""
import os

import jax
import jax.numpy as jnp
from flax import nnx

from poet_jax import layers
from poet_jax import orthogonal
from poet_jax import paths
from poet_jax.bench.common import Sizes, interleaved, log

LAYER_PATHS = ('dense', 'materialize', 'fast', 'mem', 'auto')


def _layer_call(layer: nnx.Module):
  """jitted (params, x, dy) -> (y, gradients of params and x)."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  @jax.jit
  def run(params, rest, x, dy):
    def apply(params, x):
      return nnx.merge(graphdef, params, rest)(x)
    y, vjp = jax.vjp(apply, params, x)
    return y, vjp(dy)

  return lambda x, dy: run(params, rest, x, dy)


def make_layer(path: str, m: int, n: int, block: int, seed: int = 0):
  """An m -> n layer: `nnx.Linear` for 'dense', else a POETLinear on `path`."""
  rngs = nnx.Rngs(seed)
  if path == 'dense':
    return nnx.Linear(m, n, use_bias=False, rngs=rngs)
  layer = layers.POETLinear(m, n, block_size=block, compute=path, rngs=rngs)
  # Non-trivial blocks, as during training (the speed does not depend on it).
  k1, k2 = jax.random.split(jax.random.key(seed + 1))
  for key, blocks in ((k1, layer.in_blocks), (k2, layer.out_blocks)):
    u = 0.01 * jax.random.normal(key, blocks.shape[:-2] + (
        orthogonal.num_generator_params(block),))
    blocks[...] = orthogonal.orthogonal_blocks(u, block)
  return layer


def bench_layer(sizes: Sizes, reps: int, profile_dir: str = '') -> list[dict]:
  """Layer paths interleaved; with profile_dir, then a trace of 3 calls each.

  The traces (jax.profiler, one directory per shape and path) show the time
  of every XLA op: open them with xprof or TensorBoard's profile plugin.
  """
  rows = []
  tokens, block = sizes.layer_tokens, sizes.layer_block
  for m, n in sizes.layer_shapes:
    log(f'layer {m}x{n}, N={tokens}, block {block}')
    keys = jax.random.split(jax.random.key(m * n), 8)
    xs = [jax.random.normal(k, (tokens, m), jnp.float32) for k in keys[:4]]
    dys = [jax.random.normal(k, (tokens, n), jnp.float32) for k in keys[4:]]
    calls = {}
    for path in LAYER_PATHS:
      call = _layer_call(make_layer(path, m, n, block))
      calls[path] = lambda i, call=call: call(xs[i % 4], dys[i % 4])
    t = interleaved(calls, reps)
    if profile_dir:
      for path, call in calls.items():
        with jax.profiler.trace(os.path.join(profile_dir, f'{m}x{n}-{path}')):
          for i in range(3):
            jax.block_until_ready(call(i))
    flops = paths.path_flops('block', m, n, block, block, tokens)
    auto = paths.choose_compute('block', m, n, block, block, tokens)
    dense = t['dense']['median_s']
    best = min(t['fast']['median_s'], t['materialize']['median_s'])
    for path in LAYER_PATHS:
      row = {'section': 'layer', 'shape': [m, n], 'tokens': tokens,
             'block': block, 'path': path, **t[path],
             'ms': 1e3 * t[path]['median_s'],
             'ratio_to_dense': t[path]['median_s'] / dense,
             # The FLOP floor, the orthogonal maps included.
             'flop_ratio_to_dense': 1.0 if path == 'dense' else
                 (flops[auto if path == 'auto' else path] + flops['maps']) /
                 flops['dense']}
      if path == 'auto':
        row['auto_choice'] = auto
        row['ratio_to_best_of_fast_materialize'] = t[path]['median_s'] / best
      if path == 'mem':
        row['ratio_to_fast'] = t[path]['median_s'] / t['fast']['median_s']
      rows.append(row)
      log(f'  {path:12s} {row["ms"]:9.2f} ms  {row["ratio_to_dense"]:.2f}x '
          'dense')
  return rows
