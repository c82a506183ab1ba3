"""docs/reproduction.md and results.json, written from the study's runs.

The page records the commit it was run at and results.json a fingerprint
of the initial weights and permutations its configurations draw from their
seeds (init_fingerprint); tests/test_experiments.py recomputes it from
today's code, so a change of the seed-to-initialization mapping cannot leave
the page silently stale.
"""
import datetime
import hashlib
import json
import math
import os
import platform
import subprocess

import jax
import numpy as np

from poet_jax.bench import common
from poet_jax.data import tokenizer as tokenizer_lib
from poet_jax.experiments import diagnostics
from poet_jax.experiments import findings
from poet_jax.experiments import report
from poet_jax.train import state as train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS32 = float(np.finfo(np.float32).eps)


def git_commit() -> tuple[str, bool]:
  """(HEAD's commit, whether tracked files differ from it) of the checkout
  this package runs from; ('unknown', False) outside a git checkout."""
  try:
    head = subprocess.run(['git', '-C', REPO, 'rev-parse', 'HEAD'],
                          capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()
    status = subprocess.run(['git', '-C', REPO, 'status', '--porcelain',
                             '--untracked-files=no'], capture_output=True,
                            text=True, check=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return 'unknown', False
  return head, bool(status.strip())


def initial_state(c):
  vocab = (c.model.vocab_size or
           tokenizer_lib.load_tokenizer(c.data.tokenizer).vocab_size)
  return train_state.init_state(c, vocab)[1]


def init_fingerprint(state) -> dict:
  """{leaf path: figures} of a state's initial params and frozen arrays.

  Integer arrays (permutations): their SHA-256, exact. Float arrays: sum,
  dot with fixed random weights, and sum of magnitudes (float64), compared
  within the rounding of float32 sampling (fingerprints_differ): bits of a
  float init may differ across CPUs, the figures of another mapping differ
  by about sqrt(size) times the values' scale.
  """
  out = {}
  for part in ('params', 'frozen'):
    for path, x in jax.tree_util.tree_leaves_with_path(state[part]):
      name = part + jax.tree_util.keystr(path)
      x = np.asarray(x)
      if np.issubdtype(x.dtype, np.integer):
        out[name] = {'sha256': hashlib.sha256(
            np.ascontiguousarray(x, np.int64).tobytes()).hexdigest()}
        continue
      x = x.astype(np.float64)
      weights = np.random.default_rng(0).standard_normal(x.shape)
      out[name] = {'shape': list(x.shape), 'sum': float(x.sum()),
                   'dot': float((x * weights).sum()),
                   'abs': float(np.abs(x).sum())}
  return out


def fingerprints_differ(recorded: dict, computed: dict) -> list[str]:
  """Leaves whose figures differ beyond float32 rounding (or that one side
  lacks). A float leaf's elements may each carry the roundings of sampling
  and of a normalization over the array's longest axis: 4 x (longest axis
  + 16) x eps32 x the sum of magnitudes bounds the difference of its sums.
  """
  bad = sorted(set(recorded) ^ set(computed))
  for name in sorted(set(recorded) & set(computed)):
    r, c = recorded[name], computed[name]
    if 'sha256' in r or 'sha256' in c:
      if r.get('sha256') != c.get('sha256'):
        bad.append(name)
      continue
    bound = 4 * (max(r['shape'] + [1]) + 16) * EPS32 * max(r['abs'],
                                                           c['abs'])
    if (r['shape'] != c['shape'] or abs(r['sum'] - c['sum']) > bound or
        abs(r['dot'] - c['dot']) > bound or
        abs(r['abs'] - c['abs']) > bound):
      bad.append(name)
  return bad


def write_all(run, res: dict, args, argv, common: dict, wall: float,
              log=print) -> dict:
  """Every section of the chosen studies; writes args.page, results.json
  and the plots into args.out. common: the overrides of every run (besides
  the scale's). Returns results.json's content."""
  link = os.path.relpath(os.path.abspath(args.out), os.path.dirname(
      os.path.abspath(args.page)))
  out = report.Plots(args.out, '' if link == '.' else link)
  parts = _sections(run, res, args.studies, out)
  claims = [c for _, cs in parts for c in cs]
  compare = res['compare']
  fingerprints, sizes = [], {}
  for key in ('best_poet', 'best_adamw'):
    for result in compare[key][:2]:  # seeds 0 and 1
      state = initial_state(run.config(result['overrides']))
      fingerprints.append({'run': result['name'],
                           'overrides': result['overrides'],
                           'leaves': init_fingerprint(state)})
      sizes.setdefault(key, train_state.count_params(state)[0])
  summary = {
      'scale': args.scale, 'commits': sorted(
          {r.get('commit', 'unknown') for r in run.results.values()}),
      'base': run.scale['base'], 'common': common,
      'best_poet': compare['best_poet'][0]['name'],
      'best_adamw': compare['best_adamw'][0]['name'],
      'train_minutes': sum(r['wall_s'] for r in run.results.values()) / 60,
      'wall_minutes': wall / 60, 'trained_now': len(run.trained),
      'claims': [{'finding': c.finding, 'a': c.a, 'b': c.b,
                  'names': list(c.names), 'kind': c.kind,
                  'verdict': c.verdict()} for c in claims],
      'init_fingerprints': fingerprints, 'runs': run.results}
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  command = ' '.join(['python -m poet_jax.experiments'] + list(argv))
  page = '\n'.join(
      [_intro(run, summary, command, link)] +
      [_scale(run, summary, sizes), _summary(claims)] +
      [text for text, _ in parts] + [LIMITS])
  os.makedirs(os.path.dirname(os.path.abspath(args.page)), exist_ok=True)
  with open(args.page, 'w') as f:
    f.write(page)
  log(f'page {os.path.abspath(args.page)}; results and plots in '
      f'{os.path.abspath(args.out)}')
  return summary


def _sections(run, res: dict, studies, out) -> list[tuple[str, list]]:
  """(Markdown, claims) of each study that ran, in the page's order."""
  compare = res['compare']
  parts = [report.report_compare(run, compare, out)]
  for study, key in (('neumann', 'poet.neumann_terms'),
                     ('merge', 'poet.merge_every'), ('init', 'poet.init')):
    if study in res:
      parts.append(report.report_ablation(run, res[study], out, key))
  if 'spectrum' in studies:
    parts.append(report.report_spectrum(run, compare, out,
                                        len(run.scale['seeds'])))
  if 'orthogonality' in studies:
    parts.append(report.report_orthogonality(run, compare['best_poet'], out))
  if 'diagnostics' in studies:
    steps = run.scale['base']['train.steps']
    no_merge = [r for t, r in res.get('merge', {}).items() if t >= steps]
    parts.append(diagnostics.report_diagnostics(
        run, compare, out, no_merge[0] if no_merge else None))
  return parts


def _intro(run, summary: dict, command: str, link: str) -> str:
  """Title, provenance (command, commits, machine, time) and commands."""
  seconds = lambda method: _mean([
      r['wall_s'] for r in run.results.values()
      if r['overrides']['optimizer.name'] == method])
  commits = ' and '.join(f'`{c}`' for c in summary['commits'])
  return (
      '# Reproducing the papers\' findings at small scale\n\n'
      '<!-- Written by python -m poet_jax.experiments from the runs; edits '
      'are lost on the next run. -->\n\n'
      'The POET papers train Llama models from 60M to 13B parameters on '
      'billions of C4 tokens. This page tests their findings (sections 2, '
      "5, 6, 9 and 10 of the project's spec, `../shared/poet-spec.md` "
      'beside the checkout) on a much smaller model, on the embedded '
      'corpus, on CPU, with every setting run at several seeds.\n\n'
      f'Written by `{command}` on {datetime.date.today().isoformat()}, on '
      f'{_machine()}, from {len(run.results)} runs trained at commit '
      f"{commits}. The runs' training took "
      f"{summary['train_minutes']:.1f} min in all (a POET run "
      f"{seconds('poet'):.0f} s on average, an AdamW run "
      f"{seconds('adamw'):.0f} s); this invocation trained "
      f"{summary['trained_now']} of them and took "
      f"{summary['wall_minutes']:.1f} min. `{link}/results.json` holds every "
      "run's figures, the commits, and a fingerprint of the initial weights "
      'and permutations of the best settings at seeds 0 and 1: '
      "`tests/test_experiments.py` fails when today's code draws other ones "
      'from those seeds, and then this page must be regenerated.\n\n'
      f'## Commands\n\n    {command}    # this page\n'
      '    python -m poet_jax.experiments --scale=smoke --root=/tmp/runs '
      '--out=/tmp/out --page=/tmp/out/reproduction.md  # the pipeline, '
      'minutes\n\n' + RUNS + '\n## When a difference is a finding\n\n' +
      findings.RULE + '\n')


def _scale(run, summary: dict, sizes: dict) -> str:
  """What was run beside the papers' 60M setting, and why this size."""
  c = run.config(run.results[summary['best_poet']]['overrides'])
  steps, m, s = c.train.steps, c.model, run.scale
  tokens = steps * c.train.batch_size * c.train.seq_len
  rows = [
      ('model', 'dim 512, 8 layers, 8 heads, FFN 1280',
       f'dim {m.dim}, {m.num_layers} layers, {m.num_heads} heads, FFN '
       f'{m.ffn_dim}'),
      ('tokenizer, vocabulary', 'T5 SentencePiece, 32000', 'bytes, 256'),
      ('data', 'C4', 'the embedded corpus (the standard library source of '
       f'Python {platform.python_version()})'),
      ('sequence, batch', '256 tokens, 512 sequences',
       f'{c.train.seq_len} tokens, {c.train.batch_size} sequences'),
      ('steps (tokens)', '300k (30B)', f'{steps} ({tokens / 1e3:.0f}k)'),
      ('POET-BS block size b', '256 (half the width)',
       f'{c.poet.block_size:g}'),
      ('T_m', '400 (750 merges)',
       f'{c.poet.merge_every} ({steps // c.poet.merge_every} merges)'),
      ('trainable parameters', 'POET 9.66M',
       f"POET {sizes['best_poet']:,}, AdamW {sizes['best_adamw']:,}"),
      ('evaluation', 'C4 validation', f'{c.eval_tokens:,} held-out tokens, '
       'the same for every run'),
      ('seeds', '1', f"{len(s['sweep_seeds'])} per sweep point, "
       f"{len(s['compare_seeds'])} for each best setting, "
       f"{len(s['seeds'])} per ablation setting")]
  return ('## What was run, and why this size\n\n' +
          report.table(('', 'papers (60M, spec section 8)', 'here'), rows) +
          '\n' + s['why'] + '\n\n' + SPEC + '\n')


def _summary(claims) -> str:
  verdicts = [claim.verdict() for claim in claims]
  counts = ', '.join(f'{verdicts.count(v)} {v}' for v in (
      findings.REPRODUCED, findings.OPPOSITE, findings.NOISE))
  return ('## Summary\n\n' + counts + '.\n\n' +
          report.table(('finding (papers)', 'papers', 'here (mean ± std)',
                        'verdict'), [claim.row() for claim in claims]))


RUNS = (
    'Each run trains with `poet_jax.train.loop.train` in its own work '
    'directory under `--root` (default `runs/reproduction/`), named after '
    'the settings it varies and its seed. A run with a `result.json` is finished and '
    'skipped on a rerun, so a rerun only rewrites the page; an interrupted '
    'run (Ctrl-C, exit code 3) resumes from its checkpoint when the same '
    'command is run again. After a change to the code, use a new `--root`. '
    'Bad flags give one line on stderr and exit code 2 before anything is '
    'written.\n')
SPEC = (
    "Everything else is the spec's: grad clip 0.1 with the reference's ramp "
    'after each merge, weight decay 0.01, cosine decay to 0.01x with no '
    'warmup, Adam betas (0.9, 0.999), `poet.scale` 0.5, normalized-Gaussian '
    "W0, k = 3, the paper's polynomial, and no guard on ‖Q‖ "
    "(`poet.max_q_norm=0`: the papers' method has none). The papers' "
    'ablations of k, T_m and W0 used POET-FS b = 1/2; all runs here are '
    'POET-BS, the variant POET-X ships.')
LIMITS = (
    '## What these runs cannot show\n\n'
    "Anything about C4 or about the papers' sizes and lengths; POET-FS (the "
    "variant of the papers' ablations); the T_m optimum of a long run; "
    "k = 0's divergence over a long run; the papers' vector-probing curve "
    'through merges (the model keeps only the rotation since the last '
    'merge). A difference the rule calls not separable may still be real: '
    'more seeds would narrow the spread.\n')


def _machine() -> str:
  """'2 CPU cores (model name), 1-minute load average L at the end'."""
  name = common.cpu_name()
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else math.nan
  return (f'{os.cpu_count()} CPU cores ({name}), 1-minute load average '
          f'{load:.1f} at the end')


def _mean(values) -> float:
  return sum(values) / len(values) if values else math.nan
