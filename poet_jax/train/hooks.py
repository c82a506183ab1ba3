"""Points of a run where a test can act (tests/faults.py injects faults).

The loop calls these at fixed points and never branches on them; the
defaults do nothing. A test process replaces `current` before it trains
(tests/run_with_faults.py).
"""


class Hooks:
  """The do-nothing hooks of a production run."""

  # Called with the step inside an asynchronous save, once everything is
  # written and before the rename that commits it (checkpoint.Checkpointer);
  # None: no hook, orbax's own commit.
  before_commit = None

  def started(self) -> None:
    """Start-up is done (state built or restored); no step taken yet."""

  def batch(self, step: int, batch, vocab_size: int):
    """The host batch (B, T+1) that step `step` will train on."""
    del step, vocab_size
    return batch

  def dispatched(self, step: int) -> None:
    """Step `step` was dispatched (it may still be running)."""

  def logged(self, step: int, stop) -> None:
    """Step `step` was logged and evaluated; stop: stopping.StopSignal."""

  def saved(self, step: int, ckpt) -> None:
    """After step `step`'s save (if one was due) was started."""


current = Hooks()
