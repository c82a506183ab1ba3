"""Whole train steps on the device, each method in a fresh process: speed,
and the peak memory the device measured next to the compiled prediction.

A process's peak (`memory_stats()['peak_bytes_in_use']`) only grows, and it
counts everything the process ever held: a method's own peak needs a process
that ran only that method. Where the device reports no peak (the CPU), one
process runs every method, which costs one start-up instead of several.
"""
import json
import math
import os
import subprocess
import sys
import time
from typing import Callable

import jax
import numpy as np

from poet_jax.train.plan import planner
from poet_jax.train.plan import targets
from poet_jax.bench.common import GIB, log

STEP_METHODS = ('adamw', 'poet-fast', 'poet-mem', 'poet-auto')


def cross_compiled_peak(config, compiled) -> float | None:
  """The peak bytes of this step's update as the dry-run planner predicts
  it, compiling for this GPU's target description on compile-only devices
  (what a CPU machine with the `plan` extra computes), to stand next to the
  peak measured here. None off a GPU, for a GPU no target describes, or
  when that compile fails (logged: the comparison is optional, the check
  goes on).

  config: the step's config (ml_collections); compiled: the step as compiled
  on this device (unused: the planner compiles its own).
  """
  del compiled
  kind = jax.devices()[0].device_kind if jax.default_backend() == 'gpu' else ''
  target = next((name for name in targets.GPU_SPECS
                 if name.upper() in kind.upper()), None)
  if target is None:
    return None
  try:
    report = planner.plan(config, target=target)
  except Exception as e:  # pylint: disable=broad-except
    log(f'  cross-compile for {target} failed: {" ".join(str(e).split())[:200]}')
    return None
  return GIB * (report['argument_gib'] + report['output_gib'] -
                report['alias_gib'] + report['temp_gib'])


def _gib(x):
  return None if x is None else x / GIB


def step_child(spec: dict) -> list[dict]:
  """Train steps of spec['methods'] in this process, one after the other:
  compile, time, memory (a row each).

  spec: {'size', 'batch', 'methods', 'reps'}. The measured peak is this
  process's so far: one method's own only when it is the process's only one.
  """
  from poet_jax.bench import steps as steps_lib  # pylint: disable=g-import-not-at-top
  rows = []
  for name in spec['methods']:
    start = time.monotonic()
    built, failed = steps_lib.build_methods(
        'device', spec['size'], tuple(spec['batch']),
        steps_lib.method_pairs([name]))
    if failed:
      rows.append({'method': name, 'error': failed[0]['error']})
      continue
    method = built[name]
    compile_s = time.monotonic() - start
    seconds = method.timed(spec['reps'], True)
    measured = (jax.devices()[0].memory_stats() or {}).get(
        'peak_bytes_in_use')
    t = float(np.median(seconds))
    rows.append({
        'method': name, 'model': spec['size'],
        'layers': method.config.model.num_layers,
        'batch': list(spec['batch']), 'compile_s': compile_s,
        'ms_per_step': 1e3 * t, 'runs': len(seconds),
        'tokens_per_s': spec['batch'][0] * spec['batch'][1] / t,
        'predicted_peak_gib': method.peak_bytes / GIB,
        'cross_compiled_peak_gib': _gib(cross_compiled_peak(method.config,
                                                            method.step)),
        'measured_peak_gib': _gib(measured),
        'measured_over_predicted': (None if measured is None else
                                    measured / method.peak_bytes)})
  return rows


# step_child in another Python (not `-m`: this module is imported with the
# package first).
_CHILD = ('import json, sys; from poet_jax.bench import device_steps; '
          'print(json.dumps(device_steps.step_child(json.loads(sys.argv[1]))))')


def _in_child(spec: dict, timeout: float) -> list[dict]:
  """step_child(spec) in a fresh Python; its rows, or a row with 'error'
  for each method."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false')
  errors = lambda text: [{'method': m, 'error': text}
                         for m in spec['methods']]
  try:
    done = subprocess.run([sys.executable, '-c', _CHILD, json.dumps(spec)],
                          capture_output=True, text=True, env=env,
                          timeout=max(1.0, timeout))
  except subprocess.TimeoutExpired:
    return errors(f'cut after {timeout:.0f} s (the budget)')
  lines = done.stdout.strip().splitlines()
  if done.returncode or not lines:
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    return errors(f'exit code {done.returncode}: ' + ' | '.join(tail))
  return json.loads(lines[-1])


def whole_steps(size: str, batch: tuple, reps: int, methods,
                seconds_left: Callable[[], float],
                min_seconds: float) -> list[dict]:
  """`methods` (of STEP_METHODS) in fresh processes (module doc), in order.

  Each process may take an equal share of seconds_left() among those still
  to run, at least min_seconds, and is cut when it runs longer; once less
  than min_seconds is left, the rest are skipped.
  """
  isolate = jax.devices()[0].memory_stats() is not None
  groups = [[m] for m in methods] if isolate else [list(methods)]
  rows = []
  for i, group in enumerate(groups):
    left = seconds_left()
    if left < min_seconds:
      rows += [{'method': m, 'skipped': f'{left:.0f} s of the budget left'}
               for m in group]
      log(f"  {', '.join(group)}: skipped, {left:.0f} s of the budget left")
      continue
    spec = {'size': size, 'batch': list(batch), 'methods': group,
            'reps': reps}
    share = min(left, max(min_seconds, left / (len(groups) - i)))
    for row in _in_child(spec, share):
      if 'error' in row:
        row['passed'] = False
      rows.append(row)
      log(f"  {row['method']}: {row.get('ms_per_step', math.nan):.1f} "
          f"ms/step, peak measured {row.get('measured_peak_gib')} GiB, "
          f"predicted {row.get('predicted_peak_gib')} GiB"
          + (f"; {row['error']}" if 'error' in row else ''))
  adamw = [r for r in rows if r['method'] == 'adamw' and 'ms_per_step' in r]
  for r in rows:
    if adamw and 'ms_per_step' in r:
      r['ratio_to_adamw'] = r['ms_per_step'] / adamw[0]['ms_per_step']
  return rows
