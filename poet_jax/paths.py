"""Which compute path a POET layer takes: FLOP and memory counts per path.

Pure functions of the layer's shape and the tokens of a call (spec section
4's cost table), and the choices `compute='auto'` makes for a model's layers.
"""
from flax import nnx


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


def compute_choices(module: nnx.Module, tokens: int) -> list[dict]:
  """The path every POETLinear of `module` takes on calls of `tokens` rows.

  One entry per layer (a stack of scanned layers counts once), with its
  shape and the FLOPs of both candidate paths: what 'auto' logs.
  """
  from poet_jax import layers  # pylint: disable=g-import-not-at-top
  # (imported here: layers imports this module for choose_compute)
  out = []
  for path, node in nnx.iter_graph(module):
    if isinstance(node, layers.POETLinear):
      flops = path_flops(node.variant, node.in_features, node.out_features,
                         node.in_block, node.out_block, tokens)
      out.append({
          'layer': '.'.join(str(p) for p in path),
          'shape': (node.in_features, node.out_features),
          'compute': node.resolved_compute((tokens, node.in_features)),
          'fast_flops': flops['fast'], 'materialize_flops':
              flops['materialize'], 'dense_flops': flops['dense']})
  return out


def describe_choices(module: nnx.Module, tokens: int) -> str:
  """compute_choices as lines for a log."""
  lines = [f'POET compute paths for {tokens} tokens per call:']
  for c in compute_choices(module, tokens):
    lines.append(
        f"  {c['layer']} {c['shape'][0]}x{c['shape'][1]}: {c['compute']} "
        f"(FLOPs vs dense: fast {c['fast_flops'] / c['dense_flops']:.2f}, "
        f"materialize {c['materialize_flops'] / c['dense_flops']:.2f})")
  return '\n'.join(lines)
