"""The training loop: state, step, evaluation, checkpoints, metrics.

The train state is a dict of pure pytrees:
  params     trainable variables (nnx.Param, POET generators included)
  frozen     everything else of the model (W0, permutations)
  opt_state  the optax state
  step       optimizer steps taken (also the data position)
  nonfinite  steps whose update was dropped for a non-finite loss/gradient
  nonfinite_step  the last such step (0: none)
The step is one jax.jit with explicit shardings and a donated state; the
merge is a lax.cond inside it, keyed on the step.
"""
import dataclasses
import errno
import math
import os
import signal
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx
from jax.experimental import multihost_utils

from poet_jax import checkpoint as checkpoint_lib
from poet_jax import config as config_lib
from poet_jax import data as data_lib
from poet_jax import layers
from poet_jax import merge as merge_lib
from poet_jax import metrics as metrics_lib
from poet_jax import model as model_lib
from poet_jax import optim
from poet_jax import sharding as sharding_lib
from poet_jax import tokenizer as tokenizer_lib

EXIT_INTERRUPTED = 3   # SIGTERM/SIGINT: checkpoint written, run resumable
EXIT_NONFINITE = 4     # nan_policy='stop' met a non-finite loss or gradient
EXIT_IO_ERROR = 5      # a checkpoint or the metrics could not be written


class WorkdirError(ValueError):
  """The work directory cannot be written; one line for the user."""


# ------------------------------------------------------------- model, optim


def model_config(c, vocab_size: int) -> model_lib.LlamaConfig:
  dtypes = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
  return model_lib.LlamaConfig(
      vocab_size=vocab_size, dim=c.model.dim, num_layers=c.model.num_layers,
      num_heads=c.model.num_heads, ffn_dim=config_lib.ffn_dim(c),
      dtype=dtypes[c.model.dtype], remat=c.model.remat,
      loss_chunk_tokens=c.model.loss_chunk_tokens,
      linear='poet' if c.optimizer.name == 'poet' else 'dense',
      poet=model_lib.POETConfig(
          variant=c.poet.variant, block_size=config_lib.block_size(c),
          compute=c.poet.compute, init=c.poet.init,
          neumann_terms=c.poet.neumann_terms,
          orthogonal_map=c.poet.orthogonal_map,
          # 'int8' passes through: POET-XQ's 8-bit W0 (poet_jax/quant.py).
          w0_dtype=dtypes.get(c.model.w0_dtype, c.model.w0_dtype),
          w0_group_size=c.model.w0_group_size,
          memory_budget=c.poet.auto_memory_budget))


def schedule(c, peak: float) -> optax.Schedule:
  """Cosine decay to final_lr_fraction * peak over train.steps, with warmup.

  Depends on the configured number of steps only, so a resumed run follows
  the same curve.
  """
  end = peak * c.train.final_lr_fraction
  if c.train.warmup_steps:
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, c.train.warmup_steps, c.train.steps, end)
  return optax.cosine_decay_schedule(peak, c.train.steps,
                                     alpha=c.train.final_lr_fraction)


def _is_block_kernel(path, x) -> bool:
  names = [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]
  return 'blocks' in names and jnp.ndim(x) == 3


def optimizer(c) -> optax.GradientTransformation:
  """The configured method, after global gradient clipping.

  POET runs follow the official POET-X code by default (docs/method.md):
  its Adam convention and eps in both groups, its clipping (eps 1e-6 in
  the denominator) with the threshold ramp after each merge. Baselines use
  optax's AdamW, GaLore and Muon, as their own references do.
  """
  lr = schedule(c, c.train.lr)
  o, wd = c.optimizer, c.train.weight_decay
  if o.name == 'poet':
    p = c.poet
    tx = optim.poet(lr, schedule(c, p.lr), poet_scale=p.scale, b1=o.b1,
                    b2=o.b2, eps=p.eps, weight_decay=wd, poet_b1=o.b1,
                    poet_b2=o.b2, poet_eps=p.eps,
                    adam_convention=p.adam_convention)
    if c.train.grad_clip:
      limit = optim.post_merge_clip_ramp(
          c.train.grad_clip, p.merge_every, ramp_steps=p.clip_ramp_steps,
          until_step=p.clip_ramp_until)
      tx = optax.chain(optim.clip_by_global_norm(limit), tx)
    return tx
  if o.name == 'adamw':
    tx = optax.adamw(lr, o.b1, o.b2, weight_decay=wd, mask=optim.decay_mask)
  elif o.name == 'muon':
    # Muon on the stacked block kernels (L, in, out); Adam on the rest.
    dims = lambda params: jax.tree_util.tree_map_with_path(
        lambda p, x: optax.contrib.MuonDimensionNumbers(1, 2)
        if _is_block_kernel(p, x) else None, params)
    # Decay on both parts, unmasked, as the reference trainer's Muon groups.
    tx = optax.contrib.muon(lr, beta=o.muon_beta, weight_decay=wd,
                            adam_weight_decay=wd, adam_b1=o.b1, adam_b2=o.b2,
                            muon_weight_dimension_numbers=dims)
  elif o.name == 'galore':
    # GaLore on each layer's block kernels, AdamW on embeddings, norms and
    # head.
    labels = lambda params: jax.tree_util.tree_map_with_path(
        lambda p, x: 'galore' if _is_block_kernel(p, x) else 'adamw', params)
    tx = optax.partition({
        'galore': optim.per_layer(optax.contrib.galore(
            lr, rank=o.galore_rank, update_proj_gap=o.galore_update_proj_gap,
            scale=o.galore_scale, weight_decay=wd,
            base_optimizer=optax.scale_by_adam(o.b1, o.b2))),
        'adamw': optax.adamw(lr, o.b1, o.b2, weight_decay=wd,
                             mask=optim.decay_mask),
    }, labels)
  else:
    raise config_lib.ConfigError(f'unknown optimizer.name {o.name!r}')
  if c.train.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(c.train.grad_clip), tx)
  return tx


# ------------------------------------------------------------------- state


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the step functions close over; all static."""
  graphdef: Any
  tx: optax.GradientTransformation
  lr: optax.Schedule
  config: Any


def _split(model):
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.as_pure(params), nnx.as_pure(frozen)


def init_state(c, vocab_size: int) -> tuple[Setup, dict]:
  """A fresh state (on the default device) and what the step needs."""
  model = model_lib.Llama(model_config(c, vocab_size),
                          rngs=nnx.Rngs(params=c.seed))
  graphdef, params, frozen = _split(model)
  tx = optimizer(c)
  state = {'params': params, 'frozen': frozen, 'opt_state': tx.init(params),
           'step': jnp.zeros([], jnp.int32),
           'nonfinite': jnp.zeros([], jnp.int32),
           'nonfinite_step': jnp.zeros([], jnp.int32)}
  return Setup(graphdef, tx, schedule(c, c.train.lr), c), state


def abstract_state(c, vocab_size: int) -> tuple[Setup, Any]:
  """The state's shapes and dtypes, with nothing allocated."""
  box = {}

  def build():
    setup, state = init_state(c, vocab_size)
    box['setup'] = setup
    return state

  shapes = jax.eval_shape(build)
  return box['setup'], shapes


def count_params(state) -> tuple[int, int]:
  """(trainable, frozen) numbers of parameters; frozen counts W0 only."""
  size = lambda tree: sum(int(np.prod(np.shape(x))) for x in
                          jax.tree.leaves(tree)
                          if jnp.issubdtype(x.dtype, jnp.floating))
  # W0 by name: an 8-bit W0 is uint8 codes plus float scales and zero points.
  w0 = jax.tree_util.tree_leaves_with_path(state['frozen'])
  frozen = sum(int(np.prod(np.shape(x))) for p, x in w0
               if str(getattr(p[-1], 'key', '')) == 'w0')
  return size(state['params']), frozen


# ------------------------------------------------------------------- steps


def _where(pred, new, old):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def _micro_batches(batch: jax.Array, k: int) -> jax.Array:
  """(B, T+1) -> (k, B/k, T+1); micro-batch j holds rows j, j+k, j+2k, ...

  Strided rows keep every micro-batch split over the batch devices as the
  batch is (the row axis stays the sharded one), so nothing moves.
  """
  return batch.reshape(batch.shape[0] // k, k, -1).swapaxes(0, 1)


def _accumulate(fn, params, batch: jax.Array, k: int):
  """The sum of fn(params, micro_batch) over k micro-batches (float32).

  A lax.scan: the compiled step keeps one micro-batch's activations.
  """
  if k == 1:
    return fn(params, batch)
  micro = _micro_batches(batch, k)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                       jax.eval_shape(fn, params, micro[0]))

  def body(total, tokens):
    out = jax.tree.map(lambda x: x.astype(jnp.float32), fn(params, tokens))
    return jax.tree.map(jnp.add, total, out), None

  return jax.lax.scan(body, zeros, micro)[0]


def applied_rates(c, applied: jax.Array) -> dict:
  """The learning rates of the update after `applied` applied updates.

  optax counts (and schedules by) the updates it applied; a dropped
  non-finite update rolls its state back, so this is the global step less
  the dropped steps, never the global step (docs/reliability.md).
  """
  rates = {'learning_rate': schedule(c, c.train.lr)(applied)}
  if c.optimizer.name == 'poet':
    rates['poet_learning_rate'] = (schedule(c, c.poet.lr)(applied)
                                   * c.poet.scale)
  return rates


def train_step(setup: Setup, state: dict, batch: jax.Array):
  """One optimizer step over train.grad_accum_steps micro-batches, the
  generator guard, and a merge when due (after the step, on its count)."""
  c = setup.config

  def loss_fn(params, tokens):
    model = nnx.merge(setup.graphdef, params, state['frozen'])
    return model_lib.next_token_loss(model, tokens)

  k = c.train.grad_accum_steps
  loss, grads = _accumulate(jax.value_and_grad(loss_fn), state['params'],
                            batch, k)
  if k > 1:
    # Equal micro-batches: the mean of their mean losses and gradients is
    # the whole batch's, to float32 rounding.
    loss, grads = jax.tree.map(lambda x: x / k, (loss, grads))
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = setup.tx.update(grads, state['opt_state'],
                                       state['params'])
  params = optax.apply_updates(state['params'], updates)
  if c.optimizer.name == 'poet' and c.poet.max_q_norm:
    params = optim.clip_generator_norms(params, c.poet.max_q_norm)
  # A non-finite loss or gradient drops the whole update; detected here, on
  # device, and reported with the next logged metrics.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  params = _where(finite, params, state['params'])
  opt_state = _where(finite, opt_state, state['opt_state'])
  step = state['step'] + 1
  frozen = state['frozen']
  if c.optimizer.name == 'poet':
    params, frozen, opt_state = merge_lib.merge_if_due(
        setup.graphdef, params, frozen, opt_state, step, c.poet.merge_every,
        jax.random.key(c.seed))
  new_state = {'params': params, 'frozen': frozen, 'opt_state': opt_state,
               'step': step,
               'nonfinite': state['nonfinite'] + (~finite).astype(jnp.int32),
               'nonfinite_step': jnp.where(finite, state['nonfinite_step'],
                                           step)}
  metrics = {'train_loss': loss, 'grad_norm': grad_norm, 'finite': finite,
             **applied_rates(c, state['step'] - state['nonfinite'])}
  return new_state, metrics


def eval_step(setup: Setup, state: dict, batch: jax.Array):
  """Summed token loss and token count of one evaluation batch (taken in
  train.grad_accum_steps micro-batches, like the train step)."""
  model = nnx.merge(setup.graphdef, state['params'], state['frozen'])

  def summed(_, tokens):
    losses = optax.softmax_cross_entropy_with_integer_labels(
        model(tokens[:, :-1]), tokens[:, 1:])
    return losses.sum(), jnp.asarray(losses.size, jnp.float32)

  return _accumulate(summed, None, batch, setup.config.train.grad_accum_steps)


def diagnostics(setup: Setup, state: dict) -> dict:
  """metrics_lib.poet_diagnostics, and under 'layers' the per-layer
  metrics_lib.poet_layer_health behind the numerical warnings."""
  model = nnx.merge(setup.graphdef, state['params'], state['frozen'])
  return {**metrics_lib.poet_diagnostics(model),
          'layers': metrics_lib.poet_layer_health(model)}


@dataclasses.dataclass
class CompiledSteps:
  train: Callable
  eval: Callable
  diagnostics: Callable
  state_sharding: Any
  batch_sharding: Any


def compiler_options(c) -> dict:
  """XLA options of the steps.

  XLA:CPU multiplies bf16 matrices by converting them to f32, and its
  loop-invariant code motion then hoists those converts out of the layer
  scan: an f32 copy of every layer's W0 at once (about 2x the model's bf16
  weights, measured at llama_8b). Accelerators multiply bf16 natively; on CPU
  we turn that pass off for bf16 runs so each layer converts its own slice.
  """
  bf16 = 'bfloat16' in (c.model.dtype, c.model.w0_dtype)
  if bf16 and jax.default_backend() == 'cpu':
    return {'xla_disable_hlo_passes': 'while-loop-invariant-code-motion'}
  return {}


def compile_steps(setup: Setup, abstract: Any, mesh) -> CompiledSteps:
  """jax.jit of every step with explicit shardings; the state is donated."""
  options = compiler_options(setup.config)
  state_sh = sharding_lib.state_shardings(mesh, abstract)
  batch_sh = sharding_lib.batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  train = jax.jit(lambda s, b: train_step(setup, s, b),
                  in_shardings=(state_sh, batch_sh),
                  out_shardings=(state_sh, replicated), donate_argnums=0,
                  compiler_options=options)
  evaluate = jax.jit(lambda s, b: eval_step(setup, s, b),
                     in_shardings=(state_sh, batch_sh),
                     out_shardings=replicated)
  diag = jax.jit(lambda s: diagnostics(setup, s), in_shardings=(state_sh,),
                 out_shardings=replicated)
  return CompiledSteps(train, evaluate, diag, state_sh, batch_sh)


# -------------------------------------------------------------------- loop


class Interrupted(Exception):
  """SIGTERM or SIGINT before the first step: there was nothing to save."""


class _StopSignal:
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


# Keys a resumed run may change: they decide when to log, evaluate, save and
# stop, not what is computed (nan_policy: see docs/reliability.md).
RESUMABLE = ('nan_policy', 'log_every', 'eval_every', 'checkpoint_every',
             'keep_checkpoints', 'eval_at_start', 'tensorboard')


def _check_writable(workdir: str) -> None:
  """The work directory (and its checkpoints) can be written, or WorkdirError.

  Checked first and without creating anything: a work directory that does
  not exist yet is made only once every check has passed. A probe file in
  the directory (or, for a new one, its nearest existing parent) is
  created and removed again.
  """
  probes = [workdir, os.path.join(workdir, 'checkpoints')]
  if not os.path.lexists(workdir):
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.lexists(parent):
      parent = os.path.dirname(parent)
    probes = [parent]
  try:
    for directory in probes:
      if directory == probes[0] or os.path.lexists(directory):
        if not os.path.isdir(directory):
          raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                   directory)
        with tempfile.NamedTemporaryFile(dir=directory, prefix='.probe'):
          pass
  except OSError as e:
    where = e.filename or workdir
    raise WorkdirError(
        f'work directory {workdir} cannot be written ({where}: '
        f'{e.strerror or e}); choose another --workdir or fix its '
        'permissions') from None


def _check_config_matches(workdir: str, c, has_checkpoint: bool) -> None:
  """A work directory that holds a checkpoint belongs to one configuration:
  refuse another. Without a checkpoint there is no run to protect."""
  path = os.path.join(workdir, 'config.json')
  if not (has_checkpoint and os.path.exists(path)):
    return
  with open(path) as f:
    saved = f.read()
  current = c.to_json(sort_keys=True, indent=1)
  if saved == current:
    return
  old, new = (config_lib.flatten(s) for s in (saved, current))
  # The mesh and the processes may change between a stop and a resume, and
  # so may the keys that do not change what is computed (RESUMABLE).
  keys = sorted(k for k in old.keys() | new.keys()
                if old.get(k) != new.get(k) and k not in RESUMABLE
                and not k.startswith(('mesh.', 'distributed.')))
  if keys:
    raise config_lib.ConfigError(
        f'{workdir} holds a run with a different config ({", ".join(keys)}'
        '); use a new --workdir or the same settings to resume')


def write_config(workdir: str, c) -> None:
  """<workdir>/config.json (atomically), creating the work directory."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  with open(path + '.tmp', 'w') as f:
    f.write(c.to_json(sort_keys=True, indent=1))
  os.replace(path + '.tmp', path)


def train(c, workdir: str, progress: bool = True) -> int:
  """Train (or resume) the configured run in workdir; returns an exit code.

  Raises USER_ERRORS for bad input (before any heavy work where it can be
  found then), Interrupted for SIGTERM/SIGINT before the first step,
  checkpoint_lib.SaveError or OSError when a checkpoint or the metrics
  cannot be written. docs/reliability.md has the whole contract.
  """
  sharding_lib.initialize_distributed(c.distributed)
  stop = _StopSignal()
  try:
    return _train(c, workdir, progress, stop)
  finally:
    stop.restore()


def _train(c, workdir: str, progress: bool, stop: _StopSignal) -> int:
  is_main = jax.process_index() == 0
  say = print if is_main else (lambda *a, **k: None)
  error = ((lambda m: print(f'error: {m}', file=sys.stderr, flush=True))
           if is_main else (lambda m: None))
  faults = _Faults(os.environ)
  # Everything that can refuse the run (exit 2) is checked before anything
  # is written to the work directory and before any compile.
  _check_writable(workdir)
  mesh = sharding_lib.make_mesh(c.mesh)
  sharding_lib.check_batch(mesh, c.train.batch_size, c.train.grad_accum_steps)
  tokenizer = _load_tokenizer(c.data.tokenizer)
  vocab = c.model.vocab_size or tokenizer.vocab_size
  if vocab < tokenizer.vocab_size:
    raise config_lib.ConfigError(
        f'model.vocab_size={vocab} is smaller than the tokenizer vocabulary '
        f'({tokenizer.vocab_size}); set it to 0 or at least that')
  open_checkpoints = lambda: checkpoint_lib.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=c.keep_checkpoints,
      before_commit=faults.before_commit)
  # Opening creates the directory: only an existing one is opened now.
  ckpt = (open_checkpoints()
          if os.path.isdir(os.path.join(workdir, 'checkpoints')) else None)
  try:
    latest = ckpt.latest_step() if ckpt else None
    _check_config_matches(workdir, c, has_checkpoint=latest is not None)
    # What the checkpoint was trained on must be what is at hand: checked
    # for the tokenizer before the data is tokenized with it.
    trained_on = ckpt.read_meta(latest) if latest is not None else {}
    _check_input(ckpt, latest, trained_on, 'tokenizer', tokenizer.identity)
    data_dir = c.data.data_dir or config_lib.default_data_dir()
    train_data, eval_data = data_lib.open_train_and_eval(
        c.data.name, data_dir, tokenizer, c.train.seq_len,
        c.data.max_tokens or None, progress=progress and is_main)
    inputs = {'tokenizer': tokenizer.identity,
              'data': f'{train_data.name}, {len(train_data.tokens)} tokens'}
    _check_input(ckpt, latest, trained_on, 'data', inputs['data'])
    for split, stream in zip(data_lib.SPLITS, (train_data, eval_data)):
      data_lib.check_one_batch(stream, c.train.batch_size, c.data.name,
                               split, c.data.max_tokens)
    # Nothing refused the run: from here on it writes.
    os.makedirs(workdir, exist_ok=True)
    if is_main:
      write_config(workdir, c)
    ckpt = ckpt or open_checkpoints()

    setup, abstract = abstract_state(c, vocab)
    steps = compile_steps(setup, abstract, mesh)
    trainable, frozen = count_params(abstract)
    layer_names = metrics_lib.poet_layer_names(
        nnx.merge(setup.graphdef, abstract['params'], abstract['frozen']))
    say(f'model: {trainable:,} trainable and {frozen - 0:,} frozen '
        f'parameters ({c.optimizer.name}); mesh {dict(mesh.shape)}')
    if c.optimizer.name == 'poet' and c.poet.compute == 'auto':
      model = nnx.merge(setup.graphdef, abstract['params'], abstract['frozen'])
      say(layers.describe_choices(
          model, c.train.batch_size // c.train.grad_accum_steps
          * c.train.seq_len))
    faults.signal_at(0)
    if latest is None:
      state = jax.jit(lambda: init_state(c, vocab)[1],
                      out_shardings=steps.state_sharding)()
      if c.init_from:  # a pretrained Hugging Face Llama (hf_import.py)
        from poet_jax import hf_import  # pylint: disable=g-import-not-at-top
        state = hf_import.init_state_from(c.init_from, setup, state,
                                          steps.state_sharding)
        say(f'initialized from {c.init_from}')
    else:
      target = jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
          abstract, steps.state_sharding)
      state, _ = ckpt.restore(latest, target)
      say(f'resumed from {ckpt.directory} at step {latest}')
    start = int(state['step'])
    log = metrics_lib.MetricsLog(
        os.path.join(workdir, 'metrics.jsonl'), resume_step=start,
        tensorboard_dir=(os.path.join(workdir, 'tensorboard')
                         if c.tensorboard else None)) if is_main else None
  except BaseException:
    if ckpt:
      ckpt.abandon()
    raise

  num_eval = max(1, c.eval_tokens // c.train.seq_len)
  eval_batches = eval_data.eval_batches(c.train.batch_size, num_eval,
                                       jax.process_index(), jax.process_count())

  say(f'workdir: {os.path.abspath(workdir)}')
  for line in data_notes(c, train_data, len(eval_batches)):
    say(line)

  def evaluate(state):
    total, count = 0.0, 0.0
    for batch in tqdm.tqdm(eval_batches, desc='evaluating', unit='batch',
                           leave=False, dynamic_ncols=True,
                           disable=not (progress and is_main)):
      s, n = steps.eval(state, _global_batch(batch, steps.batch_sharding))
      total, count = total + float(s), count + float(n)
    return total / count

  def save(state, step):
    ckpt.save(step, state, {'step': step, 'data_position': step,
                            'merges': (step // c.poet.merge_every
                                       if c.optimizer.name == 'poet' else 0),
                            **inputs})

  tokens_per_step = c.train.batch_size * c.train.seq_len
  exit_code = 0
  bar = tqdm.tqdm(total=c.train.steps, initial=start, unit='step',
                  dynamic_ncols=True, disable=not (progress and is_main))
  write = bar.write if is_main else (lambda *a, **k: None)
  failed = True
  try:
    write('compiling the train and eval steps')
    _compile_ahead(c, steps, state)
    at_start, why = eval_at_start(c, len(eval_batches))
    if start == 0:
      write(f'step 0: {"evaluating" if at_start else "not evaluating"} the '
            f'initial model ({why})')
    if start == 0 and at_start:
      first = evaluate(state)
      say(f'step 0: eval loss {first:.4f}, perplexity {math.exp(first):.2f}')
      log and log.write({'step': 0, 'eval_loss': first,
                         'eval_ppl': math.exp(min(first, 700))})
    # Non-finite steps are counted on device (state['nonfinite']); the count
    # is read only at log steps and, with nan_policy='stop', before a save.
    reported = int(state['nonfinite'])
    warned = set()  # kinds of numerical warning given (each once a run)
    _restart_clock(bar, start)
    last_time, last_step = time.perf_counter(), start
    step = start
    stop.in_loop = True
    while step < c.train.steps:
      batch = train_data.train_batch(step, c.train.batch_size, c.seed,
                                     jax.process_index(), jax.process_count())
      if faults.at('nan', step + 1):
        batch = np.array(batch)
        batch[0, 0] = vocab  # out of the vocabulary: the embedding is NaN
      state, m = steps.train(state, _global_batch(batch, steps.batch_sharding))
      step += 1
      faults.during_step(step)
      bar.update(1)
      last = step == c.train.steps
      log_due = step % c.log_every == 0 or last
      if step == start + 1 and not log_due:
        # The first call of a compiled step sets up its runtime: leave it
        # out of the clocks as well.
        jax.block_until_ready(m)
        _restart_clock(bar, step)
        last_time, last_step = time.perf_counter(), step
      nonfinite = int(state['nonfinite']) if log_due else None
      entry = {}
      if log_due:
        m = jax.device_get(m)
        now = time.perf_counter()
        dt = (now - last_time) / max(step - last_step, 1)
        entry.update(train_loss=float(m['train_loss']),
                     learning_rate=float(m['learning_rate']),
                     grad_norm=float(m['grad_norm']),
                     tokens_seen=step * tokens_per_step, step_time_s=dt,
                     tokens_per_s=tokens_per_step / dt,
                     nonfinite_steps=nonfinite)
        if c.optimizer.name == 'poet':
          entry['poet_learning_rate'] = float(m['poet_learning_rate'])
          diag = jax.device_get(steps.diagnostics(state))
          health = diag.pop('layers')
          entry.update({k: float(v) for k, v in diag.items()})
          for line in metrics_lib.numerical_warnings(step, layer_names,
                                                     health, warned):
            write(line)
        bar.set_postfix(loss=f'{entry["train_loss"]:.3f}',
                        tok_s=f'{entry["tokens_per_s"]:.0f}')
      if step % c.eval_every == 0 or last:
        loss = evaluate(state)
        entry.update(eval_loss=loss, eval_ppl=math.exp(min(loss, 700)))
        write(f'step {step}: eval loss {loss:.4f}, perplexity '
              f'{entry["eval_ppl"]:.2f}')
      if entry and log:
        log.write({'step': step, **entry})
      if log_due:  # tokens/s counts train steps, not evaluations or logging
        last_time, last_step = time.perf_counter(), step
      faults.pause(step, stop)
      stopping = _agreed_stop(stop, log_due)
      save_due = (step % c.checkpoint_every == 0 or last or
                  stopping is not None)
      if save_due and c.nan_policy == 'stop' and nonfinite is None:
        nonfinite = int(state['nonfinite'])
      if nonfinite is not None and nonfinite > reported:
        bad, count = int(state['nonfinite_step']), nonfinite - reported
        reported = nonfinite
        where = (f'at step {bad}' if count == 1 else
                 f'at {count} steps up to step {bad}')
        if c.nan_policy == 'stop':
          # Nothing after the bad step is saved: wait for the saves of
          # earlier steps, then name the newest as the one to resume from.
          ckpt.wait()
          error(f'non-finite loss or gradient {where} (nan_policy=stop); '
                'its update was dropped and nothing after it was saved; the '
                f'last good checkpoint is step {ckpt.latest_step()}. See '
                'docs/reliability.md to resume')
          exit_code = EXIT_NONFINITE
          break
        write(f'warning: non-finite loss or gradient {where}; the update '
              f'was skipped (nan_policy=skip, {nonfinite} so far)')
      if save_due:
        save(state, step)
      faults.after_save(step, ckpt)
      if stopping:
        ckpt.wait()
        write(f'{stopping}: checkpoint at step {step} written; run the '
              'same command to resume')
        exit_code = EXIT_INTERRUPTED
        break
    failed = False
  finally:
    bar.close()
    if log:
      log.close()
    if failed:
      ckpt.abandon()  # the error on its way out is the one to report
  ckpt.close()
  if is_main and exit_code == 0:
    metrics_lib.plot_losses(os.path.join(workdir, 'metrics.jsonl'),
                            os.path.join(workdir, 'loss.png'))
    say(f'done: metrics in {os.path.join(workdir, "metrics.jsonl")}, '
        f'curves in {os.path.join(workdir, "loss.png")}')
  return exit_code


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
  epochs = c.train.steps * c.train.batch_size / train_data.num_examples
  if epochs > 1:
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


def _compile_ahead(c, steps: CompiledSteps, state) -> None:
  """Compiles the train, eval and diagnostics steps now (jax.jit keeps the
  executables), so that the clocks of tokens/s and of the time left, started
  after this, leave compilation out."""
  batch = jax.ShapeDtypeStruct((c.train.batch_size, c.train.seq_len + 1),
                               jnp.int32, sharding=steps.batch_sharding)
  steps.train.lower(state, batch).compile()
  steps.eval.lower(state, batch).compile()
  if c.optimizer.name == 'poet':
    steps.diagnostics.lower(state).compile()


def _restart_clock(bar, step: int) -> None:
  """The progress bar's rate and time left from now on (not compilation)."""
  bar.reset(total=bar.total)
  bar.n = bar.initial = bar.last_print_n = step
  bar.refresh()


def _load_tokenizer(spec: str):
  """tokenizer_lib.load_tokenizer, refusing an empty model file, which
  sentencepiece would load as a model without pieces."""
  path = os.path.expanduser(spec)
  if spec != 'byte' and os.path.isfile(path) and not os.path.getsize(path):
    raise tokenizer_lib.TokenizerError(
        f'tokenizer file {path} is empty; set data.tokenizer to a '
        "SentencePiece .model file or to 'byte'")
  return tokenizer_lib.load_tokenizer(spec)


def _agreed_stop(stop: _StopSignal, sync_point: bool) -> str | None:
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


def _check_input(ckpt, step, trained_on: dict, key: str, now: str) -> None:
  """The tokenizer or data a checkpoint was trained on is the one at hand.

  A tokenizer file that was replaced (or damaged yet still loads) or another
  corpus would silently change the run: refuse, naming both. Checkpoints
  that did not record it pass.
  """
  then = trained_on.get(key)
  if then is not None and then != now:
    raise config_lib.ConfigError(
        f'the {key} differs from the one checkpoint {ckpt.step_path(step)} '
        f'was trained with ({then!r}, now {now!r}); restore the original '
        'or use a new --workdir')


class _Faults:
  """Test-only fault injection (tests/test_reliability.py); never set these
  variables outside tests.

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

  def signal_at(self, step: int) -> None:
    for kind, sig in (('term', signal.SIGTERM), ('int', signal.SIGINT)):
      if self.at(kind, step):
        os.kill(os.getpid(), sig)

  def during_step(self, step: int) -> None:
    if self.at('kill', step):
      self._kill()
    self.signal_at(step)

  def pause(self, step: int, stop: _StopSignal) -> None:
    if self.at('pause', step):
      print(f'paused after step {step}', flush=True)
      deadline = time.monotonic() + 120
      while not stop.received and time.monotonic() < deadline:
        time.sleep(0.01)

  def after_save(self, step: int, ckpt) -> None:
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


def _global_batch(local: np.ndarray, sharding) -> jax.Array:
  """This process's rows of the global batch -> one global jax.Array."""
  return jax.make_array_from_process_local_data(sharding, local)


# Errors that mean bad input (config, paths, data, mesh), reported as one
# line with exit code 2 by train.py.
USER_ERRORS = (config_lib.ConfigError, sharding_lib.MeshError,
               data_lib.DataError, tokenizer_lib.TokenizerError,
               checkpoint_lib.CorruptCheckpointError, WorkdirError,
               FileNotFoundError, NotADirectoryError, PermissionError)
