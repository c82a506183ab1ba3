"""Benchmarks of POET against a dense layer, AdamW and the baselines.

  python -m poet_jax.bench --json=bench.json              # everything
  python -m poet_jax.bench --only=layer,step --reps=30    # some sections
  python -m poet_jax.bench --tiny                         # seconds: smoke test

Everything is measured in this one process, on this machine, and every ratio
is against a baseline measured in the same run. Sections:

  matmul  the machine's float32 matmul rate through jax (the limit)
  layer   one layer, forward + backward (gradients of the generators or the
          kernel, and of the input), N tokens: dense, materialize, fast, mem,
          auto as ratios to the dense layer
  breakdown  the 'fast' path of the widest layer shape cut into its pieces
          (W0 products, block products, Cayley–Neumann maps, gathers,
          layout copies), each timed alone, against the whole: where the
          time over the FLOP floor goes
  step    the jitted train step of llama_60m at batch 32 x 256: AdamW, GaLore,
          Muon, POET with each compute path; ms per step, tokens/s, ratio to
          AdamW, achieved FLOP rate (the step's matrix-product FLOPs counted
          from its jaxpr, a scan's body times its length: matmul_flops),
          compiled peak memory; and one merge of the whole model
  ref     the same model at the reference's setting, batch 8 x 256
  wide    the llama_1b width with 2 layers, batch 4 x 256
  memory  the dry-run planner's peak per device for llama_1b/3b/8b/13b at
          batch 1 and sequence 512/1024/2048, next to the POET-X paper;
          POET-XQ (poetxq-mem: W0 in 8 bits, model.w0_dtype=int8) next to
          POET-X mem with a bfloat16 W0

Timings are medians of many runs after warm-up, with the compared variants
interleaved (round-robin, the order rotated each round) so that load from
other processes falls on all of them alike, and inputs rotated over several
arrays. Progress goes to stderr; the tables to stdout.
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
import numpy as np
from flax import nnx

from poet_jax import config as config_lib
from poet_jax import layers
from poet_jax import merge as merge_lib
from poet_jax import orthogonal
from poet_jax import planner
from poet_jax import sharding as sharding_lib
from poet_jax import spo
from poet_jax import train_lib

SECTIONS = ('matmul', 'layer', 'breakdown', 'step', 'ref', 'wide', 'memory')
METHODS = ('adamw', 'galore', 'muon', 'poet-fast', 'poet-mem',
           'poet-materialize', 'poet-auto', 'poetxq-mem')
LAYER_PATHS = ('dense', 'materialize', 'fast', 'mem', 'auto')
POET_PATHS = ('fast', 'mem', 'materialize', 'auto')
GIB = 1024 ** 3

# POET-X paper (spec, section 9): peak memory in GB on an H100, batch 1.
# None: "does not fit" in 80 GB.
PAPER_MEMORY_GB = {
    ('3b', 512, 'adamw'): 28.74, ('3b', 1024, 'adamw'): 28.78,
    ('3b', 2048, 'adamw'): 31.43,
    ('3b', 512, 'materialize'): 33.45, ('3b', 1024, 'materialize'): 34.79,
    ('3b', 2048, 'materialize'): 38.02,
    ('3b', 512, 'mem'): 11.96, ('3b', 1024, 'mem'): 13.28,
    ('3b', 2048, 'mem'): 15.47,
    ('8b', 1024, 'adamw'): 76.34, ('8b', 1024, 'fast'): 33.14,
    ('8b', 1024, 'mem'): 27.87, ('8b', 1024, 'materialize'): None,
    ('13b', 512, 'adamw'): None, ('13b', 1024, 'adamw'): None,
    ('13b', 2048, 'adamw'): None,
    ('13b', 512, 'mem'): 35.65, ('13b', 1024, 'mem'): 41.62,
    ('13b', 2048, 'mem'): 47.21,
}


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What each section runs; `full` is the issue's, `tiny` the smoke test's."""
  matmul: int
  layer_shapes: tuple
  layer_block: int
  layer_tokens: int
  step_size: str            # a config.MODEL_SIZES key, or 'tiny'
  step_batch: tuple         # (sequences, sequence length)
  ref_batch: tuple
  wide_size: str
  wide_layers: int
  wide_batch: tuple
  memory_sizes: tuple
  memory_seqs: tuple


FULL = Sizes(
    matmul=4096, layer_shapes=((512, 1280), (2048, 2048), (2048, 5376)),
    layer_block=256, layer_tokens=2048, step_size='60m', step_batch=(32, 256),
    ref_batch=(8, 256), wide_size='1b', wide_layers=2, wide_batch=(4, 256),
    memory_sizes=('1b', '3b', '8b', '13b'), memory_seqs=(512, 1024, 2048))

# The step, ref and wide sections share one model and batch here, so the
# smoke test compiles each method's step once (see _built).
TINY = Sizes(
    matmul=256, layer_shapes=((64, 160), (128, 128)), layer_block=32,
    layer_tokens=64, step_size='tiny', step_batch=(4, 16), ref_batch=(4, 16),
    wide_size='tiny', wide_layers=0, wide_batch=(4, 16),
    memory_sizes=('tiny',), memory_seqs=(16,))


def log(*args):
  print(f'[{time.strftime("%H:%M:%S")}]', *args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ timing


def interleaved(calls: dict[str, Callable[[int], Any]], reps: int,
                warmup: int = 2) -> dict[str, dict]:
  """Median (and quartiles) of seconds per call, the calls interleaved.

  calls[name](i) runs one repetition on input number i and returns what to
  block on. Each round runs every call once, in an order rotated by one
  each round.
  """
  names = list(calls)
  for name in names:
    for i in range(warmup):
      jax.block_until_ready(calls[name](i))
  times = {name: [] for name in names}
  for r in range(reps):
    for j in range(len(names)):
      name = names[(r + j) % len(names)]
      start = time.perf_counter()
      jax.block_until_ready(calls[name](r))
      times[name].append(time.perf_counter() - start)
  return {name: {'median_s': float(np.median(t)),
                 'p25_s': float(np.percentile(t, 25)),
                 'p75_s': float(np.percentile(t, 75)), 'runs': len(t)}
          for name, t in times.items()}


# ------------------------------------------------------------------ machine


def machine() -> dict:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f
               if line.startswith('model name')]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  import jaxlib  # pylint: disable=g-import-not-at-top
  return {
      'cpu': cpu, 'cores': os.cpu_count(),
      'backend': jax.default_backend(),
      'devices': [str(d) for d in jax.devices()],
      'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
      'python': platform.python_version(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'load_average': list(os.getloadavg()),
      'date': datetime.datetime.now().astimezone().isoformat(
          timespec='seconds'),
      'command': 'python -m poet_jax.bench ' + ' '.join(sys.argv[1:]),
  }


# ------------------------------------------------------------------ matmul


def bench_matmul(sizes: Sizes, reps: int) -> list[dict]:
  """FLOP rate of a large float32 matmul: the machine's limit for jax."""
  n = sizes.matmul
  keys = jax.random.split(jax.random.key(0), 4)
  inputs = [jax.random.normal(k, (n, n), jnp.float32) for k in keys]
  matmul = jax.jit(jnp.matmul)
  t = interleaved({'matmul': lambda i: matmul(inputs[i % 4],
                                              inputs[(i + 1) % 4])},
                  max(3, reps // 3))['matmul']
  flops = 2 * n ** 3
  return [{'section': 'matmul', 'n': n, 'flops': flops, **t,
           'gflops_per_s': flops / t['median_s'] / 1e9}]


# ------------------------------------------------------------------- layer


def _layer_call(layer: nnx.Module):
  """jitted (params, x, dy) -> (y, gradients of params and x)."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  @jax.jit
  def run(params, rest, x, dy):
    def apply(params, x):
      return nnx.merge(graphdef, params, rest)(x)
    y, vjp = jax.vjp(apply, params, x)
    return y, vjp(dy)

  return lambda x, dy: run(params, rest, x, dy)


def make_layer(path: str, m: int, n: int, block: int, seed: int = 0):
  rngs = nnx.Rngs(seed)
  if path == 'dense':
    return nnx.Linear(m, n, use_bias=False, rngs=rngs)
  layer = layers.POETLinear(m, n, block_size=block, compute=path, rngs=rngs)
  # Non-trivial blocks, as during training (the speed does not depend on it).
  k1, k2 = jax.random.split(jax.random.key(seed + 1))
  for key, blocks in ((k1, layer.in_blocks), (k2, layer.out_blocks)):
    u = 0.01 * jax.random.normal(key, blocks.shape[:-2] + (
        orthogonal.num_generator_params(block),))
    blocks[...] = orthogonal.orthogonal_blocks(u, block)
  return layer


def bench_layer(sizes: Sizes, reps: int, profile_dir: str = '') -> list[dict]:
  """Layer paths interleaved; with profile_dir, then a trace of 3 calls each.

  The traces (jax.profiler, one directory per shape and path) show the time
  of every XLA op: open them with xprof or TensorBoard's profile plugin.
  """
  rows = []
  tokens, block = sizes.layer_tokens, sizes.layer_block
  for m, n in sizes.layer_shapes:
    log(f'layer {m}x{n}, N={tokens}, block {block}')
    keys = jax.random.split(jax.random.key(m * n), 8)
    xs = [jax.random.normal(k, (tokens, m), jnp.float32) for k in keys[:4]]
    dys = [jax.random.normal(k, (tokens, n), jnp.float32) for k in keys[4:]]
    calls = {}
    for path in LAYER_PATHS:
      call = _layer_call(make_layer(path, m, n, block))
      calls[path] = lambda i, call=call: call(xs[i % 4], dys[i % 4])
    t = interleaved(calls, reps)
    if profile_dir:
      for path, call in calls.items():
        with jax.profiler.trace(os.path.join(profile_dir, f'{m}x{n}-{path}')):
          for i in range(3):
            jax.block_until_ready(call(i))
    flops = layers.path_flops('block', m, n, block, block, tokens)
    auto = layers.choose_compute('block', m, n, block, block, tokens)
    dense = t['dense']['median_s']
    best = min(t['fast']['median_s'], t['materialize']['median_s'])
    for path in LAYER_PATHS:
      row = {'section': 'layer', 'shape': [m, n], 'tokens': tokens,
             'block': block, 'path': path, **t[path],
             'ms': 1e3 * t[path]['median_s'],
             'ratio_to_dense': t[path]['median_s'] / dense,
             # The FLOP floor, the orthogonal maps included.
             'flop_ratio_to_dense': 1.0 if path == 'dense' else
                 (flops[auto if path == 'auto' else path] + flops['maps']) /
                 flops['dense']}
      if path == 'auto':
        row['auto_choice'] = auto
        row['ratio_to_best_of_fast_materialize'] = t[path]['median_s'] / best
      if path == 'mem':
        row['ratio_to_fast'] = t[path]['median_s'] / t['fast']['median_s']
      rows.append(row)
      log(f'  {path:12s} {row["ms"]:9.2f} ms  {row["ratio_to_dense"]:.2f}x '
          'dense')
  return rows


def bench_breakdown(sizes: Sizes, reps: int) -> list[dict]:
  """The pieces of one 'fast' forward + backward, each jitted and timed alone.

  The same operations XLA runs inside the layer (spo's block layout, the
  permutation gathers, the W0 products of the forward and of the input
  gradient, block products of the forward, the input gradient and the
  generator gradient, the maps with their gradient); the sum of the pieces
  is compared with the whole layer. Timed alone, pieces do not overlap, so
  this attributes time where a trace of the fused program cannot.
  """
  m, n = max(sizes.layer_shapes, key=lambda s: s[0] * s[1])
  tokens, b = sizes.layer_tokens, sizes.layer_block
  log(f'breakdown: fast path of {m}x{n}, N={tokens}, block {b}')
  keys = iter(jax.random.split(jax.random.key(0), 16))
  normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)
  x, dy, w0 = normal(tokens, m), normal(tokens, n), normal(m, n)
  perm_in = spo.draw_permutation(next(keys), m)
  perm_out = spo.draw_permutation(next(keys), n)
  q = {side: 0.01 * normal(size // b, orthogonal.num_generator_params(b))
       for side, size in (('in', m), ('out', n))}
  g = {side: orthogonal.orthogonal_blocks(q[side], b) for side in q}
  blocks = {side: normal(size // b, tokens, b) for side, size in
            (('in', m), ('out', n))}
  maps = lambda q: orthogonal.orthogonal_blocks(q, b)
  # (name, what it counts as, function, arguments, times per fwd+bwd)
  pieces = [
      ('W0 product, forward', 'W0 products', jnp.matmul, (x, w0), 1),
      ('W0 product, input gradient', 'W0 products',
       lambda d, w: d @ w.T, (dy, w0), 1),
  ]
  for side in ('in', 'out'):
    xk, gk = blocks[side], g[side]
    pieces += [
        (f'{side} blocks, forward and input gradient', 'block products',
         jnp.matmul, (xk, gk), 2),
        (f'{side} blocks, generator gradient', 'block products',
         lambda a, c: jnp.einsum('knb,knc->kbc', a, c), (xk, xk), 1),
        (f'{side} maps, forward + backward', 'Cayley–Neumann maps',
         lambda q: jax.vjp(maps, q)[1](maps(q)), (q[side],), 1),
    ]
  for side, a, perm in (('in', x, perm_in), ('out', dy, perm_out)):
    # A gather and a layout change on the way in, the inverse on the way
    # out, forward and backward: two of each per side and direction.
    pieces += [
        (f'{side} gather', 'gathers', spo.permute, (a, perm), 2),
        (f'{side} to/from block layout', 'layout copies',
         lambda a: spo._to_blocks(a, b), (a,), 4),
    ]
  pieces.append(('in gather + layout, recomputed in the backward',
                 'gathers', lambda a, p: spo._to_blocks(spo.permute(a, p), b),
                 (x, perm_in), 1))
  fast = _layer_call(make_layer('fast', m, n, b))
  calls = {'whole layer': lambda i: fast(x, dy)}
  for name, _, fn, args, _ in pieces:
    calls[name] = lambda i, f=jax.jit(fn), a=args: f(*a)
  t = interleaved(calls, reps)
  whole = t['whole layer']['median_s']
  rows = []
  for name, group, _, _, times in pieces:
    seconds = t[name]['median_s'] * times
    rows.append({'section': 'breakdown', 'shape': [m, n], 'tokens': tokens,
                 'block': b, 'piece': name, 'group': group, 'times': times,
                 'ms': 1e3 * seconds, 'fraction_of_whole': seconds / whole})
  total = sum(r['ms'] for r in rows) / 1e3
  rows.append({'section': 'breakdown', 'shape': [m, n], 'tokens': tokens,
               'block': b, 'piece': 'whole layer (fused, measured)',
               'group': 'whole', 'times': 1, 'ms': 1e3 * whole,
               'fraction_of_whole': 1.0,
               'sum_of_pieces_ms': 1e3 * total})
  return rows


# -------------------------------------------------------------------- step


def _tiny_config():
  c = config_lib.base_config()
  c.model.dim, c.model.num_layers, c.model.num_heads = 64, 2, 4
  c.model.ffn_dim = c.model.ffn_dim_block = c.model.ffn_dim_dense = 128
  c.model.vocab_size = 256
  c.poet.block_size = 32.0
  return c


def step_config(size: str, method: str, compute: str, batch: tuple,
                num_layers: int = 0):
  """A paper config (or the tiny one) for one benchmarked method."""
  c = _tiny_config() if size == 'tiny' else config_lib.paper_config(size)
  if num_layers:
    c.model.num_layers = num_layers
  c.train.batch_size, c.train.seq_len = batch
  if method == 'poetxq':  # POET-XQ: POET with an 8-bit W0
    method, c.model.w0_dtype = 'poet', 'int8'
  c.optimizer.name = method
  c.poet.compute = compute
  # The largest group of at most the default 256 rows that fits every width.
  c.model.w0_group_size = math.gcd(c.model.w0_group_size, c.model.dim,
                                   config_lib.ffn_dim(c))
  c.mesh.data = 1
  return c


def _subjaxprs(value):
  """The jaxprs inside one equation parameter (a jaxpr, or a tuple of)."""
  if isinstance(value, jax_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jax_core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _subjaxprs(v)]
  return []


def matmul_flops(jaxpr) -> float:
  """FLOPs of the matrix products a jaxpr runs: 2 x output size x contraction.

  A scan's body counts `length` times (XLA's cost analysis counts a loop
  body once, so it undercounts a model whose layers run in a scan; issue
  15); a cond counts its costliest branch; a while loop's body once (its
  trip count is not static). Elementwise work is not counted: in the train
  steps benchmarked here it is a few percent of the products.

  Args:
    jaxpr: a Jaxpr or ClosedJaxpr, e.g. `jax.jit(f).trace(*args).jaxpr`.
  Returns:
    float, FLOPs per call (multiply and add counted separately).
  """
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs[d] for d in contract)
      continue
    inner = [matmul_flops(j) for v in eqn.params.values()
             for j in _subjaxprs(v)]
    if eqn.primitive.name == 'cond':
      total += max(inner, default=0.0)
    else:
      times = eqn.params['length'] if eqn.primitive.name == 'scan' else 1
      total += times * sum(inner)
  return total


def _peak_bytes(compiled) -> int:
  """Peak as the planner counts it: the donated state once."""
  mem = compiled.memory_analysis()
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes -
          mem.alias_size_in_bytes + mem.temp_size_in_bytes)


class _Method:
  """One method's compiled step, fresh states on demand, one at a time."""

  def __init__(self, c, mesh):
    self.config = c
    vocab = c.model.vocab_size
    self.setup, abstract = train_lib.abstract_state(c, vocab)
    steps = train_lib.compile_steps(self.setup, abstract, mesh)
    self.state_sharding = steps.state_sharding
    self.batch_sharding = steps.batch_sharding
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, steps.state_sharding)
    batch = jax.ShapeDtypeStruct((c.train.batch_size, c.train.seq_len + 1),
                                 jnp.int32, sharding=steps.batch_sharding)
    traced = steps.train.trace(state, batch)
    self.flops = matmul_flops(traced.jaxpr)
    self.step = traced.lower().compile()
    cost = self.step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # XLA's count, for comparison: a scanned layer's body only once.
    self.xla_flops = float(cost.get('flops', 0.0))
    self.peak_bytes = _peak_bytes(self.step)
    self.init = jax.jit(lambda: train_lib.init_state(c, vocab)[1],
                        out_shardings=steps.state_sharding)
    self.state = None

  def run(self, batch):
    self.state, metrics = self.step(self.state, batch)
    return metrics['train_loss']


_BUILT: dict[str, _Method] = {}


def _built(c, mesh) -> _Method:
  """_Method(c, mesh), compiled once per config within the process."""
  key = c.to_json()
  if key not in _BUILT:
    _BUILT[key] = _Method(c, mesh)
  return _BUILT[key]


def _batches(c, sharding, count=4):
  rng = np.random.default_rng(0)
  shape = (c.train.batch_size, c.train.seq_len + 1)
  return [jax.device_put(rng.integers(0, c.model.vocab_size, shape,
                                      dtype=np.int32), sharding)
          for _ in range(count)]


def bench_steps(section: str, sizes: Sizes, size: str, batch: tuple,
                methods: list[tuple[str, str]], reps: int, num_layers=0,
                matmul_rate=None, merge=True) -> list[dict]:
  """Train steps of several methods, interleaved in blocks.

  The states of all methods need not fit at once: each round builds one
  method's fresh state, runs `per_round` timed steps (after a warm-up step
  in the first round) and frees it before the next method; two rounds, the
  second in the opposite order. No merge falls in the timed steps (merges
  are every 400 steps); one whole-model merge is timed separately.
  """
  mesh = sharding_lib.make_mesh(config_lib.base_config().mesh,
                                jax.devices()[:1])
  built, failed = {}, []
  for method, compute in methods:
    name = f'{method}-{compute}' if method.startswith('poet') else method
    log(f'{section}: compiling {name} ({size}, batch {batch[0]} x '
        f'{batch[1]})')
    try:
      built[name] = _built(step_config(size, method, compute, batch,
                                       num_layers), mesh)
    except Exception as e:  # pylint: disable=broad-except
      # A method that cannot build its step is reported, not fatal: the
      # other rows still mean something.
      log(f'  {name} failed: {type(e).__name__}: {e}')
      failed.append({'section': section, 'model': size, 'method': name,
                     'batch': list(batch),
                     'error': f'{type(e).__name__}: {e}'})
  first = next(iter(built.values()))
  batches = _batches(first.config, first.batch_sharding)
  rounds = 2
  per_round = max(1, math.ceil(reps / rounds))
  times = {name: [] for name in built}
  names = list(built)
  for r in range(rounds):
    for j in range(len(names)):
      name = names[j if r % 2 == 0 else len(names) - 1 - j]
      method = built[name]
      method.state = method.init()
      if r == 0:
        jax.block_until_ready(method.run(batches[0]))   # warm-up
      for i in range(per_round):
        start = time.perf_counter()
        jax.block_until_ready(method.run(batches[(i + 1) % len(batches)]))
        times[name].append(time.perf_counter() - start)
      method.state = None
      log(f'  round {r + 1}/{rounds} {name}: '
          f'{1e3 * np.median(times[name]):.1f} ms/step so far')
  rows = []
  adamw = np.median(times['adamw']) if 'adamw' in times else None
  adamw_peak = built['adamw'].peak_bytes if 'adamw' in built else None
  tokens = batch[0] * batch[1]
  for name, method in built.items():
    t = float(np.median(times[name]))
    row = {'section': section, 'model': size, 'layers':
               method.config.model.num_layers, 'batch': list(batch),
           'method': name, 'ms_per_step': 1e3 * t,
           'p25_ms': 1e3 * float(np.percentile(times[name], 25)),
           'p75_ms': 1e3 * float(np.percentile(times[name], 75)),
           'runs': len(times[name]), 'tokens_per_s': tokens / t,
           'flops_per_step': method.flops,
           'xla_cost_flops_per_step': method.xla_flops,
           'gflops_per_s': method.flops / t / 1e9,
           'peak_gib': method.peak_bytes / GIB}
    if adamw:
      row['ratio_to_adamw'] = t / adamw
      row['peak_ratio_to_adamw'] = method.peak_bytes / adamw_peak
    if matmul_rate:
      row['fraction_of_matmul_rate'] = row['gflops_per_s'] / matmul_rate
    if name == 'poet-auto':
      row['auto_choices'] = {
          r['layer']: r['compute'] for r in _auto_choices(method, tokens)}
    rows.append(row)
  if merge:
    poet = [m for n, m in built.items() if n.startswith('poet')]
    if poet:
      rows.append(_bench_merge(section, size, poet[0], reps))
  return rows + failed


def _auto_choices(method: _Method, tokens: int) -> list[dict]:
  abstract = jax.eval_shape(method.init)
  model = nnx.merge(method.setup.graphdef, abstract['params'],
                    abstract['frozen'])
  return layers.compute_choices(model, tokens)


def _bench_merge(section: str, size: str, method: _Method, reps: int) -> dict:
  """One merge of every POET layer of the model, jitted on its own."""
  log(f'{section}: merge of the whole model')
  graphdef = method.setup.graphdef
  merge = jax.jit(lambda params, frozen, opt, key: merge_lib.merge_states(
      graphdef, params, frozen, opt, key))
  state = method.init()
  keys = [jax.random.key(i) for i in range(4)]
  t = interleaved({'merge': lambda i: merge(
      state['params'], state['frozen'], state['opt_state'], keys[i % 4])},
                  max(3, reps // 2), warmup=1)['merge']
  return {'section': section, 'model': size, 'method': 'poet merge',
          'ms': 1e3 * t['median_s'], **t}


# ------------------------------------------------------------------ memory


def bench_memory(sizes: Sizes, dtype: str, methods) -> list[dict]:
  """planner.plan of every (method, compute) pair at batch 1."""
  rows = []
  for size in sizes.memory_sizes:
    for seq in sizes.memory_seqs:
      adamw = mem = None
      for method, compute in methods:
        c = step_config(size, method, compute, (1, seq))
        c.model.dtype = dtype
        if c.model.w0_dtype != 'int8':
          c.model.w0_dtype = dtype
        name = {'poet': compute, 'poetxq': f'xq {compute}'}.get(method,
                                                                method)
        log(f'memory: {size} seq {seq} {name}')
        try:
          report = planner.plan(c, jax.devices()[:1])
        except Exception as e:  # pylint: disable=broad-except
          log(f'  failed: {type(e).__name__}: {e}')
          rows.append({'section': 'memory', 'model': size, 'seq_len': seq,
                       'batch': 1, 'dtype': dtype, 'method': name,
                       'error': f'{type(e).__name__}: {e}'})
          continue
        peak = report['peak_gib']
        adamw = peak if method == 'adamw' else adamw or math.nan
        mem = peak if name == 'mem' else mem  # POET-X mem, if measured
        paper = PAPER_MEMORY_GB.get((size, seq, name), 'n/a')
        rows.append({'section': 'memory', 'model': size, 'seq_len': seq,
                     'batch': 1, 'dtype': dtype, 'method': name,
                     'w0_dtype': report['w0_dtype'],
                     'peak_gib': peak, 'peak_gb': peak * GIB / 1e9,
                     'ratio_to_adamw': peak / adamw,
                     'minus_mem_gib': None if mem is None else peak - mem,
                     'temp_gib': report['temp_gib'],
                     'argument_gib': report['argument_gib'],
                     'paper_gb': 'does not fit' if paper is None else paper})
  return rows


# ------------------------------------------------------------------- print


def _fmt(x, spec='.2f'):
  if isinstance(x, float):
    return format(x, spec) if math.isfinite(x) else str(x)
  return '' if x is None else str(x)


def print_tables(report: dict, out=None) -> None:
  out = out or sys.stdout  # looked up now, not at import
  m = report['machine']
  print(f"# poet_jax benchmarks, {m['date']}", file=out)
  print(f"machine: {m['cpu']}, {m['cores']} cores, {m['backend']}; jax "
        f"{m['jax']}; load average at start {m['load_average']}", file=out)
  print(f"command: {m['command']}", file=out)
  rows = report['rows']
  by = lambda s: [r for r in rows if r['section'] == s]
  for r in by('matmul'):
    print(f"\nmatmul {r['n']}^3 float32: {r['median_s'] * 1e3:.1f} ms, "
          f"{r['gflops_per_s']:.1f} GFLOP/s", file=out)
  if by('layer'):
    print('\n## one layer, forward + backward (median ms; ratio to dense; '
          'FLOP ratio with the orthogonal maps)', file=out)
    print('| shape | tokens | path | ms | x dense | FLOPs x dense | note |',
          file=out)
    print('|---|---|---|---|---|---|---|', file=out)
    for r in by('layer'):
      note = ''
      if r['path'] == 'auto':
        note = (f"picked {r['auto_choice']}; "
                f"{r['ratio_to_best_of_fast_materialize']:.2f}x the better")
      if r['path'] == 'mem':
        note = f"{r['ratio_to_fast']:.2f}x fast"
      print(f"| {r['shape'][0]} x {r['shape'][1]} | {r['tokens']} | "
            f"{r['path']} | {_fmt(r['ms'])} | {_fmt(r['ratio_to_dense'])} | "
            f"{_fmt(r['flop_ratio_to_dense'])} | {note} |", file=out)
  for section in ('step', 'ref', 'wide'):
    sec = by(section)
    if not sec:
      continue
    first = sec[0]
    print(f"\n## train step, {first['model']} ({first.get('layers')} layers),"
          f" batch {first['batch'][0]} x {first['batch'][1]}", file=out)
    print('| method | ms/step | tokens/s | x AdamW | GFLOP/s | of matmul rate'
          ' | peak GiB | peak x AdamW |', file=out)
    print('|---|---|---|---|---|---|---|---|', file=out)
    for r in sec:
      if r['method'] == 'poet merge':
        continue
      if 'error' in r:
        print(f"| {r['method']} | failed: {r['error'][:100]} |", file=out)
        continue
      print(f"| {r['method']} | {_fmt(r['ms_per_step'], '.0f')} | "
            f"{_fmt(r['tokens_per_s'], '.0f')} | "
            f"{_fmt(r.get('ratio_to_adamw'))} | "
            f"{_fmt(r['gflops_per_s'], '.1f')} | "
            f"{_fmt(r.get('fraction_of_matmul_rate'))} | "
            f"{_fmt(r['peak_gib'])} | {_fmt(r.get('peak_ratio_to_adamw'))} |",
            file=out)
    for r in sec:
      if r['method'] == 'poet merge':
        print(f"one merge of the whole model: {r['ms']:.1f} ms", file=out)
      if r.get('auto_choices'):
        picks = ', '.join(f'{k.split(".")[-1]}: {v}'
                          for k, v in r['auto_choices'].items())
        print(f'auto picked: {picks}', file=out)
  if by('breakdown'):
    rows_b = by('breakdown')
    whole = rows_b[-1]
    m, n = whole['shape']
    print(f"\n## 'fast' {m} x {n}, N={whole['tokens']}, in pieces timed "
          f"alone (ms per forward + backward; fraction of the whole)",
          file=out)
    print('| piece | counts as | ms | of whole |', file=out)
    print('|---|---|---|---|', file=out)
    for r in rows_b[:-1]:
      times = f" (x{r['times']})" if r['times'] > 1 else ''
      print(f"| {r['piece']}{times} | {r['group']} | {r['ms']:.1f} | "
            f"{r['fraction_of_whole']:.2f} |", file=out)
    groups = {}
    for r in rows_b[:-1]:
      groups[r['group']] = groups.get(r['group'], 0.0) + r['ms']
    for group, ms in groups.items():
      print(f"| **{group}** | | {ms:.1f} | {ms / whole['ms']:.2f} |",
            file=out)
    print(f"| sum of the pieces | | {whole['sum_of_pieces_ms']:.1f} | "
          f"{whole['sum_of_pieces_ms'] / whole['ms']:.2f} |", file=out)
    print(f"| whole layer, measured | | {whole['ms']:.1f} | 1.00 |", file=out)
  if by('memory'):
    print(f"\n## dry-run peak memory per device, batch 1, "
          f"{by('memory')[0]['dtype']} (ours GiB; paper GB, H100)", file=out)
    print('| model | seq | method | W0 | peak GiB | x AdamW | - POET-X mem '
          'GiB | paper GB |', file=out)
    print('|---|---|---|---|---|---|---|---|', file=out)
    for r in by('memory'):
      if 'error' in r:
        print(f"| {r['model']} | {r['seq_len']} | {r['method']} | | failed: "
              f"{r['error'][:100]} | | | |", file=out)
        continue
      print(f"| {r['model']} | {r['seq_len']} | {r['method']} | "
            f"{r['w0_dtype'] or ''} | {_fmt(r['peak_gib'])} | "
            f"{_fmt(r['ratio_to_adamw'])} | {_fmt(r['minus_mem_gib'])} | "
            f"{r['paper_gb']} |", file=out)


# -------------------------------------------------------------------- main


def _pairs(names) -> list[tuple[str, str]]:
  """'poet-fast' -> ('poet', 'fast'); 'adamw' -> ('adamw', 'fast')."""
  return [tuple(n.split('-', 1)) if '-' in n else (n, 'fast') for n in names]


def run(sections, sizes: Sizes, reps: int, memory_dtype: str,
        methods=METHODS, step_reps: int = 0, profile_dir: str = '') -> dict:
  report = {'machine': machine(), 'reps': reps, 'rows': []}
  rows = report['rows']
  rate = None
  if 'matmul' in sections or {'step', 'ref', 'wide'} & set(sections):
    log('matmul rate')
    rows += bench_matmul(sizes, reps)
    rate = rows[-1]['gflops_per_s']
  if 'layer' in sections:
    rows += bench_layer(sizes, reps, profile_dir)
  if 'breakdown' in sections:
    rows += bench_breakdown(sizes, reps)
  step_reps = step_reps or max(2, reps // 4)
  if 'step' in sections:
    rows += bench_steps('step', sizes, sizes.step_size, sizes.step_batch,
                        _pairs(methods), step_reps, matmul_rate=rate)
  if 'ref' in sections:
    ref = [m for m in methods if m in ('adamw', 'poet-fast', 'poet-mem',
                                       'poet-auto')]
    rows += bench_steps('ref', sizes, sizes.step_size, sizes.ref_batch,
                        _pairs(ref), step_reps, matmul_rate=rate, merge=False)
  if 'wide' in sections:
    rows += bench_steps('wide', sizes, sizes.wide_size, sizes.wide_batch,
                        _pairs(methods), step_reps,
                        num_layers=sizes.wide_layers, matmul_rate=rate,
                        merge=False)
  if 'memory' in sections:
    memory = [m for m in methods if m in ('adamw', 'galore',
                                          'poet-materialize', 'poet-fast',
                                          'poet-mem', 'poetxq-mem')]
    rows += bench_memory(sizes, memory_dtype, _pairs(memory))
  report['machine']['load_average_at_end'] = list(os.getloadavg())
  return report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m poet_jax.bench',
      description=__doc__.split('\n\n')[0])
  parser.add_argument('--only', default=','.join(SECTIONS),
                      help=f'comma-separated sections of {SECTIONS}')
  parser.add_argument('--reps', type=int, default=20,
                      help='timed runs per layer variant')
  parser.add_argument('--step_reps', type=int, default=4,
                      help='timed train steps per method (in two rounds)')
  parser.add_argument('--json', default='bench.json',
                      help='where the JSON report is written')
  parser.add_argument('--memory_dtype', default='bfloat16',
                      choices=config_lib.DTYPES,
                      help='model.dtype and model.w0_dtype of the memory '
                      'section (the paper trains in bf16)')
  parser.add_argument('--memory_sizes', default='',
                      help='comma-separated models of the memory section '
                      f"(default {','.join(FULL.memory_sizes)})")
  parser.add_argument('--memory_seqs', default='',
                      help='comma-separated sequence lengths of the memory '
                      f"section (default {','.join(map(str, FULL.memory_seqs))})")
  parser.add_argument('--methods', default=','.join(METHODS),
                      help=f'comma-separated methods of the train-step and '
                      f'memory sections, of {METHODS}')
  parser.add_argument('--profile', default='', metavar='DIR',
                      help='also write a jax.profiler trace of every layer '
                      'path of the layer section under DIR')
  parser.add_argument('--tiny', action='store_true',
                      help='every section at a tiny size (the smoke test)')
  args = parser.parse_args(argv)
  sections = [s for s in args.only.split(',') if s]
  unknown = set(sections) - set(SECTIONS)
  if unknown:
    parser.error(f'unknown sections {sorted(unknown)}; choose from '
                 f'{SECTIONS}')
  methods = [m for m in args.methods.split(',') if m]
  if set(methods) - set(METHODS):
    parser.error(f'unknown methods {sorted(set(methods) - set(METHODS))}; '
                 f'choose from {METHODS}')
  sizes = TINY if args.tiny else FULL
  if args.memory_sizes:
    sizes = dataclasses.replace(
        sizes, memory_sizes=tuple(args.memory_sizes.split(',')))
  if args.memory_seqs:
    sizes = dataclasses.replace(sizes, memory_seqs=tuple(
        int(s) for s in args.memory_seqs.split(',')))
  report = run(sections, sizes, args.reps,
               args.memory_dtype, methods, args.step_reps, args.profile)
  print_tables(report)
  with open(args.json, 'w') as f:
    json.dump(report, f, indent=1)
  log(f'written to {args.json}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
