"""`python -m poet_jax.bench`: the sections to run, their flags, the report."""
import argparse
import dataclasses
import json
import os

from poet_jax.bench import device
from poet_jax.bench import reference
from poet_jax.bench.blocks import bench_blocks
from poet_jax.bench.breakdown import bench_breakdown
from poet_jax.bench.common import FULL, TINY, Sizes, log, machine
from poet_jax.bench.flops import bench_matmul
from poet_jax.bench.layer import bench_layer
from poet_jax.bench.memory import bench_memory
from poet_jax.bench.steps import bench_steps
from poet_jax.bench.steps import method_pairs as _pairs
from poet_jax.bench.tables import print_tables
from poet_jax.train import config as config_lib
from poet_jax.train import workdir as workdir_lib
from poet_jax.train.plan import targets

# What a run without --only runs; 'reference' needs the official code
# installed (reference.py) and 'device' is a ten-minute check of an
# accelerator (device.py): each runs only when asked for.
SECTIONS = ('matmul', 'layer', 'breakdown', 'blocks', 'step', 'ref', 'wide',
            'memory')
ALL_SECTIONS = SECTIONS + ('reference', 'device')
METHODS = ('adamw', 'galore', 'muon', 'poet-fast', 'poet-mem',
           'poet-materialize', 'poet-auto', 'poetxq-mem')
POET_PATHS = ('fast', 'mem', 'materialize', 'auto')


def _step_sections(sections, sizes: Sizes, methods, step_reps, rate,
                   profile_dir=''):
  rows = []
  if 'step' in sections:
    rows += bench_steps('step', sizes, sizes.step_size, sizes.step_batch,
                        _pairs(methods), step_reps, matmul_rate=rate,
                        profile_dir=profile_dir)
  if 'ref' in sections:
    ref = [m for m in methods if m in ('adamw', 'poet-fast', 'poet-mem',
                                       'poet-auto')]
    rows += bench_steps('ref', sizes, sizes.step_size, sizes.ref_batch,
                        _pairs(ref), step_reps, matmul_rate=rate, merge=False,
                        profile_dir=profile_dir)
  if 'wide' in sections:
    rows += bench_steps('wide', sizes, sizes.wide_size, sizes.wide_batch,
                        _pairs(methods), step_reps,
                        num_layers=sizes.wide_layers, matmul_rate=rate,
                        merge=False, profile_dir=profile_dir)
  return rows


def run(sections, sizes: Sizes, reps: int, memory_dtype: str,
        methods=METHODS, step_reps: int = 0, profile_dir: str = '',
        reference_args: reference.Args | None = None,
        tiny: bool = False, target: str | None = None) -> dict:
  """Runs `sections`; returns {'machine': ..., 'reps': ..., 'rows': [...]}.

  tiny: the device check at its CPU smoke-test size (device.TINY); target:
  the device the memory section compiles for (poet_jax.train.plan.targets).
  """
  report = {'machine': machine(), 'reps': reps, 'rows': []}
  rows = report['rows']
  rate = None
  if 'matmul' in sections or {'blocks', 'step', 'ref', 'wide'} & set(
      sections):
    log('matmul rate')
    rows += bench_matmul(sizes, reps)
    rate = rows[-1]['gflops_per_s']
  if 'layer' in sections:
    rows += bench_layer(sizes, reps, profile_dir)
  if 'breakdown' in sections:
    rows += bench_breakdown(sizes, reps)
  if 'blocks' in sections:
    rows += bench_blocks(sizes, reps, _pairs(['adamw']), matmul_rate=rate)
  step_reps = step_reps or max(2, reps // 4)
  rows += _step_sections(sections, sizes, methods, step_reps, rate,
                         profile_dir)
  if 'memory' in sections:
    memory = [m for m in methods if m in ('adamw', 'galore',
                                          'poet-materialize', 'poet-fast',
                                          'poet-mem', 'poetxq-mem')]
    rows += bench_memory(sizes, memory_dtype, _pairs(memory), target)
  if 'reference' in sections:
    rows += reference.bench_reference(
        sizes, reference_args or reference.Args(), step_reps)
  if 'device' in sections:
    rows += device.bench_device(tiny, methods)
  report['machine']['load_average_at_end'] = list(os.getloadavg())
  return report


def _parser() -> argparse.ArgumentParser:
  from poet_jax import bench  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog='python -m poet_jax.bench',
      description=bench.__doc__.split('\n\n')[0])
  parser.add_argument('--only', '--sections', dest='only',
                      default=','.join(SECTIONS),
                      help=f'comma-separated sections of {ALL_SECTIONS} '
                      f'(default: all but reference)')
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
  parser.add_argument('--target', default=None, choices=targets.TARGETS,
                      help='the memory section compiles for this device '
                      "instead of this machine's (a GPU needs none here, "
                      "only JAX's CUDA plugin: pip install -e '.[plan]')")
  parser.add_argument('--methods', default=','.join(METHODS),
                      help=f'comma-separated methods of the train-step and '
                      f'memory sections, of {METHODS}')
  parser.add_argument('--profile', default='', metavar='DIR',
                      help='also write a jax.profiler trace of every layer '
                      'path of the layer section and of two steps of every '
                      'method of the step sections under DIR (the steps\' '
                      'op time by kind goes into their rows)')
  parser.add_argument('--tiny', action='store_true',
                      help='every section at a tiny size (the smoke test)')
  reference.add_flags(parser)
  return parser


def _sizes(args) -> Sizes:
  sizes = TINY if args.tiny else FULL
  if args.memory_sizes:
    sizes = dataclasses.replace(
        sizes, memory_sizes=tuple(args.memory_sizes.split(',')))
  if args.memory_seqs:
    sizes = dataclasses.replace(sizes, memory_seqs=tuple(
        int(s) for s in args.memory_seqs.split(',')))
  return sizes


def main(argv=None) -> int:
  """The command line; returns the exit code (argparse exits 2 on bad flags)."""
  parser = _parser()
  args = parser.parse_args(argv)
  targets.quiet_plugin_without_gpu()
  sections = [s for s in args.only.split(',') if s]
  unknown = set(sections) - set(ALL_SECTIONS)
  if unknown:
    parser.error(f'unknown sections {sorted(unknown)}; choose from '
                 f'{ALL_SECTIONS}')
  methods = [m for m in args.methods.split(',') if m]
  if set(methods) - set(METHODS):
    parser.error(f'unknown methods {sorted(set(methods) - set(METHODS))}; '
                 f'choose from {METHODS}')
  if 'device' in sections:
    device.prepare_environment()  # before JAX starts a backend
  try:
    workdir_lib.check_outside_runs(args.json, '--json')
  except workdir_lib.WorkdirError as e:
    parser.error(str(e))
  targets.use_cpu_runtime(args.target)
  try:  # before any section runs: a target that cannot be compiled for
    targets.compile_devices(args.target)
  except targets.TargetError as e:
    parser.exit(2, f'error: {e}\n')
  report = run(sections, _sizes(args), args.reps, args.memory_dtype, methods,
               args.step_reps, args.profile, reference.Args.from_flags(args),
               args.tiny, args.target)
  print_tables(report)
  device.print_report(report['rows'])
  with open(args.json, 'w') as f:
    json.dump(report, f, indent=1)
  log(f'written to {args.json}')
  failed = device.failures(report['rows'])
  for line in failed:
    log(f'device check failed: {line}')
  return 1 if failed else 0
