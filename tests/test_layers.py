import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from poet_jax import layers
from poet_jax import orthogonal
from poet_jax import paths
from poet_jax import spo
import tolerance

SHAPES = {'block': (16, 24, 8), 'full': (16, 24, 0.5)}
# Rounded operations along one output of x @ (G_in W0 G_out), in any of
# the compute paths' orders: the blocks' sums (8 in; 8, or 12 = 0.5 x 24 for
# full, out) and W0's (16).
FORWARD = 8 + 16 + 12
# ...and of a gradient of sum(sin(y)) over the 2 x 5 rows: back through the
# same chain and summed over the rows, plus sin and cos.
BACKWARD = 2 * FORWARD + 10 + 2
BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)
EPS64 = float(np.finfo(np.float64).eps)


def set_generators(layer, u_in, u_out, method='neumann'):
  """The layer's blocks as the orthogonal map of the given generators."""
  for blocks, u, size in ((layer.in_blocks, u_in, layer.in_block),
                          (layer.out_blocks, u_out, layer.out_block)):
    blocks[...] = orthogonal.orthogonal_blocks(u, size, method=method).astype(
        blocks.dtype)


def make(variant='block', compute='fast', seed=0, scale=0.1,
         method='neumann', **kw):
  m, n, b = SHAPES[variant]
  layer = layers.POETLinear(m, n, block_size=b, variant=variant,
                            compute=compute, rngs=nnx.Rngs(seed), **kw)
  if scale:
    k1, k2 = jax.random.split(jax.random.key(seed + 100))
    size = lambda blocks: (blocks.shape[0], orthogonal.num_generator_params(
        blocks.shape[-1]))
    set_generators(
        layer, scale * jax.random.normal(k1, size(layer.in_blocks)),
        scale * jax.random.normal(k2, size(layer.out_blocks)), method)
  return layer


def is_identity(blocks):
  return bool(jnp.all(blocks == jnp.eye(blocks.shape[-1])))


def inputs(m=16, seed=1):
  return jax.random.normal(jax.random.key(seed), (2, 5, m), jnp.float32)


@pytest.mark.parametrize('variant', ['block', 'full'])
@pytest.mark.parametrize('compute', layers.COMPUTES)
def test_identity_at_creation(variant, compute):
  layer = make(variant, compute, scale=0.0)
  x = inputs()
  assert is_identity(layer.in_blocks[...])
  assert is_identity(layer.out_blocks[...])
  tolerance.assert_close(layer(x), x @ layer.base_weight(), FORWARD)
  np.testing.assert_array_equal(layer.effective_weight(), layer.base_weight())


def test_w0_is_frozen_and_orthogonal_blocks_are_params():
  layer = make()
  assert isinstance(layer.w0, layers.FrozenWeight)
  assert not isinstance(layer.w0, nnx.Param)
  assert isinstance(layer.in_blocks, layers.OrthogonalBlocks)
  assert isinstance(layer.in_blocks, nnx.Param)
  params = nnx.state(layer, nnx.Param)
  assert set(params.keys()) == set(layers.BLOCK_NAMES)
  m, n, b = SHAPES['block']
  assert layer.in_blocks.shape == (m // b, b, b)
  assert layer.out_blocks.shape == (n // b, b, b)
  assert not hasattr(layer, 'neumann_terms')  # the map is the optimizer's


@pytest.mark.parametrize('variant', ['block', 'full'])
@pytest.mark.parametrize('compute', layers.COMPUTES)
def test_forward_equals_effective_weight(variant, compute):
  layer = make(variant, compute)
  x = inputs()
  tolerance.assert_close(layer(x), x @ layer.effective_weight(), FORWARD)


def _loss_and_grads(layer, x):
  def loss(layer):
    return jnp.sum(jnp.sin(layer(x)))
  return nnx.value_and_grad(loss)(layer)


@pytest.mark.parametrize('variant', ['block', 'full'])
def test_compute_modes_agree_on_outputs_and_gradients(variant):
  x = inputs()
  ref_loss, ref_grads = _loss_and_grads(make(variant, 'materialize'), x)
  for compute in ('fast', 'mem'):
    loss, grads = _loss_and_grads(make(variant, compute), x)
    # A sum of 2 x 5 x 24 sines, each at most 1.
    tolerance.assert_close(loss, ref_loss, FORWARD + 240, scale=240.0)
    for name in layers.BLOCK_NAMES:
      tolerance.assert_close(grads[name][...], ref_grads[name][...],
                             BACKWARD)


@pytest.mark.parametrize('variant', ['block', 'full'])
@pytest.mark.parametrize('compute', layers.COMPUTES)
def test_gradients_match_finite_differences(variant, compute):
  # In float64, so that central differences are accurate to ~1e-9.
  with jax.enable_x64(True):
    layer = make(variant, compute)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def f(g_in, g_out, x):
      p = nnx.State({'in_blocks': layers.OrthogonalBlocks(g_in),
                     'out_blocks': layers.OrthogonalBlocks(g_out)})
      return jnp.sum(jnp.sin(nnx.merge(graphdef, p, rest)(x)))

    args = [np.asarray(a, np.float64) for a in
            (params['in_blocks'][...], params['out_blocks'][...], inputs())]
    grads = jax.grad(f, argnums=(0, 1, 2))(*args)
    rng = np.random.default_rng(0)
    for i, (arg, grad) in enumerate(zip(args, grads)):
      direction = rng.standard_normal(arg.shape)
      eps = 1e-5
      plus, minus = list(args), list(args)
      plus[i], minus[i] = arg + eps * direction, arg - eps * direction
      numeric = (f(*plus) - f(*minus)) / (2 * eps)
      analytic = np.sum(np.asarray(grad) * direction)
      assert abs(numeric - analytic) < 1e-6 * max(1.0, abs(analytic)), i


@pytest.mark.parametrize('variant', ['block', 'full'])
def test_spectrum_is_that_of_w0(variant):
  layer = make(variant, scale=0.05)
  s0 = np.linalg.svd(layer.base_weight(), compute_uv=False)
  s = np.linalg.svd(layer.effective_weight(), compute_uv=False)
  g_in, g_out = layer.orthogonal_blocks()
  err = float(max(orthogonal.orthogonality_error(g_in).max(),
                  orthogonal.orthogonality_error(g_out).max()))
  assert err > 1e-4  # the blocks are non-trivial
  # ||W - W_0-spectrum||: singular values of (approximately orthogonal) G's
  # are within 1 +- sqrt(b)*err of one, so relative changes stay that small.
  b_max = max(layer.in_block, layer.out_block)
  # (+ two float32 SVDs' rounding, 24-term sums, relative to s0.max)
  bound = 2 * np.sqrt(b_max) * err + 4 * 2 * 24 * tolerance.EPS32
  assert np.max(np.abs(s - s0) / s0.max()) < bound
  exact = make(variant, scale=0.3, method='exact')
  s0 = np.linalg.svd(exact.base_weight(), compute_uv=False)
  s = np.linalg.svd(exact.effective_weight(), compute_uv=False)
  # The Cayley map by a linear solve (b = 8: 8 eliminations, 8-term sums),
  # the product (FORWARD), and float32 SVDs of a 16 x 24 matrix (backward
  # stable: 24-term sums, twice).
  tolerance.assert_close(s, s0, 2 * 8 + FORWARD + 2 * 24)


def test_normalized_init_has_unit_output_neurons():
  w = layers.init_w0(jax.random.key(0), 32, 48, 'normalized')
  # Normalized by the norm (32 squares summed, a root, a division), then
  # measured the same way.
  tolerance.assert_close(jnp.linalg.norm(w, axis=0), np.ones(48), 2 * 34)


def test_uniform_spectrum_init_has_unit_singular_values():
  w = layers.init_w0(jax.random.key(0), 32, 48, 'uniform_spectrum')
  # An orthogonal factor of a float32 decomposition, then a float32 SVD:
  # each backward stable, 48-term sums.
  tolerance.assert_close(np.linalg.svd(w, compute_uv=False), np.ones(32),
                         2 * 48)


@pytest.mark.parametrize('init', ['standard', 'xavier'])
def test_other_inits_have_their_scale(init):
  w = layers.init_w0(jax.random.key(0), 256, 512, init)
  expected = 0.02 if init == 'standard' else np.sqrt(2 / (256 + 512))
  assert abs(float(jnp.std(w)) / expected - 1) < 0.05


def test_non_divisible_sizes_raise_naming_sizes():
  with pytest.raises(ValueError) as info:
    layers.POETLinear(512, 1376, block_size=256, name='mlp.up',
                      rngs=nnx.Rngs(0))
  msg = str(info.value)
  for part in ('mlp.up', '512', '1376', 'block_size=256'):
    assert part in msg


def test_unknown_options_raise():
  with pytest.raises(ValueError, match='compute'):
    layers.POETLinear(8, 8, block_size=4, compute='turbo', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='variant'):
    layers.POETLinear(8, 8, block_size=4, variant='half', rngs=nnx.Rngs(0))


@pytest.mark.parametrize('variant', ['block', 'full'])
def test_merge_preserves_function_and_redraws_placement(variant):
  layer = make(variant)
  x = inputs()
  before = layer(x)
  old_in, old_out = layer.in_place[...], layer.out_place[...]
  layer.merge(jax.random.key(7))
  # W0 <- G_in W0 G_out rounded (FORWARD), then the forward again.
  tolerance.assert_close(layer(x), before, 2 * FORWARD)
  assert is_identity(layer.in_blocks[...])
  assert is_identity(layer.out_blocks[...])
  assert not np.array_equal(layer.in_place[...], old_in)
  assert not np.array_equal(layer.out_place[...], old_out)


@pytest.mark.parametrize('variant', ['block', 'full'])
def test_float64_layer_keeps_its_output_across_a_merge_to_float64(variant):
  # jax.enable_x64 as a context: float64 for this test only.
  with jax.enable_x64(True):
    layer = make(variant, w0_dtype=jnp.float64)
    x = inputs().astype(jnp.float64)
    before = layer(x)
    assert before.dtype == jnp.float64
    assert layer.effective_weight().dtype == jnp.float64
    tolerance.assert_close(before, x @ layer.effective_weight(), FORWARD,
                           eps=EPS64)
    layer.merge(jax.random.key(7))
    assert layer.w0.dtype == jnp.float64
    # A float32 merge would change the output by ~1e-7, 1e6 times more.
    tolerance.assert_close(layer(x), before, 2 * FORWARD, eps=EPS64)


def test_bfloat16_w0_and_compute():
  layer = make(dtype=jnp.bfloat16, w0_dtype=jnp.bfloat16)
  assert layer.w0.dtype == jnp.bfloat16
  x = inputs()
  y = layer(x)
  assert y.dtype == jnp.bfloat16
  ref = x @ layer.effective_weight()
  # bfloat16 roundings along the chain: x, W0 and the two blocks as stored,
  # and the three products' results (their sums run in float32 on CPU).
  tolerance.assert_close(y.astype(jnp.float32), ref, 7, eps=BF16_EPS)


# ------------------------------------------------------- permutations, auto


@pytest.mark.parametrize('axis', [0, -1])
def test_permute_and_its_gather_backward_match_plain_indexing(axis):
  x = jax.random.normal(jax.random.key(0), (6, 10))
  perm = spo.draw_permutation(jax.random.key(1), x.shape[axis])
  cot = jax.random.normal(jax.random.key(2), x.shape)
  index = (perm, slice(None)) if axis == 0 else (slice(None), perm)
  y, vjp = jax.vjp(lambda x: spo.permute(x, perm, axis), x)
  y_ref, vjp_ref = jax.vjp(lambda x: x[index], x)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(vjp(cot)[0], vjp_ref(cot)[0])
  np.testing.assert_array_equal(
      spo.inverse_permutation(perm), jnp.argsort(perm))


def test_fast_keeps_only_the_w0_product_for_the_backward():
  layer = make('block', 'fast')
  x = inputs()
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  _, vjp = jax.vjp(lambda p: nnx.merge(graphdef, p, rest)(x), params)
  shapes = [r.shape for r in jax.tree.leaves(vjp)]  # what the backward keeps
  m, n, b = SHAPES['block']
  # h in block layout, (n/b, tokens, b); no (tokens, m)-sized activation.
  assert (n // b, 10, b) in shapes
  assert not [s for s in shapes if s in ((10, m), (m // b, 10, b))], shapes


def test_cost_model_picks_by_width_block_and_tokens():
  # Narrow layer, big blocks, many tokens: the block products dominate.
  assert paths.choose_compute('block', 512, 512, 256, 256, 8192) == (
      'materialize')
  # Wide layer: W0 taking no gradient saves more than the blocks cost.
  assert paths.choose_compute('block', 4096, 4096, 256, 256, 8192) == 'fast'
  # Few tokens: building the kernel is not amortized.
  assert paths.choose_compute('block', 512, 512, 256, 256, 64) == 'fast'
  flops = paths.path_flops('block', 4096, 4096, 256, 256, 2048)
  # The spec's ratios: 2/3 + b(m+n)/(mn) and 1 + 2b/N.
  assert flops['fast'] / flops['dense'] == pytest.approx(2 / 3 + 2 * 256 / 4096)
  assert flops['materialize'] / flops['dense'] == pytest.approx(
      1 + 2 * 256 / 2048)


@pytest.mark.parametrize('tokens', [4, 400])
@pytest.mark.parametrize('variant', ['block', 'full'])
def test_auto_equals_the_path_it_picked(variant, tokens):
  x = jax.random.normal(jax.random.key(3), (tokens, SHAPES[variant][0]))
  auto = make(variant, 'auto')
  picked = auto.resolved_compute(x.shape)
  assert picked in ('fast', 'materialize')
  loss, grads = _loss_and_grads(auto, x)
  ref_loss, ref_grads = _loss_and_grads(make(variant, picked), x)
  assert float(loss) == float(ref_loss)
  for name in layers.BLOCK_NAMES:
    np.testing.assert_array_equal(grads[name][...], ref_grads[name][...])


def test_auto_picks_both_paths_over_token_counts():
  layer = make('block', 'auto')
  m = SHAPES['block'][0]
  assert layer.resolved_compute((4, m)) == 'fast'
  assert layer.resolved_compute((4000, m)) == 'materialize'
  choices = layers.compute_choices(layer, 4000)
  assert [c['compute'] for c in choices] == ['materialize']


def _median_time(fns, args, reps=9):
  for f in fns.values():
    jax.block_until_ready(f(*args[0]))
  times = {k: [] for k in fns}
  for r in range(reps):
    for k, f in fns.items():  # interleaved: load hits both alike
      start = time.perf_counter()
      jax.block_until_ready(f(*args[r % len(args)]))
      times[k].append(time.perf_counter() - start)
  return {k: float(np.median(v)) for k, v in times.items()}


@pytest.mark.parametrize('m,b,tokens', [
    (1024, 32, 256),   # wide, small blocks: fast needs ~0.6x the FLOPs
    (256, 256, 4096),  # narrow, one big block: materialize ~0.4x
])
def test_cost_model_orders_paths_as_measured(m, b, tokens):
  flops = paths.path_flops('block', m, m, b, b, tokens)
  predicted = min(('fast', 'materialize'), key=flops.get)
  margin = max(flops['fast'], flops['materialize']) / min(
      flops['fast'], flops['materialize'])
  assert margin > 1.5  # only orderings with a big margin are compared
  fns = {}
  for compute in ('fast', 'materialize'):
    layer = layers.POETLinear(m, m, block_size=b, compute=compute,
                              rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def step(params, x, dy, graphdef=graphdef, rest=rest):
      y, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p, rest)(x),
                       params, x)
      return y, vjp(dy)

    fns[compute] = functools.partial(jax.jit(step), params)
  keys = jax.random.split(jax.random.key(0), 4)
  args = [(jax.random.normal(k, (tokens, m)), jax.random.normal(k, (tokens, m)))
          for k in keys[:2]]
  t = _median_time(fns, args)
  assert min(t, key=t.get) == predicted, (t, flops)


def test_auto_keeps_within_a_memory_budget():
  # One output block: materialize is cheaper by FLOPs (1.25x dense against
  # fast's 1.73x) but keeps the 1024 x 64 kernel; fast keeps 512 x 64.
  m, n, b, tokens = 1024, 64, 64, 512
  pick = lambda budget: paths.choose_compute('block', m, n, b, b, tokens,
                                              budget)
  saved = paths.path_saved_elements(m, n, tokens)
  assert saved['fast'] < saved['materialize']
  assert pick(0) == 'materialize'
  assert pick(saved['materialize']) == 'materialize'
  assert pick(saved['materialize'] - 1) == 'fast'   # over budget: the other
  assert pick(saved['fast'] - 1) == 'mem'           # neither fits: mem
  layer = layers.POETLinear(m, n, block_size=b, compute='auto',
                            memory_budget=saved['fast'] - 1, rngs=nnx.Rngs(0))
  assert layer.resolved_compute((tokens, m)) == 'mem'
  assert layers.compute_choices(layer, tokens)[0]['compute'] == 'mem'
  x = jax.random.normal(jax.random.key(0), (tokens, m))
  np.testing.assert_array_equal(
      layer(x), layers.POETLinear(m, n, block_size=b, compute='mem',
                                  rngs=nnx.Rngs(0))(x))
