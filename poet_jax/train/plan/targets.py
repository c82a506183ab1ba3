"""The device a step is compiled for: this machine's, or a GPU without one.

A dry run can compile the run's steps for an H100, H200 or A100 on a machine
that has none: JAX's CUDA plugin (the `plan` extra: `pip install -e
'.[plan]'`, no NVIDIA libraries or driver needed) builds compile-only
devices from a target description, a GpuTargetConfigProto in text form,
and XLA runs its whole GPU pipeline for them. The descriptions here are
written from each device's published figures (GPU_SPECS). The platform
the code is traced for while compiling for a target is poet_jax.platform's
(`compiling_for`).
"""
import dataclasses
import importlib.util
import logging
import os

import jax

from poet_jax.train import config as config_lib

# Targets besides this machine's own devices (None): the CPU, and GPUs
# compiled for through the CUDA plugin.
GPU_TARGETS = ('h100', 'h200', 'a100')
TARGETS = ('cpu',) + GPU_TARGETS
PLAN_EXTRA = "pip install -e '.[plan]'"


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  """A GPU's published figures (the vendor's datasheet and CUDA guide).

  memory_bytes and memory_bandwidth are in the datasheet's units, 1e9
  bytes and bytes/s; bf16_flops is the dense (not 2:4 sparse) tensor-core
  peak in FLOP/s, the roofline's compute bound.
  """
  device_kind: str          # as the driver names the device
  compute_capability: tuple[int, int]
  sm_count: int
  clock_ghz: float          # boost clock
  memory_bytes: int
  memory_bandwidth: float   # bytes/s
  l2_bytes: int
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int
  fp32_cores_per_sm: int
  bf16_flops: float


GB = 10 ** 9
KIB, MIB = 1024, 1024 ** 2

GPU_SPECS = {
    # H100 SXM5 80GB: 132 SMs at 1.98 GHz, 80 GB HBM3 at 3.35 TB/s, 50 MB
    # L2, 228 KB shared memory per SM, 989 dense bf16 TFLOP/s.
    'h100': GpuSpec('NVIDIA H100 80GB HBM3', (9, 0), 132, 1.98, 80 * GB,
                    3.35e12, 50 * MIB, 228 * KIB, 227 * KIB, 128, 989.4e12),
    # H200 SXM 141GB: the H100's chip with 141 GB HBM3e at 4.8 TB/s.
    'h200': GpuSpec('NVIDIA H200', (9, 0), 132, 1.98, 141 * GB, 4.8e12,
                    50 * MIB, 228 * KIB, 227 * KIB, 128, 989.4e12),
    # A100 SXM4 80GB: 108 SMs at 1.41 GHz, 80 GB HBM2e at 2.039 TB/s, 40 MB
    # L2, 164 KB shared memory per SM, 312 dense bf16 TFLOP/s.
    'a100': GpuSpec('NVIDIA A100-SXM4-80GB', (8, 0), 108, 1.41, 80 * GB,
                    2.039e12, 40 * MIB, 164 * KIB, 163 * KIB, 64, 312e12),
}


class TargetError(config_lib.ConfigError):
  """A target that cannot be compiled for here; one line for the user."""


def target_config(name: str) -> str:
  """The GpuTargetConfigProto text of GPU target `name` (GPU_SPECS).

  Besides the published figures, the limits every CUDA device of compute
  capability 7.0 and newer shares (CUDA C++ Programming Guide, "Technical
  Specifications per Compute Capability").
  """
  s = GPU_SPECS[name]
  major, minor = s.compute_capability
  fields = {
      'threads_per_block_limit': 1024, 'threads_per_warp': 32,
      'shared_memory_per_block': 48 * KIB,
      'shared_memory_per_block_optin': s.shared_memory_per_block_optin,
      'shared_memory_per_core': s.shared_memory_per_sm,
      'threads_per_core_limit': 2048, 'core_count': s.sm_count,
      'fpus_per_core': s.fp32_cores_per_sm,
      'block_dim_limit_x': 2 ** 31 - 1, 'block_dim_limit_y': 65535,
      'block_dim_limit_z': 65535,
      'memory_bandwidth': int(s.memory_bandwidth),
      'l2_cache_size': s.l2_bytes, 'clock_rate_ghz': s.clock_ghz,
      'device_memory_size': s.memory_bytes,
      'registers_per_core_limit': 65536, 'registers_per_block_limit': 65536,
      'thread_dim_limit_x': 1024, 'thread_dim_limit_y': 1024,
      'thread_dim_limit_z': 64,
  }
  lines = [f'  {key}: {value}' for key, value in fields.items()]
  lines.append(f'  cuda_compute_capability {{ major: {major} minor: {minor} }}')
  return '\n'.join(['gpu_device_info {', *lines, '}',
                    'platform_name: "CUDA"',
                    f'device_description_str: "{s.device_kind}"', ''])


def plugin_installed() -> bool:
  """Whether JAX's CUDA plugin (the `plan` extra) is installed."""
  return any(importlib.util.find_spec(f'jax_plugins.xla_cuda{v}') is not None
             for v in (13, 12))


def compile_devices(target: str | None, count: int = 1) -> list:
  """`count` devices to compile for: this machine's (target None), its CPU
  devices ('cpu'), or compile-only devices of a GPU target on one host.

  Raises:
    TargetError: for an unknown target, or a GPU target without the CUDA
      plugin (the `plan` extra) loaded.
  """
  if target is None:
    return jax.devices()[:count]
  if target == 'cpu':
    return jax.devices('cpu')[:count]
  if target not in GPU_SPECS:
    raise TargetError(f'unknown target {target!r}; use one of {TARGETS}')
  if not plugin_installed():
    raise TargetError(
        f'--target={target} needs JAX\'s CUDA plugin at jaxlib\'s version, '
        f'which is not installed; {PLAN_EXTRA} installs it')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topology = topologies.get_topology_desc(
        platform='cuda', target_config=target_config(target),
        topology=f'1x1x{count}')
  except Exception as e:  # pylint: disable=broad-except
    raise TargetError(
        f'--target={target}: JAX\'s CUDA plugin is installed but did not '
        f'load ({" ".join(str(e).split())[:200]}); on a machine without a '
        'GPU run with JAX_PLATFORMS=cpu') from e
  return list(topology.devices)


def use_cpu_runtime(target: str | None) -> None:
  """For a GPU target, JAX's runtime on the CPU: called before JAX starts its
  backends, so that the CUDA plugin loads as a compiler only (its start-up
  check of the CUDA libraries would otherwise fail without a GPU). Other
  targets change nothing."""
  if target in GPU_SPECS:
    jax.config.update('jax_platforms', 'cpu')


def has_nvidia_device() -> bool:
  """Whether this machine has an NVIDIA device (its driver's control node),
  whatever JAX plugins are installed: the `plan` extra installs the CUDA
  plugin on machines without one, as a compiler only."""
  return os.path.exists('/dev/nvidiactl')


class _NoPluginFailureWithoutGPU(logging.Filter):
  def filter(self, record):
    return not str(record.msg).startswith('Jax plugin configuration error')


def quiet_plugin_without_gpu() -> None:
  """On a machine with no NVIDIA device, drops the traceback JAX logs when
  the CUDA plugin (the `plan` extra, installed as a compiler only) fails its
  start-up check: it is expected there, and JAX runs on the CPU anyway.
  Where an NVIDIA device exists the message stays, since it then means a
  broken CUDA install. Call before JAX starts its backends."""
  if not has_nvidia_device():
    logging.getLogger('jax._src.xla_bridge').addFilter(
        _NoPluginFailureWithoutGPU())


def device_spec(target: str | None) -> GpuSpec | None:
  """The GpuSpec of a GPU target; None for the CPU or this machine."""
  return GPU_SPECS.get(target)
