"""The 'fast' path of one layer cut into its pieces, each timed alone.

The same operations XLA runs inside the layer (spo's block layout, the
permutation gathers, the W0 products of the forward and of the input
gradient, block products of the forward, the input gradient and the
generator gradient, the maps with their gradient); the sum of the pieces is
compared with the whole layer. Timed alone, pieces do not overlap, so this
attributes time where a trace of the fused program cannot.
"""
import jax
import jax.numpy as jnp

from poet_jax import orthogonal
from poet_jax import spo
from poet_jax.bench.common import Sizes, interleaved, log
from poet_jax.bench.layer import _layer_call, make_layer


def _pieces(m: int, n: int, tokens: int, b: int):
  """(name, counts as, function, arguments, times per fwd+bwd), and x, dy."""
  keys = iter(jax.random.split(jax.random.key(0), 16))
  normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)
  x, dy, w0 = normal(tokens, m), normal(tokens, n), normal(m, n)
  perm_in = spo.draw_permutation(next(keys), m)
  perm_out = spo.draw_permutation(next(keys), n)
  q = {side: 0.01 * normal(size // b, orthogonal.num_generator_params(b))
       for side, size in (('in', m), ('out', n))}
  g = {side: orthogonal.orthogonal_blocks(q[side], b) for side in q}
  blocks = {side: normal(size // b, tokens, b) for side, size in
            (('in', m), ('out', n))}
  maps = lambda q: orthogonal.orthogonal_blocks(q, b)
  pieces = [
      ('W0 product, forward', 'W0 products', jnp.matmul, (x, w0), 1),
      ('W0 product, input gradient', 'W0 products',
       lambda d, w: d @ w.T, (dy, w0), 1),
  ]
  for side in ('in', 'out'):
    xk, gk = blocks[side], g[side]
    pieces += [
        (f'{side} blocks, forward and input gradient', 'block products',
         jnp.matmul, (xk, gk), 2),
        (f'{side} blocks, generator gradient', 'block products',
         lambda a, c: jnp.einsum('knb,knc->kbc', a, c), (xk, xk), 1),
        (f'{side} maps, forward + backward', 'Cayley–Neumann maps',
         lambda q: jax.vjp(maps, q)[1](maps(q)), (q[side],), 1),
    ]
  for side, a, perm in (('in', x, perm_in), ('out', dy, perm_out)):
    # A gather and a layout change on the way in, the inverse on the way
    # out, forward and backward: two of each per side and direction.
    pieces += [
        (f'{side} gather', 'gathers', spo.permute, (a, perm), 2),
        (f'{side} to/from block layout', 'layout copies',
         lambda a: spo._to_blocks(a, b), (a,), 4),
    ]
  pieces.append(('in gather + layout, recomputed in the backward',
                 'gathers', lambda a, p: spo._to_blocks(spo.permute(a, p), b),
                 (x, perm_in), 1))
  return pieces, x, dy


def bench_breakdown(sizes: Sizes, reps: int) -> list[dict]:
  """The pieces of one 'fast' forward + backward of the widest layer shape.

  Returns one row per piece (ms per forward + backward, its count included,
  and its fraction of the whole layer), then a row for the whole layer.
  """
  m, n = max(sizes.layer_shapes, key=lambda s: s[0] * s[1])
  tokens, b = sizes.layer_tokens, sizes.layer_block
  log(f'breakdown: fast path of {m}x{n}, N={tokens}, block {b}')
  pieces, x, dy = _pieces(m, n, tokens, b)
  fast = _layer_call(make_layer('fast', m, n, b))
  calls = {'whole layer': lambda i: fast(x, dy)}
  for name, _, fn, args, _ in pieces:
    calls[name] = lambda i, f=jax.jit(fn), a=args: f(*a)
  t = interleaved(calls, reps)
  whole = t['whole layer']['median_s']
  rows = []
  for name, group, _, _, times in pieces:
    seconds = t[name]['median_s'] * times
    rows.append({'section': 'breakdown', 'shape': [m, n], 'tokens': tokens,
                 'block': b, 'piece': name, 'group': group, 'times': times,
                 'ms': 1e3 * seconds, 'fraction_of_whole': seconds / whole})
  total = sum(r['ms'] for r in rows) / 1e3
  rows.append({'section': 'breakdown', 'shape': [m, n], 'tokens': tokens,
               'block': b, 'piece': 'whole layer (fused, measured)',
               'group': 'whole', 'times': 1, 'ms': 1e3 * whole,
               'fraction_of_whole': 1.0,
               'sum_of_pieces_ms': 1e3 * total})
  return rows
