"""Dry run: compile the train step abstractly and report memory and FLOPs.

Nothing is allocated: the state and batch are ShapeDtypeStructs, the step is
lowered and compiled for the configured mesh, and XLA's memory and cost
analyses are read off the compiled executable. The devices compiled for are
this machine's, or a target's (targets.py: an H100, H200 or A100
compiled for without one), and every choice the code makes by platform
follows the target.
"""
import json
import math
import os

import jax
import numpy as np

from poet_jax import platform
from poet_jax.models import attention
from poet_jax.train import config as config_lib
from poet_jax.train import sharding as sharding_lib
from poet_jax.train import state as train_state
from poet_jax.train import steps as steps_lib
from poet_jax.train import workdir as workdir_lib
from poet_jax.train.plan import flops as flops_lib
from poet_jax.train.plan import hlo_cost
from poet_jax.train.plan import targets

GIB = 1024 ** 3
# About the most memory one accelerator holds today (MI300X, B200): a peak
# far above it needs other settings, not another device.
LARGEST_DEVICE_GIB = 192.0


def vocab_size(c) -> int:
  if c.model.vocab_size:
    return c.model.vocab_size
  from poet_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  return tokenizer_lib.load_tokenizer(c.data.tokenizer).vocab_size


def peak_bytes(mem) -> int:
  """Peak bytes per device of a compiled program, from its
  `memory_analysis()`: arguments + outputs + temporaries, the donated state
  (aliased by its output) counted once."""
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes -
          mem.alias_size_in_bytes + mem.temp_size_in_bytes)


def target_devices(c, target: str | None):
  """The devices a dry run for `target` compiles for: None (this machine's,
  as sharding.make_mesh picks them), every CPU device ('cpu'), or as many
  of a GPU target's as the mesh names (a -1 axis counts one)."""
  if target is None:
    return None
  if target == 'cpu':
    return targets.compile_devices('cpu', len(jax.devices('cpu')))
  sizes = [max(1, int(c.mesh[axis])) for axis in sharding_lib.AXES]
  return targets.compile_devices(target, math.prod(sizes))


def _per_device_bytes(tree, shardings) -> int:
  """Bytes one device holds of an abstract pytree with its shardings."""
  return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def peak_split(abstract, shardings, peak: int, grad_accum_steps: int) -> dict:
  """The peak per device (GiB) split into parameters, frozen (W0 and the
  placements), optimizer state, gradients and the rest (activations, the
  batch, other temporaries): the rest is the peak less the others.

  The gradients are one per trainable parameter in its dtype (float32 sums
  with micro-batches), the most the step holds at once; the peak can fall
  where fewer are live (the end of the forward pass without remat).
  """
  held = {key: _per_device_bytes(abstract[key], shardings[key])
          for key in ('params', 'frozen', 'opt_state')}
  grads = held['params']
  if grad_accum_steps > 1:
    grads = sum(math.prod(s.shard_shape(x.shape)) * 4 for x, s in zip(
        jax.tree.leaves(abstract['params']),
        jax.tree.leaves(shardings['params'])))
  split = {'parameters': held['params'], 'frozen': held['frozen'],
           'optimizer_state': held['opt_state'], 'gradients': grads}
  split['activations_and_other'] = peak - sum(split.values())
  return {key: value / GIB for key, value in split.items()}


def roofline_ms(target: str | None, flops: float, bytes_accessed: float):
  """Milliseconds of one step at the target's bf16 peak or memory
  bandwidth, whichever binds (None for a target without published
  figures: the CPU, this machine)."""
  spec = targets.device_spec(target)
  if spec is None:
    return None
  return 1e3 * max(flops / spec.bf16_flops,
                   bytes_accessed / spec.memory_bandwidth)


def _compile(c, devices, target: str | None):
  """(mesh, steps, abstract state, the traced update, [the compiled update,
  and for POET the compiled merge]) of config c for `devices` or `target`."""
  with platform.compiling_for(target):
    if devices is None:
      devices = target_devices(c, target)
    mesh = sharding_lib.make_mesh(c.mesh, devices)
    sharding_lib.check_batch(mesh, c.train.batch_size,
                             c.train.grad_accum_steps)
    setup, abstract = train_state.abstract_state(c, vocab_size(c))
    steps = steps_lib.compile_steps(setup, abstract, mesh)
    traced = steps_lib.trace_train(c, steps, abstract)
    compiled = [traced.lower().compile()]
    if steps.merge:
      compiled.append(steps_lib.trace_merge(steps, abstract).lower().compile())
  return mesh, steps, abstract, traced, compiled


def _attention_cores(c, target: str | None) -> tuple[str, str]:
  """The attention core compiled for `target` here, and the one a run on
  the target's own device compiles: they differ for cuDNN's, which needs the
  GPU present (attention.implementation)."""
  with platform.compiling_for(target):
    return tuple(attention.implementation(*train_state.attention_args(c),
                                          on_device=on_device)
                 for on_device in (None, True))


def plan(c, devices=None, target: str | None = None) -> dict:
  """Per-device memory (GiB), parameter counts, FLOPs and bytes of one train
  step, compiled for `devices` or, without them, for `target`
  (target_devices).

  A train step is two programs (steps.CompiledSteps): the update, whose
  arguments, outputs and temporaries are reported, and for POET the merge;
  peak_gib is the larger of their peaks (merge_peak_gib the merge's, at a
  merging step). flops_per_step counts the matrix products of the whole
  update, all devices (`flops.matmul_flops`); hlo_flops and hlo_bytes are
  XLA's cost analysis of one device's compiled update and merge at a step
  that does not merge (hlo_cost.step_cost: every op, each loop body times
  its trip count). attention is the attention core compiled, and
  attention_in_a_run the one a run on the target's device compiles: cuDNN's
  fused attention needs the GPU present, so a dry run for a GPU this machine
  lacks compiles XLA's form in its place.

  Raises:
    targets.TargetError: when `target` cannot be compiled for here.
  """
  mesh, steps, abstract, traced, compiled = _compile(c, devices, target)
  cores = _attention_cores(c, target)
  mem = compiled[0].memory_analysis()
  peaks = [peak_bytes(x.memory_analysis()) for x in compiled]
  costs = [hlo_cost.step_cost(x) for x in compiled]
  cost = hlo_cost.Cost(sum(x.flops for x in costs),
                       sum(x.bytes_accessed for x in costs))
  trainable, frozen = train_state.count_params(abstract)
  peak = max(peaks)
  return {
      'config_method': c.optimizer.name,
      'compute': c.poet.compute if c.optimizer.name == 'poet' else 'dense',
      'attention': cores[0],
      'attention_in_a_run': cores[1],
      'w0_dtype': c.model.w0_dtype if c.optimizer.name == 'poet' else None,
      'target': target or jax.default_backend(),
      'device_kind': mesh.devices.flat[0].device_kind,
      'num_devices': mesh.size,
      'mesh': dict(mesh.shape),
      'batch_size': c.train.batch_size,
      # The step scans over micro-batches: its temporaries are one's.
      'grad_accum_steps': c.train.grad_accum_steps,
      'micro_batch_size': c.train.batch_size // c.train.grad_accum_steps,
      'seq_len': c.train.seq_len,
      'argument_gib': mem.argument_size_in_bytes / GIB,
      'output_gib': mem.output_size_in_bytes / GIB,
      'alias_gib': mem.alias_size_in_bytes / GIB,
      'temp_gib': mem.temp_size_in_bytes / GIB,
      'peak_gib': peak / GIB,
      'merge_peak_gib': peaks[1] / GIB if steps.merge else None,
      'peak_split_gib': peak_split(abstract, steps.state_sharding, peak,
                                   c.train.grad_accum_steps),
      'trainable_params': trainable,
      'frozen_params': frozen,
      # Of the whole step, all devices: XLA's cost analysis would count
      # the layer scan's body once.
      'flops_per_step': flops_lib.matmul_flops(traced.jaxpr),
      'hlo_flops_per_device': cost.flops,
      'hlo_bytes_per_device': cost.bytes_accessed,
      'roofline_ms': roofline_ms(target, cost.flops, cost.bytes_accessed),
  }


def device_memory_gib(devices=None, target: str | None = None) -> float:
  """Memory of one device: a GPU target's published size; else its
  allocator's limit, or on CPU the host's RAM shared by its local devices."""
  spec = targets.device_spec(target)
  if spec is not None:
    return spec.memory_bytes / GIB
  devices = devices or (jax.local_devices() if target is None
                        else jax.devices('cpu'))
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


def memory_options(c) -> dict:
  """The settings that trade speed or precision for memory, as configured
  (optimizer.mu_dtype resolved)."""
  options = {key: _get(c, key) for key in MEMORY_OPTIONS}
  options['optimizer.mu_dtype'] = config_lib.mu_dtype(c)
  options['model.remat_policy'] = c.model.remat_policy
  return options


def _get(c, key: str):
  node = c
  for part in key.split('.'):
    node = node[part]
  return node


# Config keys that lower the peak, and the value that does.
MEMORY_OPTIONS = {'model.remat': True, 'poet.compute': 'mem',
                  'optimizer.mu_dtype': 'bfloat16',
                  'model.param_dtype': 'bfloat16'}


def suggestions(c, report, limit_gib: float, target: str | None = None
                ) -> dict:
  """{setting: per-device peak GiB} for settings that lower the peak, each
  figure from compiling the step with it (for `target`, as plan).

  Micro-batches (train.grad_accum_steps=k) are compiled as the step of one
  micro-batch (batch_size / k), plus the float32 gradient buffer that
  accumulation keeps.
  """
  now = memory_options(c)
  options = {f'{key}={value}': {key: value}
             for key, value in MEMORY_OPTIONS.items()
             if now[key] != value and (c.optimizer.name == 'poet' or
                                       not key.startswith('poet.'))}
  mesh = report['mesh']
  k = _micro_batches(c, report, limit_gib, mesh['data'] * mesh['fsdp'])
  if k:
    options[f'train.grad_accum_steps={k}'] = {
        'train.batch_size': c.train.batch_size // k}
  if len(options) > 1:
    options['all of the above'] = {
        key: value for changes in options.values()
        for key, value in changes.items()}
  buffer = report['trainable_params'] * 4 / GIB / (
      mesh['fsdp'] * mesh['tensor'])
  return {name: plan(_changed(c, changes), target=target)['peak_gib'] + (
      buffer if 'train.batch_size' in changes else 0.0)
          for name, changes in options.items()}


def _advise(c, report, limit_gib: float, target: str | None) -> list[str]:
  """Lines saying that the peak does not fit, and what would make it."""
  peak = report['peak_gib']
  far = (f'far above any single accelerator (the largest hold about '
         f'{LARGEST_DEVICE_GIB:.0f} GiB) and ' if peak > LARGEST_DEVICE_GIB
         else '')
  lines = [f'  peak {peak:.3g} GiB per device is {far}above this device\'s '
           f'{limit_gib:.3g} GiB; settings that lower it, each compiled:']
  report['suggestions_peak_gib'] = suggestions(c, report, limit_gib, target)
  for name, gib in report['suggestions_peak_gib'].items():
    flag = name if name.startswith('all') else f'--config.{name}'
    lines.append(f'    {flag:<44} peak {gib:.3g} GiB')
  lines.append('    (more devices: mesh.fsdp shards the parameters and '
               'optimizer state over them)')
  return lines


def _adamw(c, target: str | None) -> dict:
  """The peak and roofline of AdamW at the same settings (a dense model)."""
  report = plan(_changed(c, {'optimizer.name': 'adamw'}), target=target)
  return {key: report[key] for key in (
      'peak_gib', 'hlo_flops_per_device', 'hlo_bytes_per_device',
      'roofline_ms')}


def _summary(report) -> list[str]:
  """The report as the lines a dry run prints."""
  r, split = report, report['peak_split_gib']
  w0 = f", W0 {r['w0_dtype']}" if r['w0_dtype'] else ''
  attention = r['attention'] + (
      '' if r['attention_in_a_run'] == r['attention'] else
      f" (a run on the device uses {r['attention_in_a_run']}: cuDNN builds "
      'its kernels with the GPU present)')
  lines = [f"{r['config_method']} ({r['compute']}{w0}), {r['num_devices']} "
           f"x {r['device_kind']} (target {r['target']}), batch "
           f"{r['batch_size']} x {r['seq_len']}; attention {attention}"]
  if r['grad_accum_steps'] > 1:
    lines.append(f"  in {r['grad_accum_steps']} micro-batches of "
                 f"{r['micro_batch_size']}: the memory below is one "
                 "micro-batch's")
  lines += [
      f"  per device: arguments {r['argument_gib']:.2f} GiB, outputs "
      f"{r['output_gib']:.2f} GiB, temporaries {r['temp_gib']:.2f} GiB, "
      f"peak {r['peak_gib']:.2f} GiB ({r['peak_gib'] * GIB / 1e9:.2f} GB)"
      + (f"; the merge step's {r['merge_peak_gib']:.2f} GiB"
         if r['merge_peak_gib'] is not None else ''),
      '  peak split: ' + ', '.join(f"{k.replace('_', ' ')} {v:.2f}"
                                   for k, v in split.items()) + ' GiB',
      '  memory options: ' + ', '.join(
          f'{k}={v}' for k, v in r['memory_options'].items()),
      f"  parameters: {r['trainable_params']:,} trainable, "
      f"{r['frozen_params']:,} frozen; {r['flops_per_step']:.3e} FLOPs "
      'per step (matrix products)',
      f"  compiled step per device: {r['hlo_flops_per_device']:.3e} FLOPs, "
      f"{r['hlo_bytes_per_device'] / 1e9:.3g} GB accessed"]
  if r['roofline_ms'] is not None:
    line = f"  roofline {r['roofline_ms']:.1f} ms per step"
    if 'adamw' in r:
      a = r['adamw']
      line += (f"; AdamW at the same settings: peak {a['peak_gib']:.2f} GiB,"
               f" roofline {a['roofline_ms']:.1f} ms")
    lines.append(line)
  return lines


def dry_run(c, workdir: str, target: str | None = None) -> dict:
  """plan(c) for `target`, printed and written to workdir/memory.json, with
  AdamW at the same settings on a GPU target and the settings that would
  fit when the peak does not.

  Raises workdir.WorkdirError / config.ConfigError (targets.TargetError
  among them), before anything is written, when workdir cannot be written
  or holds a run of another config (the trainer's own checks: a dry run
  writes nothing into another run's directory), or the target cannot be
  compiled for here.
  """
  workdir_lib.check_writable(workdir)
  checkpoints = os.path.join(workdir, 'checkpoints')
  has_checkpoint = os.path.isdir(checkpoints) and any(
      name.isdigit() for name in os.listdir(checkpoints))
  workdir_lib.check_config_matches(workdir, c, has_checkpoint)
  report = plan(c, target=target)
  report['memory_options'] = memory_options(c)
  if targets.device_spec(target) and c.optimizer.name != 'adamw':
    report['adamw'] = _adamw(c, target)
  limit = device_memory_gib(target=target)
  advice = (_advise(c, report, limit, target) if report['peak_gib'] > limit
            else [])
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'memory.json')
  with open(path, 'w') as f:
    json.dump(report, f, indent=1)
  for line in _summary(report) + advice:
    print(line)
  print(f'  written to {path}')
  return report
