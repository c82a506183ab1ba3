"""A run's start-up: every check that can refuse it (exit 2) before anything
is written or compiled, then its data, checkpoints, compiled steps and its
state, fresh or restored (docs/reliability.md)."""
import dataclasses
import os
from typing import Any, Callable

import jax
from flax import nnx

from poet_jax import layers
from poet_jax.models import attention
from poet_jax.data import pipeline as data_lib
from poet_jax.data import tokenizer as tokenizer_lib
from poet_jax.train import checkpoint as checkpoint_lib
from poet_jax.train import config as config_lib
from poet_jax.train import hooks
from poet_jax.train import metrics as metrics_lib
from poet_jax.train import sharding as sharding_lib
from poet_jax.train import state as train_state
from poet_jax.train import steps as steps_lib
from poet_jax.train import workdir as workdir_lib
from poet_jax.train.plan import planner


@dataclasses.dataclass
class Run:
  """What the loop works with, once start-up is done."""
  config: Any
  workdir: str
  ckpt: checkpoint_lib.Checkpointer
  setup: train_state.Setup
  steps: steps_lib.CompiledSteps
  state: dict
  start: int                 # the step the loop starts after
  vocab: int
  train_data: Any            # data_lib token stream
  eval_batches: list         # this process's rows of each held-out batch
  inputs: dict               # tokenizer and data identities, for checkpoints
  layer_names: list          # POET layers, for the numerical warnings
  log: metrics_lib.MetricsLog | None  # None except on the main process
  say: Callable
  lock: int | None = None    # the descriptor holding workdir_lib.lock

  def unlock(self) -> None:
    """Lets another trainer have the work directory."""
    if self.lock is not None:
      os.close(self.lock)
      self.lock = None


def _load_tokenizer(spec: str):
  """tokenizer_lib.load_tokenizer, refusing an empty model file, which
  sentencepiece would load as a model without pieces."""
  path = os.path.expanduser(spec)
  if spec != 'byte' and os.path.isfile(path) and not os.path.getsize(path):
    raise tokenizer_lib.TokenizerError(
        f'tokenizer file {path} is empty; set data.tokenizer to a '
        "SentencePiece .model file or to 'byte'")
  return tokenizer_lib.load_tokenizer(spec)


def _check_input(ckpt, step, trained_on: dict, key: str, now: str,
                 allow_change: bool = False, say: Callable = print) -> None:
  """The tokenizer or data a checkpoint was trained on is the one at hand.

  A tokenizer file that was replaced (or damaged yet still loads) or another
  corpus would silently change the run: refuse, naming both. Checkpoints
  that did not record it pass. allow_change (the data only: --allow_data_change)
  goes on with the new data, saying so.
  """
  then = trained_on.get(key)
  if then is None or then == now:
    return
  differs = (f'the {key} differs from the one checkpoint '
             f'{ckpt.step_path(step)} was trained with ({then!r}, now '
             f'{now!r})')
  if allow_change:
    say(f'{differs}; continuing on the new data (--allow_data_change)')
    return
  override = (' (--allow_data_change continues on the new data when the '
              'change is harmless: a fixed typo, files added)'
              if key == 'data' else '')
  raise config_lib.ConfigError(
      f'{differs}; restore the original, or use a new --workdir{override}')


def _open_checkpoints(c, workdir: str,
                      tidy: bool = True) -> checkpoint_lib.Checkpointer:
  return checkpoint_lib.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=c.keep_checkpoints,
      before_commit=hooks.current.before_commit, tidy=tidy)


def _tokenizer_and_vocab(c):
  """The tokenizer and the model's vocabulary size, or ConfigError."""
  tokenizer = _load_tokenizer(c.data.tokenizer)
  vocab = c.model.vocab_size or tokenizer.vocab_size
  if vocab < tokenizer.vocab_size:
    raise config_lib.ConfigError(
        f'model.vocab_size={vocab} is smaller than the tokenizer vocabulary '
        f'({tokenizer.vocab_size}); set it to 0 or at least that')
  return tokenizer, vocab


def data_identity(train_data) -> str:
  """What a checkpoint records of its training data: the stream's cache key
  (dataset contents, split, tokenizer, token cap), known before the stream
  is tokenized, so neither a save nor a resume waits for tokenizing."""
  return f'{train_data.name}, {train_data.source}'


def _open_data(c, tokenizer, ckpt, latest, trained_on: dict, progress: bool,
               allow_change: bool, say: Callable):
  """(train stream, eval stream, inputs): the data, checked to be what the
  checkpoint was trained on and to hold one batch of each split."""
  data_dir = c.data.data_dir or config_lib.default_data_dir()
  train_data, eval_data = data_lib.open_train_and_eval(
      c.data.name, data_dir, tokenizer, c.train.seq_len,
      c.data.max_tokens or None, progress=progress,
      decode_errors=c.data.decode_errors)
  inputs = {'tokenizer': tokenizer.identity,
            'data': data_identity(train_data)}
  if latest is not None:
    _check_input(ckpt, latest, trained_on, 'data', inputs['data'],
                 allow_change, say)
  for split, stream in zip(data_lib.SPLITS, (train_data, eval_data)):
    data_lib.check_one_batch(stream, c.train.batch_size, c.data.name,
                             split, c.data.max_tokens)
  return train_data, eval_data, inputs


def _describe_model(c, setup, abstract, mesh, say) -> list:
  """Says the model's size (and POET's compute choices); returns the POET
  layer names."""
  trainable, frozen = train_state.count_params(abstract)
  layer_names = metrics_lib.poet_layer_names(
      nnx.merge(setup.graphdef, abstract['params'], abstract['frozen']))
  say(f'model: {trainable:,} trainable and {frozen - 0:,} frozen '
      f'parameters ({c.optimizer.name}); mesh {dict(mesh.shape)}; '
      f'attention {attention.describe(*train_state.attention_args(c))}')
  if c.optimizer.name == 'poet' and c.poet.compute == 'auto':
    model = nnx.merge(setup.graphdef, abstract['params'], abstract['frozen'])
    say(layers.describe_choices(
        model, c.train.batch_size // c.train.grad_accum_steps
        * c.train.seq_len))
  return layer_names


def _initial_state(c, vocab, setup, abstract, steps, ckpt, latest, say):
  """A fresh state (or one from init_from) without a checkpoint; else the
  latest checkpoint's, restored to the steps' shardings."""
  if latest is None:
    state = jax.jit(lambda: train_state.init_state(c, vocab)[1],
                    out_shardings=steps.state_sharding)()
    if c.init_from:  # a pretrained Hugging Face Llama (init_from.py)
      from poet_jax.train import init_from  # pylint: disable=g-import-not-at-top
      state = init_from.init_state_from(c.init_from, setup, state,
                                        steps.state_sharding)
      say(f'initialized from {c.init_from}')
  else:
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, steps.state_sharding)
    state, _ = ckpt.restore(latest, target)
    say(f'resumed from {ckpt.directory} at step {latest}')
  return state


def memory_warning(c, compiled, data_parallel: int = 1) -> str | None:
  """One line when the compiled train step will not fit one device's memory
  (planner.device_memory_gib), with the figures and what to try; None when
  it fits or the backend reports no memory analysis.

  The peak is the dry run's (planner.plan): arguments + outputs - aliases
  (the donated state is both) + temporaries, in bytes per device, read off
  `compiled` (a jax.stages.Compiled: the trainer's own executable, so
  nothing is compiled again). A warning, not a refusal: a CPU host swaps,
  and an accelerator fails with its own out-of-memory error. Micro-batches
  are suggested only when twice as many still split train.batch_size over
  the `data_parallel` (mesh data x fsdp) devices.
  """
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    mem = None  # not every backend implements it
  if mem is None:
    return None
  peak = planner.peak_bytes(mem) / planner.GIB
  limit = planner.device_memory_gib()
  if peak <= limit:
    return None
  tries = []
  k = 2 * c.train.grad_accum_steps
  if c.train.batch_size % (k * data_parallel) == 0:
    tries.append(f'--config.train.grad_accum_steps={k} (smaller '
                 'micro-batches)')
  if not c.model.remat:
    tries.append('--config.model.remat=True')
  return (f'warning: the compiled train step needs {peak:.3g} GiB per device '
          f'(temporaries {mem.temp_size_in_bytes / planner.GIB:.3g} GiB), '
          f"more than this device's {limit:.3g} GiB: it may run out of memory "
          '(or swap, on CPU); --dry_run names settings that fit, each with '
          'its compiled peak' + (f'; try {" or ".join(tries)}' if tries
                                 else ''))


def _check_write_paths(c, workdir: str) -> None:
  """The run writes its work directory and data.data_dir: neither may hit
  another run's files (workdir.run_owning)."""
  other = workdir_lib.run_owning(workdir, itself=False)
  if other:
    raise workdir_lib.WorkdirError(
        f'--workdir={workdir} is inside the files of the run {other}; give '
        'a path outside them')
  data_dir = os.path.expanduser(c.data.data_dir or
                                config_lib.default_data_dir())
  workdir_lib.check_outside_runs(data_dir, 'data.data_dir', runs=[workdir])


@dataclasses.dataclass
class _Held:
  """What start-up has opened so far, let go of if it fails."""
  lock: int | None = None    # the descriptor holding workdir_lib.lock
  ckpt: checkpoint_lib.Checkpointer | None = None

  def release(self) -> None:
    if self.ckpt:
      self.ckpt.abandon()
    if self.lock is not None:
      os.close(self.lock)


def open_run(c, workdir: str, progress: bool, say: Callable,
             allow_data_change: bool = False) -> Run:
  """Checks, then builds, everything the loop needs.

  Raises loop.USER_ERRORS for bad input, before anything is written to the
  work directory and before any compile; stopping.Interrupted for a signal
  during start-up. allow_data_change: resume on data other than the
  checkpoint's (its identity changed) instead of refusing.
  """
  is_main = jax.process_index() == 0
  workdir_lib.check_writable(workdir)
  _check_write_paths(c, workdir)
  # One live trainer per work directory (the main process holds the lock);
  # a new directory is locked once it is made.
  held = _Held(lock=workdir_lib.lock(workdir)
               if is_main and os.path.isdir(workdir) else None)
  try:
    return _start(c, workdir, progress and is_main, say, allow_data_change,
                  is_main, held)
  except BaseException:
    held.release()
    raise


def _look_at_checkpoints(c, workdir: str, held: _Held) -> tuple:
  """(the latest step or None, what it was trained on): the checkpoints
  opened only to look, and the config checked against the directory's."""
  # Only an existing directory is opened now, and only to look: the
  # temporary directories of killed saves are removed once nothing refused
  # the run.
  if os.path.isdir(os.path.join(workdir, 'checkpoints')):
    held.ckpt = _open_checkpoints(c, workdir, tidy=False)
  latest = held.ckpt.latest_step() if held.ckpt else None
  trained_on = held.ckpt.read_meta(latest) if latest is not None else {}
  # What a checkpoint records of its data and tokenizer is checked on
  # their contents (_check_input), not on the paths they were named by:
  # a moved corpus directory or tokenizer file may resume.
  moved = (('data.name',) if 'data' in trained_on else ()) + (
      ('data.tokenizer',) if 'tokenizer' in trained_on else ())
  workdir_lib.check_config_matches(
      workdir, c, has_checkpoint=latest is not None, also_resumable=moved)
  return latest, trained_on


def _begin_writing(c, workdir: str, is_main: bool, start: int,
                   held: _Held) -> metrics_lib.MetricsLog | None:
  """Nothing refused the run: the directory, its lock and config, the
  checkpoints opened to write; returns the metrics log (main process)."""
  os.makedirs(workdir, exist_ok=True)
  if is_main and held.lock is None:
    held.lock = workdir_lib.lock(workdir)
  if is_main:
    workdir_lib.write_config(workdir, c)
  if held.ckpt:
    held.ckpt.abandon()
    held.ckpt = None
  held.ckpt = _open_checkpoints(c, workdir)
  hooks.current.started()
  if not is_main:
    return None
  return metrics_lib.MetricsLog(
      os.path.join(workdir, 'metrics.jsonl'), resume_step=start,
      tensorboard_dir=(os.path.join(workdir, 'tensorboard')
                       if c.tensorboard else None))


def _start(c, workdir: str, progress: bool, say: Callable,
           allow_data_change: bool, is_main: bool, held: _Held) -> Run:
  """open_run's checks and builds; what it opens is in `held`."""
  mesh = sharding_lib.make_mesh(c.mesh)
  sharding_lib.check_batch(mesh, c.train.batch_size,
                           c.train.grad_accum_steps)
  tokenizer, vocab = _tokenizer_and_vocab(c)
  latest, trained_on = _look_at_checkpoints(c, workdir, held)
  # What the checkpoint was trained on must be what is at hand: checked
  # for the tokenizer before the data is tokenized with it.
  _check_input(held.ckpt, latest, trained_on, 'tokenizer', tokenizer.identity)
  train_data, eval_data, inputs = _open_data(
      c, tokenizer, held.ckpt, latest, trained_on, progress,
      allow_data_change, say)
  setup, abstract = train_state.abstract_state(c, vocab)
  steps = steps_lib.compile_steps(setup, abstract, mesh)
  layer_names = _describe_model(c, setup, abstract, mesh, say)
  # Restored while the checkpoints are open only to look: a damaged one
  # (its fingerprint) is refused before anything is written.
  state = _initial_state(c, vocab, setup, abstract, steps, held.ckpt, latest,
                         say)
  start = int(state['step'])
  log = _begin_writing(c, workdir, is_main, start, held)
  num_eval = max(1, c.eval_tokens // c.train.seq_len)
  eval_batches = eval_data.eval_batches(c.train.batch_size, num_eval,
                                       jax.process_index(),
                                       jax.process_count())
  return Run(c, workdir, held.ckpt, setup, steps, state, start, vocab,
             train_data, eval_batches, inputs, layer_names, log, say,
             held.lock)
