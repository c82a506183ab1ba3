"""Dry run: compile the train step abstractly and report memory and FLOPs.

Nothing is allocated: the state and batch are ShapeDtypeStructs, the step is
lowered and compiled for the configured mesh, and XLA's memory and cost
analyses are read off the compiled executable.
"""
import json
import os

import jax

from poet_jax import flops as flops_lib
from poet_jax import sharding as sharding_lib
from poet_jax import steps as steps_lib
from poet_jax import train_state
from poet_jax import workdir as workdir_lib

GIB = 1024 ** 3
# About the most memory one accelerator holds today (MI300X, B200): a peak
# far above it needs other settings, not another device.
LARGEST_DEVICE_GIB = 192.0


def vocab_size(c) -> int:
  if c.model.vocab_size:
    return c.model.vocab_size
  from poet_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  return tokenizer_lib.load_tokenizer(c.data.tokenizer).vocab_size


def peak_bytes(mem) -> int:
  """Peak bytes per device of a compiled program, from its
  `memory_analysis()`: arguments + outputs + temporaries, the donated state
  (aliased by its output) counted once."""
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes -
          mem.alias_size_in_bytes + mem.temp_size_in_bytes)


def plan(c, devices=None) -> dict:
  """Per-device memory (GiB), parameter counts and FLOPs of one train step.

  FLOPs are the matrix products of the whole step (`flops.matmul_flops`).
  """
  mesh = sharding_lib.make_mesh(c.mesh, devices)
  sharding_lib.check_batch(mesh, c.train.batch_size, c.train.grad_accum_steps)
  setup, abstract = train_state.abstract_state(c, vocab_size(c))
  steps = steps_lib.compile_steps(setup, abstract, mesh)
  traced = steps_lib.trace_train(c, steps, abstract)
  mem = traced.lower().compile().memory_analysis()
  trainable, frozen = train_state.count_params(abstract)
  argument = mem.argument_size_in_bytes
  output = mem.output_size_in_bytes
  temp = mem.temp_size_in_bytes
  alias = mem.alias_size_in_bytes
  peak = peak_bytes(mem)
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
      # Of the whole step, all devices: XLA's cost analysis would count
      # the layer scan's body once.
      'flops_per_step': flops_lib.matmul_flops(traced.jaxpr),
  }


def device_memory_gib(devices=None) -> float:
  """Memory of one device: its allocator's limit, or on CPU the host's RAM
  shared by its local devices."""
  devices = devices or jax.local_devices()
  try:
    stats = devices[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  if 'bytes_limit' in stats:
    return stats['bytes_limit'] / GIB
  host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return host / GIB / len(devices)


def _changed(c, changes: dict):
  c = c.copy_and_resolve_references()
  for key, value in changes.items():
    *path, last = key.split('.')
    node = c
    for part in path:
      node = node[part]
    node[last] = value
  return c


def _micro_batches(c, report, limit_gib: float, data_parallel: int) -> int:
  """The fewest micro-batches (a power of two) whose activations, scaled
  down linearly from this batch's, fit in limit_gib; 0 if the batch cannot
  be split (a micro-batch needs a multiple of the data-parallel size)."""
  batch = c.train.batch_size
  if batch % (2 * data_parallel):
    return 0
  room = limit_gib * 0.9 - (report['peak_gib'] - report['temp_gib'])
  k = 2
  while (report['temp_gib'] / k > room and batch % (2 * k * data_parallel)
         == 0):
    k *= 2
  return k


def suggestions(c, report, limit_gib: float, devices=None) -> dict:
  """{setting: per-device peak GiB} for settings that lower the peak, each
  figure from compiling the step with it.

  Micro-batches (train.grad_accum_steps=k) are compiled as the step of one
  micro-batch (batch_size / k), plus the float32 gradient buffer that
  accumulation keeps.
  """
  mesh = sharding_lib.make_mesh(c.mesh, devices)
  options = {}
  if not c.model.remat:
    options['model.remat=True'] = {'model.remat': True}
  if c.optimizer.name == 'poet' and c.poet.compute != 'mem':
    options['poet.compute=mem'] = {'poet.compute': 'mem'}
  k = _micro_batches(c, report, limit_gib,
                     mesh.shape['data'] * mesh.shape['fsdp'])
  if k:
    options[f'train.grad_accum_steps={k}'] = {
        'train.batch_size': c.train.batch_size // k}
  if len(options) > 1:
    options['all of the above'] = {
        key: value for changes in options.values()
        for key, value in changes.items()}
  buffer = report['trainable_params'] * 4 / GIB / (
      mesh.shape['fsdp'] * mesh.shape['tensor'])
  return {name: plan(_changed(c, changes), devices)['peak_gib'] + (
      buffer if 'train.batch_size' in changes else 0.0)
          for name, changes in options.items()}


def _advise(c, report, limit_gib: float) -> list[str]:
  """Lines saying that the peak does not fit, and what would make it."""
  peak = report['peak_gib']
  far = (f'far above any single accelerator (the largest hold about '
         f'{LARGEST_DEVICE_GIB:.0f} GiB) and ' if peak > LARGEST_DEVICE_GIB
         else '')
  lines = [f'  peak {peak:.3g} GiB per device is {far}above this device\'s '
           f'{limit_gib:.3g} GiB; settings that lower it, each compiled:']
  report['suggestions_peak_gib'] = suggestions(c, report, limit_gib)
  for name, gib in report['suggestions_peak_gib'].items():
    flag = name if name.startswith('all') else f'--config.{name}'
    lines.append(f'    {flag:<44} peak {gib:.3g} GiB')
  lines.append('    (more devices: mesh.fsdp shards the parameters and '
               'optimizer state over them)')
  return lines


def dry_run(c, workdir: str) -> dict:
  """plan(c), printed and written to workdir/memory.json, with the settings
  that would fit when the peak does not.

  Raises workdir.WorkdirError / config.ConfigError, before anything is
  compiled or written, when workdir cannot be written or holds a run of
  another config (the trainer's own checks: a dry run writes nothing into
  another run's directory).
  """
  workdir_lib.check_writable(workdir)
  checkpoints = os.path.join(workdir, 'checkpoints')
  has_checkpoint = os.path.isdir(checkpoints) and any(
      name.isdigit() for name in os.listdir(checkpoints))
  workdir_lib.check_config_matches(workdir, c, has_checkpoint)
  report = plan(c)
  limit = device_memory_gib()
  advice = _advise(c, report, limit) if report['peak_gib'] > limit else []
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
  for line in advice:
    print(line)
  print(f'  written to {path}')
  return report
