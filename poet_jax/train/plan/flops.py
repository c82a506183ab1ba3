"""FLOPs of the matrix products a traced program runs.

XLA's cost analysis counts a loop's body once, so it undercounts a model
whose layers run in a scan; this count walks the jaxpr instead.
"""
import math

from jax.extend import core as jax_core


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
  body once, so it undercounts a model whose layers run in a scan); a cond
  counts its costliest branch; a while loop's body once (its trip count is
  not static). Elementwise work is not counted: in the train
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
