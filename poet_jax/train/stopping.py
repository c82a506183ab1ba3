"""Stopping on SIGTERM/SIGINT: before the first step at once, in the loop
after a checkpoint of the step in flight, on every process at the same step."""
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


# -------------------------------------------------------------------- loop


class Interrupted(BaseException):
  """SIGTERM or SIGINT before the first step: there was nothing to save.

  A BaseException, as KeyboardInterrupt is: raised from the signal handler
  wherever start-up happens to be, it must not be taken for an error by
  library code that catches Exception (JAX's compilation cache did, and
  start-up went on).
  """


class StopSignal:
  """SIGTERM/SIGINT handling.

  Before the loop (`in_loop` False) a signal raises Interrupted: start-up has
  nothing worth saving and stops at once. In the loop it sets `received`;
  the loop finishes the step in flight, writes a checkpoint and exits with
  EXIT_INTERRUPTED.
  """

  def __init__(self):
    self.received = None
    self.in_loop = False
    self._previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if not self.in_loop:
      raise Interrupted(name)
    self.received = name

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def agreed_stop(stop: StopSignal, sync_point: bool) -> str | None:
  """The signal to stop on after this step, the same on every process.

  One process stops as soon as a signal arrived. Several processes may get
  it at different steps; they compare flags at log steps (the same steps
  everywhere, one small all-gather), so that all save the same step and
  leave together.
  """
  if jax.process_count() == 1:
    return stop.received
  if not sync_point:
    return None
  flags = multihost_utils.process_allgather(
      np.int32(stop.received is not None))
  if not np.any(flags):
    return None
  return stop.received or 'a signal to another process'
