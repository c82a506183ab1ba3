"""The machine's matmul rate: the FLOP rate a step is measured against."""
import jax
import jax.numpy as jnp

from poet_jax.bench.common import Sizes, interleaved


def bench_matmul(sizes: Sizes, reps: int) -> list[dict]:
  """FLOP rate of a large float32 matmul: the machine's limit for jax."""
  n = sizes.matmul
  keys = jax.random.split(jax.random.key(0), 4)
  inputs = [jax.random.normal(k, (n, n), jnp.float32) for k in keys]
  matmul = jax.jit(jnp.matmul)
  t = interleaved({'matmul': lambda i: matmul(inputs[i % 4],
                                              inputs[(i + 1) % 4])},
                  max(3, reps // 3))['matmul']
  flops = 2 * n ** 3
  return [{'section': 'matmul', 'n': n, 'flops': flops, **t,
           'gflops_per_s': flops / t['median_s'] / 1e9}]
