"""Device mesh and the sharding rules of the train state, in one place.

Axes: 'data' (pure data parallelism), 'fsdp' (data parallelism whose
parameters and optimizer state are split across devices too) and 'tensor'
(reserved). The batch is split over data x fsdp. A leaf of the state is split
on 'fsdp' along its largest axis that the fsdp size divides; POET generators
and anything small stay replicated. XLA inserts the communication.

The mesh uses Auto axis types on purpose: the model is written without
sharding annotations, and GSPMD propagation from the input and state
shardings is what we want; Explicit axes would require typing every op.
"""
import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp', 'tensor')
BATCH = ('data', 'fsdp')
MIN_SHARDED_SIZE = 2 ** 14  # leaves smaller than this are replicated


class MeshError(ValueError):
  """A mesh that does not fit the devices, batch or parameters."""


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  sizes = [int(mesh_cfg[a]) for a in AXES]
  if sizes.count(-1) > 1:
    raise MeshError('at most one of mesh.data, mesh.fsdp, mesh.tensor may '
                    'be -1')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise MeshError(f'mesh sizes {dict(zip(AXES, sizes))} do not divide '
                      f'the {num_devices} devices')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise MeshError(f'mesh {dict(zip(AXES, sizes))} needs '
                    f'{math.prod(sizes)} devices; there are {num_devices}')
  if sizes[2] != 1:
    raise MeshError('mesh.tensor > 1 is not supported yet; use mesh.data '
                    'and mesh.fsdp')
  return tuple(sizes)


def initialize_distributed(dist_cfg) -> None:
  """jax.distributed.initialize for multi-process runs; a no-op otherwise.

  Must run before anything touches a JAX backend.
  """
  explicit = dist_cfg.num_processes > 1
  from_env = dist_cfg.num_processes == 0
  if not (explicit or from_env):
    return
  # Only the CPU backend reads this; GPUs and TPUs have their own.
  jax.config.update('jax_cpu_collectives_implementation',
                    dist_cfg.cpu_collectives)
  if explicit:
    jax.distributed.initialize(dist_cfg.coordinator_address,
                               dist_cfg.num_processes, dist_cfg.process_id)
  else:
    jax.distributed.initialize()
  if jax.process_count() > 1 and jax.default_backend() == 'cpu':
    # XLA:CPU (jax 0.12): processes that load their step from the persistent
    # compilation cache hang in its first cross-process (gloo) collective.
    # Several CPU processes are a test or a trial, not a long run: compile.
    jax.config.update('jax_enable_compilation_cache', False)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """The configured mesh over `devices` (default: all of them).

  A fully explicit mesh (no -1) may use fewer devices than there are: it
  takes the first ones.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(mesh_cfg[a]) for a in AXES]
  if -1 not in sizes and 0 < math.prod(sizes) < len(devices):
    devices = devices[:math.prod(sizes)]
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH))


def check_batch(mesh, batch_size: int, grad_accum_steps: int = 1) -> None:
  """Each micro-batch (batch_size / grad_accum_steps sequences) splits evenly
  over the data x fsdp devices; MeshError otherwise."""
  n = mesh.shape['data'] * mesh.shape['fsdp']
  if batch_size % n:
    raise MeshError(f'train.batch_size={batch_size} is not divisible by '
                    f'mesh data x fsdp = {n}; choose a multiple of {n}')
  if grad_accum_steps > 1 and (batch_size // grad_accum_steps) % n:
    raise MeshError(
        f'the micro-batch train.batch_size / train.grad_accum_steps = '
        f'{batch_size} / {grad_accum_steps} is not divisible by mesh data x '
        f'fsdp = {n}; choose a batch size that is a multiple of '
        f'{n * grad_accum_steps}')


def leaf_spec(shape, fsdp: int, name: str = 'a parameter') -> P:
  """Split the largest axis that fsdp divides; replicate small leaves."""
  if fsdp == 1 or math.prod(shape) < MIN_SHARDED_SIZE:
    return P()
  candidates = [i for i in range(len(shape)) if shape[i] % fsdp == 0]
  if not candidates:
    raise MeshError(f'mesh.fsdp={fsdp} divides no axis of {name} with shape '
                    f'{tuple(shape)}; choose an fsdp size that divides the '
                    'model widths')
  axis = max(candidates, key=lambda i: shape[i])
  spec = [None] * len(shape)
  spec[axis] = 'fsdp'
  return P(*spec)


def state_shardings(mesh, abstract_state):
  """NamedSharding for every leaf of a (possibly abstract) state pytree."""
  fsdp = mesh.shape['fsdp']
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(
          mesh, leaf_spec(np.shape(x), fsdp, jax.tree_util.keystr(path))),
      abstract_state)
