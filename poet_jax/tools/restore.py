"""A training run's checkpoint, for use after training, and its dense form.

`load_run` reads a work directory (its config.json and a checkpoint) without
writing anything to it, so it is safe while the trainer is still running.
`dense_weights` folds every POET layer into one dense kernel
(W = P_in W0 R_out, POETLinear.effective_weight), once; `dense_model`
builds the plain Llama that inference then runs at a dense model's cost.
"""
import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from poet_jax import layers
from poet_jax.data import tokenizer as tokenizer_lib
from poet_jax.models import hf
from poet_jax.models import llama as model_lib
from poet_jax.train import checkpoint as checkpoint_lib
from poet_jax.train import config as config_lib
from poet_jax.train import config_checks
from poet_jax.train import state as train_state

class RunError(ValueError):
  """A work directory or checkpoint that cannot be used; one line."""


@dataclasses.dataclass
class Run:
  """A restored checkpoint of a run."""
  config: ml_collections.ConfigDict
  workdir: str
  step: int
  meta: dict
  tokenizer: Any
  setup: train_state.Setup
  state: dict            # the train state (train/state.py), on device

  @property
  def model(self) -> model_lib.Llama:
    return nnx.merge(self.setup.graphdef, self.state['params'],
                     self.state['frozen'])


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a work directory was trained with, validated.

  Keys added to poet_jax after the run take their defaults. Raises RunError.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise RunError(f'{workdir} has no config.json: not a training work '
                   'directory; give the --workdir of a run of train.py')
  try:
    with open(path) as f:
      saved = json.load(f)
    c = config_lib.base_config()
    c.update(saved)
    # init_from only seeded step 0; the checkpoint holds the weights now.
    c.init_from = ''
    config_checks.validate(c)
  except (ValueError, TypeError, KeyError) as e:
    raise RunError(f'{path} cannot be used ({e}); it should be the one '
                   'train.py wrote') from None
  return c


def _checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
  """orbax, read-only: unlike a training Checkpointer it creates and cleans
  up nothing, so a trainer writing to the same directory is undisturbed."""
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if not os.path.isdir(directory):
    raise RunError(f'no checkpoint in {workdir} ({directory} does not exist);'
                   f' train first: python train.py --workdir={workdir}')
  # orbax warns that the manager is read-only, which is what we asked for.
  quiet = _DropMessage('is read only')
  logging.getLogger('absl').addFilter(quiet)
  try:
    return ocp.CheckpointManager(
        directory, item_names=('state', 'meta'),
        options=ocp.CheckpointManagerOptions(
            read_only=True, create=False, save_interval_steps=0,
            max_to_keep=None))
  finally:
    logging.getLogger('absl').removeFilter(quiet)


class _DropMessage(logging.Filter):

  def __init__(self, text: str):
    super().__init__()
    self.text = text

  def filter(self, record: logging.LogRecord) -> bool:
    return self.text not in record.getMessage()


def load_run(workdir: str, step: int | None = None, shardings=None) -> Run:
  """Restore checkpoint `step` (default: the latest) of a work directory.

  Args:
    workdir: a directory train.py wrote.
    step: which checkpoint; None: the latest complete one.
    shardings: a function abstract_state -> shardings of its leaves; None:
      everything on the first device.
  Raises:
    RunError (one line) for a missing or unusable directory, checkpoint,
    step or tokenizer.
  """
  c = read_config(workdir)
  try:
    tokenizer = tokenizer_lib.load_tokenizer(c.data.tokenizer)
  except (tokenizer_lib.TokenizerError, OSError) as e:
    raise RunError(f'the run\'s tokenizer cannot be loaded: {e}') from None
  vocab = c.model.vocab_size or tokenizer.vocab_size
  manager = _checkpoint_manager(workdir)
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise RunError(f'no checkpoint in {manager.directory}; train first: '
                     f'python train.py --workdir={workdir}')
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise RunError(f'{workdir} has no checkpoint of step {step}; it has '
                     f'steps {", ".join(map(str, steps))}')
    setup, abstract = train_state.abstract_state(c, vocab)
    if shardings is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target_sh = jax.tree.map(lambda _: device, abstract)
    else:
      target_sh = shardings(abstract)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, target_sh)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      reason = ' '.join(str(e).split())[:200]
      raise RunError(f'checkpoint {manager.directory}/{step} cannot be read '
                     f'({type(e).__name__}: {reason})') from None
  finally:
    manager.close()
  meta = dict(restored.meta)
  damage = checkpoint_lib.find_damage(restored.state,
                                      meta.pop('fingerprint', None))
  if damage:
    older = [s for s in steps if s < step]
    raise RunError(f'checkpoint {manager.directory}/{step} cannot be used '
                   f'({damage})' + (f'; --step={older[-1]} reads the one '
                                    'before' if older else ''))
  if meta.get('tokenizer', tokenizer.identity) != tokenizer.identity:
    raise RunError(f'the tokenizer {c.data.tokenizer} is not the one step '
                   f'{step} was trained with ({meta["tokenizer"]}); restore '
                   'the original file')
  return Run(c, workdir, step, meta, tokenizer, setup, restored.state)


def _kernel(layer) -> jax.Array:
  if isinstance(layer, layers.POETLinear):
    return layer.effective_weight()
  return layer.kernel[...].astype(jnp.float32)


def dense_weights(model: model_lib.Llama) -> dict[str, jax.Array]:
  """Every weight of the model as a float32 array, POET layers folded.

  Keys: 'embed' (V, D); per layer, stacked on a leading axis L:
  'attention_norm', 'mlp_norm' (L, D) and the kernels 'q', 'k', 'v', 'o',
  'gate', 'up', 'down' (L, in, out), with layer(x) == x @ kernel; 'norm'
  (D,), 'lm_head' (D, V) (the embedding transposed when tied): the dense
  weights that poet_jax.models.hf maps to the Hugging Face format.
  """
  blocks = model.blocks
  out = {'embed': model.embed.embedding[...],
         'attention_norm': blocks.attention_norm.scale[...],
         'mlp_norm': blocks.mlp_norm.scale[...],
         'norm': model.norm.scale[...],
         'lm_head': model.head_kernel()}
  out.update({n: _kernel(getattr(blocks.attention, n)) for n in hf.ATTENTION})
  out.update({n: _kernel(getattr(blocks.mlp, n)) for n in hf.MLP})
  return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}


def set_weights(model: model_lib.Llama, weights: dict) -> None:
  """Write dense_weights-style arrays into a dense model, in place."""
  blocks = model.blocks
  model.embed.embedding.set_value(weights['embed'])
  blocks.attention_norm.scale.set_value(weights['attention_norm'])
  blocks.mlp_norm.scale.set_value(weights['mlp_norm'])
  model.norm.scale.set_value(weights['norm'])
  if not model.cfg.tie_embeddings:
    model.lm_head.kernel.set_value(weights['lm_head'])
  for name in hf.ATTENTION:
    getattr(blocks.attention, name).kernel.set_value(weights[name])
  for name in hf.MLP:
    getattr(blocks.mlp, name).kernel.set_value(weights[name])


def dense_config(cfg: model_lib.LlamaConfig) -> model_lib.LlamaConfig:
  """cfg for inference: no recomputation in a backward."""
  return dataclasses.replace(cfg, remat=False)


def dense_model(cfg: model_lib.LlamaConfig,
                weights: dict) -> model_lib.Llama:
  """The plain Llama (nnx.Linear layers) of cfg's sizes holding `weights`."""
  model = nnx.eval_shape(lambda: model_lib.Llama(dense_config(cfg),
                                                 rngs=nnx.Rngs(0)))
  set_weights(model, weights)
  return model


def folded_model(run: Run) -> model_lib.Llama:
  """The run's model with every POET layer folded into a dense kernel."""
  model = run.model
  return dense_model(model.cfg, nnx.jit(dense_weights)(model))
