"""Running train.py in a subprocess on a tiny model, for the CLI tests."""
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model small enough that a subprocess run takes seconds.
TINY = ('--config.model.dim=32', '--config.model.num_layers=2',
        '--config.model.num_heads=2', '--config.model.ffn_dim=64',
        '--config.poet.block_size=8', '--config.train.batch_size=4',
        '--config.train.seq_len=32', '--config.eval_tokens=256',
        '--no_progress')


# The train.py runs of one test session share a persistent XLA compilation
# cache (a fresh directory per session, removed at exit): a run loads the
# executables an earlier run with the same shapes compiled instead of
# compiling them again. Same executables, same numbers.
XLA_CACHE = tempfile.mkdtemp(prefix='poet_jax_test_xla_cache_')
atexit.register(shutil.rmtree, XLA_CACHE, ignore_errors=True)
CACHE_ENV = {'JAX_COMPILATION_CACHE_DIR': XLA_CACHE,
             'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
             'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


# train.py with the test-only fault hooks (tests/faults.py) installed; they
# act only when a test sets POET_JAX_FAULT or POET_JAX_KILL_AT_STEP.
TRAIN = os.path.join(ROOT, 'tests', 'run_with_faults.py')


def train_command(workdir, *overrides):
  return [sys.executable, TRAIN, f'--workdir={workdir}', *TINY, *overrides]


# Less LLVM optimization: the tiny model's programs compile in about 60% of
# the time and run in milliseconds anyway. Every run of a test uses the same
# flags, so runs still compare bit for bit.
FAST_COMPILE = '--xla_backend_optimization_level=0'


def train_env(env=None):
  # One device unless a test asks for more.
  full_env = dict(os.environ, **CACHE_ENV, XLA_FLAGS=FAST_COMPILE)
  full_env.update(env or {})
  return full_env


def run_train(workdir, *overrides, env=None, timeout=600):
  """train.py with the tiny model; returns the CompletedProcess."""
  return subprocess.run(train_command(workdir, *overrides),
                        capture_output=True, text=True, env=train_env(env),
                        timeout=timeout, cwd=ROOT)


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def numeric(entries, keys=('train_loss', 'learning_rate', 'grad_norm',
                           'eval_loss', 'tokens_seen', 'orth_error_max')):
  """The entries with only the deterministic fields (no timings)."""
  return [{k: e[k] for k in ('step',) + tuple(keys) if k in e}
          for e in entries]
