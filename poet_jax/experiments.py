"""The papers' ablations at a size a CPU can run (docs/reproduction.md).

  python -m poet_jax.experiments                  # a loaded 2-core CPU: ~27 min
  python -m poet_jax.experiments --scale=large    # a quiet machine: ~2 h
  python -m poet_jax.experiments --studies=compare,spectrum --scale=smoke

Every run is train_lib.train on the embedded corpus in its own work directory
<root>/<run name>, named by the settings it varies, so a run shared by two
studies (the best POET run is k = 3 of the Neumann study and T_m = 50 of the
merge study) trains once. A run whose result.json exists is finished and
skipped; an unfinished one resumes from its last checkpoint. The POET and
AdamW learning rates are swept first; the ablations then use the best POET
settings. Tables (tables.md, results.json) and PNG plots go to --out.

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
from poet_jax import experiments_report as report
from poet_jax import metrics as metrics_lib
from poet_jax import stopping
from poet_jax import train_lib
from poet_jax import workdir as workdir_lib

INITS = ('normalized', 'standard', 'xavier', 'uniform_spectrum')
STUDIES = ('compare', 'seeds', 'neumann', 'merge', 'init', 'spectrum',
           'orthogonality')

_SMALL_MODEL = {'model.dim': 64, 'model.num_layers': 2, 'model.num_heads': 4,
                'model.ffn_dim': 128, 'train.seq_len': 64}
# base: config overrides of every run; adamw_lr, poet_lr: the sweeps;
# base_lr: POET's base-group rates tried at the best poet.lr (the first is
# the one the poet.lr sweep uses); merge_every: T_m (the first is the
# default of the other studies); seeds: the best runs again at these seeds.
SCALES = {
    # This session's machine (2 shared cores): about 30 min for 17 runs.
    'small': dict(
        base={**_SMALL_MODEL, 'train.batch_size': 16, 'train.steps': 200,
              'poet.block_size': 32.0, 'eval_tokens': 16384,
              'eval_every': 50, 'log_every': 5, 'checkpoint_every': 100},
        adamw_lr=(1e-3, 3e-3, 1e-2), poet_lr=(3e-3, 6e-3, 1.2e-2, 2.4e-2),
        base_lr=(1e-2, 3e-3), merge_every=(50, 5, 25, 100), seeds=(1, 2)),
    # The default tiny model (llama_tiny) and the papers' T_m: about 2 h on
    # 2 quiet cores.
    'large': dict(
        base={'train.steps': 1200, 'poet.block_size': 32.0,
              'eval_every': 200, 'log_every': 10, 'checkpoint_every': 200},
        adamw_lr=(1e-3, 3e-3, 1e-2, 3e-2), poet_lr=(2e-3, 4e-3, 8e-3, 1.6e-2),
        base_lr=(1e-2, 3e-3), merge_every=(200, 5, 25, 50, 400, 1200),
        seeds=(1, 2)),
    'smoke': dict(
        base={'model.dim': 32, 'model.num_layers': 2, 'model.num_heads': 2,
              'model.ffn_dim': 64, 'poet.block_size': 8.0,
              'train.batch_size': 4, 'train.seq_len': 32, 'train.steps': 4,
              'eval_tokens': 256, 'eval_every': 4, 'log_every': 1,
              'checkpoint_every': 4},
        adamw_lr=(1e-2,), poet_lr=(1e-2,), base_lr=(1e-2,),
        merge_every=(2, 1), seeds=(1,)),
}
# Every run: one device, one kept checkpoint.
# The papers' method has no guard on ||Q||: the study runs without the
# trainer's default poet.max_q_norm (docs/reproduction.md). The tables
# report the step-0 evaluation of every run.
_COMMON = {'mesh.data': 1, 'keep_checkpoints': 1, 'poet.max_q_norm': 0.0,
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


def make_config(scale: dict, overrides: dict):
  """base_config() with the scale's and the run's overrides, validated."""
  c = config_lib.base_config()
  c.update_from_flattened_dict({**_COMMON, **scale['base'], **overrides})
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


class Runner:
  """Trains runs in <root>/<name>, each once; collects their results."""

  def __init__(self, root: str, scale: dict, log=print):
    """root: parent of the work directories; scale: one of SCALES."""
    self.root, self.scale, self.log = root, scale, log
    self.results = {}
    self.trained = []  # names of the runs this invocation trained

  def workdir(self, overrides: dict) -> str:
    return os.path.join(self.root, run_name(overrides))

  def config(self, overrides: dict):
    return make_config(self.scale, overrides)

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


def best(results: list[dict]) -> dict:
  """The run with the lowest final eval loss (non-finite counts as worst)."""
  key = lambda r: r['eval_loss'] if math.isfinite(r['eval_loss']) else 1e30
  return min(results, key=key)


# ---------------------------------------------------------------- studies


def study_compare(run: Runner, scale: dict) -> dict:
  """POET-BS and AdamW, each at its best learning rate of a small sweep.

  POET sweeps poet.lr at the first base-group rate, then the base-group rate
  at the best poet.lr.
  """
  adamw = [run(adamw_run(lr)) for lr in scale['adamw_lr']]
  base_lr = scale['base_lr'][0]
  poet = [run(poet_run(base_lr, lr, scale=scale)) for lr in scale['poet_lr']]
  poet_lr = best(poet)['overrides']['poet.lr']
  poet += [run(poet_run(lr, poet_lr, scale=scale))
           for lr in scale['base_lr'][1:]]
  return {'adamw': adamw, 'poet': poet, 'best_adamw': best(adamw),
          'best_poet': best(poet)}


def study_ablation(run: Runner, base: dict, key: str, values) -> list:
  """`base` (a result) with config `key` set to each of `values`."""
  return [run({**base['overrides'], key: value}) for value in values]


# ------------------------------------------------------------------ main


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise UsageError(message)


def parse_args(argv):
  """argv (without the program) -> namespace; UsageError for bad input."""
  p = _Parser(prog='python -m poet_jax.experiments',
              description=__doc__.split('\n')[0])
  p.add_argument('--scale', default='small', choices=sorted(SCALES),
                 help='model and run sizes (SCALES)')
  p.add_argument('--studies', default=','.join(STUDIES),
                 help=f'comma-separated subset of {",".join(STUDIES)}; '
                 'compare always runs (the others start from its best runs)')
  p.add_argument('--root', default=os.path.join('runs', 'reproduction'),
                 help='work directories of the runs, one per run')
  p.add_argument('--out', default=os.path.join('docs', 'reproduction'),
                 help='where tables.md, results.json and the PNGs go')
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
  planned = [adamw_run(x) for x in scale['adamw_lr']] + [
      poet_run(b, lr, k, t, i, scale) for b in scale['base_lr']
      for k in range(5) for t in scale['merge_every'] for i in INITS]
  for overrides in planned[:len(scale['adamw_lr']) + 1] + planned[-1:]:
    make_config(scale, overrides)
  for path in (args.root, args.out):
    if os.path.exists(path) and not os.path.isdir(path):
      raise UsageError(f'{path} exists and is not a directory; choose '
                       'another --root / --out')
  workdir_lib.check_outside_runs(args.out, '--out')
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


def run_studies(args, log=print) -> dict:
  """Runs (or reuses) every run of the chosen studies; writes the report."""
  scale = SCALES[args.scale]
  run = Runner(args.root, scale, log)
  start = time.perf_counter()
  res = study_compare(run, scale)
  os.makedirs(args.out, exist_ok=True)
  sections = [report.report_compare(run, res, args.out)]
  p = res['best_poet']
  ablations = {'neumann': ('poet.neumann_terms', range(5)),
               'merge': ('poet.merge_every', scale['merge_every']),
               'init': ('poet.init', INITS)}
  for study, (key, values) in ablations.items():
    if study in args.studies:
      results = study_ablation(run, p, key, values)
      sections.append(report.report_ablation(run, results, args.out, key))
  if 'seeds' in args.studies:
    repeat = lambda result: [result] + study_ablation(run, result, 'seed',
                                                      scale['seeds'])
    groups = {'AdamW': repeat(res['best_adamw']), 'POET-BS': repeat(p)}
    against = {'POET-BS': 'AdamW'}
    if 'neumann' in args.studies:  # the Neumann terms the papers single out
      for k in (1, 0):
        groups[f'POET-BS k={k}'] = repeat(
            run({**p['overrides'], 'poet.neumann_terms': k}))
        against[f'POET-BS k={k}'] = 'POET-BS'
    sections.append(report.report_seeds(groups, against))
  if 'spectrum' in args.studies:
    sections.append(report.report_spectrum(run, res, args.out))
  if 'orthogonality' in args.studies:
    sections.append(report.report_orthogonality(run, p, args.out))
  wall = time.perf_counter() - start
  total = sum(r['wall_s'] for r in run.results.values())
  header = (f'# Reproduction tables ({args.scale} scale)\n\nOverrides of '
            f'every run: `{json.dumps({**_COMMON, **scale["base"]})}`.\n'
            f'{len(run.results)} runs; their training took {total / 60:.1f} '
            f'min in all. The last invocation trained {len(run.trained)} of '
            f'them and took {wall / 60:.1f} min.\n')
  with open(os.path.join(args.out, 'tables.md'), 'w') as f:
    f.write('\n'.join([header] + sections))
  summary = {'scale': args.scale, 'base': scale['base'],
             'best_poet': p['name'], 'best_adamw': res['best_adamw']['name'],
             'train_minutes': total / 60, 'wall_minutes': wall / 60,
             'runs': run.results}
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  log(f'tables and plots in {os.path.abspath(args.out)}')
  return summary


def main(argv) -> int:
  """The command line (argv without the program); returns the exit code."""
  try:
    args = parse_args(argv)
  except (UsageError,) + train_lib.USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 2
  _set_up_xla(args)
  try:
    run_studies(args)
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
