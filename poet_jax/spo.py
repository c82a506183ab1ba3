"""Stochastic primitive optimization: where the orthogonal blocks act.

Pure functions on arrays. Activations are row vectors (..., features) and
kernels are (in_features, out_features), as in Flax, so a layer computes
y = x @ K with K = P_in @ W0 @ R_out.

Block-stochastic (POET-BS). P_in = Psi^T Diag(G_1..G_k) Psi. We describe Psi
by a gather index `in_perm` (x @ Psi^T == x[..., in_perm]) and, on the output
side, by the gather applied last (`out_perm`). W0 is stored in the frame of
the permutations ("permutation reduction"), so the activation path is

    y = (blockdiag((blockdiag(x[..., in_perm], G_in)) @ W0_frame, G_out))[..., out_perm]

with two gathers and no dense orthogonal matrix anywhere. The dense kernel is
K = M[argsort(in_perm)][:, out_perm] with M = Diag(G_in) W0_frame Diag(G_out).

Fully-stochastic (POET-FS). P_in = I + D(S)(G - I)D(S)^T for an index set S
of size b: it acts as G on the coordinates S and as the identity elsewhere.
W0 is kept in its own frame.
"""
import jax
import jax.numpy as jnp


def block_diag_apply(x: jax.Array, blocks: jax.Array) -> jax.Array:
  """x @ Diag(blocks): x (..., k*b), blocks (k, b, b)."""
  k, b, _ = blocks.shape
  chunks = x.reshape(*x.shape[:-1], k, b)
  return jnp.einsum('...kb,kbc->...kc', chunks, blocks).reshape(x.shape)


def block_diag_left(blocks: jax.Array, w: jax.Array) -> jax.Array:
  """Diag(blocks) @ w: blocks (k, b, b), w (k*b, n)."""
  k, b, _ = blocks.shape
  rows = w.reshape(k, b, w.shape[-1])
  return jnp.einsum('kbc,kcn->kbn', blocks, rows).reshape(w.shape)


# ---------------------------------------------------------------- block (BS)


def block_forward(x, w0_frame, g_in, g_out, in_perm, out_perm):
  """Input-centric POET-X forward: never builds the dense kernel."""
  h = block_diag_apply(x[..., in_perm], g_in)
  h = h @ w0_frame
  return block_diag_apply(h, g_out)[..., out_perm]


def block_rotated_frame(w0_frame, g_in, g_out):
  """M = Diag(G_in) W0_frame Diag(G_out), still in the permutation frame."""
  return block_diag_apply(block_diag_left(g_in, w0_frame), g_out)


def block_materialized_forward(x, w0_frame, g_in, g_out, in_perm, out_perm):
  """Original POET: build the rotated weight, then one dense product."""
  m = block_rotated_frame(w0_frame, g_in, g_out)
  return (x[..., in_perm] @ m)[..., out_perm]


def block_kernel(w0_frame, g_in, g_out, in_perm, out_perm):
  """Dense (in, out) kernel K with x @ K == block_forward(x, ...)."""
  m = block_rotated_frame(w0_frame, g_in, g_out)
  return m[jnp.argsort(in_perm)][:, out_perm]


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
  rows = jnp.argsort(in_perm)[new_in_perm]
  cols = out_perm[jnp.argsort(new_out_perm)]
  return m[rows][:, cols]


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
