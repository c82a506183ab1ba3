"""POET-XQ: the 8-bit W0 (poet_jax/quant.py) and the layers that use it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from poet_jax import layers
from poet_jax import orthogonal
from poet_jax import quant
from poet_jax.train import config as config_lib
from poet_jax.train import config_checks

import tolerance

# (in, out, block size) per variant; 8-bit groups of 8 rows.
SHAPES = {'block': (32, 24, 8), 'full': (32, 24, 0.5)}
GROUP = 8


def make(variant='block', compute='fast', w0_dtype=quant.DTYPE, seed=0,
         scale=0.1):
  m, n, b = SHAPES[variant]
  layer = layers.POETLinear(m, n, block_size=b, variant=variant,
                            compute=compute, w0_dtype=w0_dtype,
                            w0_group_size=GROUP, rngs=nnx.Rngs(seed))
  set_generators(layer, jax.random.key(seed + 100), scale)
  return layer


def set_generators(layer, key, scale):
  """Blocks from random generators of the given scale."""
  for k, blocks in zip(jax.random.split(key), (layer.in_blocks,
                                                layer.out_blocks)):
    b = blocks.shape[-1]
    u = scale * jax.random.normal(
        k, blocks.shape[:-2] + (orthogonal.num_generator_params(b),))
    blocks[...] = orthogonal.orthogonal_blocks(u, b)


def inputs(m=32, seed=1):
  return jax.random.normal(jax.random.key(seed), (3, 5, m), jnp.float32)


def frobenius_bound(q: quant.Quantized) -> float:
  """sqrt(sum of (s/2)^2 over every element): bounds ||W - W~||_F."""
  return float(jnp.sqrt(q.group_size * jnp.sum(quant.error_bound(q) ** 2)))


# ------------------------------------------------------------ quantize


def test_error_per_group_is_within_half_a_step():
  w = jax.random.normal(jax.random.key(0), (2, 64, 24)) * jnp.linspace(
      0.01, 3.0, 24)  # columns of very different ranges
  q = quant.quantize(w, 16)
  assert q.codes.dtype == jnp.uint8 and q.codes.shape == w.shape
  assert q.scale.shape == q.zero.shape == (2, 4, 24)
  err = jnp.abs(quant.dequantize(q) - w).reshape(2, 4, 16, 24).max(axis=2)
  # 8-bit uniform quantization: half a step, (max - min) / 510 per group,
  # up to float32 rounding of the dequantized value.
  groups = w.reshape(2, 4, 16, 24)
  step = (groups.max(axis=2) - groups.min(axis=2)) / 255
  # A difference and a division, each element to its own size.
  tolerance.assert_close(q.scale, step, 2, scale=np.abs(step))
  # Half a step, and the dequantization's product and sum (code x scale +
  # zero) rounded at the group's magnitude.
  magnitude = jnp.abs(groups).max(axis=2)
  assert bool(jnp.all(err <= step / 2 + 4 * 2 * tolerance.EPS32 * magnitude)
              ), float((err / step).max())
  # Min and max of every group land on codes 0 and 255: the range is used.
  codes = q.codes.reshape(2, 4, 16, 24)
  assert int(codes.min(axis=2).max()) == 0
  assert int(codes.max(axis=2).min()) == 255
  print(f'\nmax error / step over groups: {float((err / step).max()):.4f}')


@pytest.mark.parametrize('group', [64, 256])
def test_relative_error_of_the_paper_init_w0(group):
  w = layers.init_w0(jax.random.key(0), 1024, 512)  # normalized Gaussian
  err = quant.dequantize(quant.quantize(w, group)) - w
  rel = float(jnp.linalg.norm(err) / jnp.linalg.norm(w))
  x = jax.random.normal(jax.random.key(1), (64, 1024))
  out = float(jnp.linalg.norm(x @ err) / jnp.linalg.norm(x @ w))
  print(f'\ngroup {group}: relative error of W0 {rel:.2e}, of x @ W0 '
        f'{out:.2e}')
  # Uniform rounding error has RMS step / sqrt(12); a group of g Gaussians
  # spans about 2 sqrt(2 ln g) standard deviations.
  expected = 2 * np.sqrt(2 * np.log(group)) / 255 / np.sqrt(12)
  assert 0.7 * expected < rel < 1.3 * expected, (rel, expected)
  assert out < 1.5 * rel


def test_constant_group_is_exact_and_dequantize_has_the_asked_dtype():
  w = jnp.concatenate([jnp.full((8, 3), 0.25), jnp.ones((8, 3))], axis=0)
  q = quant.quantize(w, 8)
  np.testing.assert_array_equal(quant.dequantize(q), w)
  assert quant.dequantize(q, jnp.bfloat16).dtype == jnp.bfloat16


def test_a_group_size_that_does_not_divide_is_a_clear_error():
  with pytest.raises(ValueError, match=r'group size 24 does not divide '
                     r'in_features=32.*such as 16'):
    quant.quantize(jnp.ones((32, 4)), 24)
  with pytest.raises(ValueError, match='mlp.down.*does not divide'):
    layers.POETLinear(32, 16, block_size=8, w0_dtype='int8',
                      w0_group_size=12, name='mlp.down', rngs=nnx.Rngs(0))


def test_config_rejects_a_group_that_does_not_divide_a_width():
  c = config_lib.base_config()  # dim 128, FFN 384
  c.model.w0_dtype = 'int8'
  with pytest.raises(config_lib.ConfigError,
                     match=r'w0_group_size=256 does not divide model.dim=128'
                     r'.*such as 128'):
    config_checks.validate(c)
  c.model.w0_group_size = 128
  config_checks.validate(c)
  c.model.w0_dtype = 'int4'
  with pytest.raises(config_lib.ConfigError, match='model.w0_dtype'):
    config_checks.validate(c)


# --------------------------------------------------------------- layer


def test_layer_stores_codes_and_keeps_no_float_w0():
  layer = make()
  state = nnx.state(layer, layers.FrozenWeight)
  assert {k: v.dtype for k, v in state.items()} == {
      'w0': jnp.uint8, 'w0_scale': jnp.float32, 'w0_zero': jnp.float32}
  assert set(nnx.state(layer, nnx.Param).keys()) == set(layers.BLOCK_NAMES)


@pytest.mark.parametrize('variant', ['block', 'full'])
@pytest.mark.parametrize('compute', ['fast', 'mem', 'materialize'])
def test_output_error_against_the_float32_w0_layer_is_bounded(variant,
                                                              compute):
  # Same seed: the same W0 and placements, once in float32, once in 8 bits.
  exact = make(variant, compute, w0_dtype=jnp.float32)
  q8 = make(variant, compute)
  x = inputs()
  y, y8 = exact(x), q8(x)
  # y8 - y = x @ (P (W0~ - W0) R) with P, R orthogonal (to the Neumann
  # series' error): ||.||_F <= ||x||_F ||W0~ - W0||_F.
  bound = float(jnp.linalg.norm(x)) * frobenius_bound(q8.stored_w0())
  err = float(jnp.linalg.norm(y8 - y))
  assert err <= 1.01 * bound, (err, bound)
  rel = err / float(jnp.linalg.norm(y))
  assert rel < 1e-2
  # The layer's path against x @ W: the dequantization (2), the blocks' sums
  # (2 b) and W0's (32), in two orders.
  m, _, b = SHAPES[variant]
  tolerance.assert_close(y8, x @ q8.effective_weight(),
                         2 + m + 2 * int(b if b >= 1 else b * 32))
  print(f'\n{variant} {compute}: relative output error {rel:.2e}, '
        f'bound {bound / float(jnp.linalg.norm(y)):.2e}')


@pytest.mark.parametrize('variant', ['block', 'full'])
def test_compute_paths_agree_on_outputs_and_gradients(variant):
  x = inputs()
  results = []
  for compute in ('fast', 'mem', 'materialize'):
    layer = make(variant, compute)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    loss = lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p, rest)(x)))
    results.append(jax.value_and_grad(loss)(params))
  # Each gradient element sums over the 15 tokens and chains the input
  # blocks, W0 (32 x 24) and the output blocks: about 15 + 32 + 24 + 2b
  # rounded terms, differently associated on each path.
  m, n, b = SHAPES[variant]
  terms = 15 + m + n + 2 * int(b if b >= 1 else b * max(m, n))
  for value, grads in results[1:]:
    tolerance.assert_close(value, results[0][0], terms + 15 * n, scale=15 * n)
    for a, b_ in zip(jax.tree.leaves(grads), jax.tree.leaves(results[0][1])):
      tolerance.assert_close(a, b_, terms)


def test_backward_keeps_no_dequantized_w0():
  layer = make('block', 'fast')
  x = inputs()
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  _, vjp = jax.vjp(lambda p: nnx.merge(graphdef, p, rest)(x), params)
  m, n, _ = SHAPES['block']
  kept = [(r.shape, r.dtype) for r in jax.tree.leaves(vjp)]
  assert ((m, n), jnp.uint8) in kept
  assert not [k for k in kept if k[0] == (m, n) and k[1] != jnp.uint8], kept


# --------------------------------------------------------------- merges


@pytest.mark.parametrize('variant', ['block', 'full'])
def test_merge_keeps_the_function_to_the_requantization_error(variant):
  layer = make(variant)
  x = inputs()
  before = layer(x)
  layer.merge(jax.random.key(7))
  assert layer.w0.dtype == jnp.uint8
  after = layer(x)
  # Before: x @ (P W0~ R), exactly (float32); the merge rounds P W0~ R once
  # more to 8 bits, so the change is bounded by the new groups' half steps.
  bound = float(jnp.linalg.norm(x)) * frobenius_bound(layer.stored_w0())
  err = float(jnp.linalg.norm(after - before))
  assert err <= 1.01 * bound, (err, bound)
  assert err / float(jnp.linalg.norm(before)) < 1e-2


def drift_over_merges(merges=50, scale=0.2, seed=0):
  """Relative distance between an 8-bit and a float32 layer's kernels after
  the same rotations merged `merges` times: [after merge 0, 1, ...]."""
  m, n, b = 64, 64, 8
  make_layer = lambda w0_dtype: layers.POETLinear(
      m, n, block_size=b, w0_dtype=w0_dtype, w0_group_size=16,
      rngs=nnx.Rngs(seed))
  exact, q8 = make_layer(jnp.float32), make_layer(quant.DTYPE)

  @jax.jit
  def rotate_and_merge(state_f, state_q, key):
    out = []
    for state in (state_f, state_q):
      layer = nnx.merge(graphdef[state is state_q], state)
      set_generators(layer, key, scale)  # the same rotation for both
      layer.merge(jax.random.fold_in(key, 1))
      out.append(nnx.state(layer))
    return out

  def distance(a, b):
    ka, kb = a.effective_weight(), b.effective_weight()
    return float(jnp.linalg.norm(kb - ka) / jnp.linalg.norm(ka))

  graphdef = {False: nnx.graphdef(exact), True: nnx.graphdef(q8)}
  state_f, state_q = nnx.state(exact), nnx.state(q8)
  drift = [distance(exact, q8)]
  for i in range(merges):
    state_f, state_q = rotate_and_merge(state_f, state_q,
                                        jax.random.key(1000 + i))
    drift.append(distance(nnx.merge(graphdef[False], state_f),
                          nnx.merge(graphdef[True], state_q)))
  return drift


def test_requantizing_at_every_merge_drifts_like_a_random_walk():
  drift = drift_over_merges()
  first = drift[0]  # one quantization
  print('\ndrift (relative kernel distance to the float32 layer) after '
        'merges 0, 1, 2, 5, 10, 20, 50: ' + ', '.join(
            f'{drift[i]:.2e}' for i in (0, 1, 2, 5, 10, 20, 50)))
  # Each merge adds an independent rounding error of the same size, which
  # later rotations carry along: the errors add in quadrature (sqrt(k)),
  # they do not compound.
  for k in (10, 20, 50):
    assert drift[k] <= 1.5 * first * np.sqrt(k + 1), (k, drift[k], first)
  assert drift[50] > drift[0]


# ---------------------------------------------------------- checkpoints


def test_checkpoint_stores_the_codes_and_resume_is_exact(tmp_path):
  """Train steps with merges, save, restore, step on: bit for bit."""
  from poet_jax.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from poet_jax.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from poet_jax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from poet_jax.train import state as train_state  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.model.dim, c.model.num_layers, c.model.num_heads = 32, 1, 2
  c.model.ffn_dim, c.poet.block_size, c.poet.merge_every = 64, 8.0, 2
  c.model.w0_dtype, c.model.w0_group_size = 'int8', 16
  c.train.batch_size, c.train.seq_len, c.mesh.data = 2, 16, 1
  vocab = 64
  setup, abstract = train_state.abstract_state(c, vocab)
  steps = steps_lib.compile_steps(setup, abstract,
                                  sharding_lib.make_mesh(c.mesh,
                                                         jax.devices()[:1]))
  state = jax.jit(lambda: train_state.init_state(c, vocab)[1],
                  out_shardings=steps.state_sharding)()
  batch = lambda i: jax.random.randint(jax.random.key(i), (2, 17), 0, vocab)
  codes0 = state['frozen']['blocks']['mlp']['down']['w0']
  codes0 = np.asarray(codes0)
  for i in range(2):  # the second step merges
    state, _ = steps.train(state, batch(i))
  codes = state['frozen']['blocks']['mlp']['down']['w0']
  assert codes.dtype == jnp.uint8 and not np.array_equal(codes, codes0)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), asynchronous=False)
  ckpt.save(2, state, {})
  ckpt.wait()
  restored, _ = ckpt.restore(2, abstract)
  ckpt.close()
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  for i in (2, 3):
    state, m1 = steps.train(state, batch(i))
    restored, m2 = steps.train(restored, batch(i))
    assert float(m1['train_loss']) == float(m2['train_loss'])
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
