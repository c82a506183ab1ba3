"""What every benchmark section shares: sizes, interleaved timing, the machine.

Every ratio the benchmarks report is taken against a baseline measured in
the same process, with the compared variants interleaved (round-robin, the
order rotated each round) so that load from other processes falls on all of
them alike.
"""
import dataclasses
import datetime
import os
import platform
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What each section runs; `full` the benchmarks', `tiny` the smoke test's."""
  matmul: int
  layer_shapes: tuple
  layer_block: int
  layer_tokens: int
  step_size: str            # a config.MODEL_SIZES key, or 'tiny'
  step_batch: tuple         # (sequences, sequence length)
  ref_batch: tuple
  wide_size: str
  wide_layers: int
  wide_batch: tuple
  memory_sizes: tuple
  memory_seqs: tuple


FULL = Sizes(
    matmul=4096, layer_shapes=((512, 1280), (2048, 2048), (2048, 5376)),
    layer_block=256, layer_tokens=2048, step_size='60m', step_batch=(32, 256),
    ref_batch=(8, 256), wide_size='1b', wide_layers=2, wide_batch=(4, 256),
    memory_sizes=('1b', '3b', '8b', '13b'), memory_seqs=(512, 1024, 2048))

# The step, ref and wide sections share one model and batch here, so the
# smoke test compiles each method's step once (steps._built).
TINY = Sizes(
    matmul=256, layer_shapes=((64, 160), (128, 128)), layer_block=32,
    layer_tokens=64, step_size='tiny', step_batch=(4, 16), ref_batch=(4, 16),
    wide_size='tiny', wide_layers=0, wide_batch=(4, 16),
    memory_sizes=('tiny',), memory_seqs=(16,))


def log(*args):
  """Progress on stderr (the tables go to stdout), with the time of day."""
  print(f'[{time.strftime("%H:%M:%S")}]', *args, file=sys.stderr, flush=True)


def summary(seconds) -> dict:
  """Median and quartiles of a list of seconds, as the reports store them."""
  return {'median_s': float(np.median(seconds)),
          'p25_s': float(np.percentile(seconds, 25)),
          'p75_s': float(np.percentile(seconds, 75)), 'runs': len(seconds)}


def interleaved(calls: dict[str, Callable[[int], Any]], reps: int,
                warmup: int = 2) -> dict[str, dict]:
  """Median (and quartiles) of seconds per call, the calls interleaved.

  calls[name](i) runs one repetition on input number i and returns what to
  block on. Each round runs every call once, in an order rotated by one
  each round.
  """
  names = list(calls)
  for name in names:
    for i in range(warmup):
      jax.block_until_ready(calls[name](i))
  times = {name: [] for name in names}
  for r in range(reps):
    for j in range(len(names)):
      name = names[(r + j) % len(names)]
      start = time.perf_counter()
      jax.block_until_ready(calls[name](r))
      times[name].append(time.perf_counter() - start)
  return {name: summary(t) for name, t in times.items()}


def cpu_name() -> str:
  """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
  try:
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f
               if line.startswith('model name')]
  except OSError:
    names = []
  return names[0] if names else (platform.processor() or platform.machine())


def machine() -> dict:
  """The machine, the software and the load the report was measured with."""
  cpu = cpu_name()
  import jaxlib  # pylint: disable=g-import-not-at-top
  return {
      'cpu': cpu, 'cores': os.cpu_count(),
      'backend': jax.default_backend(),
      'devices': [str(d) for d in jax.devices()],
      'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
      'python': platform.python_version(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'load_average': list(os.getloadavg()),
      'date': datetime.datetime.now().astimezone().isoformat(
          timespec='seconds'),
      'command': 'python -m poet_jax.bench ' + ' '.join(sys.argv[1:]),
  }
