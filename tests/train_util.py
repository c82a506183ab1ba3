"""Running train.py in a subprocess on a tiny model, for the CLI tests."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model small enough that a subprocess run takes seconds.
TINY = ('--config.model.dim=32', '--config.model.num_layers=2',
        '--config.model.num_heads=2', '--config.model.ffn_dim=64',
        '--config.poet.block_size=8', '--config.train.batch_size=4',
        '--config.train.seq_len=32', '--config.eval_tokens=256',
        '--no_progress')


def run_train(workdir, *overrides, env=None, timeout=600):
  """train.py with the tiny model; returns the CompletedProcess."""
  cmd = [sys.executable, os.path.join(ROOT, 'train.py'),
         f'--workdir={workdir}', *TINY, *overrides]
  full_env = dict(os.environ, **(env or {}))
  full_env.pop('XLA_FLAGS', None)  # one device unless a test asks for more
  return subprocess.run(cmd, capture_output=True, text=True, env=full_env,
                        timeout=timeout, cwd=ROOT)


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def numeric(entries, keys=('train_loss', 'learning_rate', 'grad_norm',
                           'eval_loss', 'tokens_seen', 'orth_error_max')):
  """The entries with only the deterministic fields (no timings)."""
  return [{k: e[k] for k in ('step',) + tuple(keys) if k in e}
          for e in entries]
