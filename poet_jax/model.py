"""Llama in Flax NNX, with the block linears POET or dense by configuration.

RMSNorm, rotary embeddings, SwiGLU MLP, multi-head causal attention and an
untied output head. The layer stack is created with nnx.vmap and run with
nnx.scan, so it is traced and compiled once however deep the model is.
"""
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from poet_jax import layers

BLOCK_LINEARS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


@dataclasses.dataclass(frozen=True)
class POETConfig:
  variant: str = 'block'
  block_size: Any = 256        # int, or a fraction for variant='full'
  compute: str = 'fast'
  init: str = 'normalized'
  neumann_terms: int = 3
  orthogonal_map: str = 'neumann'
  w0_dtype: Any = jnp.float32  # a float dtype, or 'int8' (POET-XQ)
  w0_group_size: int = 256     # W0 rows per 8-bit group, for 'int8'
  memory_budget: int = 0       # for compute='auto'; see layers.choose_compute


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 256
  dim: int = 64
  num_layers: int = 2
  num_heads: int = 4
  ffn_dim: int = 128
  norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  dtype: Any = jnp.float32          # compute dtype; parameters stay float32
  linear: str = 'poet'              # 'poet' or 'dense'
  poet: POETConfig = POETConfig()
  remat: bool = False               # recompute each block in the backward

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads


def make_linear(cfg: LlamaConfig, in_features: int, out_features: int,
                name: str, rngs: nnx.Rngs):
  """The one place where AdamW and POET models differ."""
  if cfg.linear == 'poet':
    p = cfg.poet
    return layers.POETLinear(
        in_features, out_features, block_size=p.block_size,
        variant=p.variant, compute=p.compute, init=p.init,
        neumann_terms=p.neumann_terms, orthogonal_map=p.orthogonal_map,
        dtype=cfg.dtype, w0_dtype=p.w0_dtype, w0_group_size=p.w0_group_size,
        memory_budget=p.memory_budget, name=name, rngs=rngs)
  if cfg.linear == 'dense':
    return nnx.Linear(in_features, out_features, use_bias=False,
                      dtype=cfg.dtype,
                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
  raise ValueError(f"unknown linear {cfg.linear!r}; use 'poet' or 'dense'")


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotate pairs (x_i, x_{i+d/2}) of x (B, T, H, d) by position angles."""
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[..., None].astype(jnp.float32) * freq  # (B, T, half)
  sin = jnp.sin(angle)[:, :, None, :].astype(x.dtype)
  cos = jnp.cos(angle)[:, :, None, :].astype(x.dtype)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# Causal attention whose backward recomputes the (T x T) probabilities from
# q, k, v instead of keeping them per layer, as flash attention does: at
# sequence 1024 the kept probabilities would outweigh a POET model's weights.
_attention = jax.checkpoint(
    functools.partial(jax.nn.dot_product_attention, is_causal=True),
    policy=jax.checkpoint_policies.nothing_saveable)


class Attention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.dim
    self.q = make_linear(cfg, d, d, 'attention.q', rngs)
    self.k = make_linear(cfg, d, d, 'attention.k', rngs)
    self.v = make_linear(cfg, d, d, 'attention.v', rngs)
    self.o = make_linear(cfg, d, d, 'attention.o', rngs)

  def __call__(self, x, positions):
    b, t, _ = x.shape
    heads = lambda y: y.reshape(b, t, self.cfg.num_heads, self.cfg.head_dim)
    q = rotary(heads(self.q(x)), positions, self.cfg.rope_theta)
    k = rotary(heads(self.k(x)), positions, self.cfg.rope_theta)
    out = _attention(q, k, heads(self.v(x)))
    return self.o(out.reshape(b, t, self.cfg.dim))


class MLP(nnx.Module):

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.gate = make_linear(cfg, cfg.dim, cfg.ffn_dim, 'mlp.gate', rngs)
    self.up = make_linear(cfg, cfg.dim, cfg.ffn_dim, 'mlp.up', rngs)
    self.down = make_linear(cfg, cfg.ffn_dim, cfg.dim, 'mlp.down', rngs)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


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
    self.lm_head = nnx.Linear(cfg.dim, cfg.vocab_size, use_bias=False,
                              dtype=cfg.dtype,
                              kernel_init=nnx.initializers.normal(0.02),
                              rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens (B, T) int -> logits (B, T, vocab) float32."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = self.embed(tokens)

    # A plain lax.scan over the stacked block state. The forward does not
    # mutate the blocks, so unlike nnx.scan nothing is scanned back out: no
    # second stacked copy of W0 is made.
    graphdef, stacked = nnx.split(self.blocks)

    def run_block(x, block_state):
      return nnx.merge(graphdef, block_state)(x, positions), None

    if self.cfg.remat:
      run_block = jax.checkpoint(run_block)
    x, _ = jax.lax.scan(run_block, x, stacked)
    return self.lm_head(self.norm(x)).astype(jnp.float32)


def next_token_loss(model: Llama, tokens: jax.Array,
                    mask: jax.Array | None = None) -> jax.Array:
  """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1]."""
  logits = model(tokens[:, :-1])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           tokens[:, 1:])
  if mask is None:
    return losses.mean()
  mask = mask[:, 1:].astype(losses.dtype)
  return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)
