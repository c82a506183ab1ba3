"""The papers' findings at a size a CPU can run, over seeds; writes
docs/reproduction.md and docs/reproduction/.

  python -m poet_jax.experiments                  # 2 quiet cores: ~1 h
  python -m poet_jax.experiments --scale=quick    # the same in 100-step runs
  python -m poet_jax.experiments --scale=smoke --root=/tmp/r --out=/tmp/o \\
      --page=/tmp/o/reproduction.md               # the pipeline, in minutes

Every run is train_lib.train on the embedded corpus in its own work
directory <root>/<run name>, named by the settings it varies and its seed,
so a run shared by two studies (the best POET setting is k = 3 of the
Neumann study and the default T_m of the merge study) trains once. A run
whose result.json exists is finished and skipped; an unfinished one resumes
from its last checkpoint. The learning rates are swept first (over the
scale's sweep seeds, the best by mean eval loss); the best settings then run
at more seeds, and every ablation runs at the scale's seeds. The page,
results.json (with the commits and a fingerprint of the initial weights)
and the PNG plots are written from the runs (experiments_page).

Exit codes as train.py: 2 bad input (nothing written), 3 interrupted (run
the same command to resume).
"""
import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import sys
import time

# Importing JAX does not start its backend: _set_up_xla still can set the
# XLA flags before the first computation.
import jax

from poet_jax import config as config_lib
from poet_jax import config_checks
from poet_jax import experiments_page as page
from poet_jax import metrics as metrics_lib
from poet_jax import stopping
from poet_jax import targets
from poet_jax import train_lib
from poet_jax import workdir as workdir_lib

INITS = ('normalized', 'xavier', 'standard', 'uniform_spectrum')
STUDIES = ('compare', 'neumann', 'merge', 'init', 'spectrum',
           'orthogonality', 'diagnostics')

# base: config overrides of every run; adamw_lr, poet_lr: the sweeps;
# base_lr: POET's base-group rates tried at the best poet.lr (the first is
# the one the poet.lr sweep uses); merge_every: T_m (the first is the
# default of the other studies); sweep_seeds: the seeds of the sweeps;
# compare_seeds: of the best POET and AdamW settings; seeds: of every
# ablation; why: the page's reason for the size.
_STUDY_MODEL = {'model.dim': 128, 'model.num_layers': 2, 'model.num_heads': 4,
                'model.ffn_dim': 256, 'train.seq_len': 64,
                'train.batch_size': 16, 'poet.block_size': 64.0,
                'eval_tokens': 16384}
_SEEDS = dict(sweep_seeds=(0, 1, 2), compare_seeds=(0, 1, 2, 3, 4),
              seeds=(0, 1, 2))
_LRS = dict(adamw_lr=(1e-3, 3e-3, 1e-2), poet_lr=(3e-3, 6e-3, 1.2e-2, 2.4e-2),
            base_lr=(1e-2, 3e-3))
SCALES = {
    # About an hour on 2 quiet cores: 61 runs.
    'study': dict(
        base={**_STUDY_MODEL, 'train.steps': 500, 'eval_every': 50,
              'log_every': 10, 'checkpoint_every': 250},
        merge_every=(100, 10, 25, 250, 500), **_LRS, **_SEEDS,
        why=('The whole study is 61 runs: 8 learning-rate settings at 3 '
             'seeds, 2 more seeds of the best POET and AdamW settings, and '
             '11 ablation settings at 3 seeds. Measured as CPU time on this '
             'machine while it was shared, a POET run of this model costs '
             'about 16 CPU-s of compiling and 0.18 CPU-s a step, an AdamW run '
             '3 CPU-s and 0.13 CPU-s a step, and one run keeps about 1.7 of '
             'the 2 cores busy: 500 steps a run make about an hour of wall '
             'time on 2 quiet cores. Width 128 with POET-BS b = 64 keeps the '
             'papers\' b = half the width and is twice the width of the '
             'earlier study, so width effects (the standard initialization\'s '
             'singular values shrink with width) weigh less; two layers and '
             '500 steps rather than four layers and fewer steps, because the '
             'ablations act through the number of merges and the growth of '
             'Q, which need steps more than depth. T_m = 100 gives 5 merges; '
             'the T_m sweep runs from 50 merges (T_m = 10) to none before '
             'the last step (T_m = 500).')),
    # The study's model and seeds in 100-step runs: a check of the whole
    # pipeline on a shared machine (84 min of training at load averages
    # of 3 to 11; about 25 min on 2 quiet cores by the study's figures).
    'quick': dict(
        base={**_STUDY_MODEL, 'train.steps': 100, 'eval_every': 10,
              'log_every': 5, 'checkpoint_every': 100},
        merge_every=(25, 5, 10, 50, 100), **_LRS, **_SEEDS,
        why=('A reduced run of the study\'s model, seeds and settings, in '
             '100-step runs (T_m = 25: 4 merges), to check the whole '
             'pipeline while the machine was shared; 100 steps are far too '
             'few for the papers\' findings, and the full study (`--scale='
             'study`, 500 steps) is the one to read.')),
    # The whole pipeline in minutes (tests/test_experiments.py).
    'smoke': dict(
        base={'model.dim': 32, 'model.num_layers': 2, 'model.num_heads': 2,
              'model.ffn_dim': 64, 'poet.block_size': 8.0,
              'train.batch_size': 4, 'train.seq_len': 32, 'train.steps': 4,
              'eval_tokens': 256, 'eval_every': 2, 'log_every': 1,
              'checkpoint_every': 4},
        adamw_lr=(1e-2,), poet_lr=(1e-2,), base_lr=(1e-2,),
        merge_every=(2, 4), sweep_seeds=(0,), compare_seeds=(0, 1),
        seeds=(0, 1),
        why='A pipeline check: its numbers mean nothing.'),
}
# Every run: one device, one kept checkpoint.
# The papers' method has no guard on ||Q||: the study runs without the
# trainer's default poet.max_q_norm (docs/reproduction.md). The tables
# report the step-0 evaluation of every run.
COMMON = {'mesh.data': 1, 'keep_checkpoints': 1, 'poet.max_q_norm': 0.0,
          'eval_at_start': 'always'}


class UsageError(ValueError):
  """Bad command-line input; one line for the user."""


# ------------------------------------------------------------------- runs


def run_name(overrides: dict) -> str:
  """The work directory name of a run: the method and the varied settings."""
  o = overrides
  seed = f"_seed{o['seed']}" if o.get('seed') else ''
  if o['optimizer.name'] == 'adamw':
    return f"adamw_lr{o['train.lr']:g}{seed}"
  return (f"poet_lr{o['train.lr']:g}_plr{o['poet.lr']:g}"
          f"_k{o['poet.neumann_terms']}_tm{o['poet.merge_every']}"
          f"_{o['poet.init']}{seed}")


def make_config(base: dict, overrides: dict, common=None):
  """base_config() with COMMON (or `common`), a scale's base overrides and
  the run's, validated."""
  c = config_lib.base_config()
  c.update_from_flattened_dict({**(COMMON if common is None else common),
                                **base, **overrides})
  config_checks.validate(c)
  return c


def poet_run(train_lr, poet_lr, k=3, merge_every=None, init='normalized',
             scale=None) -> dict:
  """Config overrides of a POET-BS run (merge_every None: the scale's)."""
  return {'optimizer.name': 'poet', 'train.lr': train_lr, 'poet.lr': poet_lr,
          'poet.neumann_terms': k,
          'poet.merge_every': merge_every or scale['merge_every'][0],
          'poet.init': init}


def adamw_run(lr) -> dict:
  """Config overrides of an AdamW run (dense layers)."""
  return {'optimizer.name': 'adamw', 'train.lr': lr}


def at_seed(overrides: dict, seed: int) -> dict:
  """The run of `overrides` (a setting) at `seed` (seed 0: the default)."""
  setting = {k: v for k, v in overrides.items() if k != 'seed'}
  return {**setting, 'seed': seed} if seed else setting


class Runner:
  """Trains runs in <root>/<name>, each once; collects their results."""

  def __init__(self, root: str, scale: dict, log=print, commit='unknown'):
    """root: parent of the work directories; scale: one of SCALES; commit:
    the code's, recorded in the result of every run trained here."""
    self.root, self.scale, self.log, self.commit = root, scale, log, commit
    self.results = {}
    self.trained = []  # names of the runs this invocation trained

  def workdir(self, overrides: dict) -> str:
    return os.path.join(self.root, run_name(overrides))

  def config(self, overrides: dict):
    return make_config(self.scale['base'], overrides)

  def __call__(self, overrides: dict) -> dict:
    """The result of a run (see _summarize), training it if unfinished."""
    name = run_name(overrides)
    if name in self.results:
      return self.results[name]
    workdir = self.workdir(overrides)
    path = os.path.join(workdir, 'result.json')
    if os.path.exists(path):
      with open(path) as f:
        result = json.load(f)
      self.log(f'{name}: finished earlier, skipped (eval perplexity '
               f"{result['eval_ppl']:.3f})")
    else:
      result = self._train(name, overrides, workdir)
      self.trained.append(name)
    self.results[name] = result
    return result

  def seeds(self, overrides: dict, seeds) -> list[dict]:
    """The results of a setting at each of `seeds`, in that order."""
    return [self(at_seed(overrides, s)) for s in seeds]

  def _train(self, name: str, overrides: dict, workdir: str) -> dict:
    c = self.config(overrides)
    self.log(f'{name}: training in {workdir}')
    start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'train.log'), 'a') as out, \
        contextlib.redirect_stdout(out):
      code = train_lib.train(c, workdir, progress=False)
    if code:
      raise SystemExit(code)
    result = _summarize(name, overrides, workdir,
                        time.perf_counter() - start)
    result['commit'] = self.commit
    tmp = os.path.join(workdir, 'result.json.tmp')
    with open(tmp, 'w') as f:
      json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(workdir, 'result.json'))
    self.log(f"{name}: eval perplexity {result['eval_ppl']:.3f} "
             f"({result['wall_s']:.0f} s)")
    return result


def _summarize(name: str, overrides: dict, workdir: str, wall: float):
  """A finished run's figures from its metrics.jsonl.

  diverged: the final evaluation is not finite, no better than the first,
  or some update was dropped as non-finite. wall_s: the time of the
  invocation that finished the run (of its last part, if it was resumed).
  """
  entries = metrics_lib.MetricsLog.read(os.path.join(workdir,
                                                     'metrics.jsonl'))
  evals = [e for e in entries if 'eval_loss' in e]
  first, last = evals[0]['eval_loss'], evals[-1]['eval_loss']
  nonfinite = max([e.get('nonfinite_steps', 0) for e in entries] + [0])
  return {'name': name, 'overrides': overrides, 'eval_loss': last,
          'eval_ppl': math.exp(min(last, 700)) if math.isfinite(last)
                      else float('inf'),
          'first_eval_ppl': math.exp(min(first, 700)),
          'nonfinite_steps': nonfinite, 'wall_s': wall,
          'diverged': not math.isfinite(last) or last >= first or
                      nonfinite > 0}


def mean_loss(results: list[dict]) -> float:
  """Mean final eval loss of a setting's runs (a non-finite one: inf)."""
  losses = [r['eval_loss'] if math.isfinite(r['eval_loss']) else math.inf
            for r in results]
  return sum(losses) / len(losses)


def best(settings: list[list[dict]]) -> list[dict]:
  """The setting (its runs over seeds) with the lowest mean eval loss."""
  return min(settings, key=mean_loss)


# ---------------------------------------------------------------- studies


def study_compare(run: Runner, scale: dict) -> dict:
  """POET-BS and AdamW, each at its best learning rate of a small sweep
  (over the sweep seeds), then each best setting at the compare seeds.

  POET sweeps poet.lr at the first base-group rate, then the base-group rate
  at the best poet.lr.
  """
  seeds = scale['sweep_seeds']
  adamw = [run.seeds(adamw_run(lr), seeds) for lr in scale['adamw_lr']]
  base_lr = scale['base_lr'][0]
  poet = [run.seeds(poet_run(base_lr, lr, scale=scale), seeds)
          for lr in scale['poet_lr']]
  poet_lr = best(poet)[0]['overrides']['poet.lr']
  poet += [run.seeds(poet_run(lr, poet_lr, scale=scale), seeds)
           for lr in scale['base_lr'][1:]]
  return {'adamw': adamw, 'poet': poet,
          'best_adamw': run.seeds(best(adamw)[0]['overrides'],
                                  scale['compare_seeds']),
          'best_poet': run.seeds(best(poet)[0]['overrides'],
                                 scale['compare_seeds'])}


def study_ablation(run: Runner, setting: dict, key: str, values,
                   seeds) -> dict:
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
              description=__doc__.split('\n')[0])
  p.add_argument('--scale', default='study', choices=sorted(SCALES),
                 help='model, run and seed sizes (SCALES)')
  p.add_argument('--studies', default=','.join(STUDIES),
                 help=f'comma-separated subset of {",".join(STUDIES)}; '
                 'compare always runs (the others start from its best runs)')
  p.add_argument('--root', default=os.path.join('runs', 'reproduction'),
                 help='work directories of the runs, one per run')
  p.add_argument('--out', default=os.path.join('docs', 'reproduction'),
                 help='where results.json and the PNGs go')
  p.add_argument('--page', default=os.path.join('docs', 'reproduction.md'),
                 help='the Markdown page written from the runs')
  p.add_argument('--fast_compile', default=True,
                 action=argparse.BooleanOptionalAction,
                 help='XLA:CPU backend optimization level 0: faster '
                 'compiles (off when an accelerator plugin is installed)')
  args = p.parse_args(argv)
  args.studies = [s.strip() for s in args.studies.split(',') if s.strip()]
  unknown = sorted(set(args.studies) - set(STUDIES))
  if unknown or not args.studies:
    raise UsageError(f'--studies={",".join(unknown)}: choose from '
                     f'{",".join(STUDIES)}')
  scale = SCALES[args.scale]
  # Every configuration the study can train, checked before anything runs.
  lr = scale['poet_lr'][0]
  for overrides in [adamw_run(x) for x in scale['adamw_lr']] + [
      poet_run(b, lr, k, t, i, scale) for b in scale['base_lr']
      for k in (0, 4) for t in scale['merge_every'] for i in INITS]:
    make_config(scale['base'], overrides)
  for path in (args.root, args.out):
    if os.path.exists(path) and not os.path.isdir(path):
      raise UsageError(f'{path} exists and is not a directory; choose '
                       'another --root / --out')
  workdir_lib.check_outside_runs(args.out, '--out')
  if os.path.isdir(args.page):
    raise UsageError(f'--page={args.page} is a directory; give a file name')
  return args


def _set_up_xla(args) -> None:
  """Before JAX starts its backend: fast CPU compiles and a shared on-disk
  cache of compiled steps (runs with the same shapes reuse eval steps)."""
  accelerated = False
  for plugin in ('jax-cuda12-plugin', 'jax-cuda13-plugin', 'libtpu',
                 'jax-rocm7-plugin'):
    try:
      importlib.metadata.version(plugin)
      accelerated = True
    except importlib.metadata.PackageNotFoundError:
      pass
  flags = os.environ.get('XLA_FLAGS', '')
  if (args.fast_compile and not accelerated and
      'xla_backend_optimization_level' not in flags):
    os.environ['XLA_FLAGS'] = (flags +
                               ' --xla_backend_optimization_level=0').strip()
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir',
                      os.path.abspath(os.path.join(args.root, 'xla_cache')))


def run_studies(args, argv=(), log=print) -> dict:
  """Runs (or reuses) every run of the chosen studies; writes the page,
  results.json and the plots. Returns results.json's content."""
  scale = SCALES[args.scale]
  commit, dirty = page.git_commit()
  run = Runner(args.root, scale, log, commit + (
      ' with uncommitted changes' if dirty else ''))
  start = time.perf_counter()
  res = {'compare': study_compare(run, scale)}
  setting = res['compare']['best_poet'][0]['overrides']
  ablations = {'neumann': ('poet.neumann_terms', range(5)),
               'merge': ('poet.merge_every', scale['merge_every']),
               'init': ('poet.init', INITS)}
  for study, (key, values) in ablations.items():
    if study in args.studies:
      res[study] = study_ablation(run, setting, key, values, scale['seeds'])
  os.makedirs(args.out, exist_ok=True)
  return page.write_all(run, res, args, argv, COMMON,
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
    return int(e.code)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
