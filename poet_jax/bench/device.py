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
               (device_steps)

A failed check makes the command exit with 1, after the JSON is written.
"""
import dataclasses
import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from poet_jax import layers
from poet_jax.bench import device_numerics
from poet_jax.bench import device_steps
from poet_jax.bench import device_train
from poet_jax.bench.common import interleaved, log
from poet_jax.bench.device_steps import STEP_METHODS

# The parts' budget: ten minutes less one for the start-up, the report, and
# a part that runs on past the budget (only the processes are cut).
BUDGET_S = 540.0
# POET-X paper (spec, section 9): one Llama-8B-sized layer, 2048 tokens,
# b = 256, forward + backward on an H100, ms.
PAPER_LAYER_MS = {'dense': 1.11, 'materialize': 10.59, 'fast': 1.38,
                  'mem': 1.89}


@dataclasses.dataclass(frozen=True)
class DeviceSizes:
  """What each part runs, and the seconds it needs at least to start (for
  'steps': each of its processes)."""
  numerics: tuple          # (in, out, block, int8 group, tokens)
  training: device_train.Run
  layer_table: tuple       # (in, out, block, tokens)
  step_size: str           # a config.MODEL_SIZES key, or 'tiny'
  step_batch: tuple        # (sequences, sequence length)
  reps: int                # timed calls per layer path; half as many steps
  reserve_s: dict
  budget_s: float          # the whole check's wall-clock seconds


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
    reserve_s={'numerics': 60, 'training': 120, 'layer_table': 45,
               'steps': 60}, budget_s=BUDGET_S)

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
                       'steps': 1},
    # A smoke test on a shared CPU is not a timing: its budget only stops
    # a hang (82 s on 2 quiet cores; over 540 s at load 11).
    budget_s=3600.0)


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
                 budget_s: float | None = None) -> list[dict]:
  """Every part within budget_s seconds (None: the sizes' budget); rows of
  section 'device'.

  methods: the whole steps' methods, those of STEP_METHODS among them.
  Call prepare_environment() first, before JAX starts a backend (the
  command line does).
  """
  sizes = TINY if tiny else FULL
  budget_s = sizes.budget_s if budget_s is None else budget_s
  methods = [m for m in STEP_METHODS if m in methods]
  budget = Budget(budget_s)
  env = environment()
  log(f"device check on {env['device_kind']} ({env['platform']}, "
      f"{env['local_devices']} local devices), budget {budget_s:.0f} s")
  rows = [{'section': 'device', 'part': 'environment', **env}]
  parts = (('numerics', lambda: _numerics(sizes)),
           ('training', lambda: _training(sizes, budget)),
           ('layer_table', lambda: layer_table(sizes)),
           ('steps', lambda: device_steps.whole_steps(
               sizes.step_size, sizes.step_batch, max(2, sizes.reps // 2),
               methods, budget.left, sizes.reserve_s['steps'])))
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
          'compiled here GiB | GPU-target compile GiB |\n'
          '|---|---|---|---|---|---|---|', file=out)
    for r in steps:
      if 'ms_per_step' not in r:
        print(f"| {r['method']} | {r.get('error') or r.get('skipped')} |",
              file=out)
        continue
      print(f"| {r['method']} | {r['ms_per_step']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {_fmt(r.get('ratio_to_adamw'))} | "
            f"{_fmt(r['measured_peak_gib'])} | "
            f"{r['predicted_peak_gib']:.2f} | "
            f"{_fmt(r['cross_compiled_peak_gib'])} |", file=out)


def failures(rows) -> list[str]:
  """What failed: a line per row of a check that did not pass."""
  return [' '.join(str(r[k]) for k in (
      'part', 'layer', 'config', 'method', 'path', 'dtype', 'part_error',
      'error', 'first_difference') if r.get(k)) for r in rows
          if r.get('section') == 'device' and r.get('passed') is False]
