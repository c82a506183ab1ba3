"""The reproduction study (python -m poet_jax.experiments) at its smoke scale:
five runs of 4 steps, in subprocesses as a user runs it."""
import json
import os
import subprocess
import sys

import pytest

from train_util import ROOT, train_env

STUDIES = 'compare,seeds,merge,spectrum,orthogonality'


def run_experiments(root, out, *extra):
  command = [sys.executable, '-m', 'poet_jax.experiments', '--scale=smoke',
             f'--root={root}', f'--out={out}', *extra]
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
  return root, out, result


def test_writes_tables_and_plots(study):
  root, out, _ = study
  for name in ('compare.png', 'merge_every.png', 'spectrum.png',
               'orthogonality.png'):
    with open(os.path.join(out, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', name
  with open(os.path.join(out, 'tables.md')) as f:
    tables = f.read()
  for heading in ('POET-BS vs AdamW', 'Seed noise', 'Merge interval T_m',
                  'Singular values', 'Orthogonality error'):
    assert f'## {heading}' in tables
  with open(os.path.join(out, 'results.json')) as f:
    results = json.load(f)
  runs = results['runs']
  # AdamW and POET (T_m = 2) at seeds 0 and 1, POET at T_m = 1.
  assert sorted(runs) == sorted(d for d in os.listdir(root)
                                if d != 'xla_cache')
  assert len(runs) == 5
  for run in runs.values():
    assert run['eval_ppl'] < run['first_eval_ppl'], run
    assert os.path.exists(os.path.join(root, run['name'], 'result.json'))
  # The table reports the run's own figure.
  best = runs[results['best_poet']]
  assert f"{best['eval_ppl']:.3f}" in tables


def test_poet_keeps_the_spectrum_and_adamw_does_not(study):
  _, out, _ = study
  with open(os.path.join(out, 'tables.md')) as f:
    section = f.read().split('## Singular values')[1].split('\n## ')[0]
  rows = [l for l in section.splitlines()
          if l.startswith(('| POET-BS |', '| AdamW |'))]
  change = {l.split('|')[1].strip(): float(l.split('|')[-2]) for l in rows}
  assert change['POET-BS'] < 1e-4 < change['AdamW'], change


def test_rerun_skips_finished_runs(study):
  root, out, _ = study
  before = _snapshot(root)
  again = run_experiments(root, out, f'--studies={STUDIES}')
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count('finished earlier, skipped') == 5, again.stdout
  assert 'training in' not in again.stdout
  assert _snapshot(root) == before


def test_bad_input_is_one_line_and_changes_nothing(tmp_path):
  root, out = str(tmp_path / 'runs'), str(tmp_path / 'out')
  result = run_experiments(root, out, '--studies=compare,bogus')
  assert result.returncode == 2
  assert result.stderr.strip().count('\n') == 0, result.stderr
  assert 'bogus' in result.stderr
  assert not os.listdir(tmp_path)
