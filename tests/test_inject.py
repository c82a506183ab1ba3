"""inject: a POET layer's W0, placements and merges set from outside."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import poet_jax
import tolerance


def test_an_8_bit_layer_takes_a_kernel_and_a_given_merge():
  kernel = jax.random.normal(jax.random.key(0), (16, 24)) / 4
  layer = poet_jax.POETLinear(16, 24, block_size=8, w0_dtype='int8',
                              w0_group_size=8, rngs=nnx.Rngs(1))
  in_place = jax.random.permutation(jax.random.key(2), 16)
  out_place = jax.random.permutation(jax.random.key(3), 24)
  poet_jax.set_poet_layer(layer, kernel, in_place, out_place)
  assert layer.w0[...].dtype == jnp.uint8
  np.testing.assert_array_equal(layer.in_place[...], in_place)
  step = float(jnp.abs(kernel).max()) * 2 / 255   # one quantization step
  np.testing.assert_allclose(layer.base_weight(), kernel, atol=step)
  u = jnp.full((2, 28), 0.02)
  layer.in_blocks[...] = poet_jax.orthogonal_blocks(u, 8)
  before = layer.effective_weight()
  new_in = jax.random.permutation(jax.random.key(4), 16)
  new_out = jax.random.permutation(jax.random.key(5), 24)
  poet_jax.merge_with_placements(layer, new_in, new_out)
  np.testing.assert_array_equal(layer.out_place[...], new_out)
  np.testing.assert_array_equal(layer.in_blocks[...],
                                jnp.broadcast_to(jnp.eye(8), (2, 8, 8)))
  np.testing.assert_allclose(layer.effective_weight(), before, atol=step)


def test_shapes_that_do_not_match_are_refused():
  layer = poet_jax.POETLinear(16, 24, block_size=8, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match='does not match'):
    poet_jax.set_poet_layer(layer, jnp.ones((24, 16)), jnp.arange(16),
                            jnp.arange(24))


def test_a_stacked_llama_layer_as_an_ordinary_module():
  cfg = poet_jax.LlamaConfig(vocab_size=32, dim=16, num_layers=3,
                             num_heads=2, ffn_dim=32)
  model = poet_jax.Llama(cfg, rngs=nnx.Rngs(0))
  poet_jax.poetize(model, block_size=8, rngs=nnx.Rngs(1))
  block = poet_jax.layer_at(model.blocks, 1)
  q = block.attention.q
  assert q.w0[...].ndim == 2
  # One layer of the stack or all of them: the blocks' two 8-term sums,
  # perhaps in another order.
  tolerance.assert_close(q.effective_weight(),
                         model.blocks.attention.q.effective_weight()[1], 16)
  x = jax.random.normal(jax.random.key(1), (4, 16))
  # The layer's path (8 + 16 + 8) against x @ W (16 + 16).
  tolerance.assert_close(q(x), x @ q.effective_weight(), 8 + 16 + 8 + 16)
  q.in_blocks[...] = 2 * q.in_blocks[...]
  poet_jax.set_layer_at(model.blocks, 1, block)
  stacked = model.blocks.attention.q.in_blocks[...]
  assert float(stacked[1].max()) == 2.0
  assert float(stacked[0].max()) == 1.0
  with pytest.raises(IndexError):
    poet_jax.layer_at(model.blocks, 3)
  with pytest.raises(ValueError, match='stack of 3 layers.*layer_at'):
    model.blocks.attention.q(x)
