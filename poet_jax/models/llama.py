"""Llama in Flax NNX: a plain dense model.

RMSNorm, rotary embeddings, SwiGLU MLP, causal attention with multi-head or
grouped-query keys and values (num_kv_heads, as Llama-2 70B and Llama-3),
and an untied or tied (the embedding's transpose) output head. The layer
stack is created with nnx.vmap and run with lax.scan, so it is traced and
compiled once however deep the model is.
`Llama.decode` is the inference path: the same blocks with a key/value cache
(`init_cache`), for generation one token at a time.

Every linear layer is an nnx.Linear. A POET model is this model after
`poet_jax.poetize`, which replaces the blocks' linears (stacked, one per
layer) by POET layers; nothing here depends on which linear a block holds.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import ad_checkpoint

from poet_jax import platform
from poet_jax import spo
from poet_jax.models import attention as attention_lib
from poet_jax.models import loss as loss_lib


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 256
  dim: int = 64
  num_layers: int = 2
  num_heads: int = 4
  ffn_dim: int = 128
  norm_eps: float = 1e-6            # RMSNorm eps (the papers'; Llama-3 1e-5)
  rope_theta: float = 10000.0       # rotary base (Llama-3: 500000)
  num_kv_heads: int = 0             # key/value heads; 0: num_heads (MHA)
  tie_embeddings: bool = False      # output head = embedding transposed
  dtype: Any = jnp.float32          # compute dtype; parameters stay float32
  remat: bool = False               # recompute each block in the backward
  remat_policy: str = 'full'        # 'full', or 'products' (REMAT_POLICIES)
  loss_chunk_tokens: int = 8192     # tokens per chunk of the loss; 0: one

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def kv_heads(self) -> int:
    """Key/value heads: num_kv_heads, or num_heads when 0."""
    return self.num_kv_heads or self.num_heads


def dense(cfg: LlamaConfig, in_features: int, out_features: int,
          rngs: nnx.Rngs) -> nnx.Linear:
  """A bias-free linear layer with the Llama init N(0, 0.02^2)."""
  return nnx.Linear(in_features, out_features, use_bias=False,
                    dtype=cfg.dtype,
                    kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotate pairs (x_i, x_{i+d/2}) of x (B, T, H, d) by position angles."""
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[..., None].astype(jnp.float32) * freq  # (B, T, half)
  sin = jnp.sin(angle)[:, :, None, :].astype(x.dtype)
  cos = jnp.cos(angle)[:, :, None, :].astype(x.dtype)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _tokens_major(x: jax.Array) -> jax.Array:
  """(B, T, D) -> (B * T, D) on CPU, unchanged elsewhere.

  XLA:CPU transposes the weight gradient of a product over a 3-D input
  through a strided copy that also recomputes the producer's elementwise
  backward (SwiGLU's most of all): a flat 2-D input keeps that gradient a
  plain product. Same arithmetic either way (docs/benchmarks.md).
  """
  if platform.platform() != 'cpu':
    return x
  return x.reshape(-1, x.shape[-1])


# What a rematerialized block keeps for its backward (model.remat_policy):
# nothing but its input ('full'), or also the outputs of its seven linear
# layers ('products', tagged PRODUCT) and, in a POET layer, the W0 product
# that its 'fast' path keeps (spo.SAVED_ACTIVATION), so that the backward
# recomputes the norms, the attention core, the activations and the
# orthogonal blocks' products, not the large products.
PRODUCT = 'product'
REMAT_POLICIES = {
    'full': None,
    'products': jax.checkpoint_policies.save_only_these_names(
        PRODUCT, spo.SAVED_ACTIVATION),
}


def _product(y: jax.Array) -> jax.Array:
  """y, tagged as a linear layer's output for the 'products' policy."""
  return ad_checkpoint.checkpoint_name(y, PRODUCT)


# Causal attention whose backward recomputes the (T x T) probabilities
# instead of keeping them per layer (attention.py).
_attention = attention_lib.causal_attention


def _shared_kv(k: jax.Array, num_heads: int) -> jax.Array:
  """(B, T, H_kv, d) keys or values for all H heads: query head h uses
  key/value head h // (H / H_kv), as transformers' repeat_kv."""
  group = num_heads // k.shape[2]
  return k if group == 1 else jnp.repeat(k, group, axis=2)


class Attention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, kv = cfg.dim, cfg.kv_heads * cfg.head_dim
    self.q = dense(cfg, d, d, rngs)
    self.k = dense(cfg, d, kv, rngs)
    self.v = dense(cfg, d, kv, rngs)
    self.o = dense(cfg, d, d, rngs)

  def _heads(self, y, b, t, num_heads):
    return y.reshape(b, t, num_heads, self.cfg.head_dim)

  def __call__(self, x, positions):
    b, t, d = x.shape
    cfg = self.cfg
    flat = _tokens_major(x)
    q = rotary(self._heads(_product(self.q(flat)), b, t, cfg.num_heads),
               positions, cfg.rope_theta)
    k = rotary(self._heads(_product(self.k(flat)), b, t, cfg.kv_heads),
               positions, cfg.rope_theta)
    v = self._heads(_product(self.v(flat)), b, t, cfg.kv_heads)
    out = _attention(q, _shared_kv(k, cfg.num_heads),
                     _shared_kv(v, cfg.num_heads))
    return _product(self.o(_tokens_major(out.reshape(b, t, d)))).reshape(
        b, t, d)

  def decode(self, x, positions, k_cache, v_cache):
    """Attention of new tokens over themselves and the cached ones.

    x (B, T, D) sits at `positions` (B, T), consecutive and the same in every
    row; their keys and values are written into the caches (B, S, H_kv, d)
    at those slots, and each token attends to slots up to its own position.
    Returns (output (B, T, D), k_cache, v_cache).
    """
    b, t, _ = x.shape
    cfg = self.cfg
    q = rotary(self._heads(self.q(x), b, t, cfg.num_heads), positions,
               cfg.rope_theta)
    k = rotary(self._heads(self.k(x), b, t, cfg.kv_heads), positions,
               cfg.rope_theta)
    start = positions[0, 0]
    k_cache = jax.lax.dynamic_update_slice_in_dim(
        k_cache, k.astype(k_cache.dtype), start, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(
        v_cache, self._heads(self.v(x), b, t, cfg.kv_heads).astype(
            v_cache.dtype), start, axis=1)
    # Slots after a token's position are empty or in its future.
    visible = jnp.arange(k_cache.shape[1]) <= positions[:, :, None]
    out = jax.nn.dot_product_attention(
        q, _shared_kv(k_cache.astype(q.dtype), cfg.num_heads),
        _shared_kv(v_cache.astype(q.dtype), cfg.num_heads),
        mask=visible[:, None])
    return self.o(out.reshape(b, t, cfg.dim)), k_cache, v_cache


class MLP(nnx.Module):

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.gate = dense(cfg, cfg.dim, cfg.ffn_dim, rngs)
    self.up = dense(cfg, cfg.dim, cfg.ffn_dim, rngs)
    self.down = dense(cfg, cfg.ffn_dim, cfg.dim, rngs)

  def __call__(self, x):
    flat = _tokens_major(x)
    hidden = (jax.nn.silu(_product(self.gate(flat))) *
              _product(self.up(flat)))
    return _product(self.down(hidden)).reshape(x.shape)


class Block(nnx.Module):

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.attention_norm = nnx.RMSNorm(cfg.dim, epsilon=cfg.norm_eps,
                                      dtype=cfg.dtype, rngs=rngs)
    self.attention = Attention(cfg, rngs)
    self.mlp_norm = nnx.RMSNorm(cfg.dim, epsilon=cfg.norm_eps,
                                dtype=cfg.dtype, rngs=rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions):
    x = x + self.attention(self.attention_norm(x), positions)
    return x + self.mlp(self.mlp_norm(x))

  def decode(self, x, positions, k_cache, v_cache):
    """__call__ with a key/value cache; see Attention.decode."""
    h, k_cache, v_cache = self.attention.decode(self.attention_norm(x),
                                                positions, k_cache, v_cache)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), k_cache, v_cache


class Llama(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, dtype=cfg.dtype,
                           embedding_init=nnx.initializers.normal(0.02),
                           rngs=rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return Block(cfg, rngs)

    self.blocks = make_blocks(rngs)
    self.norm = nnx.RMSNorm(cfg.dim, epsilon=cfg.norm_eps, dtype=cfg.dtype,
                            rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = dense(cfg, cfg.dim, cfg.vocab_size, rngs)

  def head_kernel(self) -> jax.Array:
    """The output head's (dim, vocab) kernel: lm_head's, or the embedding
    transposed when tied."""
    if self.cfg.tie_embeddings:
      return self.embed.embedding[...].T
    return self.lm_head.kernel[...]

  def head(self, x: jax.Array) -> jax.Array:
    """The output head: x (..., dim) -> logits (..., vocab) float32."""
    if self.cfg.tie_embeddings:
      return self.embed.attend(x).astype(jnp.float32)
    return self.lm_head(x).astype(jnp.float32)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens (B, T) int -> logits (B, T, vocab) float32."""
    return self.head(self.features(tokens))

  def features(self, tokens: jax.Array) -> jax.Array:
    """tokens (B, T) int -> the final norm's output (B, T, dim), the
    output head's input."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = self.embed(tokens)

    # A plain lax.scan over the stacked block state. The forward does not
    # mutate the blocks, so unlike nnx.scan nothing is scanned back out: no
    # second stacked copy of W0 is made.
    graphdef, stacked = nnx.split(self.blocks)

    def run_block(x, block_state):
      return nnx.merge(graphdef, block_state)(x, positions), None

    if self.cfg.remat:
      run_block = jax.checkpoint(run_block,
                                 policy=REMAT_POLICIES[self.cfg.remat_policy])
    x, _ = jax.lax.scan(run_block, x, stacked)
    return self.norm(x)

  def decode(self, tokens: jax.Array, cache: dict, start
             ) -> tuple[jax.Array, dict]:
    """The forward pass of new tokens, reusing the keys/values of earlier ones.

    Args:
      tokens: (B, T) int, the tokens at positions start .. start + T - 1 of
        every row (T = the prompt's length to prefill, then 1 per step).
      cache: from init_cache, holding positions 0 .. start - 1.
      start: int scalar (may be traced), the position of tokens[:, 0].
    Returns:
      logits (B, T, vocab) float32, equal (to rounding) to those of
      __call__ on the whole sequence at these positions, and the cache with
      these tokens added.
    """
    positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1]),
                                 tokens.shape)
    x = self.embed(tokens)
    graphdef, stacked = nnx.split(self.blocks)

    def run_block(x, layer):
      block_state, k_cache, v_cache = layer
      x, k_cache, v_cache = nnx.merge(graphdef, block_state).decode(
          x, positions, k_cache, v_cache)
      return x, (k_cache, v_cache)

    x, (k, v) = jax.lax.scan(run_block, x, (stacked, cache['k'], cache['v']))
    return self.head(self.norm(x)), {'k': k, 'v': v}


def init_cache(cfg: LlamaConfig, batch_size: int, max_length: int) -> dict:
  """An empty key/value cache for Llama.decode.

  {'k', 'v'}: zeros (num_layers, batch_size, max_length, kv_heads,
  head_dim) of the compute dtype; max_length bounds prompt + generated
  tokens.
  """
  shape = (cfg.num_layers, batch_size, max_length, cfg.kv_heads,
           cfg.head_dim)
  return {'k': jnp.zeros(shape, cfg.dtype), 'v': jnp.zeros(shape, cfg.dtype)}


def next_token_loss(model: Llama, tokens: jax.Array,
                    mask: jax.Array | None = None) -> jax.Array:
  """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1].

  The head and the cross-entropy run in chunks of cfg.loss_chunk_tokens
  tokens (loss.py): the whole batch's logits never exist at once.
  """
  hidden = model.features(tokens[:, :-1])
  weights = None if mask is None else mask[:, 1:].astype(jnp.float32)
  total = loss_lib.cross_entropy_sum(
      hidden, model.head_kernel(), tokens[:, 1:], weights,
      chunk_tokens=model.cfg.loss_chunk_tokens, dtype=model.cfg.dtype)
  count = (jnp.asarray(tokens[:, 1:].size, jnp.float32) if mask is None
           else jnp.maximum(weights.sum(), 1.0))
  return total / count
