"""XLA op time of a compiled program, from a jax.profiler trace, by kind."""
import collections
import glob
import gzip
import json
import os
from typing import Callable

import jax

# Spans that contain the ops rather than being ops themselves: the host's
# dispatch and the loops and branches around the ops they run.
_WRAPPERS = ('ThunkExecutor', '$', 'SlinkyThreadPool', 'PjitFunction',
             'ParseArguments', 'CommonPjRt', 'PjRt', 'TfrtCpu', 'while',
             'conditional', 'call')


def _kind(name: str) -> str:
  if name.startswith(('ynn_fusion', 'dot', 'onednn', 'custom-call')):
    return 'matrix products'
  if 'transpose' in name or 'copy' in name:
    return 'transposes and copies'
  return 'other (elementwise, reductions, gathers)'


def op_times(trace_dir: str, calls: int) -> dict:
  """{op name: ms per call} of the newest trace under trace_dir."""
  paths = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'),
                    recursive=True)
  if not paths:
    raise FileNotFoundError(f'no *.trace.json.gz under {trace_dir}')
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  times = collections.Counter()
  for e in events:
    name = e.get('name', '')
    if e.get('ph') == 'X' and 'dur' in e and not name.startswith(_WRAPPERS):
      times[name] += e['dur'] / 1e3 / calls  # microseconds -> ms
  return dict(times)


def profile(run: Callable[[int], object], trace_dir: str,
            calls: int = 2) -> dict:
  """Traces `calls` runs of run(i); ms per call by kind and the top ops.

  XLA:CPU runs independent ops concurrently on the cores, so the summed op
  time may exceed the wall time; the kinds' shares are what compare.
  """
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for i in range(calls):
      jax.block_until_ready(run(i))
  ops = op_times(trace_dir, calls)
  kinds = collections.Counter()
  for name, ms in ops.items():
    kinds[_kind(name)] += ms
  top = sorted(ops.items(), key=lambda kv: -kv[1])[:10]
  return {'ms_by_kind': dict(kinds), 'top_ops_ms': dict(top)}
