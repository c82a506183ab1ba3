"""Whole jitted train steps of AdamW, the baselines and POET, interleaved.

One method's compiled step at a time holds a state: each round builds a
fresh state, runs its timed steps (after a warm-up step in the first round)
and frees it before the next method; two rounds, the second in the opposite
order. No merge falls in the timed steps (merges are every 400 steps); one
whole-model merge is timed separately.
"""
import math
import os
import time
from typing import Callable

import jax
import numpy as np
from flax import nnx

from poet_jax import layers
from poet_jax import merge as merge_lib
from poet_jax.bench import op_profile as profile_lib
from poet_jax.bench.common import GIB, Sizes, interleaved, log
from poet_jax.train import config as config_lib
from poet_jax.train import sharding as sharding_lib
from poet_jax.train import state as train_state
from poet_jax.train import steps as steps_lib
from poet_jax.train.plan import planner
from poet_jax.train.plan.flops import matmul_flops

# A runner times `count` steps (after a warm-up step if asked) and returns
# their seconds: our compiled steps and the reference's eager ones alike.
Runner = Callable[[int, bool], list]


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


class _Method:
  """One method's compiled step, fresh states on demand, one at a time."""

  def __init__(self, c, mesh):
    self.config = c
    vocab = c.model.vocab_size
    self.setup, abstract = train_state.abstract_state(c, vocab)
    steps = steps_lib.compile_steps(self.setup, abstract, mesh)
    self.state_sharding = steps.state_sharding
    self.batch_sharding = steps.batch_sharding
    traced = steps_lib.trace_train(c, steps, abstract)
    self.flops = matmul_flops(traced.jaxpr)
    self.step = traced.lower().compile()
    cost = self.step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # XLA's count, for comparison: a scanned layer's body only once.
    self.xla_flops = float(cost.get('flops', 0.0))
    self.peak_bytes = planner.peak_bytes(self.step.memory_analysis())
    self.init = jax.jit(lambda: train_state.init_state(c, vocab)[1],
                        out_shardings=steps.state_sharding)
    self.state = None
    self.batches = _batches(c, self.batch_sharding)

  def run(self, batch):
    self.state, metrics = self.step(self.state, batch)
    return metrics['train_loss']

  def timed(self, count: int, warmup: bool) -> list:
    """Seconds of `count` steps from a fresh state (a Runner)."""
    self.state = self.init()
    if warmup:
      jax.block_until_ready(self.run(self.batches[0]))
    seconds = []
    for i in range(count):
      start = time.perf_counter()
      jax.block_until_ready(self.run(self.batches[(i + 1) %
                                                  len(self.batches)]))
      seconds.append(time.perf_counter() - start)
    self.state = None
    return seconds


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


def method_pairs(names) -> list[tuple[str, str]]:
  """'poet-fast' -> ('poet', 'fast'); 'adamw' -> ('adamw', 'fast')."""
  return [tuple(n.split('-', 1)) if '-' in n else (n, 'fast') for n in names]


def method_name(method: str, compute: str) -> str:
  """('poet', 'fast') -> 'poet-fast'; ('adamw', 'fast') -> 'adamw'."""
  return f'{method}-{compute}' if method.startswith('poet') else method


def build_methods(section: str, size: str, batch: tuple,
                  methods: list[tuple[str, str]], num_layers=0):
  """Compiled steps by name, and an error row for each that failed."""
  mesh = sharding_lib.make_mesh(config_lib.base_config().mesh,
                                jax.devices()[:1])
  built, failed = {}, []
  for method, compute in methods:
    name = method_name(method, compute)
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
  return built, failed


def time_rounds(runners: dict[str, Runner], reps: int,
                rounds: int = 2) -> dict[str, list]:
  """Seconds per step of every runner, in rounds of alternating order.

  Round r runs every runner for ceil(reps / rounds) steps, in the given
  order when r is even and reversed when odd; the first round warms up.
  """
  per_round = max(1, math.ceil(reps / rounds))
  names = list(runners)
  times = {name: [] for name in names}
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      times[name] += runners[name](per_round, r == 0)
      log(f'  round {r + 1}/{rounds} {name}: '
          f'{1e3 * np.median(times[name]):.1f} ms/step so far')
  return times


def _step_row(section, size, batch, name, method, seconds, adamw,
              matmul_rate) -> dict:
  """The report's row of one method: speed, FLOP rate, memory, ratios."""
  t = float(np.median(seconds))
  tokens = batch[0] * batch[1]
  row = {'section': section, 'model': size, 'layers':
             method.config.model.num_layers, 'batch': list(batch),
         'method': name, 'ms_per_step': 1e3 * t,
         'p25_ms': 1e3 * float(np.percentile(seconds, 25)),
         'p75_ms': 1e3 * float(np.percentile(seconds, 75)),
         'runs': len(seconds), 'tokens_per_s': tokens / t,
         'flops_per_step': method.flops,
         'xla_cost_flops_per_step': method.xla_flops,
         'gflops_per_s': method.flops / t / 1e9,
         'peak_gib': method.peak_bytes / GIB}
  if adamw:
    row['ratio_to_adamw'] = t / float(np.median(adamw[1]))
    row['peak_ratio_to_adamw'] = method.peak_bytes / adamw[0].peak_bytes
  if matmul_rate:
    row['fraction_of_matmul_rate'] = row['gflops_per_s'] / matmul_rate
  if name == 'poet-auto':
    row['auto_choices'] = {
        r['layer']: r['compute'] for r in _auto_choices(method, tokens)}
  return row


def _profile(method: _Method, trace_dir: str) -> dict:
  """Op time by kind of two steps from a fresh state (op_profile.profile)."""
  method.state = method.init()
  jax.block_until_ready(method.run(method.batches[0]))
  result = profile_lib.profile(lambda i: method.run(method.batches[i % 4]),
                               trace_dir)
  method.state = None
  return result


def bench_steps(section: str, sizes: Sizes, size: str, batch: tuple,
                methods: list[tuple[str, str]], reps: int, num_layers=0,
                matmul_rate=None, merge=True, profile_dir='') -> list[dict]:
  """Train steps of several methods, interleaved in blocks (module doc).

  With profile_dir, each method's row also gets `profile`: the XLA op time
  of two traced steps by kind (trace under profile_dir/section-method).
  """
  del sizes  # the size and batch are given; kept for a uniform signature
  built, failed = build_methods(section, size, batch, methods, num_layers)
  times = time_rounds({name: m.timed for name, m in built.items()}, reps)
  adamw = (built['adamw'], times['adamw']) if 'adamw' in built else None
  rows = [_step_row(section, size, batch, name, method, times[name], adamw,
                    matmul_rate) for name, method in built.items()]
  for row, (name, method) in zip(rows, built.items()):
    if profile_dir:
      log(f'{section}: profiling {name}')
      row['profile'] = _profile(method,
                                os.path.join(profile_dir, f'{section}-{name}'))
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
