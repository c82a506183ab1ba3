"""Test-only fault injection through poet_jax.train.hooks, set by environment
variables of a tests/run_with_faults.py process.

POET_JAX_FAULT is a comma-separated list of KIND@STEP:
  kill@N       SIGKILL right after step N is dispatched (the step in flight)
  kill_save@N  SIGKILL inside the asynchronous save of step N, after orbax
               wrote everything and before the rename that commits it
  enospc@N     the save of step N fails as on a full disk
  term@N       SIGTERM (int@N: SIGINT) to this process during step N;
               N=0: during start-up, before the first step
  pause@N      after step N, wait up to 120 s for a signal from outside
  nan@N        step N's batch holds an out-of-vocabulary token: its loss
               is NaN, as with corrupt data
POET_JAX_KILL_AT_STEP=N: SIGKILL after step N, once every save started
             so far (step N's included) is committed.
"""
import errno
import os
import signal
import sys
import time

import numpy as np

from poet_jax.train import hooks


class Faults(hooks.Hooks):
  """The faults that `environ` asks for, at their steps."""

  def __init__(self, environ):
    self._points = {}
    for item in filter(None, environ.get('POET_JAX_FAULT', '').split(',')):
      kind, _, step = item.strip().partition('@')
      self._points.setdefault(kind, set()).add(int(step))
    if environ.get('POET_JAX_KILL_AT_STEP'):
      self._points.setdefault('kill_after_save', set()).add(
          int(environ['POET_JAX_KILL_AT_STEP']))
    save_faults = ('kill_save', 'enospc')
    self.before_commit = (self._before_commit if any(
        k in self._points for k in save_faults) else None)

  def at(self, kind: str, step: int) -> bool:
    return step in self._points.get(kind, ())

  def _kill(self):
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

  def _signal_at(self, step: int) -> None:
    for kind, sig in (('term', signal.SIGTERM), ('int', signal.SIGINT)):
      if self.at(kind, step):
        os.kill(os.getpid(), sig)

  def started(self) -> None:
    self._signal_at(0)

  def batch(self, step: int, batch, vocab_size: int):
    if self.at('nan', step):
      batch = np.array(batch)
      batch[0, 0] = vocab_size  # out of the vocabulary: the embedding is NaN
    return batch

  def dispatched(self, step: int) -> None:
    if self.at('kill', step):
      self._kill()
    self._signal_at(step)

  def logged(self, step: int, stop) -> None:
    if self.at('pause', step):
      print(f'paused after step {step}', flush=True)
      deadline = time.monotonic() + 120
      while not stop.received and time.monotonic() < deadline:
        time.sleep(0.01)

  def saved(self, step: int, ckpt) -> None:
    if self.at('kill_after_save', step):
      # Every save started so far commits first: the kill lands between
      # checkpoints whatever the machine's speed (kill_save covers a kill
      # inside a save).
      ckpt.wait()
      self._kill()

  def _before_commit(self, step: int) -> None:
    if self.at('kill_save', step):
      self._kill()
    if self.at('enospc', step):
      raise OSError(errno.ENOSPC, 'No space left on device (simulated)')
