"""POET on models written as people write them, not the project's Llama.

An NNX decoder whose attention projections are nnx.LinearGeneral and
nnx.Einsum ((D, H, Dh) and (H, Dh, D) kernels) and whose every linear is
called with an out_sharding argument, and a flax.linen decoder with
DenseGeneral attention: each trained a few steps with merges, every
projection POET (its singular values stay W0's), nothing left dense but
the head.
"""
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

import poet_jax
from spectra import assert_spectrum_kept

V, D, H, DH, F = 32, 16, 2, 8, 32
B, MERGE_EVERY, STEPS = 8, 3, 7
TOKENS = jax.random.randint(jax.random.key(0), (4, 9), 0, V)


class NNXDecoder(nnx.Module):
  """One decoder block, Gemma-style: LinearGeneral / Einsum attention."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.norm1, self.norm2 = (nnx.RMSNorm(D, rngs=rngs) for _ in range(2))
    self.q = nnx.LinearGeneral(D, (H, DH), use_bias=False, rngs=rngs)
    self.k = nnx.Einsum('btd,dnh->btnh', (D, H, DH), (H, DH), rngs=rngs)
    self.v = nnx.LinearGeneral(D, (H, DH), use_bias=False, rngs=rngs)
    self.o = nnx.Einsum('btnh,nhd->btd', (H, DH, D), rngs=rngs)
    self.gate = nnx.Linear(D, F, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(D, F, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(F, D, rngs=rngs)
    self.head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

  def __call__(self, tokens, sharded=False):
    spec = (lambda n: P('data', *[None] * (n - 1))) if sharded else (
        lambda n: None)
    x = self.embed(tokens, out_sharding=spec(3))
    h = self.norm1(x)
    q = self.q(h, out_sharding=spec(4))
    k = self.k(h, out_sharding=spec(4))
    v = self.v(h, out_sharding=spec(4))
    a = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + self.o(a, out_sharding=spec(3))
    h = self.norm2(x)
    mlp = jax.nn.silu(self.gate(h, out_sharding=spec(3))) * self.up(
        h, out_sharding=spec(3))
    x = x + self.down(mlp, out_sharding=spec(3))
    return self.head(x, out_sharding=spec(3))


PROJECTIONS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


def loss_of(logits, tokens):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1], tokens[:, 1:]).mean()


def matrix(layer):
  """A POET layer's (inputs x outputs) matrix R W0 P."""
  poet = layer.linear if not isinstance(layer, poet_jax.POETLinear) else layer
  return poet.effective_weight()


def train_nnx(sharded: bool):
  model = NNXDecoder(nnx.Rngs(0))
  dense = {n: poet_jax.KernelLayout('io' if n in ('gate', 'up', 'down') else
                                    ('iio' if n == 'o' else 'ioo')).to_matrix(
                                        getattr(model, n).kernel[...])
           for n in PROJECTIONS}
  left = poet_jax.poetize(model, block_size=B, rngs=nnx.Rngs(1))
  tx = poet_jax.reparameterize(poet_jax.poet(1e-2, 1e-2),
                               merge_every=MERGE_EVERY)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(
        lambda m: loss_of(m(tokens, sharded), tokens))(model)
    optimizer.update(model, grads)
    poet_jax.merge_model_if_due(model, optimizer, jax.random.key(2))
    return loss

  tokens = TOKENS
  if sharded:
    tokens = jax.device_put(TOKENS, P('data', None))
  losses = [float(step(model, optimizer, tokens)) for _ in range(STEPS)]
  return model, dense, left, losses


@pytest.fixture(scope='module')
def trained_nnx():
  return train_nnx(sharded=False)


def test_nnx_decoder_with_einsum_attention_is_poet_everywhere(trained_nnx):
  model, dense, left, losses = trained_nnx
  assert left == {'head': "excluded by '*head*'"}
  assert isinstance(model.q, poet_jax.POETLinearGeneral)
  assert isinstance(model.k, poet_jax.POETEinsum)
  assert isinstance(model.gate, poet_jax.POETLinear)
  assert losses[-1] < 0.9 * losses[0], losses
  merges = STEPS // MERGE_EVERY
  for name in PROJECTIONS:
    after = matrix(getattr(model, name))
    assert not np.allclose(after, dense[name], atol=1e-4), name  # trained
    assert_spectrum_kept(after, dense[name], B, merges)
  # The multi-axis layers' dense kernels keep the module's layout.
  assert model.o.kernel().shape == (H, DH, D)


def test_sharding_arguments_under_an_explicit_mesh(trained_nnx):
  """The same training with the batch split over two devices and every
  projection called with its out_sharding: the same losses."""
  plain = trained_nnx[3]
  mesh = jax.make_mesh((2,), ('data',), axis_types=(AxisType.Explicit,),
                       devices=jax.devices()[:2])
  with jax.set_mesh(mesh):
    _, _, _, sharded = train_nnx(sharded=True)
  # The same products, split by rows: float32 rounding of the reductions.
  np.testing.assert_allclose(sharded, plain, rtol=1e-5)


# ---------------------------------------------------------------- linen


class LinenDecoder(linen.Module):
  """One decoder block in flax.linen, DenseGeneral attention."""

  @linen.compact
  def __call__(self, tokens):
    x = linen.Embed(V, D, name='embed')(tokens)
    h = linen.RMSNorm(name='norm1')(x)
    q, k, v = (linen.DenseGeneral((H, DH), use_bias=n == 'k', name=n)(h)
               for n in 'qkv')
    a = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + linen.DenseGeneral(D, axis=(-2, -1), name='o')(a)
    h = linen.RMSNorm(name='norm2')(x)
    mlp = jax.nn.silu(linen.Dense(F, name='gate')(h)) * linen.Dense(
        F, name='up')(h)
    x = x + linen.Dense(D, name='down')(mlp)
    return linen.Dense(V, name='head')(x)


def test_linen_decoder_with_dense_general_attention_is_poet_everywhere():
  model = LinenDecoder()
  params = model.init(jax.random.key(0), TOKENS)['params']
  axes = poet_jax.linen_kernel_axes(model, TOKENS)
  assert axes == {'q': 'ioo', 'k': 'ioo', 'v': 'ioo', 'o': 'iio'}
  layouts, left = poet_jax.select_kernels(params, B, kernel_axes=axes)
  assert left == {'head': "excluded by '*head*'"}
  tx = poet_jax.poet_kernels(
      optax.chain(poet_jax.clip_by_global_norm(1.0),
                  poet_jax.poet(1e-2, 1e-2)),
      block_size=B, merge_every=MERGE_EVERY, key=jax.random.key(1),
      kernel_axes=axes)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(
        lambda p: loss_of(model.apply({'params': p}, TOKENS), TOKENS))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state, trained, losses = tx.init(params), params, []
  for _ in range(STEPS):
    trained, state, loss = step(trained, state)
    losses.append(float(loss))
  assert losses[-1] < 0.9 * losses[0], losses
  for name in PROJECTIONS:
    layout = layouts[name]['kernel']
    before = layout.to_matrix(params[name]['kernel'])
    after = layout.to_matrix(trained[name]['kernel'])
    assert not np.allclose(after, before, atol=1e-4), name
    assert_spectrum_kept(after, before, B, STEPS // MERGE_EVERY)


def test_undeclared_multi_axis_kernels_are_reported_never_split():
  """Without its axes a 3-D kernel stays dense, said so; per_layer needs
  its stacks declared (a (D, H, Dh) kernel is not D layers)."""
  params = LinenDecoder().init(jax.random.key(0), TOKENS)['params']
  _, left = poet_jax.select_kernels(params, B)
  assert 'no declared axes' in left['q'] and 'kernel_axes' in left['q']
  with pytest.raises(ValueError, match='stacked must be a function'):
    poet_jax.optim.per_layer(optax.sgd(1.0), stacked=None)
