"""Dry-run peak memory per device (planner.plan) next to the POET-X paper."""
import math

import jax

from poet_jax.bench.common import GIB, Sizes, log
from poet_jax.bench.steps import step_config
from poet_jax.train.plan import planner

# POET-X paper (spec, section 9): peak memory in GB on an H100, batch 1.
# None: "does not fit" in 80 GB.
PAPER_MEMORY_GB = {
    ('3b', 512, 'adamw'): 28.74, ('3b', 1024, 'adamw'): 28.78,
    ('3b', 2048, 'adamw'): 31.43,
    ('3b', 512, 'materialize'): 33.45, ('3b', 1024, 'materialize'): 34.79,
    ('3b', 2048, 'materialize'): 38.02,
    ('3b', 512, 'mem'): 11.96, ('3b', 1024, 'mem'): 13.28,
    ('3b', 2048, 'mem'): 15.47,
    ('8b', 1024, 'adamw'): 76.34, ('8b', 1024, 'fast'): 33.14,
    ('8b', 1024, 'mem'): 27.87, ('8b', 1024, 'materialize'): None,
    ('13b', 512, 'adamw'): None, ('13b', 1024, 'adamw'): None,
    ('13b', 2048, 'adamw'): None,
    ('13b', 512, 'mem'): 35.65, ('13b', 1024, 'mem'): 41.62,
    ('13b', 2048, 'mem'): 47.21,
}


def bench_memory(sizes: Sizes, dtype: str, methods, target=None
                 ) -> list[dict]:
  """planner.plan of every (method, compute) pair at batch 1, compiled for
  one device of `target` (poet_jax.train.plan.targets; None: this machine's)."""
  rows = []
  for size in sizes.memory_sizes:
    for seq in sizes.memory_seqs:
      adamw = mem = None
      for method, compute in methods:
        c = step_config(size, method, compute, (1, seq))
        c.model.dtype = dtype
        if c.model.w0_dtype != 'int8':
          c.model.w0_dtype = dtype
        name = {'poet': compute, 'poetxq': f'xq {compute}'}.get(method,
                                                                method)
        log(f'memory: {size} seq {seq} {name}')
        try:
          report = planner.plan(
              c, None if target else jax.devices()[:1], target)
        except Exception as e:  # pylint: disable=broad-except
          log(f'  failed: {type(e).__name__}: {e}')
          rows.append({'section': 'memory', 'model': size, 'seq_len': seq,
                       'batch': 1, 'dtype': dtype, 'method': name,
                       'error': f'{type(e).__name__}: {e}'})
          continue
        peak = report['peak_gib']
        adamw = peak if method == 'adamw' else adamw or math.nan
        mem = peak if name == 'mem' else mem  # POET-X mem, if measured
        paper = PAPER_MEMORY_GB.get((size, seq, name), 'n/a')
        rows.append({'section': 'memory', 'model': size, 'seq_len': seq,
                     'batch': 1, 'dtype': dtype, 'method': name,
                     'target': report['target'],
                     'device_kind': report['device_kind'],
                     'w0_dtype': report['w0_dtype'],
                     'peak_gib': peak, 'peak_gb': peak * GIB / 1e9,
                     'ratio_to_adamw': peak / adamw,
                     'minus_mem_gib': None if mem is None else peak - mem,
                     'temp_gib': report['temp_gib'],
                     'argument_gib': report['argument_gib'],
                     'roofline_ms': report['roofline_ms'],
                     'paper_gb': 'does not fit' if paper is None else paper})
  return rows
