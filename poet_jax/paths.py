"""A POET layer's compute paths: their forwards, costs and the 'auto' choice.

FORWARD holds each path's forward with what it keeps for the backward (its
remat policy); path_flops and path_saved_elements are pure functions of the
layer's shape and the tokens of a call (spec section 4's cost table), and
choose_compute is the choice `compute='auto'` makes from them
(layers.compute_choices reports it for a model's layers).
"""
import jax
from jax.ad_checkpoint import checkpoint_name

from poet_jax import quant
from poet_jax import spo


def path_flops(variant: str, in_features: int, out_features: int,
               in_block: int, out_block: int, tokens: int) -> dict:
  """Forward + backward FLOPs of one layer call, per compute path.

  The spec's table (section 4), multiply-adds counted as 2: with m x n the
  kernel and N tokens, a dense layer costs 6Nmn; W0 takes no gradient, so
  the input-centric path does two m x n products (4Nmn) plus six block
  products per side; the materialized path does the three dense products
  plus building the kernel and its gradient, six block products on m x n.
  'mem' repeats the forward (2Nmn and one block product per side).
  'maps' is the Cayley–Neumann maps, forward and VJP (six b x b products
  per block): run by `poet_jax.reparameterize` once per optimizer update,
  not by the layer, the same for every path, so left out of the paths'
  figures and of the choice, but not free at small N.
  """
  m, n, big = in_features, out_features, tokens
  if variant == 'block':
    side = 2 * (in_block * m + out_block * n)    # one block product per side
    build = 2 * m * n * (in_block + out_block)   # Diag(G_in) W0 Diag(G_out)
    maps = 12 * (in_block ** 2 * m + out_block ** 2 * n)
  else:                                          # 'full': index sets
    side = 2 * (in_block ** 2 + out_block ** 2)
    build = 2 * (in_block ** 2 * n + m * out_block ** 2)
    maps = 12 * (in_block ** 3 + out_block ** 3)
  return {
      'dense': 6 * big * m * n,
      'fast': 4 * big * m * n + 3 * big * side,
      'mem': 6 * big * m * n + 4 * big * side,
      'materialize': 6 * big * m * n + 3 * build,
      'maps': maps,
  }


def path_saved_elements(in_features: int, out_features: int,
                        tokens: int) -> dict:
  """Elements a path keeps for its backward beyond the layer's input.

  'fast' keeps the W0 product's output (tokens x out), 'materialize' the
  dense kernel (in x out), 'mem' nothing: it recomputes the forward.
  """
  return {'fast': tokens * out_features,
          'materialize': in_features * out_features, 'mem': 0}


def choose_compute(variant: str, in_features: int, out_features: int,
                   in_block: int, out_block: int, tokens: int,
                   memory_budget: int = 0) -> str:
  """'auto': the cheaper of 'fast' and 'materialize' by path_flops.

  With memory_budget > 0 (elements a layer may keep for its backward, see
  path_saved_elements), a path over the budget is passed over; 'mem', which
  keeps nothing, is the fallback.
  """
  flops = path_flops(variant, in_features, out_features, in_block, out_block,
                     tokens)
  saved = path_saved_elements(in_features, out_features, tokens)
  fits = [p for p in ('fast', 'materialize')
          if not memory_budget or saved[p] <= memory_budget]
  return min(fits, key=flops.get) if fits else 'mem'


# Name of W0 as the forward multiplies it (cast or dequantized): never kept
# for the backward, which recomputes it from the stored W0.
DENSE_W0 = 'poet_dense_w0'


def _on_dense_w0(forward):
  """forward(x, w0, ...) taking W0 as stored; made dense in x's dtype."""
  def fn(x, w0, *rest):
    return forward(x, checkpoint_name(quant.dense(w0, x.dtype), DENSE_W0),
                   *rest)
  return fn


def _checkpointed(forward, policy):
  return jax.checkpoint(_on_dense_w0(forward), policy=policy)


_policies = jax.checkpoint_policies
# 'fast' keeps only the W0 product's output for the backward; the gathered
# input it also needs (for the input blocks' gradient) is one cheap gather of
# x away, and x is kept anyway, often shared by several layers (q, k, v).
_KEEP_H = _policies.save_only_these_names(spo.SAVED_ACTIVATION)
_KEEP_NOTHING = _policies.nothing_saveable
_KEEP_ALL_BUT_W0 = _policies.save_anything_except_these_names(DENSE_W0)

# The forward of each (variant, compute path), as a POETLinear calls it:
# fn(x, w0 as stored, g_in, g_out, in_place, out_place).
FORWARD = {
    ('block', 'fast'): _checkpointed(spo.block_forward, _KEEP_H),
    ('block', 'mem'): _checkpointed(spo.block_forward, _KEEP_NOTHING),
    ('block', 'materialize'): _checkpointed(spo.block_materialized_forward,
                                            _KEEP_ALL_BUT_W0),
    ('full', 'fast'): _checkpointed(spo.full_forward, _KEEP_ALL_BUT_W0),
    ('full', 'mem'): _checkpointed(spo.full_forward, _KEEP_NOTHING),
    ('full', 'materialize'): _checkpointed(spo.full_materialized_forward,
                                           _KEEP_ALL_BUT_W0),
}
