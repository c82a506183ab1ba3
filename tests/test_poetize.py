"""poetize on a user's NNX model."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import poet_jax
from poet_jax.train import config
from poet_jax.train import state as train_state
import tolerance


class UserMLP(nnx.Module):
  """Not the project's Llama: biases, and a head the block does not divide."""

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(16, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 24, rngs=rngs)
    self.odd = nnx.Linear(24, 12, rngs=rngs)
    self.head = nnx.Linear(12, 4, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.fc1(x))
    x = jax.nn.relu(self.fc2(x))
    return self.head(jax.nn.relu(self.odd(x)))


def test_indivisible_layer_raises_by_default_and_changes_nothing():
  model = UserMLP(nnx.Rngs(0))
  before = jax.tree.map(np.array, nnx.state(model))
  with pytest.raises(ValueError, match="odd.*block_size=8 does not divide.*"
                     r"exclude=\[.*'odd'\] or on_indivisible='skip'"):
    poet_jax.poetize(model, block_size=8, rngs=nnx.Rngs(1))
  assert isinstance(model.fc1, nnx.Linear)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)


def test_poetize_keeps_the_function_and_reports_what_it_skipped(caplog):
  model = UserMLP(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (5, 16))
  before = model(x)
  with caplog.at_level(logging.WARNING):
    skipped = poet_jax.poetize(model, block_size=8, on_indivisible='skip',
                               rngs=nnx.Rngs(1))
  # Every projection left dense, with the reason, returned and logged.
  assert skipped == {'head': "excluded by '*head*'",
                     'odd': 'block_size=8 does not divide 24 x 12'}
  assert 'odd: block_size=8 does not divide' in caplog.text
  assert isinstance(model.fc1, poet_jax.BiasedPOETLinear)
  assert isinstance(model.odd, nnx.Linear)   # left dense, and said so
  assert isinstance(model.head, nnx.Linear)  # excluded by default
  # W0 is the kernel and R = P = I: the same function before training (the
  # layers' sums, 16 + 32 + 24 + 12, the identity blocks' 2 x 8 of fc1 and
  # fc2, and the biases and ReLUs, in another order).
  tolerance.assert_close(model(x), before, 16 + 32 + 24 + 12 + 32 + 8)
  # The bias is frozen by default: not a parameter the optimizer sees.
  params = nnx.state(model, nnx.Param)
  assert 'bias' not in params['fc1']
  assert 'in_blocks' in params['fc1']['linear']


def test_poetized_model_trains_with_poet():
  model = UserMLP(nnx.Rngs(0))
  poet_jax.poetize(model, block_size=8, on_indivisible='skip',
                   trainable_bias=True, rngs=nnx.Rngs(1))
  assert 'bias' in nnx.state(model, nnx.Param)['fc1']
  optimizer = nnx.Optimizer(
      model, poet_jax.reparameterize(poet_jax.poet(1e-2, 2e-2)), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(2), (64, 16))
  y = jnp.tanh(x[:, :4])

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(
        lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(20)]
  assert losses[-1] < 0.8 * losses[0], losses


# ---------------------------------------------------------- the stacked Llama

CFG = poet_jax.LlamaConfig(vocab_size=32, dim=16, num_layers=3, num_heads=2,
                           ffn_dim=32)
TOKENS = jax.random.randint(jax.random.key(3), (2, 7), 0, 32)
LINEARS = ('attention.q', 'attention.k', 'attention.v', 'attention.o',
           'mlp.gate', 'mlp.up', 'mlp.down')


def block_linear(model, name):
  part, leaf = name.split('.')
  return getattr(getattr(model.blocks, part), leaf)


@pytest.fixture(scope='module')
def llama():
  """The dense Llama, and a copy of it poetized with w0='keep'."""
  dense = poet_jax.Llama(CFG, rngs=nnx.Rngs(0))
  poet = nnx.clone(dense)
  assert poet_jax.poetize(poet, block_size=8, rngs=nnx.Rngs(1)) == {
      'lm_head': "excluded by '*lm_head*'"}
  return dense, poet


def test_poetized_llama_computes_the_dense_llama(llama):
  dense, poet = llama
  for name in LINEARS:
    layer = block_linear(poet, name)
    assert isinstance(layer, poet_jax.POETLinear), name
    assert layer.w0[...].shape[0] == CFG.num_layers  # one stack, not a list
    # Identity blocks: two 8-term sums, exact here but bounded by that.
    tolerance.assert_close(layer.effective_weight(),
                           block_linear(dense, name).kernel[...], 2 * 8)
  assert isinstance(poet.lm_head, nnx.Linear)   # the head is excluded
  tolerance.assert_close(poet(TOKENS), dense(TOKENS),
                         tolerance.llama_terms(CFG, TOKENS.shape[1], 8))


def test_stacked_layers_draw_independently_and_deterministically(llama):
  _, poet = llama
  for name in LINEARS:
    layer = block_linear(poet, name)
    for place in (layer.in_place[...], layer.out_place[...]):
      assert len({tuple(np.asarray(p)) for p in place}) == CFG.num_layers
      # Each layer's placement is a permutation of its own.
      np.testing.assert_array_equal(np.sort(place, axis=-1),
                                    np.broadcast_to(np.arange(
                                        place.shape[-1]), place.shape))
  # A redrawn W0 differs between the layers of a stack too.
  again = poet_jax.Llama(CFG, rngs=nnx.Rngs(0))
  poet_jax.poetize(again, block_size=8, w0='redraw', init='uniform_spectrum',
                   target=('*.mlp.*',), rngs=nnx.Rngs(1))
  up = again.blocks.mlp.up
  assert not np.allclose(up.w0[...][0], up.w0[...][1])
  # uniform_spectrum: every singular value of every layer's W0 is 1.
  # An orthogonal factor, then an SVD of 16 x 32: 32-term sums, twice.
  tolerance.assert_close(jnp.linalg.svd(up.base_weight())[1],
                         np.ones((CFG.num_layers, 16)), 2 * 32)
  assert isinstance(again.blocks.attention.q, nnx.Linear)  # not targeted
  # The same rngs give the same draws; a layer's draws depend on its path
  # only, not on which other layers were selected.
  np.testing.assert_array_equal(up.in_place[...],
                                poet.blocks.mlp.up.in_place[...])


def test_poetize_under_eval_shape_allocates_nothing():
  def build():
    model = poet_jax.Llama(CFG, rngs=nnx.Rngs(0))
    poet_jax.poetize(model, block_size=8, w0='redraw', w0_dtype='int8',
                     w0_group_size=8, compute='auto', memory_budget=64,
                     dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    return model

  model = nnx.eval_shape(build)
  down = model.blocks.mlp.down
  leaves = jax.tree.leaves(nnx.state(model))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  w0 = down.w0.get_value()
  assert (w0.shape, w0.dtype) == ((CFG.num_layers, 32, 16), jnp.uint8)
  assert (down.compute, down.memory_budget, down.dtype) == (
      'auto', 64, jnp.bfloat16)


def test_adamw_and_poet_runs_build_one_llama():
  """The trainer's model is the dense Llama; a POET run poetizes it."""
  c = config.base_config()
  c.model.dim, c.model.num_layers, c.model.num_heads = 16, 2, 2
  c.model.ffn_dim, c.poet.block_size = 32, 8.0
  models = {}
  for name in ('adamw', 'poet'):
    c.optimizer.name = name
    models[name] = train_state.build_model(c, 32)
  dense, poet = models['adamw'], models['poet']
  assert type(dense) is type(poet) is poet_jax.Llama
  for name in LINEARS:
    assert isinstance(block_linear(dense, name), nnx.Linear)
    assert isinstance(block_linear(poet, name), poet_jax.POETLinear)
  # One seed, one model: the parts POET leaves alone start equal.
  for get in (lambda m: m.embed.embedding, lambda m: m.lm_head.kernel,
              lambda m: m.blocks.attention_norm.scale):
    np.testing.assert_array_equal(get(dense)[...], get(poet)[...])


# ------------------------------------------------- multi-axis projections


class Projections(nnx.Module):
  """Every way the einsum of a multi-axis projection can be written."""

  def __init__(self, rngs):
    e = lambda eq, shape, bias=None: nnx.Einsum(eq, shape, bias, rngs=rngs)
    self.split = e('btd,dnh->btnh', (16, 2, 8), (2, 8))      # 'ioo'
    self.merge = e('btnh,nhd->btd', (2, 8, 16))              # 'iio'
    self.order = e('btd,ndh->bnth', (2, 16, 8))              # out, in, out
    self.dots = e('...d,dnh->...nh', (16, 2, 8))             # ellipsis
    self.stack = e('btnd,ndh->btnh', (2, 16, 8))             # 's' axis n
    self.summed = e('btd,dh->bh', (16, 8))                   # sums t
    self.late = e('btd,dnh->btnh', (16, 2, 8))               # in the call
    self.qkv = e('btd,sdnh->sbtnh', (3, 16, 2, 8))           # one matrix
    self.general = nnx.LinearGeneral((2, 8), 16, axis=(-2, -1), rngs=rngs)
    self.batched = nnx.LinearGeneral(16, 8, batch_axis={0: 2}, rngs=rngs)

  def __call__(self, x):
    """x (2, 3, 16): one output per layer."""
    h = self.split(x)
    return {'split': h, 'merge': self.merge(h), 'order': self.order(x),
            'dots': self.dots(x[0]), 'summed': self.summed(x),
            'stack': self.stack(jnp.stack([x, 2 * x], axis=2)),
            'late': self.late(x, 'btd,dnh->bnth'), 'qkv': self.qkv(x),
            'general': self.general(h), 'batched': self.batched(x)}


def test_multi_axis_projections_compute_what_they_replaced():
  """W0 = the kernel, R = P = I: every form computes the module's output,
  roles read from the module, or given (kernel_axes: q, k, v of a fused
  projection as a stack of three matrices)."""
  model = Projections(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, 16))
  before = model(x)
  left = poet_jax.poetize(model, block_size=8, kernel_axes={'qkv': 'sioo'},
                          rngs=nnx.Rngs(1))
  assert left == {}
  roles = {n: getattr(model, n).layout.roles for n in before}
  assert roles == {'split': 'ioo', 'merge': 'iio', 'order': 'oio',
                   'dots': 'ioo', 'stack': 'sio', 'summed': 'io',
                   'late': 'ioo', 'qkv': 'sioo', 'general': 'iio',
                   'batched': 'sio'}
  # A stack axis is a stack of POET matrices; inputs x outputs otherwise.
  assert model.stack.linear.w0[...].shape == (2, 16, 8)
  assert model.order.linear.w0[...].shape == (16, 16)
  assert model.qkv.linear.w0[...].shape == (3, 16, 16)
  after = model(x)
  for name in before:
    np.testing.assert_allclose(after[name], before[name], rtol=1e-5,
                               atol=1e-6, err_msg=name)
  # Trained blocks change the function; the kernel() is still the forward's.
  layer = model.split.linear
  layer.out_blocks[...] = poet_jax.orthogonal_blocks(
      0.1 * jax.random.normal(jax.random.key(2), (2, 28)), 8)
  np.testing.assert_allclose(
      model.split(x), jnp.einsum('btd,dnh->btnh', x, model.split.kernel())
      + model.split.bias[...], rtol=1e-5, atol=1e-6)


def test_an_einsum_that_is_no_projection_stays_dense_and_says_why(caplog):
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(16, 16, rngs=rngs)
      self.trace = nnx.Einsum('btd,dk->bt', (16, 8), rngs=rngs)

  model = Model(nnx.Rngs(0))
  with caplog.at_level(logging.WARNING):
    left = poet_jax.poetize(model, block_size=8, rngs=nnx.Rngs(1))
  assert "kernel axis 'k' is summed away" in left['trace']
  assert isinstance(model.trace, nnx.Einsum)
  assert 'trace: einsum' in caplog.text


def test_a_stack_of_multi_axis_layers_under_vmap():
  """nnx.vmap's leading axis on a LinearGeneral: one stacked POET layer,
  each layer its own W0 and permutations."""
  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return nnx.LinearGeneral(16, (2, 8), use_bias=False,
                             rngs=nnx.Rngs(params=key))

  model = nnx.Dict(q=make(jax.random.split(jax.random.key(0), 3)))
  kernels = model['q'].kernel[...]
  poet_jax.poetize(model, block_size=8, rngs=nnx.Rngs(1))
  stack = model['q']
  assert stack.linear.w0[...].shape == (3, 16, 16)
  np.testing.assert_array_equal(stack.kernel(), kernels)
  x = jax.random.normal(jax.random.key(1), (4, 16))
  one = poet_jax.layer_at(stack, 1)
  np.testing.assert_allclose(one(x), jnp.einsum('bd,dnh->bnh', x,
                                                kernels[1]),
                             rtol=1e-5, atol=1e-6)
