"""poet_jax.models.attention: the causal attention core against jax's own form."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from poet_jax import platform as platform_lib
from poet_jax.models import attention
import tolerance


def _inputs(shape, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  return [jax.random.normal(k, shape, jnp.float32).astype(dtype)
          for k in keys]


def _value_and_grads(core, q, k, v, dout):
  out, vjp = jax.vjp(core, q, k, v)
  return (out, *vjp(dout))


def test_equals_the_reference_forward_and_gradients():
  """Output and dq, dk, dv equal jax.nn.dot_product_attention's to float32
  rounding (the sums run in another order): forward, the scores' 8 and the
  softmax's and weighted values' 16 each; back, dp's 8, the softmax's 16
  and dq's or dk's 16."""
  q, k, v, dout = _inputs((2, 16, 3, 8))
  got = _value_and_grads(attention.causal_attention, q, k, v, dout)
  want = _value_and_grads(attention.reference_attention, q, k, v, dout)
  for name, g, w in zip(('out', 'dq', 'dk', 'dv'), got, want):
    assert g.dtype == jnp.float32 and g.shape == w.shape, name
    tolerance.assert_close(g, w, 8 + 16 + 16 + 8 + 16 + 16 + 5)


def test_bfloat16_is_as_accurate_as_the_reference():
  """In bfloat16 both forms are off a float32 truth (of the same bfloat16
  inputs) by the bfloat16 roundings along their chains: at most six
  (the scores, the probabilities, the output; back, dp, ds and the
  gradient), the sums running in float32."""
  inputs32 = _inputs((2, 32, 2, 16))
  inputs16 = [x.astype(jnp.bfloat16) for x in inputs32]
  truth = _value_and_grads(attention.reference_attention,
                           *[x.astype(jnp.float32) for x in inputs16])
  ours = _value_and_grads(attention.causal_attention, *inputs16)
  jaxs = _value_and_grads(attention.reference_attention, *inputs16)
  bf16 = float(jnp.finfo(jnp.bfloat16).eps)
  for name, o, j, t in zip(('out', 'dq', 'dk', 'dv'), ours, jaxs, truth):
    assert o.dtype == jnp.bfloat16, name
    for form in (o, j):
      tolerance.assert_close(np.asarray(form, np.float32), t, 6, eps=bf16)


def test_no_token_sees_a_later_one():
  """Outputs before position 5 do not change when the keys and values from
  5 on do, and their loss has no gradient there."""
  q, k, v, k2 = _inputs((2, 12, 2, 8), seed=1)
  cut = 5
  later = lambda x, y: x.at[:, cut:].set(y[:, cut:])
  out = attention.causal_attention(q, k, v)
  changed = attention.causal_attention(q, later(k, k2), later(v, -k2))
  np.testing.assert_array_equal(out[:, :cut], changed[:, :cut])
  assert not np.allclose(out[:, cut:], changed[:, cut:])
  dk, dv = jax.grad(lambda k, v: jnp.sum(
      attention.causal_attention(q, k, v)[:, :cut] ** 2), argnums=(0, 1))(k, v)
  assert np.all(dk[:, cut:] == 0) and np.all(dv[:, cut:] == 0)
  assert np.any(dk[:, :cut] != 0) and np.any(dv[:, :cut] != 0)


def test_other_backends_use_jax_dot_product_attention(monkeypatch):
  q, k, v, _ = _inputs((1, 8, 2, 4))
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  np.testing.assert_array_equal(attention.causal_attention(q, k, v),
                                attention.reference_attention(q, k, v))


@pytest.mark.parametrize('dtype, head_dim, platform, on_device, want', [
    (jnp.bfloat16, 64, 'gpu', True, 'cudnn'),
    (jnp.float16, 128, 'gpu', True, 'cudnn'),
    (jnp.float32, 64, 'gpu', True, 'xla'),      # cuDNN: fp16/bf16 only
    (jnp.bfloat16, 12, 'gpu', True, 'xla'),     # not a multiple of 8
    (jnp.bfloat16, 256, 'gpu', True, 'xla'),    # above 128
    (jnp.bfloat16, 64, 'gpu', False, 'xla'),    # compiled without the GPU
    (jnp.bfloat16, 64, 'tpu', True, 'xla'),
    (jnp.bfloat16, 64, 'cpu', True, 'cpu'),
    (jnp.float32, 64, 'cpu', False, 'cpu'),
])
def test_the_core_follows_dtype_head_dim_and_platform(dtype, head_dim,
                                                      platform, on_device,
                                                      want):
  assert attention.implementation(dtype, head_dim, platform,
                                  on_device) == want


def test_a_gpu_run_calls_cudnn_fused_attention(monkeypatch):
  """On a GPU (its device present), bfloat16 goes to jax.nn's cuDNN fused
  attention, causal and without a jax.checkpoint around it (its backward
  keeps no probabilities); float32 to XLA's form. The call is recorded and
  run in XLA's form, as this machine has no cuDNN."""
  calls = []
  original = jax.nn.dot_product_attention

  def recorded(*args, **kwargs):
    calls.append(kwargs)
    return original(*args, **{**kwargs, 'implementation': 'xla'})

  monkeypatch.setattr(jax.nn, 'dot_product_attention', recorded)
  monkeypatch.setattr(platform_lib, 'runs_here', lambda: True)
  q, k, v, _ = _inputs((1, 16, 2, 8), jnp.bfloat16)
  with platform_lib.compiling_for('h100'):
    jaxpr = jax.make_jaxpr(attention.causal_attention)(q, k, v)
    assert calls == [{'is_causal': True, 'implementation': 'cudnn'}]
    assert 'remat' not in str(jaxpr)
    calls.clear()
    q32, k32, v32 = [x.astype(jnp.float32) for x in (q, k, v)]
    np.testing.assert_array_equal(
        attention.causal_attention(q32, k32, v32),
        attention.reference_attention(q32, k32, v32))
    assert calls == []  # the reference is XLA's form, bound at import


def test_mismatched_shapes_raise():
  q, k, _, _ = _inputs((1, 8, 2, 4))
  with pytest.raises(ValueError, match='one shape'):
    attention.causal_attention(q, k, k[:, :4])


def test_no_layer_keeps_its_probabilities():
  """Compiled temp memory of the gradients of 16 scanned attention layers
  stays under half of the 16 layers' (T x T) probabilities; jax's form
  without recompute keeps them all."""
  layers, shape = 16, (1, 512, 2, 8)
  probs_bytes = layers * shape[0] * shape[2] * shape[1] ** 2 * 4

  def temp_bytes(core):
    def loss(q, k, v):
      step = lambda x, _: (core(x, k, v), None)
      return jnp.sum(jax.lax.scan(step, q, None, length=layers)[0])
    s = jax.ShapeDtypeStruct(shape, jnp.float32)
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return fn.lower(s, s, s).compile().memory_analysis().temp_size_in_bytes

  keeps = functools.partial(jax.nn.dot_product_attention, is_causal=True)
  assert temp_bytes(keeps) >= probs_bytes
  assert temp_bytes(attention.causal_attention) < probs_bytes / 2
