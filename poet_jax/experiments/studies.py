"""The papers' findings at a size a CPU can run, over seeds; writes
docs/reproduction.md and docs/reproduction/.

  python -m poet_jax.experiments                  # 2 quiet cores: ~80 min
  python -m poet_jax.experiments --scale=quick    # the same in 100-step runs
  python -m poet_jax.experiments --scale=smoke --root=/tmp/r --out=/tmp/o \\
      --page=/tmp/o/reproduction.md               # the pipeline, in minutes

Every run is poet_jax.train.loop.train on the embedded corpus in its own
work directory <root>/<run name>, named by the settings it varies and its
seed (scales.run_name; runner.Runner trains it), so a run shared by two
studies (the best POET setting is k = 3 of the Neumann study and the
default T_m of the merge study) trains once. A run whose result.json exists
is finished and skipped; an unfinished one resumes from its last checkpoint.
The learning rates are swept first (over the scale's sweep seeds, the best
by mean eval loss); the best settings then run at more seeds, and every
ablation runs at the scale's seeds. The page, results.json (with the commits
and a fingerprint of the initial weights) and the PNG plots are written from
the runs (page.py).

Exit codes as train.py: 2 bad input (nothing written), 3 interrupted (run
the same command to resume).
"""
import argparse
import importlib.metadata
import os
import sys
import time

# Importing JAX does not start its backend: _set_up_xla still can set the
# XLA flags before the first computation.
import jax

from poet_jax.experiments import page
from poet_jax.experiments import runner as runner_lib
from poet_jax.experiments import scales
from poet_jax.train import loop as train_lib
from poet_jax.train import stopping
from poet_jax.train import workdir as workdir_lib
from poet_jax.train.plan import targets


class UsageError(ValueError):
  """Bad command-line input; one line for the user."""


# ---------------------------------------------------------------- studies


def study_compare(run: runner_lib.Runner, scale: dict) -> dict:
  """POET-BS and AdamW, each at its best learning rate of a small sweep
  (over the sweep seeds), then each best setting at the compare seeds.

  POET sweeps poet.lr at the first base-group rate, then the base-group rate
  at the best poet.lr.
  """
  seeds = scale['sweep_seeds']
  adamw = [run.seeds(scales.adamw_run(lr), seeds) for lr in scale['adamw_lr']]
  base_lr = scale['base_lr'][0]
  poet = [run.seeds(scales.poet_run(base_lr, lr, scale=scale), seeds)
          for lr in scale['poet_lr']]
  poet_lr = runner_lib.best(poet)[0]['overrides']['poet.lr']
  poet += [run.seeds(scales.poet_run(lr, poet_lr, scale=scale), seeds)
           for lr in scale['base_lr'][1:]]
  return {'adamw': adamw, 'poet': poet,
          'best_adamw': run.seeds(runner_lib.best(adamw)[0]['overrides'],
                                  scale['compare_seeds']),
          'best_poet': run.seeds(runner_lib.best(poet)[0]['overrides'],
                                 scale['compare_seeds'])}


def study_ablation(run: runner_lib.Runner, setting: dict, key: str,
                   values, seeds) -> dict:
  """{value: runs over seeds} of `setting` with config `key` set to each."""
  return {value: run.seeds({**setting, key: value}, seeds)
          for value in values}


# ------------------------------------------------------------------ main


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise UsageError(message)


def parse_args(argv):
  """argv (without the program) -> namespace; UsageError for bad input."""
  p = _Parser(prog='python -m poet_jax.experiments',
              description=__doc__.split('\n\n')[0].replace('\n', ' '),
              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--scale', default='study', choices=sorted(scales.SCALES),
                 help='model, run and seed sizes: study (the page), quick (its '
                 '100-step form), smoke (a pipeline check)')
  p.add_argument('--studies', default=','.join(scales.STUDIES),
                 help='comma-separated subset of '
                 f'{",".join(scales.STUDIES)}; compare always runs (the '
                 'others start from its best runs)')
  p.add_argument('--root', default=os.path.join('runs', 'reproduction'),
                 help='work directories of the runs, one per run')
  p.add_argument('--out', default=os.path.join('docs', 'reproduction'),
                 help='where results.json and the PNGs go')
  p.add_argument('--page', default=os.path.join('docs', 'reproduction.md'),
                 help='the Markdown page written from the runs (the default '
                 'overwrites the committed page)')
  p.add_argument('--fast_compile', default=True,
                 action=argparse.BooleanOptionalAction,
                 help='XLA:CPU backend optimization level 0: faster '
                 'compiles (off on a machine with an accelerator)')
  args = p.parse_args(argv)
  args.studies = [s.strip() for s in args.studies.split(',') if s.strip()]
  unknown = sorted(set(args.studies) - set(scales.STUDIES))
  if unknown or not args.studies:
    raise UsageError(f'--studies={",".join(unknown)}: choose from '
                     f'{",".join(scales.STUDIES)}')
  scale = scales.SCALES[args.scale]
  # Every configuration the study can train, checked before anything runs.
  lr = scale['poet_lr'][0]
  for overrides in [scales.adamw_run(x) for x in scale['adamw_lr']] + [
      scales.poet_run(b, lr, k, t, i, scale) for b in scale['base_lr']
      for k in (0, 4) for t in scale['merge_every'] for i in scales.INITS]:
    scales.make_config(scale['base'], overrides)
  for path in (args.root, args.out):
    if os.path.exists(path) and not os.path.isdir(path):
      raise UsageError(f'{path} exists and is not a directory; choose '
                       'another --root / --out')
  workdir_lib.check_outside_runs(args.out, '--out')
  if os.path.isdir(args.page):
    raise UsageError(f'--page={args.page} is a directory; give a file name')
  return args


def _has_accelerator() -> bool:
  """Whether JAX runs on an accelerator here: an NVIDIA device, or a TPU or
  ROCm plugin installed. An installed CUDA plugin alone is not one: the
  `plan` extra installs it on CPU machines, as a compiler only."""
  if targets.has_nvidia_device():
    return True
  for plugin in ('libtpu', 'jax-rocm7-plugin'):
    try:
      importlib.metadata.version(plugin)
      return True
    except importlib.metadata.PackageNotFoundError:
      pass
  return False


def _set_up_xla(args) -> None:
  """Before JAX starts its backend: fast CPU compiles and a shared on-disk
  cache of compiled steps (runs with the same shapes reuse eval steps)."""
  flags = os.environ.get('XLA_FLAGS', '')
  if (args.fast_compile and not _has_accelerator() and
      'xla_backend_optimization_level' not in flags):
    os.environ['XLA_FLAGS'] = (flags +
                               ' --xla_backend_optimization_level=0').strip()
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir',
                      os.path.abspath(os.path.join(args.root, 'xla_cache')))


def run_studies(args, argv=(), log=print) -> dict:
  """Runs (or reuses) every run of the chosen studies; writes the page,
  results.json and the plots. Returns results.json's content."""
  scale = scales.SCALES[args.scale]
  commit, dirty = page.git_commit()
  run = runner_lib.Runner(args.root, scale, log, commit + (
      ' with uncommitted changes' if dirty else ''))
  start = time.perf_counter()
  res = {'compare': study_compare(run, scale)}
  setting = res['compare']['best_poet'][0]['overrides']
  ablations = {'neumann': ('poet.neumann_terms', range(5)),
               'merge': ('poet.merge_every', scale['merge_every']),
               'init': ('poet.init', scales.INITS)}
  for study, (key, values) in ablations.items():
    if study in args.studies:
      res[study] = study_ablation(run, setting, key, values, scale['seeds'])
  os.makedirs(args.out, exist_ok=True)
  return page.write_all(run, res, args, argv, scales.COMMON,
                        wall=time.perf_counter() - start, log=log)


def main(argv) -> int:
  """The command line (argv without the program); returns the exit code."""
  try:
    args = parse_args(argv)
  except (UsageError,) + train_lib.USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 2
  _set_up_xla(args)
  targets.quiet_plugin_without_gpu()
  try:
    run_studies(args, argv)
  except train_lib.USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 2
  except stopping.Interrupted as e:
    print(f'{e}: stopped; run the same command to resume', flush=True)
    return train_lib.EXIT_INTERRUPTED
  except SystemExit as e:  # a run's own exit code (3: interrupted, resumable)
    print(f'a run stopped with exit code {e.code}; run the same command to '
          'resume', file=sys.stderr, flush=True)
    return e.code if isinstance(e.code, int) else 1
  return 0
