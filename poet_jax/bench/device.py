"""`--only=device`: a check of one accelerator in at most ten minutes.

  python -m poet_jax.bench --only=device --json=device.json   # on the GPU
  python -m poet_jax.bench --only=device --tiny               # CPU smoke test

Four parts, in this order, each timed and skipped (with a line saying so)
when the budget left is under what it needs:

  numerics     every layer path ('fast', 'mem', 'materialize', 'auto') of
               POET-BS, POET-FS and POET-BS with an 8-bit W0, in float32 and
               bfloat16, against a float64 CPU evaluation of the same layer:
               outputs and gradients within bounds from the arithmetic
               (device_numerics)
  training     llama_60m for 60 steps: the loss goes down, and a run killed
               with SIGKILL after a checkpoint resumes to the same metrics,
               bit for bit (device_train)
  layer_table  the POET-X paper's layer table: one Llama-8B FFN layer
               (4096 x 14336), 2048 tokens, b = 256, bfloat16, forward +
               backward: dense, original POET (materialize), POET-X fast
               and mem, next to the paper's H100 milliseconds
  steps        whole train steps of AdamW and POET fast/mem/auto at
               llama_1b, each in its own process: ms/step, tokens/s, the
               measured peak (memory_stats()['peak_bytes_in_use']) next to
               the compiled step's memory_analysis() prediction

A failed check makes the command exit with 1, after the JSON is written.
"""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from poet_jax import layers
from poet_jax.bench import device_numerics
from poet_jax.bench import device_train
from poet_jax.bench.common import GIB, interleaved, log

BUDGET_S = 600.0
# POET-X paper (spec, section 9): one Llama-8B-sized layer, 2048 tokens,
# b = 256, forward + backward on an H100, ms.
PAPER_LAYER_MS = {'dense': 1.11, 'materialize': 10.59, 'fast': 1.38,
                  'mem': 1.89}
STEP_METHODS = ('adamw', 'poet-fast', 'poet-mem', 'poet-auto')


@dataclasses.dataclass(frozen=True)
class DeviceSizes:
  """What each part runs, and the seconds it needs at least to start."""
  numerics: tuple          # (in, out, block, int8 group, tokens)
  training: device_train.Run
  layer_table: tuple       # (in, out, block, tokens)
  step_size: str
  step_batch: tuple
  reps: int
  reserve_s: dict


FULL = DeviceSizes(
    numerics=(1024, 2048, 256, 256, 2048),
    training=device_train.Run(
        'llama_60m', ('--config.train.batch_size=32',
                      '--config.train.seq_len=256',
                      '--config.checkpoint_every=20',
                      '--config.poet.merge_every=25',
                      '--config.eval_tokens=65536',
                      '--config.data.name=python_stdlib',
                      '--config.data.tokenizer=byte'), 60, 45),
    layer_table=(4096, 14336, 256, 2048), step_size='1b',
    step_batch=(16, 256), reps=20,
    reserve_s={'numerics': 30, 'training': 120, 'layer_table': 30,
               'steps': 60})

TINY = DeviceSizes(
    numerics=(64, 96, 16, 32, 32),
    training=device_train.Run(
        'llama_tiny', ('--config.model.dim=32', '--config.model.num_layers=2',
                       '--config.model.num_heads=2',
                       '--config.model.ffn_dim=64',
                       '--config.poet.block_size=8',
                       '--config.train.batch_size=4',
                       '--config.train.seq_len=32', '--config.eval_tokens=256',
                       '--config.checkpoint_every=4',
                       '--config.poet.merge_every=5'), 12, 9),
    layer_table=(64, 128, 16, 32), step_size='tiny', step_batch=(4, 16),
    reps=3, reserve_s={'numerics': 1, 'training': 1, 'layer_table': 1,
                       'steps': 1})


class Budget:
  """Seconds left of the check's wall-clock budget."""

  def __init__(self, seconds: float):
    self.deadline = time.monotonic() + seconds

  def left(self) -> float:
    return max(0.0, self.deadline - time.monotonic())


def prepare_environment() -> None:
  """Before JAX starts a backend: the GPU allocator of this process grows
  on demand instead of taking 75% of the memory at start, which the
  trainer and step processes that the check starts need."""
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')


def _fmt(x, spec='.2f') -> str:
  return '' if x is None else format(x, spec)


def environment() -> dict:
  """The device the check ran on (printed and stored)."""
  device = jax.devices()[0]
  return {'platform': device.platform, 'device_kind': device.device_kind,
          'local_devices': jax.local_device_count(),
          'environment': jax.print_environment_info(return_string=True)}


# ----------------------------------------------------------- layer table


def _table_layer(path: str, m: int, n: int, block: int):
  """An m -> n bfloat16 layer: nnx.Linear for 'dense', else POET on path."""
  rngs = nnx.Rngs(0)
  if path == 'dense':
    return nnx.Linear(m, n, use_bias=False, dtype=jnp.bfloat16,
                      param_dtype=jnp.bfloat16, rngs=rngs)
  return layers.POETLinear(m, n, block_size=block, compute=path,
                           dtype=jnp.bfloat16, w0_dtype=jnp.bfloat16,
                           rngs=rngs)


def layer_table(sizes: DeviceSizes) -> list[dict]:
  """The paper's layer table, the paths interleaved (common.interleaved)."""
  m, n, block, tokens = sizes.layer_table
  keys = jax.random.split(jax.random.key(0), 8)
  xs = [jax.random.normal(k, (tokens, m), jnp.bfloat16) for k in keys[:4]]
  dys = [jax.random.normal(k, (tokens, n), jnp.bfloat16) for k in keys[4:]]
  calls = {}
  for path in PAPER_LAYER_MS:
    run, arrays = device_numerics.layer_program(
        {path: _table_layer(path, m, n, block)})
    calls[path] = lambda i, run=run, arrays=arrays: run(arrays, xs[i % 4],
                                                        dys[i % 4])
  times = interleaved(calls, sizes.reps)
  rows = []
  for path, t in times.items():
    ms = 1e3 * t['median_s']
    rows.append({'shape': [m, n], 'tokens': tokens, 'block': block,
                 'dtype': 'bfloat16', 'path': path, 'ms': ms, **t,
                 'ratio_to_dense': t['median_s'] / times['dense']['median_s'],
                 'paper_h100_ms': PAPER_LAYER_MS[path]})
    log(f'  {path:12s} {ms:9.3f} ms (paper, H100: {PAPER_LAYER_MS[path]} ms)')
  return rows


# ----------------------------------------------------------------- steps


def cross_compiled_peak(config, compiled) -> float | None:
  """HOOK: the peak bytes that the dry-run planner predicts for this step
  when it compiles it for an H100 on a machine without one (the planner's
  GPU target), to stand next to the peak measured here; None until the
  planner has that target.

  config: the step's config (ml_collections); compiled: the step as compiled
  on this device (jax.stages.Compiled), whose own memory_analysis() is the
  prediction of this device's compiler.
  """
  del config, compiled
  return None


def step_child(spec: dict) -> list[dict]:
  """Train steps of spec['methods'] in this process, one after the other:
  compile, time, memory (a row each).

  spec: {'size', 'batch', 'methods', 'reps'}. The measured peak is this
  process's so far: one method's own only when it is the process's only
  one (whole_steps).
  """
  from poet_jax.bench import steps as steps_lib  # pylint: disable=g-import-not-at-top
  rows = []
  for name in spec['methods']:
    start = time.monotonic()
    built, failed = steps_lib.build_methods(
        'device', spec['size'], tuple(spec['batch']),
        steps_lib.method_pairs([name]))
    if failed:
      rows.append({'method': name, 'error': failed[0]['error']})
      continue
    method = built[name]
    compile_s = time.monotonic() - start
    seconds = method.timed(spec['reps'], True)
    stats = jax.devices()[0].memory_stats() or {}
    t = float(np.median(seconds))
    cross = cross_compiled_peak(method.config, method.step)
    rows.append({
        'method': name, 'model': spec['size'],
        'layers': method.config.model.num_layers,
        'batch': list(spec['batch']), 'compile_s': compile_s,
        'ms_per_step': 1e3 * t, 'runs': len(seconds),
        'tokens_per_s': spec['batch'][0] * spec['batch'][1] / t,
        'predicted_peak_gib': method.peak_bytes / GIB,
        'cross_compiled_peak_gib': None if cross is None else cross / GIB,
        'measured_peak_gib': (stats['peak_bytes_in_use'] / GIB
                              if 'peak_bytes_in_use' in stats else None),
        'measured_over_predicted': (
            stats['peak_bytes_in_use'] / method.peak_bytes
            if 'peak_bytes_in_use' in stats else None)})
  return rows


def whole_steps(sizes: DeviceSizes, budget: Budget,
                methods=STEP_METHODS) -> list[dict]:
  """`methods` (of STEP_METHODS) in fresh processes: each in its own where
  the device reports its peak memory (a process's peak is then the
  method's), all in one where it does not (the CPU)."""
  isolate = jax.devices()[0].memory_stats() is not None
  groups = [[m] for m in methods] if isolate else [list(methods)]
  rows = []
  for i, group in enumerate(groups):
    left = budget.left()
    if left < sizes.reserve_s['steps'] / len(groups):
      rows += [{'method': m, 'skipped': f'{left:.0f} s of the budget left'}
               for m in group]
      log(f"  {', '.join(group)}: skipped, {left:.0f} s of the budget left")
      continue
    spec = {'size': sizes.step_size, 'batch': list(sizes.step_batch),
            'methods': group, 'reps': max(2, sizes.reps // 2)}
    for row in _in_child(spec, left / (len(groups) - i)):
      rows.append(row)
      if 'error' in row:
        row['passed'] = False
      log(f"  {row['method']}: {row.get('ms_per_step', math.nan):.1f} "
          f"ms/step, peak measured {_fmt(row.get('measured_peak_gib'))} GiB,"
          f" predicted {_fmt(row.get('predicted_peak_gib'))} GiB"
          + (f"; {row['error']}" if 'error' in row else ''))
  adamw = [r for r in rows if r['method'] == 'adamw' and 'ms_per_step' in r]
  for r in rows:
    if adamw and 'ms_per_step' in r:
      r['ratio_to_adamw'] = r['ms_per_step'] / adamw[0]['ms_per_step']
  return rows


# step_child in another Python (not `-m`: this module is imported with the
# package first).
_CHILD = ('import json, sys; from poet_jax.bench import device; '
          'print(json.dumps(device.step_child(json.loads(sys.argv[1]))))')


def _in_child(spec: dict, timeout: float) -> list[dict]:
  """step_child(spec) in a fresh Python; its rows, or a row with 'error'
  for each method."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false')
  errors = lambda text: [{'method': m, 'error': text}
                         for m in spec['methods']]
  try:
    done = subprocess.run([sys.executable, '-c', _CHILD, json.dumps(spec)],
                          capture_output=True, text=True, env=env,
                          timeout=max(1.0, timeout))
  except subprocess.TimeoutExpired:
    return errors(f'cut after {timeout:.0f} s (the budget)')
  lines = done.stdout.strip().splitlines()
  if done.returncode or not lines:
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    return errors(f'exit code {done.returncode}: ' + ' | '.join(tail))
  return json.loads(lines[-1])


# ----------------------------------------------------------- the section


def _numerics(sizes: DeviceSizes) -> list[dict]:
  m, n, block, group, tokens = sizes.numerics
  return device_numerics.check_layers(m, n, block, group, tokens, log=log)


def _training(sizes: DeviceSizes, budget: Budget) -> list[dict]:
  directory = tempfile.mkdtemp(prefix='poet_jax_device_')
  try:
    return [device_train.check_training(
        sizes.training, directory, jax.devices()[0].platform,
        time.monotonic() + budget.left(), log=log)]
  finally:
    shutil.rmtree(directory, ignore_errors=True)


def bench_device(tiny: bool, methods=STEP_METHODS,
                 budget_s: float = BUDGET_S) -> list[dict]:
  """Every part within budget_s seconds; rows of section 'device'.

  methods: the whole steps' methods, those of STEP_METHODS among them.
  Call prepare_environment() first, before JAX starts a backend (the
  command line does).
  """
  sizes = TINY if tiny else FULL
  methods = [m for m in STEP_METHODS if m in methods]
  budget = Budget(budget_s)
  env = environment()
  log(f"device check on {env['device_kind']} ({env['platform']}, "
      f"{env['local_devices']} local devices), budget {budget_s:.0f} s")
  rows = [{'section': 'device', 'part': 'environment', **env}]
  parts = (('numerics', lambda: _numerics(sizes)),
           ('training', lambda: _training(sizes, budget)),
           ('layer_table', lambda: layer_table(sizes)),
           ('steps', lambda: whole_steps(sizes, budget, methods)))
  for part, run in parts:
    left = budget.left()
    if left < sizes.reserve_s[part]:
      log(f'{part}: skipped, {left:.0f} s of the budget left (it needs '
          f'{sizes.reserve_s[part]} s)')
      rows.append({'section': 'device', 'part': part,
                   'skipped': f'{left:.0f} s of the budget left'})
      continue
    log(f'{part}: starting, {left:.0f} s of the budget left')
    start = time.monotonic()
    try:
      part_rows = run()
    except Exception as e:  # pylint: disable=broad-except
      # A part that breaks is a failed check; the other parts still run.
      log(f'{part}: failed: {type(e).__name__}: {e}')
      part_rows = [{'part_error': f'{type(e).__name__}: {e}',
                    'passed': False}]
    seconds = time.monotonic() - start
    log(f'{part}: {seconds:.1f} s')
    rows += [{'section': 'device', 'part': part, 'part_seconds': seconds,
              **r} for r in part_rows]
  return rows


def print_report(rows, out=None) -> None:
  """The device section's rows as Markdown (the JSON has every field)."""
  out = out or sys.stdout
  rows = [r for r in rows if r.get('section') == 'device']
  # A part's own line: skipped, or broken before it had results.
  whole = lambda r: 'part_error' in r or ('skipped' in r and 'method' not in r)
  by = lambda part: [r for r in rows if r['part'] == part and not whole(r)]
  for r in by('environment'):
    print(f"\n## device check on {r['device_kind']} ({r['platform']})",
          file=out)
  for r in filter(whole, rows):
    print(f"{r['part']}: " + (f"skipped, {r['skipped']}" if 'skipped' in r
                              else f"failed: {r['part_error']}"), file=out)
  numerics = by('numerics')
  if numerics:
    print('\n| layer | dtype | path | largest error / bound | |\n'
          '|---|---|---|---|---|', file=out)
    for r in numerics:
      print(f"| {r['layer']} | {r['dtype']} | {r['path']} | "
            f"{r['error_over_bound']:.3f} | "
            f"{'ok' if r['passed'] else 'FAILED'} |", file=out)
  for r in by('training'):
    print(f"\ntraining {r['config']}, {r['steps']} steps: " + (
        f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}; killed after "
        f"step {r['kill_after']} and resumed: "
        f"{'bit-exact' if r['resumed_bit_exact'] else r['first_difference']}"
        if 'error' not in r else r['error']), file=out)
  table = by('layer_table')
  if table:
    print('\n| layer path | ms | x dense | paper H100 ms |\n|---|---|---|---|',
          file=out)
    for r in table:
      print(f"| {r['path']} | {r['ms']:.3f} | {r['ratio_to_dense']:.2f} | "
            f"{r['paper_h100_ms']} |", file=out)
  steps = by('steps')
  if steps:
    print('\n| method | ms/step | tokens/s | x AdamW | peak measured GiB | '
          'predicted GiB |\n|---|---|---|---|---|---|', file=out)
    for r in steps:
      if 'ms_per_step' not in r:
        print(f"| {r['method']} | {r.get('error') or r.get('skipped')} |",
              file=out)
        continue
      print(f"| {r['method']} | {r['ms_per_step']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {_fmt(r.get('ratio_to_adamw'))} | "
            f"{_fmt(r['measured_peak_gib'])} | "
            f"{r['predicted_peak_gib']:.2f} |", file=out)


def failures(rows) -> list[str]:
  """What failed: a line per row of a check that did not pass."""
  return [' '.join(str(r[k]) for k in (
      'part', 'layer', 'config', 'method', 'path', 'dtype', 'part_error',
      'error', 'first_difference') if r.get(k)) for r in rows
          if r.get('section') == 'device' and r.get('passed') is False]
