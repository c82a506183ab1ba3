"""Dry run: compile the train step abstractly and report memory and FLOPs.

Nothing is allocated: the state and batch are ShapeDtypeStructs, the step is
lowered and compiled for the configured mesh, and XLA's memory and cost
analyses are read off the compiled executable.
"""
import json
import os

import jax
import jax.numpy as jnp

from poet_jax import sharding as sharding_lib
from poet_jax import train_lib

GIB = 1024 ** 3


def vocab_size(c) -> int:
  if c.model.vocab_size:
    return c.model.vocab_size
  from poet_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  return tokenizer_lib.load_tokenizer(c.data.tokenizer).vocab_size


def plan(c, devices=None) -> dict:
  """Per-device memory (GiB), parameter counts and FLOPs of one train step."""
  mesh = sharding_lib.make_mesh(c.mesh, devices)
  sharding_lib.check_batch(mesh, c.train.batch_size, c.train.grad_accum_steps)
  setup, abstract = train_lib.abstract_state(c, vocab_size(c))
  steps = train_lib.compile_steps(setup, abstract, mesh)
  state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, steps.state_sharding)
  batch = jax.ShapeDtypeStruct((c.train.batch_size, c.train.seq_len + 1),
                               jnp.int32, sharding=steps.batch_sharding)
  compiled = steps.train.lower(state, batch).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  trainable, frozen = train_lib.count_params(abstract)
  argument = mem.argument_size_in_bytes
  output = mem.output_size_in_bytes
  temp = mem.temp_size_in_bytes
  alias = mem.alias_size_in_bytes
  # Donated state aliases its output: count those bytes once.
  peak = argument + output - alias + temp
  return {
      'config_method': c.optimizer.name,
      'compute': c.poet.compute if c.optimizer.name == 'poet' else 'dense',
      'w0_dtype': c.model.w0_dtype if c.optimizer.name == 'poet' else None,
      'num_devices': mesh.size,
      'mesh': dict(mesh.shape),
      'batch_size': c.train.batch_size,
      # The step scans over micro-batches: its temporaries are one's.
      'grad_accum_steps': c.train.grad_accum_steps,
      'micro_batch_size': c.train.batch_size // c.train.grad_accum_steps,
      'seq_len': c.train.seq_len,
      'argument_gib': argument / GIB,
      'output_gib': output / GIB,
      'alias_gib': alias / GIB,
      'temp_gib': temp / GIB,
      'peak_gib': peak / GIB,
      'trainable_params': trainable,
      'frozen_params': frozen,
      'flops_per_step': float(cost.get('flops', 0.0)) * mesh.size,
  }


def dry_run(c, workdir: str) -> dict:
  report = plan(c)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'memory.json')
  with open(path, 'w') as f:
    json.dump(report, f, indent=1)
  w0 = f", W0 {report['w0_dtype']}" if report['w0_dtype'] else ''
  print(f"{report['config_method']} ({report['compute']}{w0}), "
        f"{report['num_devices']} device(s), batch {report['batch_size']} x "
        f"{report['seq_len']}")
  if report['grad_accum_steps'] > 1:
    print(f"  in {report['grad_accum_steps']} micro-batches of "
          f"{report['micro_batch_size']}: the memory below is one "
          "micro-batch's")
  print(f"  per device: arguments {report['argument_gib']:.2f} GiB, outputs "
        f"{report['output_gib']:.2f} GiB, temporaries "
        f"{report['temp_gib']:.2f} GiB, peak {report['peak_gib']:.2f} GiB")
  print(f"  parameters: {report['trainable_params']:,} trainable, "
        f"{report['frozen_params']:,} frozen; "
        f"{report['flops_per_step']:.3e} FLOPs per step")
  print(f'  written to {path}')
  return report
