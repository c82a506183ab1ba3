"""Every POET layer path on the device against a float64 CPU evaluation.

One layer of each kind (POET-BS, POET-FS, POET-BS with an 8-bit W0), on every
compute path ('fast', 'mem', 'materialize', 'auto') in float32 and bfloat16:
its output and the gradients of its input and of both sides' blocks, next to
the same layer (the same W0 codes or values, blocks, permutations and
inputs) evaluated in float64 on the CPU through its dense kernel.

The bound each comparison asserts comes from the arithmetic, as in
tests/tolerance.py: |device - float64| <= 4 (r eps_op + t eps32) s, with
  s       the largest |float64 value| of the compared array;
  t       the float32 operations along the element's longest chain: the
          terms of its sums (tokens, the W0 product, the block products;
          matrix products accumulate in float32 on XLA:GPU and XLA:CPU,
          bfloat16 operands included) and an 8-bit W0's dequantization;
  r       the roundings into the operand precision along that chain:
          three chained products (input blocks, W0, output blocks; or the
          materialized kernel's two and x @ K) each round both operands,
          and the result rounds once more where it is stored and once
          where it is cast: 8;
  eps_op  the machine epsilon of that operand precision: bfloat16's; float32
          on the CPU; TensorFloat-32 (10 bits) for float32 on a GPU, which
          JAX's default matmul precision allows (docs.jax.dev, "Matmul
          precision").
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from poet_jax import layers
from poet_jax import orthogonal
from poet_jax import quant
from poet_jax import spo

# (name, variant, W0 storage) of the layers checked.
KINDS = (('poet-bs', 'block', 'float32'), ('poet-fs', 'full', 'float32'),
         ('poet-bs int8 W0', 'block', 'int8'))
PATHS = ('fast', 'mem', 'materialize', 'auto')
DTYPES = ('float32', 'bfloat16')
EPS32 = float(np.finfo(np.float32).eps)
EPS_TF32 = 2.0 ** -10
ROUNDINGS = 8


def operand_eps(dtype: str, platform: str) -> float:
  """Machine epsilon of what a matrix product rounds its operands to."""
  if dtype == 'bfloat16':
    return float(jnp.finfo(jnp.bfloat16).eps)
  return EPS_TF32 if platform == 'gpu' else EPS32


def chain_terms(m: int, n: int, b_in: int, b_out: int, tokens: int,
                quantized: bool = False) -> dict[str, int]:
  """Float32 operations along the longest chain of each compared array:
  the sums' lengths, and the dequantization of an 8-bit W0 ((codes - zero)
  * scale, two operations)."""
  extra = 2 if quantized else 0
  return {'y': b_in + m + b_out + extra, 'dx': b_out + n + b_in + extra,
          'd_in_blocks': tokens + m + n + b_in + b_out + extra,
          'd_out_blocks': tokens + m + n + b_in + b_out + extra}


def make_layer(spec: dict) -> layers.POETLinear:
  """POETLinear(**spec) with blocks far from the identity (every block's
  ||Q||_F is 0.9); built in one jitted program."""

  @nnx.jit
  def build():
    layer = layers.POETLinear(**spec, param_dtype=jnp.float32,
                              rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(1))
    for key, blocks in zip(keys, (layer.in_blocks, layer.out_blocks)):
      b = blocks.shape[-1]
      u = jax.random.normal(key, blocks.shape[:-2] + (
          orthogonal.num_generator_params(b),))
      # ||Q||_F = ||u|| sqrt(2): every block's generator scaled to 0.9.
      u = 0.9 * u / (math.sqrt(2) * jnp.linalg.norm(u, axis=-1,
                                                    keepdims=True))
      blocks[...] = orthogonal.orthogonal_blocks(u, b)
    return layer

  return build()


def _on_path(base: layers.POETLinear, path: str, dtype: str):
  """A copy of base (the same arrays) that computes on path in dtype."""
  layer = nnx.clone(base)
  layer.compute, layer.dtype = path, jnp.dtype(dtype)
  return layer


def layer_program(models: dict):
  """(run, arrays): run(arrays, x, dy) gives {name: (y, dx, d_params)} of
  every layer (any nnx module) in `models`, jitted as one program."""
  split = {name: nnx.split(layer, nnx.Param, ...)
           for name, layer in models.items()}

  def one(graphdef, params, rest, x, dy):
    y, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p, rest)(x), params, x)
    d_params, dx = vjp(dy)
    return y, dx, d_params

  @jax.jit
  def run(arrays, x, dy):
    return {name: one(split[name][0], *arrays[name], x, dy)
            for name in arrays}

  return run, {name: parts[1:] for name, parts in split.items()}


def _device_calls(models: dict, x, dy) -> dict:
  """{name: y and the gradients of x and of the blocks} of every POET
  layer in `models`, on the default device, as NumPy arrays."""
  run, arrays = layer_program(models)
  out = {}
  for name, (y, dx, d_params) in jax.device_get(run(arrays, x, dy)).items():
    out[name] = {'y': y, 'dx': dx,
                 'd_in_blocks': d_params['in_blocks'][...],
                 'd_out_blocks': d_params['out_blocks'][...]}
  return out


@functools.cache
def _float64_program(variant: str):
  """jitted (w0, places, x, g_in, g_out, dy) -> y and the gradients of x
  and both sides' blocks, through the dense kernel (one per variant)."""
  if variant == 'block':
    kernel = spo.block_kernel
  else:
    kernel = lambda w, g_in, g_out, *places: spo.full_kernel(
        w, g_in[0], g_out[0], *places)

  def grads(w0, places, x, g_in, g_out, dy):
    w0 = quant.dense(w0, jnp.float64)
    apply = lambda x, g_in, g_out: x @ kernel(w0, g_in, g_out, *places)
    y, vjp = jax.vjp(apply, x, g_in, g_out)
    return dict(zip(('y', 'dx', 'd_in_blocks', 'd_out_blocks'),
                    (y, *vjp(dy))))

  return jax.jit(grads)


def float64_reference(layer: layers.POETLinear, x, dy) -> dict:
  """The same layer's output and gradients in float64 on the CPU.

  x, dy: what the device layer received. Goes through the dense kernel
  K = P_in W0 R_out (spo), so no compute path is shared with 'fast'/'mem'.
  """
  f64 = lambda a: np.asarray(a, np.float64)
  w0 = layer.stored_w0()
  if isinstance(w0, quant.Quantized):
    w0 = quant.Quantized(np.asarray(w0.codes), f64(w0.scale), f64(w0.zero))
  else:
    w0 = f64(w0)
  places = (np.asarray(layer.in_place[...]), np.asarray(layer.out_place[...]))
  with jax.enable_x64(True), jax.default_device(jax.devices('cpu')[0]):
    out = _float64_program(layer.variant)(
        w0, places, f64(x), f64(layer.in_blocks[...]),
        f64(layer.out_blocks[...]), f64(dy))
    return {k: np.asarray(v) for k, v in out.items()}


def compare(actual: dict, desired: dict, terms: dict, eps_op: float,
            roundings: int = ROUNDINGS) -> dict:
  """Per array: max |difference|, its bound (module doc), and whether it
  holds."""
  out = {}
  for name, want in desired.items():
    err = float(np.max(np.abs(np.asarray(actual[name], np.float64) - want)))
    scale = float(np.max(np.abs(want)))
    bound = 4 * (roundings * eps_op + terms[name] * EPS32) * scale
    out[name] = {'max_abs_error': err, 'bound': bound, 'scale': scale,
                 'terms': terms[name], 'passed': err <= bound}
  return out


def _inputs(tokens: int, m: int, n: int, dtype: str, seed: int):
  """x (tokens, m), dy (tokens, n) in dtype, on the default device."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((tokens, m), np.float32), dtype)
  dy = jnp.asarray(rng.standard_normal((tokens, n), np.float32), dtype)
  return x, dy


def check_layers(m: int, n: int, block, group: int, tokens: int,
                 log=print, kinds=KINDS) -> list[dict]:
  """A row per (kind, path, dtype): the comparisons and `passed`.

  block: POET-BS's block size; POET-FS takes half of each side (the
  paper's b = 1/2). group: the 8-bit W0's rows per group.
  """
  platform = jax.devices()[0].platform
  rows = []
  for name, variant, w0_dtype in kinds:
    spec = dict(in_features=m, out_features=n, variant=variant,
                block_size=block if variant == 'block' else 0.5,
                w0_dtype=w0_dtype, w0_group_size=group)
    base = make_layer(spec)
    terms = chain_terms(m, n, base.in_block, base.out_block, tokens,
                        base.w0_quantized)
    for dtype in DTYPES:
      x, dy = _inputs(tokens, m, n, dtype, seed=len(rows))
      reference = float64_reference(base, jax.device_get(x),
                                    jax.device_get(dy))
      models = {path: _on_path(base, path, dtype) for path in PATHS}
      results = _device_calls(models, x, dy)
      for path, layer in models.items():
        result = compare(results[path], reference, terms,
                         operand_eps(dtype, platform))
        passed = all(r['passed'] for r in result.values())
        worst = max(r['max_abs_error'] / r['bound'] for r in result.values())
        rows.append({'layer': name, 'shape': [m, n],
                     'blocks': [base.in_block, base.out_block],
                     'tokens': tokens, 'path': path,
                     'resolved_path': layer.resolved_compute(x.shape),
                     'dtype': dtype, 'error_over_bound': worst,
                     'passed': passed, 'arrays': result})
        log(f'  {name:16s} {path:11s} {dtype:8s} error/bound {worst:.3f}'
            f'{"" if passed else "  FAILED"}')
  return rows
