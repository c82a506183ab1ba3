"""Checkpoints with orbax: asynchronous, atomic, the last few kept.

Orbax writes each step to a temporary directory and renames it when complete,
so a killed save never leaves a step that `latest_step` would return; the
temporary directories such a kill leaves are removed when the directory is
next opened. Errors come out as one line that says what to do:
CorruptCheckpointError when a checkpoint cannot be read, SaveError when one
cannot be written (a full disk). A restore also checks every array against the fingerprint saved with it, so
damage inside a data file that still parses is caught too. Neither touches
the other checkpoints:
orbax deletes old checkpoints (beyond `keep`) only after a newer one is
complete.
"""
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


class CheckpointError(Exception):
  """A checkpoint that cannot be used; its message is one line."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint (or the checkpoint directory) cannot be read."""


class SaveError(CheckpointError):
  """A checkpoint could not be written (disk full, permissions, I/O)."""


def _reason(e: BaseException) -> str:
  """The error in at most ~180 characters: its start (the kind of failure)
  and its end (tensorstore puts the cause, such as the OS error, last)."""
  text = ' '.join(str(e).split())
  text = f'{type(e).__name__}: {text}' if text else type(e).__name__
  return text if len(text) <= 180 else f'{text[:70]} ... {text[-100:]}'


def _hooked_temporary_path(before_commit: Callable[[int], None]):
  """orbax's atomic-rename temporary path, calling before_commit(step) once
  everything is written and just before the rename that commits it (test
  hook, see hooks.py and tests/faults.py)."""
  base = ocp.path.atomicity.AtomicRenameTemporaryPath

  class HookedTemporaryPath(base):

    async def finalize(self, *args, **kwargs):
      name = self.get_final().name
      if name.isdigit():  # the step directory, not an item inside it
        before_commit(int(name))
      return await super().finalize(*args, **kwargs)

  return HookedTemporaryPath


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """uint32: sum over elements of (bits x odd position weight), mod 2^32.

  Integer arithmetic, so the value is exact whatever the sharding or the
  order of the reduction; a position weight, so moved bytes count too.
  """
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = jax.lax.bitcast_convert_type(
      x, jnp.dtype(f'uint{x.dtype.itemsize * 8}')).astype(jnp.uint32)
  index = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(x.ndim)):
    index += jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(
        stride % 2**32)
    stride *= x.shape[axis]
  # Odd weights: multiplying by an odd number is a bijection mod 2^32, so a
  # change to any one element always changes the sum (an even weight would
  # lose the top bits: a flipped sign bit would not count).
  return jnp.sum(bits * (2 * (index % 65521) + 1), dtype=jnp.uint32)


# One jit (compiled once per state layout, not per save).
_fingerprints = jax.jit(lambda xs: [_leaf_fingerprint(x) for x in xs])


def fingerprint(state: Any) -> dict[str, int]:
  """{array path: uint32 fingerprint} of every array of a state.

  A damaged byte changes its array's fingerprint (unless the damage happens
  to sum to 0 mod 2^32). Computed where the arrays live, one jit; only the
  integers come to the host.
  """
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  values = jax.device_get(_fingerprints([x for _, x in leaves]))
  return {jax.tree_util.keystr(path): int(v)
          for (path, _), v in zip(leaves, values)}


def find_damage(state: Any, saved: dict[str, int] | None) -> str | None:
  """What differs between a restored state and the fingerprint saved with
  it ('damaged: <array> differs from the fingerprint saved with it'), or
  None; None too without a saved fingerprint (checkpoints written before
  fingerprints)."""
  if saved is None:
    return None
  now = fingerprint(state)
  damaged = [k for k in saved if now.get(k) != saved[k]]
  if not damaged and now.keys() == saved.keys():
    return None
  return (f'damaged: {(damaged or ["its list of arrays"])[0]} differs from '
          'the fingerprint saved with it')


class Checkpointer:
  """Saves and restores the train state and a small JSON record per step.

  Args:
    directory: where the step directories go (created if needed).
    keep: how many complete checkpoints to keep.
    asynchronous: write in the background (save returns at once).
    before_commit: test hook, called with the step in the writing thread
      after the data of a save is written and before it is committed.
    tidy: False opens the directory as it is, creating and removing nothing
      (the leftovers of killed saves stay): for the checks before a run.
  """

  def __init__(self, directory: str, keep: int = 3, asynchronous: bool = True,
               before_commit: Callable[[int], None] | None = None,
               tidy: bool = True):
    self.directory = os.path.abspath(directory)
    self._pending = None  # step of a save started and not yet waited for
    options = dict(max_to_keep=keep, create=tidy,
                   enable_async_checkpointing=asynchronous,
                   cleanup_tmp_directories=tidy)
    if before_commit is not None:
      options['temporary_path_class'] = _hooked_temporary_path(before_commit)
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=ocp.CheckpointManagerOptions(**options),
          item_names=('state', 'meta'))
    except (OSError, ValueError) as e:
      raise CorruptCheckpointError(
          f'checkpoint directory {self.directory} cannot be opened '
          f'({_reason(e)}); fix or move it, or use a new --workdir'
      ) from None
    # orbax removes the temporary directories of killed saves in a thread of
    # its own; wait for it, so that nothing of it outlives a run that stops
    # during start-up (orbax has no public call for this).
    getattr(self._manager, '_maybe_await_cleanup_tmp_directory',
            lambda: None)()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _unreadable(self, step: int, e: BaseException) -> CorruptCheckpointError:
    path = self.step_path(step)
    older = [s for s in self.all_steps() if s < step]
    then = (f'resume from step {older[-1]}' if older else 'start from scratch')
    return CorruptCheckpointError(
        f'checkpoint {path} cannot be read ({_reason(e)}); move it away '
        f'(mv {path} {path}.bad) to {then}, or use a new --workdir')

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Start saving `step` (returns before the write completes).

    Raises SaveError if the previous save failed or this one cannot start.
    """
    self.wait()
    meta = {**meta, 'fingerprint': fingerprint(state)}
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                         force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from None
    self._pending = step

  def _save_error(self, step: int | None, e: BaseException) -> SaveError:
    latest = self.latest_step()
    then = (f'resume from step {latest}' if latest is not None else
            'start again')
    what = self.step_path(step) if step is not None else 'in ' + self.directory
    return SaveError(
        f'could not write checkpoint {what} ({_reason(e)}); '
        f'the earlier checkpoints are intact: free space or fix the disk, '
        f'then run the same command to {then}')

  def read_meta(self, step: int) -> dict:
    """The JSON record of `step` alone (cheap: no arrays are read)."""
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise self._unreadable(step, e) from None
    meta = dict(restored.meta)
    meta.pop('fingerprint', None)  # checked by restore, with the arrays
    return meta

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """The state at `step`, laid out (shape, dtype, sharding) like the target.

    Raises CorruptCheckpointError (one line, with the fix) if any part of it
    cannot be read, or an array differs from the fingerprint saved with it.
    """
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise self._unreadable(step, e) from None
    meta = dict(restored.meta)
    damage = find_damage(restored.state, meta.pop('fingerprint', None))
    if damage:
      raise self._unreadable(step, ValueError(damage))
    return restored.state, meta

  def wait(self) -> None:
    """Block until every started save is on disk; SaveError if one failed."""
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from None

  def close(self) -> None:
    """Wait for the last save (SaveError if it failed) and release orbax."""
    try:
      self.wait()
    finally:
      self.abandon()

  def abandon(self) -> None:
    """Release orbax without reporting anything (the run is failing)."""
    try:
      self._manager.close()
    except Exception:  # pylint: disable=broad-except
      pass
