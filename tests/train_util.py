"""Running train.py in a subprocess on a tiny model, for the CLI tests."""
import atexit
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import jax

from poet_jax.train import config as config_lib
from poet_jax.train import state as train_state

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


# ------------------------------- the reliability tests' run and its checks

# 8 steps, checkpoints every 2, merges at 3 and 6: the run the kill, fault
# and bad-file tests interrupt, damage and compare (tests/conftest.py's
# `reference` is one uninterrupted run of it).
STEPS = 8
SHORT = (f'--config.train.steps={STEPS}', '--config.log_every=1',
         '--config.eval_every=4', '--config.checkpoint_every=2',
         '--config.poet.merge_every=3')
KEYS = ('train_loss', 'learning_rate', 'grad_norm', 'eval_loss', 'eval_ppl',
        'tokens_seen', 'nonfinite_steps', 'orth_error_max', 'q_norm_max',
        'sv_rel_change_max')


def complete_steps(workdir):
  """Steps with a committed checkpoint (orbax renames a step dir when done)."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def snapshot(directory):
  """{relative path: sha256} of every file below directory."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(
            f.read()).hexdigest()
  return out


def steps_of(entries):
  return [e['step'] for e in entries]


def assert_one_error_line(stderr, *expected):
  lines = stderr.strip().splitlines()
  assert len(lines) == 1, stderr[-3000:]
  assert lines[0].startswith('error: '), lines
  for text in expected:
    assert text in lines[0], (text, lines[0])
  return lines[0]


def tiny_config():
  """The model and batch of TINY as a config (merges every 100 steps)."""
  c = config_lib.base_config()
  c.model.dim, c.model.num_layers, c.model.num_heads = 32, 2, 2
  c.model.ffn_dim, c.poet.block_size = 64, 8.0
  c.train.batch_size, c.train.seq_len = 4, 32
  c.poet.merge_every = 100
  return c


def tiny_target():
  """The tiny run's state as restore targets on one device."""
  _, abstract = train_state.abstract_state(tiny_config(), 257)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      abstract)
