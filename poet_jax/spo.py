"""Stochastic primitive optimization: where the orthogonal blocks act.

Pure functions on arrays: the products, the merge that folds the blocks
into W0, and the placements drawn anew at each merge. Activations are row
vectors (..., features) and kernels are (in_features, out_features), as in
Flax, so a layer computes y = x @ K with K = P_in @ W0 @ R_out.

Block-stochastic (POET-BS). P_in = Psi^T Diag(G_1..G_k) Psi. We describe Psi
by a gather index `in_perm` (x @ Psi^T == x[..., in_perm]) and, on the output
side, by the gather applied last (`out_perm`). W0 is stored in the frame of
the permutations ("permutation reduction"), so the activation path is

    y = (blockdiag((blockdiag(x[..., in_perm], G_in)) @ W0_frame, G_out))[..., out_perm]

with two gathers and no dense orthogonal matrix anywhere. The dense kernel is
K = M[argsort(in_perm)][:, out_perm] with M = Diag(G_in) W0_frame Diag(G_out).

For speed (docs/benchmarks.md): the gathers are `permute`, whose backward is
the gather by the inverse permutation rather than a scatter-add; the block
products are batched matmuls on a block-major (k, N, b) layout, into which
the gathers write directly; the materialized path permutes the (in, out)
kernel instead of the activations.

Fully-stochastic (POET-FS). P_in = I + D(S)(G - I)D(S)^T for an index set S
of size b: it acts as G on the coordinates S and as the identity elsewhere.
W0 is kept in its own frame.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from poet_jax import quant

# Name of the one activation the 'fast' path keeps for its backward (the
# output of the W0 product, in block layout); see paths.FORWARD.
SAVED_ACTIVATION = 'poet_h'


def inverse_permutation(perm: jax.Array) -> jax.Array:
  """inv with inv[perm[i]] = i: a scatter of len(perm) integers, no sort."""
  return jnp.zeros_like(perm).at[perm].set(
      jnp.arange(perm.shape[0], dtype=perm.dtype))


def _gather(x: jax.Array, perm: jax.Array, axis: int) -> jax.Array:
  # take_along_axis reads every element by its own (row, perm) index, in the
  # order of the output. XLA:CPU compiles x[..., perm] instead to a gather of
  # whole columns followed by a transpose, 3-4x slower inside a layer's
  # fusions (measured with `python -m poet_jax.bench --only=breakdown`).
  index = jnp.expand_dims(perm, tuple(range(1, x.ndim - axis % x.ndim)))
  return jnp.take_along_axis(x, jnp.broadcast_to(index, x.shape), axis=axis,
                             mode='promise_in_bounds')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def permute(x: jax.Array, perm: jax.Array, axis: int = -1) -> jax.Array:
  """x gathered along `axis` by a permutation: x[..., perm] for axis=-1.

  The backward gathers the cotangent with the inverse permutation, where
  autodiff of a gather would scatter-add (slower on CPU, and atomics on GPU).
  Only correct when perm is a permutation of range(x.shape[axis]).
  """
  return _gather(x, perm, axis)


def _permute_fwd(x, perm, axis):
  return _gather(x, perm, axis), perm


def _permute_bwd(axis, perm, g):
  return _gather(g, inverse_permutation(perm), axis), None


permute.defvjp(_permute_fwd, _permute_bwd)


def _to_blocks(x: jax.Array, b: int) -> jax.Array:
  """(N, k*b) -> (k, N, b): block-major, the layout of a batched matmul."""
  return x.reshape(x.shape[0], -1, b).transpose(1, 0, 2)


def _from_blocks(xk: jax.Array) -> jax.Array:
  """(k, N, b) -> (N, k*b)."""
  k, n, b = xk.shape
  return xk.transpose(1, 0, 2).reshape(n, k * b)


def block_diag_apply(x: jax.Array, blocks: jax.Array) -> jax.Array:
  """x @ Diag(blocks): x (..., k*b), blocks (k, b, b)."""
  rows = x.reshape(-1, x.shape[-1])
  out = _from_blocks(_to_blocks(rows, blocks.shape[-1]) @ blocks)
  return out.reshape(x.shape)


def block_diag_left(blocks: jax.Array, w: jax.Array) -> jax.Array:
  """Diag(blocks) @ w: blocks (k, b, b), w (k*b, n)."""
  k, b, _ = blocks.shape
  rows = w.reshape(k, b, w.shape[-1])
  return jnp.einsum('kbc,kcn->kbn', blocks, rows).reshape(w.shape)


# ---------------------------------------------------------------- block (BS)


def block_forward(x, w0_frame, g_in, g_out, in_perm, out_perm):
  """Input-centric POET-X forward: never builds the dense kernel.

  The block products run as batched matmuls over a (k, N, b) copy of the
  activations; each gather is fused with the transpose into that layout.
  The W0 product's output is named SAVED_ACTIVATION.
  """
  lead = x.shape[:-1]
  rows = x.reshape(-1, x.shape[-1])
  xk = _to_blocks(permute(rows, in_perm), g_in.shape[-1])
  h = _from_blocks(xk @ g_in) @ w0_frame
  hk = checkpoint_name(_to_blocks(h, g_out.shape[-1]), SAVED_ACTIVATION)
  y = permute(_from_blocks(hk @ g_out), out_perm)
  return y.reshape(*lead, y.shape[-1])


def block_rotated_frame(w0_frame, g_in, g_out):
  """M = Diag(G_in) W0_frame Diag(G_out), still in the permutation frame."""
  return block_diag_apply(block_diag_left(g_in, w0_frame), g_out)


def block_materialized_forward(x, w0_frame, g_in, g_out, in_perm, out_perm):
  """Original POET: build the dense kernel, then one dense product.

  The permutations are applied to the (in, out) kernel, not to the
  activations: x @ K is then laid out exactly as a dense layer.
  """
  return x @ block_kernel(w0_frame, g_in, g_out, in_perm, out_perm)


def block_kernel(w0_frame, g_in, g_out, in_perm, out_perm):
  """Dense (in, out) kernel K with x @ K == block_forward(x, ...)."""
  m = block_rotated_frame(w0_frame, g_in, g_out)
  return permute(permute(m, inverse_permutation(in_perm), 0), out_perm)


def to_block_frame(kernel, in_perm, out_perm):
  """Inverse of block_kernel at G = I: the frame in which W0 is stored."""
  return kernel[in_perm][:, jnp.argsort(out_perm)]


def block_merge(w0_frame, g_in, g_out, in_perm, out_perm, new_in_perm,
                new_out_perm):
  """Fold the blocks into W0 and move it to the frame of new permutations.

  Equals to_block_frame(block_kernel(...), new_in_perm, new_out_perm) with one
  composed gather per axis.
  """
  m = block_rotated_frame(w0_frame, g_in, g_out)
  rows = inverse_permutation(in_perm)[new_in_perm]
  cols = out_perm[inverse_permutation(new_out_perm)]
  return _gather(_gather(m, rows, 0), cols, -1)


# ----------------------------------------------------------------- full (FS)


def index_set_apply(x: jax.Array, g: jax.Array, index: jax.Array) -> jax.Array:
  """x @ (I + D(S)(G - I)D(S)^T): replace x[..., S] by x[..., S] @ G."""
  return x.at[..., index].set(x[..., index] @ g)


def full_forward(x, w0, g_in, g_out, in_index, out_index):
  h = index_set_apply(x, g_in, in_index)
  return index_set_apply(h @ w0, g_out, out_index)


def full_kernel(w0, g_in, g_out, in_index, out_index):
  """P_in W0 R_out: rows S_in of W0 turned by G_in, then columns S_out."""
  left = w0.at[in_index].set(g_in @ w0[in_index])
  return index_set_apply(left, g_out, out_index)


def full_materialized_forward(x, w0, g_in, g_out, in_index, out_index):
  return x @ full_kernel(w0, g_in, g_out, in_index, out_index)


# ---------------------------------------------------------------- placement


def draw_permutation(key: jax.Array, n: int) -> jax.Array:
  return jax.random.permutation(key, n).astype(jnp.int32)


def draw_index_set(key: jax.Array, n: int, size: int) -> jax.Array:
  """A uniformly random subset of {0..n-1} of the given size, sorted."""
  return jnp.sort(jax.random.permutation(key, n)[:size]).astype(jnp.int32)


# -------------------------------------------------------------------- merge


def merge_layer(variant: str, w0, g_in, g_out, in_place, out_place, key):
  """One layer's merge-then-reinitialize, on its arrays: (W0, in_place,
  out_place) with the blocks folded into W0 and new placements drawn from
  `key`.

  w0 is stored as a POETLinear stores it (in, out): in the permutation
  frame ('block') or its own ('full'), an array or a quant.Quantized;
  g_in, g_out are the (k, b, b) blocks (k = 1 for 'full'). Computed in W0's
  float type promoted with float32; an 8-bit W0 is dequantized to float32
  and the result requantized (spec, section 4).
  """
  dtype = jnp.promote_types(quant.storage_dtype(w0), jnp.float32)
  g_in, g_out = g_in.astype(dtype), g_out.astype(dtype)
  w = quant.dense(w0, dtype)
  in_features, out_features = w.shape
  key_in, key_out = jax.random.split(key)
  if variant == 'block':
    new_in = draw_permutation(key_in, in_features)
    new_out = draw_permutation(key_out, out_features)
    w = block_merge(w, g_in, g_out, in_place, out_place, new_in, new_out)
  else:
    new_in = draw_index_set(key_in, in_features, g_in.shape[-1])
    new_out = draw_index_set(key_out, out_features, g_out.shape[-1])
    w = full_kernel(w, g_in[0], g_out[0], in_place, out_place)
  if isinstance(w0, quant.Quantized):
    return quant.quantize(w, w0.group_size), new_in, new_out
  return w.astype(w0.dtype), new_in, new_out


def merge_stack(variant: str, w0, g_in, g_out, in_place, out_place, keys):
  """merge_layer over a stack of layers (keys: one per layer, shaped as the
  leading axes), one layer at a time and in place.

  A fori_loop reads layer i of W0 and the placements from its carry and
  writes the merged layer back there: the float32 working copy costs one
  layer, and the new W0 takes the old one's buffer (a lax.map would build a
  second stacked W0, the model's whole size: 23.6 GiB at llama_13b in
  bfloat16, in the dry run).
  """
  lead = keys.shape
  flat = lambda x: x.reshape((math.prod(lead),) + x.shape[len(lead):])
  w0 = jax.tree.map(flat, w0)
  g_in, g_out, keys = flat(g_in), flat(g_out), flat(keys)

  def body(i, carry):
    at = lambda x: x[i]
    new = merge_layer(variant, jax.tree.map(at, carry[0]), g_in[i], g_out[i],
                      carry[1][i], carry[2][i], keys[i])
    return jax.tree.map(lambda x, v: x.at[i].set(v), carry, new)

  carry = (w0, flat(in_place), flat(out_place))
  carry = jax.lax.fori_loop(0, keys.shape[0], body, carry)
  return jax.tree.map(lambda x: x.reshape(lead + x.shape[1:]), carry)
