"""The core of causal multi-head attention: softmax(q k^T / sqrt(d)) v.

No form here keeps the (T x T) probabilities for the backward pass (at
sequence 1024 they would outweigh a POET model's weights). Which form runs
is decided once per model, from its compute dtype and head dimension and
the platform compiled for (implementation):

- 'cpu' (docs/benchmarks.md, "The attention core on CPU"): head-major,
  (B, H, T, d), with a hand-written backward that keeps each row's
  log-sum-exp: XLA:CPU's products over token-major (B, T, H, d) operands go
  through strided copies and odd layouts, and recomputing the softmax from
  its log-sum-exp saves the forward's max, sum and division in the backward.
- 'cudnn', on a GPU for bfloat16 or float16 with a head dimension cuDNN
  takes: jax.nn.dot_product_attention's cuDNN fused (flash) attention, whose
  own backward keeps the output and each row's log-sum-exp, not the
  probabilities.
- 'xla' elsewhere: jax.nn.dot_product_attention's XLA form, recomputed in
  the backward (jax.checkpoint), the tests' reference.

The platform is the one compiled for (platform_lib.platform()), not necessarily
this machine's. cuDNN builds its kernels with the GPU present, so a dry run
compiling for a GPU this machine lacks compiles the 'xla' form, and says so.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from poet_jax import platform as platform_lib

IMPLEMENTATIONS = ('cpu', 'cudnn', 'xla')
# What jax.nn.dot_product_attention(implementation='cudnn') accepts in JAX
# 0.12 (jax/_src/cudnn/fused_attention_stablehlo.py, check_is_flash_attention)
# without fp8: fp16 or bf16 q, k, v and a head dimension that is a multiple
# of 8, at most 128 (256 from Hopper on; kept at 128, which every cuDNN
# GPU takes).
CUDNN_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 128


def cudnn_supports(dtype, head_dim: int) -> bool:
  """Whether cuDNN's fused attention takes q, k, v of `dtype` with heads of
  `head_dim`."""
  return (np.dtype(dtype) in CUDNN_DTYPES and head_dim % 8 == 0
          and head_dim <= CUDNN_MAX_HEAD_DIM)


def implementation(dtype, head_dim: int, platform: str | None = None,
                   on_device: bool | None = None) -> str:
  """The attention core of a model ('cpu', 'cudnn' or 'xla') with compute
  `dtype` and heads of `head_dim`, compiled for `platform` (default
  platform_lib.platform()); `on_device` (default platform_lib.runs_here()) says
  whether that platform's device is present, which cuDNN needs to build
  its kernels."""
  platform = platform_lib.platform() if platform is None else platform
  if platform == 'cpu':
    return 'cpu'
  if platform != 'gpu' or not cudnn_supports(dtype, head_dim):
    return 'xla'
  on_device = platform_lib.runs_here() if on_device is None else on_device
  return 'cudnn' if on_device else 'xla'


def describe(dtype, head_dim: int) -> str:
  """implementation() for a log line; when compiling for a GPU this machine
  lacks, also what a run on that GPU uses."""
  compiled = implementation(dtype, head_dim)
  on_gpu = implementation(dtype, head_dim, on_device=True)
  if on_gpu == compiled:
    return compiled
  return (f'{compiled} (a run on the GPU uses {on_gpu}: cuDNN builds its '
          'kernels with the GPU present)')


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array
                        ) -> jax.Array:
  """jax.nn.dot_product_attention(is_causal=True), recomputed in the backward.

  The 'xla' form, and the tests' reference. Shapes and dtypes as
  causal_attention.
  """
  return _reference(q, k, v)


_reference = jax.checkpoint(
    functools.partial(jax.nn.dot_product_attention, is_causal=True,
                      implementation='xla'),
    policy=jax.checkpoint_policies.nothing_saveable)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """The 'cudnn' form: cuDNN's fused causal attention (GPU only).

  Not wrapped in jax.checkpoint: its backward keeps q, k, v, the output and
  a float32 log-sum-exp per row and head, (B, H, T), and recomputes the
  probabilities itself; a checkpoint would only run the forward kernel a
  second time. Shapes and dtypes as causal_attention.
  """
  return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                      implementation='cudnn')


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Causal self-attention of every head: token t attends to tokens <= t.

  Args:
    q, k, v: (B, T, H, d), one float dtype (float32 or bfloat16); position t
      of every row is token t.
  Returns:
    (B, T, H, d) of that dtype. The scores and the softmax are computed in
    float32; the probabilities multiply v in v's dtype, as in
    jax.nn.dot_product_attention.
  Raises:
    ValueError: if q, k and v differ in shape.
  """
  if not q.shape == k.shape == v.shape:
    raise ValueError(f'causal_attention: q, k, v must have one shape (B, T, '
                     f'H, d); got {q.shape}, {k.shape}, {v.shape}')
  form = implementation(q.dtype, q.shape[-1])
  if form == 'cudnn':
    return cudnn_attention(q, k, v)
  if form == 'xla':
    return reference_attention(q, k, v)
  heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # (B, T, H, d) <-> (B, H, T, d)
  return heads_major(_heads_major_attention(heads_major(q), heads_major(k),
                                            heads_major(v)))


def _causal(t: int) -> jax.Array:
  """(T, T) bool: query t (rows) sees key s (columns) when s <= t."""
  return jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]


@jax.custom_vjp
def _heads_major_attention(q, k, v):
  """causal_attention of (B, H, T, d) q, k, v."""
  return _forward(q, k, v)[0]


def _forward(q, k, v):
  """The output and the residuals: q, k, v and each row's log-sum-exp."""
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum('bhtd,bhsd->bhts', q, k,
                      preferred_element_type=jnp.float32) * scale
  # A finite floor, not -inf: exp of it underflows to exactly 0.
  floor = 0.7 * jnp.finfo(jnp.float32).min
  scores = jnp.where(_causal(q.shape[2]), scores, floor)
  peak = jnp.max(scores, axis=-1, keepdims=True)
  exp = jnp.exp(scores - peak)
  total = jnp.sum(exp, axis=-1, keepdims=True)
  out = jnp.einsum('bhts,bhsd->bhtd', (exp / total).astype(v.dtype), v)
  lse = (peak + jnp.log(total))[..., 0]  # (B, H, T)
  return out, (q, k, v, lse)


def _backward(residuals, dout):
  """Softmax attention's vjp from recomputed probabilities.

  Works on the transposed (key-major) probabilities p^T (B, H, S, T): two of
  the three products that take them (dv = p^T dout, dk = ds^T q) are then
  plain row-major products, which XLA:CPU runs faster than the transposed
  ones.
  """
  q, k, v, lse = residuals
  scale = q.shape[-1] ** -0.5
  scores_t = jnp.einsum('bhsd,bhtd->bhst', k, q,
                        preferred_element_type=jnp.float32) * scale
  probs_t = jnp.where(_causal(q.shape[2]).T,
                      jnp.exp(scores_t - lse[:, :, None, :]), 0.0)
  dv = jnp.einsum('bhst,bhtd->bhsd', probs_t.astype(dout.dtype), dout,
                  preferred_element_type=jnp.float32)
  dprobs_t = jnp.einsum('bhsd,bhtd->bhst', v, dout,
                        preferred_element_type=jnp.float32)
  # The softmax's backward, over keys (axis 2 here), times the scale.
  dscores_t = (probs_t * (dprobs_t - jnp.sum(probs_t * dprobs_t, axis=2,
                                             keepdims=True)) * scale)
  dscores_t = dscores_t.astype(q.dtype)
  dq = jnp.einsum('bhst,bhsd->bhtd', dscores_t, k,
                  preferred_element_type=jnp.float32)
  dk = jnp.einsum('bhst,bhtd->bhsd', dscores_t, q,
                  preferred_element_type=jnp.float32)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_heads_major_attention.defvjp(_forward, _backward)
