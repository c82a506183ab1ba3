"""Start a run from a Hugging Face Llama checkpoint: --config.init_from=DIR.

DIR holds config.json and model.safetensors (or a sharded
model.safetensors.index.json), as the export tool writes and transformers
saves (the format: poet_jax.models.hf).
A dense run (adamw, galore, muon) starts from all its weights. A POET run
takes each linear layer's weight as its W0, kept as is, with R = P = I:
training then learns only orthogonal factors of the pretrained weights (the
orthogonal finetuning use of POET); embeddings, norms and the head are its
initial values, trained as usual. Sizes and settings must match the run's
(grouped-query heads, rotary base, norm eps; a tied head may start an
untied run); everything is checked from the files' headers before any work
(`check_init_from`), and a mismatch names the config key to set.
"""
import os

import jax
from flax import nnx

from poet_jax import inject
from poet_jax import layers
from poet_jax.data import tokenizer as tokenizer_lib
from poet_jax.models import hf as hf_lib
from poet_jax.models import llama as model_lib
from poet_jax.train import config as config_lib
from poet_jax.train import state as train_state



def _fail(path: str, what: str) -> config_lib.ConfigError:
  return config_lib.ConfigError(f'init_from={path}: {what}')


def read_hf_config(path: str) -> dict:
  """config.json of a Llama checkpoint directory, or ConfigError."""
  return _reading(path, hf_lib.read_config, path)


def _reading(path: str, read, *args):
  """read(*args), its HFError said as a ConfigError naming init_from."""
  try:
    return read(*args)
  except hf_lib.HFError as e:
    raise _fail(path, str(e)) from None


def _rope_theta(hf: dict) -> float:
  params = hf.get('rope_parameters') or {}
  return float(hf.get('rope_theta') or params.get('rope_theta') or 10000.0)


def _split_head_dim(hf: dict):
  hidden, heads = hf.get('hidden_size'), hf.get('num_attention_heads')
  ints = all(isinstance(v, int) and v > 0 for v in (hidden, heads))
  return hidden // heads if ints else None


def _mismatch(name: str, theirs, ours, key: str) -> str:
  return f'{name}={theirs} but {key}={ours} (set --config.{key}={theirs})'


def check_compatible(hf: dict, cfg: model_lib.LlamaConfig, path: str) -> None:
  """The checkpoint's architecture and sizes are the run's; else ConfigError
  naming each difference and the config key that fixes it."""
  heads = hf.get('num_attention_heads')
  sizes = [('hidden_size', hf.get('hidden_size'), cfg.dim, 'model.dim'),
           ('intermediate_size', hf.get('intermediate_size'), cfg.ffn_dim,
            'model.ffn_dim'),
           ('num_hidden_layers', hf.get('num_hidden_layers'), cfg.num_layers,
            'model.num_layers'),
           ('num_attention_heads', heads, cfg.num_heads, 'model.num_heads'),
           ('num_key_value_heads', hf.get('num_key_value_heads', heads),
            cfg.kv_heads, 'model.num_kv_heads'),
           ('vocab_size', hf.get('vocab_size'), cfg.vocab_size,
            'model.vocab_size'),
           ('rope_theta', _rope_theta(hf), cfg.rope_theta, 'model.rope_theta'),
           ('rms_norm_eps', hf.get('rms_norm_eps', 1e-6), cfg.norm_eps,
            'model.norm_eps')]
  wrong = [_mismatch(*row) for row in sizes if row[1] != row[2]]
  # A tied checkpoint may start an untied run (its head a copy of the
  # embedding), not the other way round.
  if cfg.tie_embeddings and not hf.get('tie_word_embeddings', False):
    wrong.append(_mismatch('tie_word_embeddings', False, True,
                           'model.tie_embeddings'))
  if wrong:
    raise _fail(path, f'sizes do not match the run: {"; ".join(wrong)}')
  scaling = hf.get('rope_scaling') or {}
  rope_type = scaling.get('rope_type', scaling.get('type')) or (
      hf.get('rope_parameters') or {}).get('rope_type', 'default')
  unsupported = [
      (hf.get('hidden_act', 'silu') != 'silu', 'hidden_act is not silu'),
      (hf.get('attention_bias') or hf.get('mlp_bias'), 'it has biases'),
      (hf.get('head_dim') not in (None, _split_head_dim(hf)),
       'head_dim is not hidden_size / num_attention_heads'),
      (rope_type != 'default', f'rope scaling {rope_type!r}')]
  bad = [why for flag, why in unsupported if flag]
  if bad:
    raise _fail(path, f'unsupported Llama variant: {"; ".join(bad)}')


def check_tensors(path: str, hf: dict, cfg: model_lib.LlamaConfig) -> None:
  """Every tensor a Llama of cfg's sizes needs is there, with its shape."""
  shapes = _reading(path, hf_lib.tensor_shapes,
                    _reading(path, hf_lib.tensor_files, path))
  expected = hf_lib.expected_shapes(cfg)
  if hf.get('tie_word_embeddings'):
    expected.pop('lm_head.weight', None)
  missing = sorted(expected.keys() - shapes.keys())
  if missing:
    raise _fail(path, f'{len(missing)} tensors are missing, such as '
                f'{missing[0]}')
  wrong = [f'{n} is {shapes[n]}, expected {s}'
           for n, s in expected.items() if shapes[n] != s]
  if wrong:
    raise _fail(path, f'tensor shapes do not match: {wrong[0]}')


def run_model_config(c) -> model_lib.LlamaConfig:
  tokenizer = tokenizer_lib.load_tokenizer(c.data.tokenizer)
  return train_state.model_config(c, c.model.vocab_size or tokenizer.vocab_size)


def check_init_from(c) -> None:
  """config_checks.validate's check of init_from: reads headers only, no weights.

  Raises ConfigError (one line) if the directory is not a Llama checkpoint
  of the run's sizes.
  """
  path = os.path.expanduser(c.init_from)
  hf = read_hf_config(path)
  cfg = run_model_config(c)
  check_compatible(hf, cfg, path)
  check_tensors(path, hf, cfg)


def load_weights(path: str, cfg: model_lib.LlamaConfig) -> dict:
  """The checkpoint's weights as dense weights (poet_jax.models.hf)."""
  path = os.path.expanduser(path)
  hf = read_hf_config(path)
  check_compatible(hf, cfg, path)
  check_tensors(path, hf, cfg)
  files = _reading(path, hf_lib.tensor_files, path)
  tensors = hf_lib.read_tensors(files, hf_lib.expected_shapes(cfg))
  return hf_lib.weights_from_hf(tensors, cfg)


def _set_kernel(layer, kernel: jax.Array) -> None:
  """The layer computes x @ kernel: a dense kernel, or a POET layer's W0
  with R = P = I and its placements kept."""
  if isinstance(layer, layers.POETLinear):
    inject.set_poet_layer(layer, kernel, layer.in_place[...],
                          layer.out_place[...])
  else:
    layer.kernel[...] = kernel


def init_state_from(path: str, setup: train_state.Setup, state: dict,
                    shardings) -> dict:
  """A fresh train state with the checkpoint's weights (see module doc).

  The optimizer state is initialized again for the new parameters; the
  result has `shardings`. Raises ConfigError for an unusable checkpoint.
  """
  model = nnx.merge(setup.graphdef, state['params'], state['frozen'])
  weights = load_weights(path, model.cfg)

  def build(state, weights):
    model = nnx.merge(setup.graphdef, state['params'], state['frozen'])
    blocks = model.blocks
    model.embed.embedding[...] = weights['embed']
    blocks.attention_norm.scale[...] = weights['attention_norm']
    blocks.mlp_norm.scale[...] = weights['mlp_norm']
    model.norm.scale[...] = weights['norm']
    if not model.cfg.tie_embeddings:
      model.lm_head.kernel[...] = weights['lm_head']
    for name in hf_lib.ATTENTION:
      _set_kernel(getattr(blocks.attention, name), weights[name])
    for name in hf_lib.MLP:
      _set_kernel(getattr(blocks.mlp, name), weights[name])
    _, params, frozen = nnx.split(model, nnx.Param, ...)
    params, frozen = nnx.as_pure(params), nnx.as_pure(frozen)
    return {**state, 'params': params, 'frozen': frozen,
            'opt_state': setup.tx.init(params)}

  return jax.jit(build, out_shardings=shardings)(state, weights)
