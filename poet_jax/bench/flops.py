"""FLOPs: the matrix products a program runs, and the machine's matmul rate."""
import math

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from poet_jax.bench.common import Sizes, interleaved


def _subjaxprs(value):
  """The jaxprs inside one equation parameter (a jaxpr, or a tuple of)."""
  if isinstance(value, jax_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jax_core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _subjaxprs(v)]
  return []


def matmul_flops(jaxpr) -> float:
  """FLOPs of the matrix products a jaxpr runs: 2 x output size x contraction.

  A scan's body counts `length` times (XLA's cost analysis counts a loop
  body once, so it undercounts a model whose layers run in a scan; issue
  15); a cond counts its costliest branch; a while loop's body once (its
  trip count is not static). Elementwise work is not counted: in the train
  steps benchmarked here it is a few percent of the products.

  Args:
    jaxpr: a Jaxpr or ClosedJaxpr, e.g. `jax.jit(f).trace(*args).jaxpr`.
  Returns:
    float, FLOPs per call (multiply and add counted separately).
  """
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs[d] for d in contract)
      continue
    inner = [matmul_flops(j) for v in eqn.params.values()
             for j in _subjaxprs(v)]
    if eqn.primitive.name == 'cond':
      total += max(inner, default=0.0)
    else:
      times = eqn.params['length'] if eqn.primitive.name == 'scan' else 1
      total += times * sum(inner)
  return total


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
