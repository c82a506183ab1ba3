import os

import pytest

# Tests run on CPU; multi-device tests ask for 8 simulated devices. Set before
# JAX initializes its backends.
# Less LLVM optimization, as the train.py subprocesses of the tests use
# (tests/train_util.py): tiny programs compile in about 60% of the time and
# run in milliseconds anyway; the numbers are the same.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


@pytest.fixture(scope='session')
def short_run(tmp_path_factory):
  """(workdir, CompletedProcess) of one uninterrupted train.py run of
  train_util.SHORT; built once per test process, for every file that
  compares with it."""
  # Here, not at the top: xdist's controlling process, which runs no test,
  # need not import JAX.
  from train_util import SHORT, run_train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('reference'))
  result = run_train(workdir, *SHORT)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


@pytest.fixture(scope='session')
def reference(short_run):
  """The work directory of short_run, which said nothing on stderr."""
  workdir, result = short_run
  # orbax notes a slow earlier save on a loaded machine; nothing else.
  assert [l for l in result.stderr.splitlines()
          if 'Waiting for previous save to complete' not in l] == []
  return workdir


# The slowest test files, with their seconds on a 2-core machine shared
# with other jobs (load about 4; only the order matters). With pytest-xdist
# (`-n 2 --dist loadfile`, README) they start first, slowest first, so the
# two workers finish together; xdist would otherwise order files by their
# number of tests and leave slow files of one or two tests to the end.
SECONDS = {'test_resume.py': 293, 'test_planner.py': 244,
           'test_targets.py': 227, 'test_bench.py': 193,
           'test_nonfinite.py': 193, 'test_distributed.py': 154,
           'test_cli.py': 153, 'test_experiments.py': 150,
           'test_train.py': 86, 'test_layers.py': 78, 'test_fidelity.py': 75,
           'test_export.py': 74, 'test_quant.py': 58, 'test_merge.py': 54,
           'test_poetize.py': 52, 'test_kernels.py': 52,
           'test_weight_diagnostics.py': 46, 'test_corpus_files.py': 43}


def pytest_configure(config):
  if hasattr(config.option, 'loadscopereorder'):
    config.option.loadscopereorder = False  # keep the order set below


def pytest_collection_modifyitems(items):
  # Stable: the tests of a file keep their order.
  items.sort(key=lambda item: -SECONDS.get(item.path.name, 0))
