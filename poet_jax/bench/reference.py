"""Our train steps against the official PyTorch code's, on the same machine.

The official code (Sphere-AI-Lab/poet on GitHub) runs in a separate Python
with torch and transformers, as a subprocess per method
(`reference_driver.py`: our driver, importing their modules, running their
trainer's update eagerly). Our compiled steps and their eager ones take
turns in one run: two rounds, the second in reverse order, every process
idle while another is timed. Same model sizes (ours per method, the FFN
width included), vocabulary, batch, float32, threads.

Set up once (docs/benchmarks.md):

  python3 -m venv /tmp/refvenv
  /tmp/refvenv/bin/pip install torch transformers
  # a checkout of the official code at /tmp/poet_ref

  python -m poet_jax.bench --only=reference \\
      --reference_python=/tmp/refvenv/bin/python --reference_src=/tmp/poet_ref
"""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np

from poet_jax.bench.common import Sizes, log, summary
from poet_jax.bench.steps import build_methods, method_pairs, time_rounds
from poet_jax.train import config as config_lib

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'reference_driver.py')
# Ours -> the official method it is compared with.
PAIRS = {'adamw': 'adamw', 'poet-fast': 'poet', 'poet-auto': 'poet'}


@dataclasses.dataclass(frozen=True)
class Args:
  """Where the official code and its Python are; threads of both sides."""
  python: str = ''
  src: str = ''
  threads: int = 2
  methods: tuple = tuple(PAIRS)

  @classmethod
  def from_flags(cls, flags) -> 'Args':
    return cls(flags.reference_python, flags.reference_src,
               flags.reference_threads)


def add_flags(parser) -> None:
  """The reference section's flags, on the bench's argparse parser."""
  parser.add_argument('--reference_python', default='', metavar='PYTHON',
                      help='a Python with torch and transformers, for the '
                      'reference section')
  parser.add_argument('--reference_src', default='', metavar='DIR',
                      help='a checkout of the official POET code '
                      '(Sphere-AI-Lab/poet), for the reference section')
  parser.add_argument('--reference_threads', type=int, default=2,
                      help='torch threads of the reference (ours: all '
                      'cores; 2 on the project machine)')


def skip_reason(args: Args) -> str:
  """Why the reference cannot run here ('' when it can), in one line."""
  how = ('pass --reference_python (a Python with torch and transformers) '
         'and --reference_src (a checkout of Sphere-AI-Lab/poet); see '
         'docs/benchmarks.md')
  if not args.python or not args.src:
    return f'the official code is not set up: {how}'
  if not os.access(args.python, os.X_OK):
    return f'--reference_python={args.python} is not an executable: {how}'
  for part in ('poet_torch/__init__.py',
               'examples/peft_pretraining/modeling_llama.py'):
    if not os.path.isfile(os.path.join(args.src, part)):
      return f'--reference_src={args.src} has no {part}: {how}'
  check = subprocess.run([args.python, '-c', 'import torch, transformers'],
                         capture_output=True, text=True, check=False)
  if check.returncode:
    last = (check.stderr.strip().splitlines() or ['failed'])[-1]
    return f'{args.python} cannot import torch and transformers ({last})'
  return ''


def parse_reply(line: str) -> dict:
  """One line of the driver's protocol; raises RuntimeError on its errors."""
  try:
    reply = json.loads(line)
  except json.JSONDecodeError as e:
    raise RuntimeError(f'reference driver said {line.strip()[:200]!r} '
                       '(not a JSON line)') from e
  if not isinstance(reply, dict):
    raise RuntimeError(f'reference driver said {line.strip()[:200]!r}')
  if 'error' in reply:
    raise RuntimeError(f'reference driver failed: {reply["error"]}')
  return reply


class Official:
  """One official method in its own process; `timed` is a steps.Runner."""

  def __init__(self, args: Args, method: str, c):
    sizes = {'dim': c.model.dim, 'layers': c.model.num_layers,
             'heads': c.model.num_heads, 'ffn': config_lib.ffn_dim(c),
             'vocab': c.model.vocab_size, 'batch': c.train.batch_size,
             'seq': c.train.seq_len,
             'block_size': int(config_lib.block_size(c)),
             'merge_every': c.poet.merge_every}
    command = [args.python, DRIVER, f'--src={args.src}', f'--method={method}',
               f'--threads={args.threads}', f'--grad_clip={c.train.grad_clip}']
    command += [f'--{k}={v}' for k, v in sizes.items()]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    self.process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=sys.stderr, text=True, env=env)
    self.ready = self._reply()

  def _reply(self) -> dict:
    # Their code prints banners to stdout too: skip to the protocol's line.
    for line in self.process.stdout:
      if line.startswith('{'):
        return parse_reply(line)
    raise RuntimeError('reference driver exited with code '
                       f'{self.process.wait()} before answering')

  def timed(self, count: int, warmup: bool) -> list:
    self.process.stdin.write(f'run {count} {int(warmup)}\n')
    self.process.stdin.flush()
    return self._reply()['seconds']

  def close(self) -> None:
    if self.process.poll() is None:
      self.process.stdin.write('quit\n')
      self.process.stdin.close()
      self.process.wait(timeout=60)


def _rows(size, batch, pairs, times) -> list[dict]:
  rows = []
  for ours, official in pairs:
    t_ours, t_ref = times[ours], times[f'official {official}']
    rows.append({
        'section': 'reference', 'model': size, 'batch': list(batch),
        'method': ours, 'official_method': official,
        'ours_ms': 1e3 * float(np.median(t_ours)),
        'official_ms': 1e3 * float(np.median(t_ref)),
        'ratio_to_official': float(np.median(t_ours) / np.median(t_ref)),
        'ours': summary(t_ours), 'official': summary(t_ref)})
  return rows


def bench_reference(sizes: Sizes, args: Args, reps: int) -> list[dict]:
  """Our steps and the official code's, interleaved; a skip row if absent."""
  reason = skip_reason(args)
  if reason:
    log(f'reference skipped: {reason}')
    return [{'section': 'reference', 'skipped': reason}]
  size, batch = sizes.step_size, sizes.ref_batch
  built, failed = build_methods('reference', size, batch,
                                method_pairs(args.methods))
  officials, runners = {}, {}
  try:
    for name, method in built.items():  # each next to its official pair
      runners[name] = method.timed
      official = f'official {PAIRS[name]}'
      if official not in officials:
        log(f'reference: starting the {official}')
        officials[official] = Official(args, PAIRS[name], method.config)
        runners[official] = officials[official].timed
    times = time_rounds(runners, reps)
  finally:
    for o in officials.values():
      o.close()
  pairs = [(name, PAIRS[name]) for name in built]
  return _rows(size, batch, pairs, times) + failed
