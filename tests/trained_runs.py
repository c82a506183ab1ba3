"""Tiny trained work directories shared by the after-training tests.

One train.py run per method per test session (tests/train_util.py's tiny
model): 4 steps with a POET merge after step 3, so the last checkpoint has
both merged weights and non-zero generators.
"""
from train_util import run_train

STEPS = 4
ARGS = (f'--config.train.steps={STEPS}', '--config.log_every=2',
        '--config.eval_every=2', '--config.checkpoint_every=2',
        '--config.poet.merge_every=3')

_RUNS = {}


def trained_run(tmp_path_factory, method: str = 'poet') -> tuple[str, str]:
  """(workdir, train.py's stdout) of a finished tiny run of `method`."""
  if method not in _RUNS:
    workdir = str(tmp_path_factory.mktemp(f'run_{method}'))
    result = run_train(workdir, *ARGS, f'--config.optimizer.name={method}')
    assert result.returncode == 0, result.stderr[-3000:]
    _RUNS[method] = (workdir, result.stdout)
  return _RUNS[method]
