"""POETLinear: a linear layer W = P_in W0 R_out with a frozen W0.

Variables of a POETLinear:
  w0        FrozenWeight  the fixed matrix (stored in the permutation frame for
                          the block variant); no gradient, no optimizer state.
                          With w0_dtype='int8' (POET-XQ) its uint8 codes, and
  w0_scale, w0_zero       FrozenWeight per-group scale and zero point
                          (poet_jax/quant.py)
  in_blocks, out_blocks   OrthogonalBlocks: the orthogonal b x b blocks of
                          P_in and R_out themselves (trainable; identity at
                          init and after every merge)
  in_*/out_* Placement    permutations (block) or index sets (full); integer
                          state re-drawn at every merge

The layer multiplies by its blocks directly: it has no Cayley–Neumann map.
The blocks stay orthogonal because the optimizer keeps them on the map's
image: `poet_jax.reparameterize` owns the generators (spec section 2) and
turns the blocks' gradient into theirs.
"""
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from poet_jax import paths
from poet_jax import quant
from poet_jax import spo

VARIANTS = ('block', 'full')
COMPUTES = ('fast', 'mem', 'materialize', 'auto')
INITS = ('normalized', 'standard', 'xavier', 'uniform_spectrum')
BLOCK_NAMES = ('in_blocks', 'out_blocks')  # attributes of OrthogonalBlocks


class FrozenWeight(nnx.Variable):
  """A weight that is not an nnx.Param: no gradient, no optimizer state."""


class OrthogonalBlocks(nnx.Param):
  """Orthogonal b x b blocks of one side, (k, b, b) (the POET group).

  Trained through `poet_jax.reparameterize`, which keeps them equal to the
  orthogonal map of its generators; a plain optimizer would not.
  """


class Placement(nnx.Variable):
  """Integer permutation or index-set state, re-drawn at every merge."""


def init_w0(key: jax.Array, in_features: int, out_features: int,
            init: str = 'normalized', dtype: Any = jnp.float32) -> jax.Array:
  """The fixed random kernel (in_features, out_features).

  'standard' is the Llama init N(0, 0.02^2); 'normalized' (paper default)
  rescales each output neuron (a kernel column) to unit L2 norm;
  'uniform_spectrum' sets every singular value to 1.
  """
  shape = (in_features, out_features)
  if init == 'standard':
    w = 0.02 * jax.random.normal(key, shape, jnp.float32)
  elif init == 'normalized':
    w = jax.random.normal(key, shape, jnp.float32)
    w = w / jnp.linalg.norm(w, axis=0, keepdims=True)
  elif init == 'xavier':
    w = jax.nn.initializers.glorot_normal()(key, shape, jnp.float32)
  elif init == 'uniform_spectrum':
    u, _, vt = jnp.linalg.svd(jax.random.normal(key, shape, jnp.float32),
                              full_matrices=False)
    w = u @ vt
  else:
    raise ValueError(f'unknown init {init!r}; choose one of {INITS}')
  return w.astype(dtype)


def resolve_block_sizes(name: str, in_features: int, out_features: int,
                        variant: str, block_size) -> tuple[int, int]:
  """Block sizes of the input and output side, or a ValueError naming why."""
  where = f'{name} (in_features={in_features}, out_features={out_features})'
  if variant == 'block':
    if isinstance(block_size, float) or int(block_size) < 1:
      raise ValueError(f'{where}: block_size must be a positive integer for '
                       f"variant='block', got {block_size!r}")
    b = int(block_size)
    bad = [f'{n}={s}' for n, s in (('in_features', in_features),
                                    ('out_features', out_features)) if s % b]
    if bad:
      raise ValueError(
          f'{where}: block_size={b} does not divide {" and ".join(bad)}; '
          'choose a block size that divides both, or change the width')
    return b, b
  if variant == 'full':
    if isinstance(block_size, float):
      if not 0.0 < block_size <= 1.0:
        raise ValueError(f'{where}: a fractional block_size must be in (0, 1],'
                         f' got {block_size}')
      return (max(1, round(block_size * in_features)),
              max(1, round(block_size * out_features)))
    b = int(block_size)
    if not 1 <= b <= min(in_features, out_features):
      raise ValueError(f'{where}: block_size={b} must be between 1 and '
                       f'{min(in_features, out_features)} for variant=full')
    return b, b
  raise ValueError(f'{where}: unknown variant {variant!r}; use one of '
                   f'{VARIANTS}')


class POETLinear(nnx.Module):
  """Linear map x @ (P_in W0 R_out) with orthogonal P_in, R_out learned.

  Args:
    in_features, out_features: kernel shape.
    block_size: b for variant='block' (must divide both sizes); for 'full' an
      integer or a fraction of each side (0.5 is the paper's "b = 1/2").
    variant: 'block' (POET-BS) or 'full' (POET-FS).
    compute: 'fast' (apply blocks to activations), 'mem' (the same, with the
      intermediates recomputed in the backward), 'materialize' (build the
      dense kernel every call), 'auto' (the cheaper of 'fast' and
      'materialize' by `path_flops` for the tokens of each call, within
      `memory_budget`).
    init: W0 initialization, one of INITS.
    dtype: compute dtype (None: the input's).
    param_dtype: storage of the orthogonal blocks. None (default): the
      compute dtype `dtype` when given, else float32. The forward multiplies
      by the blocks in the compute dtype anyway, and the float32 master
      copy is the generators in the optimizer (poet_jax.reparameterize), so
      bfloat16 blocks cost no forward precision and halve the blocks and
      their gradient; a merge then folds
      bfloat16 blocks into W0 (rounding of the order of a bfloat16 W0's own).
    w0_dtype: storage of W0: a float dtype (float32 by default; bfloat16
      halves it) or 'int8' (POET-XQ: uint8 codes with a float32 scale and
      zero point per group, dequantized to the compute dtype inside each
      call and requantized at every merge; see poet_jax/quant.py).
    w0_group_size: rows of W0 (input features) per quantization group for
      w0_dtype='int8'; must divide in_features.
    memory_budget: for compute='auto', the most elements the layer may keep
      for its backward (0: no limit); see choose_compute.
    name: used in error messages.
  """

  def __init__(self, in_features: int, out_features: int, *,
               block_size=256, variant: str = 'block',
               compute: str = 'fast', init: str = 'normalized',
               dtype: Any = None, param_dtype: Any = None,
               w0_dtype: Any = jnp.float32,
               w0_group_size: int = quant.DEFAULT_GROUP_SIZE,
               memory_budget: int = 0, name: str = 'POETLinear',
               rngs: nnx.Rngs):
    self.in_block, self.out_block = resolve_block_sizes(
        name, in_features, out_features, variant, block_size)
    if compute not in COMPUTES:
      raise ValueError(f'{name}: unknown compute {compute!r}; use one of '
                       f'{COMPUTES}')
    self.in_features, self.out_features = in_features, out_features
    self.variant, self.compute = variant, compute
    self.dtype = dtype
    self.memory_budget = memory_budget
    self.w0_quantized = isinstance(w0_dtype, str) and w0_dtype == quant.DTYPE
    if self.w0_quantized:
      quant.check_group_size(in_features, w0_group_size, name)
    self.w0_group_size = w0_group_size

    key_w, key_in, key_out = jax.random.split(rngs.params(), 3)
    w0 = init_w0(key_w, in_features, out_features, init)
    if variant == 'block':
      in_place = spo.draw_permutation(key_in, in_features)
      out_place = spo.draw_permutation(key_out, out_features)
      w0 = spo.to_block_frame(w0, in_place, out_place)
      num_in, num_out = in_features // self.in_block, out_features // self.out_block
    else:
      in_place = spo.draw_index_set(key_in, in_features, self.in_block)
      out_place = spo.draw_index_set(key_out, out_features, self.out_block)
      num_in = num_out = 1
    if self.w0_quantized:
      codes, scale, zero = quant.quantize(w0, w0_group_size)
      self.w0 = FrozenWeight(codes)
      self.w0_scale = FrozenWeight(scale)
      self.w0_zero = FrozenWeight(zero)
    else:
      self.w0 = FrozenWeight(w0.astype(w0_dtype))
    self.in_place = Placement(in_place)
    self.out_place = Placement(out_place)
    param_dtype = param_dtype or dtype or jnp.float32
    self.in_blocks = OrthogonalBlocks(identity_blocks(
        (num_in,), self.in_block, param_dtype))
    self.out_blocks = OrthogonalBlocks(identity_blocks(
        (num_out,), self.out_block, param_dtype))

  # ------------------------------------------------------------------ math

  def orthogonal_blocks(self) -> tuple[jax.Array, jax.Array]:
    """The orthogonal blocks (..., k, b, b) of the input and output side."""
    return self.in_blocks[...], self.out_blocks[...]

  def stored_w0(self):
    """W0 as stored: an array, or a quant.Quantized for w0_dtype='int8'."""
    if self.w0_quantized:
      return quant.Quantized(self.w0[...], self.w0_scale[...],
                             self.w0_zero[...])
    return self.w0[...]

  @property
  def work_dtype(self):
    """Dtype of merges and dense kernels: W0's float type promoted with
    float32 (float32 for bfloat16 and int8 W0, float64 for float64)."""
    return jnp.promote_types(quant.storage_dtype(self.stored_w0()),
                             jnp.float32)

  def _arrays(self, dtype):
    g_in, g_out = self.orthogonal_blocks()
    if self.variant == 'full':
      g_in, g_out = g_in[..., 0, :, :], g_out[..., 0, :, :]
    # W0 goes in as stored: the forward casts or dequantizes it inside its
    # checkpoint, so the backward recomputes that copy instead of keeping it.
    return (self.stored_w0(), g_in.astype(dtype), g_out.astype(dtype),
            self.in_place[...], self.out_place[...])

  def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
    """x (..., in) -> (..., out), as nnx.Linear's call.

    out_sharding: as nnx.Linear's (a PartitionSpec or sharding of the
    output under an explicit-axes mesh; jax.sharding.reshard).
    """
    if self._lead:
      raise ValueError(
          f'this POETLinear is a stack of {self.w0[...].shape[0]} layers (as '
          "the Llama's scanned blocks); call one layer: poet_jax.layer_at("
          'model.blocks, i)')
    return self.call_stack(x, out_sharding)

  def call_stack(self, x: jax.Array, out_sharding=None) -> jax.Array:
    """Every layer of a stack on its own slice of x.

    x (*stack, ..., in) -> (*stack, ..., out), where *stack are the layer's
    leading axes (none for a single layer): the declared stack axes of a
    multi-axis projection (poet_jax.multihead).
    """
    dtype = self.dtype or jnp.result_type(x)
    lead = self._lead
    compute = self.resolved_compute(x.shape[lead:])
    forward = over_leading_axes(paths.FORWARD[self.variant, compute], lead)
    y = forward(jnp.asarray(x, dtype), *self._arrays(dtype))
    return reshard(y, out_sharding)

  def resolved_compute(self, x_shape) -> str:
    """The path a call on inputs of this (static) shape takes."""
    if self.compute != 'auto':
      return self.compute
    return paths.choose_compute(
        self.variant, self.in_features, self.out_features, self.in_block,
        self.out_block, math.prod(x_shape[:-1]), self.memory_budget)

  def effective_weight(self) -> jax.Array:
    """Dense (..., in, out) kernel K with layer(x) == x @ K.

    Leading axes are those of a stack of layers (as under a scan).
    """
    kernel = spo.block_kernel if self.variant == 'block' else spo.full_kernel
    g_in, g_out = self.orthogonal_blocks()
    if self.variant == 'full':
      g_in, g_out = g_in[..., 0, :, :], g_out[..., 0, :, :]
    dtype = self.work_dtype
    return over_leading_axes(kernel, self._lead)(
        quant.dense(self.stored_w0(), dtype), g_in.astype(dtype),
        g_out.astype(dtype), self.in_place[...], self.out_place[...])

  def base_weight(self) -> jax.Array:
    """W0 in the layer's own frame: the kernel at R = P = I."""
    w0 = quant.dense(self.stored_w0(), self.work_dtype)
    if self.variant == 'full':
      return w0
    unframe = lambda w, p_in, p_out: w[jnp.argsort(p_in)][:, p_out]
    return over_leading_axes(unframe, self._lead)(
        w0, self.in_place[...], self.out_place[...])

  @property
  def _lead(self) -> int:
    """Number of stacking axes in front of the 2-D W0."""
    return self.w0[...].ndim - 2

  # ----------------------------------------------------------------- merge

  def merge(self, key: jax.Array) -> None:
    """W0 <- P_in W0 R_out, blocks <- I, placements re-drawn from key.

    Works on stacked layers too (leading axes on every variable, as under a
    scan over layers): each slice gets its own key split from `key`.
    """
    lead = self.w0[...].shape[:-2]
    args = (self.stored_w0(), self.in_blocks[...], self.out_blocks[...],
            self.in_place[...], self.out_place[...])
    if lead:
      w0, in_place, out_place = spo.merge_stack(
          self.variant, *args, jax.random.split(key, lead))
    else:
      w0, in_place, out_place = spo.merge_layer(self.variant, *args, key)
    if self.w0_quantized:
      self.w0[...], self.w0_scale[...], self.w0_zero[...] = w0
    else:
      self.w0[...] = w0
    self.in_place[...] = in_place
    self.out_place[...] = out_place
    self.reset_blocks()

  def reset_blocks(self) -> None:
    """R = P = I: every block (of every layer of a stack) the identity."""
    for blocks in (self.in_blocks, self.out_blocks):
      value = blocks[...]
      blocks[...] = identity_blocks(value.shape[:-2], value.shape[-1],
                                    value.dtype)


def reshard(y: jax.Array, out_sharding) -> jax.Array:
  """y laid out as `out_sharding` (what flax's layers pass to dot_general
  as its out_sharding); y itself when None."""
  return y if out_sharding is None else jax.sharding.reshard(y, out_sharding)


def identity_blocks(lead: tuple, block_size: int, dtype) -> jax.Array:
  """(*lead, b, b) identity blocks."""
  return jnp.broadcast_to(jnp.eye(block_size, dtype=dtype),
                          tuple(lead) + (block_size, block_size))


def over_leading_axes(fn, n: int):
  """fn vmapped over n leading axes (a stack of layers: every array of the
  layer carries the same leading axes)."""
  for _ in range(n):
    fn = jax.vmap(fn)
  return fn


def compute_choices(module: nnx.Module, tokens: int) -> list[dict]:
  """The path every POETLinear of `module` takes on calls of `tokens` rows.

  One entry per layer (a stack of scanned layers counts once), with its
  shape and the FLOPs of both candidate paths: what 'auto' logs.
  """
  out = []
  for path, node in nnx.iter_graph(module):
    if isinstance(node, POETLinear):
      flops = paths.path_flops(node.variant, node.in_features,
                               node.out_features, node.in_block,
                               node.out_block, tokens)
      out.append({
          'layer': '.'.join(str(p) for p in path),
          'shape': (node.in_features, node.out_features),
          'compute': node.resolved_compute((tokens, node.in_features)),
          'fast_flops': flops['fast'], 'materialize_flops':
              flops['materialize'], 'dense_flops': flops['dense']})
  return out


def describe_choices(module: nnx.Module, tokens: int) -> str:
  """compute_choices as lines for a log."""
  lines = [f'POET compute paths for {tokens} tokens per call:']
  for c in compute_choices(module, tokens):
    lines.append(
        f"  {c['layer']} {c['shape'][0]}x{c['shape'][1]}: {c['compute']} "
        f"(FLOPs vs dense: fast {c['fast_flops'] / c['dense_flops']:.2f}, "
        f"materialize {c['materialize_flops'] / c['dense_flops']:.2f})")
  return '\n'.join(lines)
