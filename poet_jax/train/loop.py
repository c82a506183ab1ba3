"""The training loop: train(c, workdir) runs or resumes a run.

A run, top to bottom: start-up (startup.open_run: every check that can
refuse it, then its data, compiled steps and state), an optional evaluation
of the initial model, then per step: train, log, evaluate, act on
non-finite steps, save, stop on a signal; at the end, the loss curves.
docs/reliability.md has the whole contract.
"""
import os
import sys
import time

import jax
import numpy as np
import tqdm

from poet_jax import reparam
from poet_jax.data import pipeline as data_lib
from poet_jax.data import tokenizer as tokenizer_lib
from poet_jax.train import checkpoint as checkpoint_lib
from poet_jax.train import config as config_lib
from poet_jax.train import hooks
from poet_jax.train import metrics as metrics_lib
from poet_jax.train import plot
from poet_jax.train import sharding as sharding_lib
from poet_jax.train import startup
from poet_jax.train import steps as steps_lib
from poet_jax.train import stopping
from poet_jax.train import workdir as workdir_lib

EXIT_INTERRUPTED = 3   # SIGTERM/SIGINT: checkpoint written, run resumable
EXIT_NONFINITE = 4     # nan_policy='stop' met a non-finite loss or gradient
EXIT_IO_ERROR = 5      # a checkpoint, the metrics or the data could not be written

# Errors that mean bad input (config, paths, data, mesh), reported as one
# line with exit code 2 by train.py.
USER_ERRORS = (config_lib.ConfigError, sharding_lib.MeshError,
               data_lib.DataError, tokenizer_lib.TokenizerError,
               checkpoint_lib.CorruptCheckpointError,
               workdir_lib.WorkdirError, FileNotFoundError,
               NotADirectoryError, PermissionError)


def train(c, workdir: str, progress: bool = True,
          allow_data_change: bool = False) -> int:
  """Train (or resume) the configured run in workdir; returns an exit code.

  Raises USER_ERRORS for bad input (before any heavy work where it can be
  found then), stopping.Interrupted for SIGTERM/SIGINT before the first
  step, checkpoint_lib.SaveError or OSError when a checkpoint or the metrics
  cannot be written. allow_data_change: resume on data whose identity
  differs from the checkpoint's instead of refusing. The work directory is
  locked against other trainers while it runs. docs/reliability.md has the
  whole contract.
  """
  sharding_lib.initialize_distributed(c.distributed)
  stop = stopping.StopSignal()
  try:
    return _train(c, workdir, progress, stop, allow_data_change)
  finally:
    stop.restore()


def _train(c, workdir: str, progress: bool, stop: stopping.StopSignal,
           allow_data_change: bool) -> int:
  is_main = jax.process_index() == 0
  say = print if is_main else (lambda *a, **k: None)
  # Everything that can refuse the run (exit 2) is checked before anything
  # is written to the work directory and before any compile.
  run = startup.open_run(c, workdir, progress, say, allow_data_change)
  try:
    return _run(run, progress, stop)
  finally:
    run.unlock()


def _run(run: startup.Run, progress: bool, stop: stopping.StopSignal) -> int:
  c, workdir, say = run.config, run.workdir, run.say
  is_main = jax.process_index() == 0
  say(f'workdir: {os.path.abspath(workdir)}')
  for line in data_notes(c, run.train_data, len(run.eval_batches)):
    say(line)
  bar = tqdm.tqdm(total=c.train.steps, initial=run.start, unit='step',
                  dynamic_ncols=True, disable=not (progress and is_main))
  loop = _Loop(run, bar, stop, show_eval=progress and is_main)
  failed = True
  try:
    exit_code = loop.train()
    failed = False
  finally:
    bar.close()
    if run.log:
      run.log.close()
    if failed:
      run.ckpt.abandon()  # the error on its way out is the one to report
  run.ckpt.close()
  if is_main and exit_code == 0:
    plot.plot_run(workdir, os.path.join(workdir, 'loss.png'))
    say(f'done: metrics in {os.path.join(workdir, "metrics.jsonl")}, '
        f'curves in {os.path.join(workdir, "loss.png")}')
  return exit_code


class _Loop:
  """The steps of a run after start-up, and what happens around each."""

  def __init__(self, run: startup.Run, bar, stop: stopping.StopSignal,
               show_eval: bool):
    self.run, self.c, self.bar, self.stop = run, run.config, bar, stop
    self.show_eval = show_eval  # the evaluation's own progress bar
    is_main = jax.process_index() == 0
    self.write = bar.write if is_main else (lambda *a, **k: None)
    self.error = ((lambda m: print(f'error: {m}', file=sys.stderr,
                                   flush=True))
                  if is_main else (lambda m: None))
    self.tokens_per_step = self.c.train.batch_size * self.c.train.seq_len
    self.warned = set()  # kinds of numerical warning given (each once a run)
    self.reported = 0    # non-finite steps reported so far
    self.eval_stopped = None  # the signal that cut an evaluation short
    self.last_time, self.last_step = time.perf_counter(), run.start

  def train(self) -> int:
    """Steps from run.start to train.steps; returns the exit code."""
    run, c = self.run, self.c
    self.write('compiling the train and eval steps')
    compiled = steps_lib.compile_ahead(c, run.steps, run.state)
    mesh = run.steps.batch_sharding.mesh
    warning = startup.memory_warning(
        c, compiled, mesh.shape['data'] * mesh.shape['fsdp'])
    if warning:
      self.write(warning)
    self._initial_eval()
    # Non-finite steps are counted on device (state['nonfinite']); the count
    # is read only at log steps and, with nan_policy='stop', before a save.
    self.reported = int(run.state['nonfinite'])
    _restart_clock(self.bar, run.start)
    self._restart_step_clock(run.start)
    step = run.start
    self.stop.in_loop = True
    while step < c.train.steps:
      m = self._step(step)
      step += 1
      hooks.current.dispatched(step)
      self.bar.update(1)
      last = step == c.train.steps
      log_due = step % c.log_every == 0 or last
      if step == run.start + 1 and not log_due:
        # The first call of a compiled step sets up its runtime: leave it
        # out of the clocks as well.
        jax.block_until_ready(m)
        _restart_clock(self.bar, step)
        self._restart_step_clock(step)
      nonfinite = int(run.state['nonfinite']) if log_due else None
      entry = self._log_entry(step, m, nonfinite) if log_due else {}
      if step % c.eval_every == 0 or last:
        entry.update(self._evaluate(step))
      if entry and run.log:
        run.log.write({'step': step, **entry})
      if log_due:  # tokens/s counts train steps, not evaluations or logging
        self._restart_step_clock(step)
      hooks.current.logged(step, self.stop)
      stopping_on = (self.eval_stopped or
                     stopping.agreed_stop(self.stop, log_due))
      save_due = (step % c.checkpoint_every == 0 or last or
                  stopping_on is not None)
      if save_due and c.nan_policy == 'stop' and nonfinite is None:
        nonfinite = int(run.state['nonfinite'])
      if not self._nonfinite_allowed(nonfinite):
        return EXIT_NONFINITE
      if save_due:
        self._save(step)
      hooks.current.saved(step, run.ckpt)
      if stopping_on:
        run.ckpt.wait()
        self.write(f'{stopping_on}: checkpoint at step {step} written; run '
                   'the same command to resume')
        return EXIT_INTERRUPTED
    return 0

  def _restart_step_clock(self, step: int) -> None:
    """tokens/s and step_time_s count from here (not compilation)."""
    self.last_time, self.last_step = time.perf_counter(), step

  def _initial_eval(self) -> None:
    """The evaluation of the initial model at step 0, if eval_at_start."""
    run = self.run
    at_start, why = eval_at_start(self.c, len(run.eval_batches))
    if run.start == 0:
      self.write(f'step 0: {"evaluating" if at_start else "not evaluating"} '
                 f'the initial model ({why})')
    if run.start == 0 and at_start:
      first = self._eval_loss()
      ppl = metrics_lib.perplexity(first)
      run.say(f'step 0: eval loss {first:.4f}, perplexity '
              f'{metrics_lib.perplexity_text(ppl)}')
      if run.log:
        run.log.write({'step': 0, 'eval_loss': first, 'eval_ppl': ppl,
                       **self._weight_diagnostics()})

  def _step(self, step: int):
    """Dispatches step + 1 on its batch; returns its metrics (on device)."""
    run, c = self.run, self.c
    batch = run.train_data.train_batch(step, c.train.batch_size, c.seed,
                                       jax.process_index(),
                                       jax.process_count())
    batch = hooks.current.batch(step + 1, batch, run.vocab)
    run.state, m = run.steps.train(
        run.state, _global_batch(batch, run.steps.batch_sharding))
    return m

  def _log_entry(self, step: int, m, nonfinite: int) -> dict:
    """The metrics of a log step; gives the numerical warnings."""
    run, c = self.run, self.c
    m = jax.device_get(m)
    now = time.perf_counter()
    dt = (now - self.last_time) / max(step - self.last_step, 1)
    entry = dict(train_loss=float(m['train_loss']),
                 learning_rate=float(m['learning_rate']),
                 grad_norm=float(m['grad_norm']),
                 tokens_seen=step * self.tokens_per_step, step_time_s=dt,
                 tokens_per_s=self.tokens_per_step / dt,
                 nonfinite_steps=nonfinite)
    if c.optimizer.name == 'poet':
      entry['poet_learning_rate'] = float(m['poet_learning_rate'])
      diag = jax.device_get(run.steps.diagnostics(run.state))
      health = diag.pop('layers')
      entry.update({k: float(v) for k, v in diag.items()})
      for line in metrics_lib.numerical_warnings(step, run.layer_names,
                                                 health, self.warned):
        self.write(line)
    self.bar.set_postfix(loss=f'{entry["train_loss"]:.3f}',
                         tok_s=f'{entry["tokens_per_s"]:.0f}')
    return entry

  def _eval_loss(self) -> float | None:
    """The mean token loss over the held-out batches; None when a signal
    in the loop cut it short (every process stops at the same batch)."""
    run = self.run
    total, count = 0.0, 0.0
    for batch in tqdm.tqdm(run.eval_batches, desc='evaluating', unit='batch',
                           leave=False, dynamic_ncols=True,
                           disable=not self.show_eval):
      if self.stop.in_loop:
        self.eval_stopped = stopping.agreed_stop(self.stop, sync_point=True)
        if self.eval_stopped:
          return None
      s, n = run.steps.eval(run.state,
                            _global_batch(batch, run.steps.batch_sharding))
      total, count = total + float(s), count + float(n)
    return total / count

  def _evaluate(self, step: int) -> dict:
    loss = self._eval_loss()
    if loss is None:
      self.write(f'{self.eval_stopped}: the evaluation of step {step} was '
                 'stopped; it is not logged')
      return {}
    entry = {'eval_loss': loss, 'eval_ppl': metrics_lib.perplexity(loss)}
    entry.update(self._weight_diagnostics())
    self.write(f'step {step}: eval loss {loss:.4f}, perplexity '
               f'{metrics_lib.perplexity_text(entry["eval_ppl"])}')
    return entry

  def _weight_diagnostics(self) -> dict:
    """The papers' weight diagnostics (steps.weight_diagnostics), logged
    with every evaluation."""
    return {k: float(v) for k, v in jax.device_get(
        self.run.steps.weights(self.run.state)).items()}

  def _nonfinite_allowed(self, nonfinite: int | None) -> bool:
    """Reports the non-finite steps not reported yet (nonfinite: the count,
    None: not read at this step); False: nan_policy='stop' ends the run."""
    if nonfinite is None or nonfinite <= self.reported:
      return True
    state = self.run.state
    bad, count = int(state['nonfinite_step']), nonfinite - self.reported
    self.reported = nonfinite
    where = (f'at step {bad}' if count == 1 else
             f'at {count} steps up to step {bad}')
    if self.c.nan_policy == 'stop':
      # Nothing after the bad step is saved: wait for the saves of earlier
      # steps, then name the newest as the one to resume from.
      self.run.ckpt.wait()
      latest = self.run.ckpt.latest_step()
      good = (f'the last good checkpoint is step {latest}. See '
              'docs/reliability.md to resume' if latest is not None else
              'no checkpoint had been saved before it: rerun with '
              '--config.nan_policy=skip to drop such updates, or with a '
              'lower learning rate in a new --workdir')
      self.error(f'non-finite loss or gradient {where} (nan_policy=stop); '
                 f'its update was dropped and nothing after it was saved; '
                 f'{good}')
      return False
    self.write(f'warning: non-finite loss or gradient {where}; the update '
               f'was skipped (nan_policy=skip, {nonfinite} so far)')
    return True

  def _save(self, step: int) -> None:
    c = self.c
    self.run.ckpt.save(step, self.run.state, {
        'step': step, 'data_position': step,
        # On the optimizer's counter: dropped (non-finite) updates do not
        # count towards a merge.
        'merges': (int(reparam.merge_count(self.run.state['opt_state']))
                   if c.optimizer.name == 'poet' else 0),
        **self.run.inputs})


def eval_at_start(c, num_batches: int) -> tuple[bool, str]:
  """Whether to evaluate the initial model before step 1, and why.

  config eval_at_start: 'always', 'never', or 'auto', which evaluates when
  the run evaluates before its end (eval_every < train.steps) and one
  evaluation costs at most eval_every steps (a forward pass is about a third
  of a train step per token), so a shortened paper config with a 10 M-token
  evaluation does not start with hours of it.
  """
  if c.eval_at_start != 'auto':
    return c.eval_at_start == 'always', f'eval_at_start={c.eval_at_start}'
  cost = num_batches / 3  # in train steps of the same batch
  if c.eval_every >= c.train.steps:
    why = 'the run evaluates only at its end'
  elif cost > c.eval_every:
    why = f'it costs about {cost:.0f} steps, more than eval_every'
  else:
    return True, (f'{num_batches} batches; eval_at_start=auto, '
                  '--config.eval_at_start=never skips it')
  return False, f'{why}; --config.eval_at_start=always evaluates it'


def data_notes(c, train_data, num_eval_batches: int) -> list[str]:
  """What the run will do with its data, when it is worth saying: training
  data seen more than once, or fewer held-out tokens than eval_tokens."""
  notes = []
  ready, complete = train_data.examples_ready()
  if not complete:
    notes.append(f'data: the train split is still being tokenized; '
                 f'training starts on the {ready:,} sequences ready')
  epochs = c.train.steps * c.train.batch_size / max(ready, 1)
  if complete and epochs > 1:
    notes.append(
        f'data: {c.train.steps} steps x {c.train.batch_size} sequences read '
        f'the {train_data.num_examples:,} training sequences {epochs:.1f} '
        'times (more data, or fewer steps, for a single pass)')
  held_out = num_eval_batches * c.train.batch_size * c.train.seq_len
  if held_out < c.eval_tokens:
    notes.append(
        f'data: the held-out split has {held_out:,} tokens in whole batches, '
        f'fewer than eval_tokens={c.eval_tokens:,}; every evaluation uses '
        'those')
  return notes


def _restart_clock(bar, step: int) -> None:
  """The progress bar's rate and time left from now on (not compilation)."""
  bar.reset(total=bar.total)
  bar.n = bar.initial = bar.last_print_n = step
  bar.refresh()



def _global_batch(local: np.ndarray, sharding) -> jax.Array:
  """This process's rows of the global batch -> one global jax.Array."""
  return jax.make_array_from_process_local_data(sharding, local)

