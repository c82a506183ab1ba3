"""The reproduction study (python -m poet_jax.experiments): the smoke scale's
pipeline in subprocesses as a user runs it, the rule for findings, and the
committed page against today's seed-to-initialization mapping."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from poet_jax.experiments import findings
from poet_jax.experiments import page as page_lib
from poet_jax.experiments import report
from poet_jax.experiments import scales
from train_util import ROOT, train_env

STUDIES = 'compare,merge,spectrum,orthogonality,diagnostics'
RESULTS = os.path.join(ROOT, 'docs', 'reproduction', 'results.json')
PAGE = os.path.join(ROOT, 'docs', 'reproduction.md')


def run_experiments(root, out, *extra):
  command = [sys.executable, '-m', 'poet_jax.experiments', '--scale=smoke',
             f'--root={root}', f'--out={out}',
             f'--page={os.path.join(out, "page.md")}', *extra]
  return subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                        env=train_env(), timeout=900)


def _snapshot(root):
  """{path: (size, mtime)} of every file under root but the XLA cache."""
  files = {}
  for directory, _, names in os.walk(root):
    if 'xla_cache' not in directory:
      for name in names:
        path = os.path.join(directory, name)
        files[path] = (os.path.getsize(path), os.path.getmtime(path))
  return files


@pytest.fixture(scope='module')
def study(tmp_path_factory):
  root, out = (str(tmp_path_factory.mktemp(n)) for n in ('runs', 'out'))
  result = run_experiments(root, out, f'--studies={STUDIES}')
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(out, 'page.md')) as f:
    page = f.read()
  with open(os.path.join(out, 'results.json')) as f:
    results = json.load(f)
  return root, out, page, results


def section(page, heading):
  return page.split(f'## {heading}')[1].split('\n## ')[0]


def test_writes_the_page_results_and_plots(study):
  root, out, page, results = study
  for name in ('compare.png', 'merge_every.png', 'spectrum.png',
               'orthogonality.png', 'diagnostics.png'):
    with open(os.path.join(out, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', name
    assert f'({name})' in page  # linked relative to the page
  for heading in ('When a difference is a finding', 'Summary',
                  'POET-BS vs AdamW', 'Merge interval T_m', 'Singular values',
                  'Orthogonality error', "The papers' weight diagnostics"):
    assert f'## {heading}' in page
  assert findings.RULE in page
  runs = results['runs']
  # AdamW and POET at sweep seed 0, both again at seed 1, and T_m = 4 at
  # seeds 0 and 1.
  assert sorted(runs) == sorted(d for d in os.listdir(root)
                                if d != 'xla_cache')
  assert len(runs) == 6
  for run in runs.values():
    assert run['eval_ppl'] < run['first_eval_ppl'], run
    assert run['commit'] in page
  # The page reports each claim's verdict from the runs' own figures.
  best = [runs[results['best_poet']], runs[results['best_poet'] + '_seed1']]
  poet = [r['eval_ppl'] for r in best]
  compare = results['claims'][0]
  assert compare['a'] == poet
  assert findings.fmt(poet) in page
  summary = section(page, 'Summary')
  for claim in results['claims']:
    assert f"**{claim['verdict']}**" in summary


def test_poet_keeps_the_spectrum_and_adamw_does_not(study):
  _, _, page, _ = study
  rows = [l for l in section(page, 'Singular values').splitlines()
          if l.startswith(('| POET-BS |', '| AdamW |'))]
  change = {l.split('|')[1].strip(): float(l.split('|')[-2].split('±')[0])
            for l in rows}
  assert change['POET-BS'] < 1e-4 < change['AdamW'], change


def test_dense_runs_log_the_weight_diagnostics(study):
  root, _, _, results = study
  with open(os.path.join(root, results['best_adamw'], 'metrics.jsonl')) as f:
    entries = [json.loads(line) for line in f]
  evaluated = [e for e in entries if 'eval_loss' in e]
  assert evaluated and all('svd_entropy' in e and 'hyperspherical_energy'
                           in e and 'vector_probe_r' not in e
                           for e in evaluated)


def test_rerun_skips_finished_runs(study):
  root, out, _, _ = study
  before = _snapshot(root)
  again = run_experiments(root, out, f'--studies={STUDIES}')
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count('finished earlier, skipped') == 6, again.stdout
  assert 'training in' not in again.stdout
  assert _snapshot(root) == before


def test_bad_input_is_one_line_and_changes_nothing(tmp_path):
  root, out = str(tmp_path / 'runs'), str(tmp_path / 'out')
  result = run_experiments(root, out, '--studies=compare,bogus')
  assert result.returncode == 2
  assert result.stderr.strip().count('\n') == 0, result.stderr
  assert 'bogus' in result.stderr
  assert not os.listdir(tmp_path)


# ------------------------------------------------------------ the rule


@pytest.mark.parametrize('a, b, kind, verdict', [
    ([1.0, 1.2, 1.1], [2.0, 2.1, 1.9], 'lower', findings.REPRODUCED),
    ([2.0, 2.1, 1.9], [1.0, 1.2, 1.1], 'lower', findings.OPPOSITE),
    # Means 0.1 apart, spread 0.15: noise either way.
    ([1.0, 1.3, 1.15], [1.1, 1.25, 1.4], 'lower', findings.NOISE),
    ([1.0, 1.3, 1.15], [1.1, 1.25, 1.4], 'close', findings.REPRODUCED),
    ([1.0, 1.2, 1.1], [2.0, 2.1, 1.9], 'close', findings.OPPOSITE),
    ([float('inf')] * 3, [1.0, 1.1, 1.2], 'lower', findings.OPPOSITE),
    ([0.62, 0.7, 0.66], (0.6, 0.65), 'within', findings.REPRODUCED),
    ([0.9, 0.92, 0.91], (0.6, 0.65), 'within', findings.OPPOSITE),
])
def test_a_difference_is_a_finding_only_beyond_the_spread(a, b, kind,
                                                          verdict):
  claim = findings.Claim('', '', a, b, ('a', 'b'), kind)
  assert claim.verdict() == verdict


def test_mean_and_sample_standard_deviation():
  assert findings.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
  assert findings.fmt([8.0, 9.0]) == '8.500 ± 0.707'


# ------------------------------------- the page against today's code


def recorded():
  with open(RESULTS) as f:
    return json.load(f)


def test_the_page_was_written_from_the_recorded_runs():
  """The committed page names the commits its runs trained at and each
  claim's verdict as results.json records them."""
  summary = recorded()
  with open(PAGE) as f:
    page = f.read()
  assert summary['commits'] and all(f'`{c}`' in page
                                    for c in summary['commits'])
  for claim in summary['claims']:
    assert f"**{claim['verdict']}**" in page


def test_the_page_matches_todays_seed_to_init_mapping():
  """The initial weights and permutations today's code draws for the
  page's best settings at seeds 0 and 1 are the ones its runs started from
  (within float32 rounding). When this fails, the code's seed-to-init
  mapping changed since the page's commit: regenerate the page with the
  command it names."""
  summary = recorded()
  assert len(summary['init_fingerprints']) == 4
  for entry in summary['init_fingerprints']:
    c = scales.make_config(summary['base'], entry['overrides'],
                           summary['common'])
    computed = page_lib.init_fingerprint(page_lib.initial_state(c))
    assert page_lib.fingerprints_differ(entry['leaves'], computed) == [], (
        f"{entry['run']}: the initial state differs from the one the page's "
        f"runs (commit {summary['commits']}) started from; regenerate "
        'docs/reproduction.md')


def test_the_fingerprint_tells_rounding_from_another_mapping():
  summary = recorded()
  entry = next(e for e in summary['init_fingerprints']
               if e['overrides']['optimizer.name'] == 'poet')
  c = scales.make_config(summary['base'], entry['overrides'],
                         summary['common'])
  state = page_lib.initial_state(c)
  base = page_lib.init_fingerprint(state)
  # One float32 rounding of every element: the same mapping.
  up = lambda x: (np.nextafter(np.asarray(x), np.float32(np.inf))
                  if np.issubdtype(np.asarray(x).dtype, np.floating) else x)
  rounded = {part: jax.tree.map(up, state[part])
             for part in ('params', 'frozen')}
  assert page_lib.fingerprints_differ(
      base, page_lib.init_fingerprint(rounded)) == []
  # Another seed's weights and permutations: what another mapping gives.
  other = page_lib.initial_state(scales.make_config(
      summary['base'], {**entry['overrides'], 'seed': 7},
      summary['common']))
  differ = page_lib.fingerprints_differ(base, page_lib.init_fingerprint(
      other))
  assert any('w0' in name for name in differ), differ
  assert any('in_place' in name for name in differ), differ


def test_a_sweep_whose_best_rate_is_its_smallest_is_at_the_edge():
  def setting(lr, eval_loss, poet_lr=None):
    return [{'overrides': {'train.lr': lr, 'poet.lr': poet_lr},
             'eval_loss': eval_loss}]
  adamw = [setting(1e-3, 1.0), setting(3e-3, 1.5), setting(1e-2, 2.0)]
  assert report._at_edge(adamw, 'train.lr')
  adamw.insert(0, setting(3e-4, 1.2))
  assert not report._at_edge(adamw, 'train.lr')
  # POET's line is its poet.lr sweep at the first base rate; a second base
  # rate tried at the best poet.lr is not on it.
  poet = [setting(1e-2, 1.3, 3e-3), setting(1e-2, 1.0, 6e-3),
          setting(1e-2, 1.2, 1.2e-2), setting(3e-3, 0.9, 1.2e-2)]
  assert not report._at_edge(poet, 'poet.lr')
  assert report._at_edge(poet[:2], 'poet.lr')
