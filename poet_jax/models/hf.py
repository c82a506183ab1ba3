"""The Hugging Face format of the Llama: transformers' LlamaForCausalLM.

A directory holds config.json and model.safetensors (or shards named by
model.safetensors.index.json). Here is the mapping between it and a model's
dense weights, both ways, and the reading and writing of its files; the
export tool (poet_jax.tools.export) writes a run's merged model with it and
`--config.init_from` (poet_jax.train.init_from) starts a run from one.

A model's dense weights (poet_jax.tools.restore.dense_weights) are float32
arrays keyed 'embed' (V, D); per layer, stacked on a leading axis L:
'attention_norm', 'mlp_norm' (L, D) and the kernels of ATTENTION and MLP
(L, in, out), with layer(x) == x @ kernel; 'norm' (D,), 'lm_head' (D, V)
(the embedding transposed when tied).

The layouts agree without any reordering of q/k rows: transformers' Linear
weight is the transpose of our (in, out) kernel, and its rotary embedding
turns the pairs (x_i, x_{i + d/2}) of each head (`rotate_half`), as
llama.rotary does. Checkpoints converted from Meta's interleaved-pair layout
have already been permuted into that convention by their converter.
"""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from poet_jax.models import llama as model_lib

# The projections of a block: its attention's and its MLP's.
ATTENTION = ('q', 'k', 'v', 'o')
MLP = ('gate', 'up', 'down')
KERNELS = ATTENTION + MLP
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# Dense weights' keys -> the module names of a transformers LlamaDecoderLayer.
LAYER_NAMES = {'attention_norm': 'input_layernorm',
               'mlp_norm': 'post_attention_layernorm',
               'q': 'self_attn.q_proj', 'k': 'self_attn.k_proj',
               'v': 'self_attn.v_proj', 'o': 'self_attn.o_proj',
               'gate': 'mlp.gate_proj', 'up': 'mlp.up_proj',
               'down': 'mlp.down_proj'}


class HFError(ValueError):
  """A checkpoint directory that cannot be read or written; one line."""


def hf_tensors(weights: dict, tied: bool = False) -> dict[str, np.ndarray]:
  """Dense weights (module docstring) -> transformers' state dict (float32).

  Linear weights are (out, in): our kernels transposed. A tied head
  (`tied`) is the embedding and has no tensor of its own, as transformers
  saves it.
  """
  w = {k: np.asarray(v, np.float32) for k, v in weights.items()}
  out = {'model.embed_tokens.weight': w['embed'],
         'model.norm.weight': w['norm']}
  if not tied:
    out['lm_head.weight'] = w['lm_head'].T
  for i in range(w['q'].shape[0]):
    for ours, theirs in LAYER_NAMES.items():
      out[f'model.layers.{i}.{theirs}.weight'] = (
          w[ours][i].T if ours in KERNELS else w[ours][i])
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def expected_shapes(cfg: model_lib.LlamaConfig) -> dict[str, tuple]:
  """Name -> shape of every tensor of a transformers Llama of cfg's sizes
  (no lm_head.weight when the head is tied)."""
  d, f, v = cfg.dim, cfg.ffn_dim, cfg.vocab_size
  kv = cfg.kv_heads * cfg.head_dim
  per_layer = {'attention_norm': (d,), 'mlp_norm': (d,), 'q': (d, d),
               'k': (kv, d), 'v': (kv, d), 'o': (d, d), 'gate': (f, d),
               'up': (f, d), 'down': (d, f)}
  out = {'model.embed_tokens.weight': (v, d), 'model.norm.weight': (d,)}
  if not cfg.tie_embeddings:
    out['lm_head.weight'] = (v, d)
  for i in range(cfg.num_layers):
    for ours, theirs in LAYER_NAMES.items():
      out[f'model.layers.{i}.{theirs}.weight'] = per_layer[ours]
  return out


def weights_from_hf(tensors: dict, cfg: model_lib.LlamaConfig) -> dict:
  """Inverse of hf_tensors: dense weights (module docstring; a tied
  checkpoint's 'lm_head' is its embedding transposed)."""
  get = lambda name: np.asarray(tensors[name], np.float32)
  head = 'lm_head.weight' if 'lm_head.weight' in tensors else (
      'model.embed_tokens.weight')
  out = {'embed': get('model.embed_tokens.weight'),
         'norm': get('model.norm.weight'),
         'lm_head': get(head).T}
  for ours, theirs in LAYER_NAMES.items():
    stack = [get(f'model.layers.{i}.{theirs}.weight')
             for i in range(cfg.num_layers)]
    out[ours] = np.stack([s.T if ours in KERNELS else s for s in stack])
  return out


def hf_config(cfg: model_lib.LlamaConfig, eos_id: int,
              max_positions: int) -> dict:
  """transformers' LlamaConfig (config.json) of a poet_jax model."""
  return {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.dim,
      'intermediate_size': cfg.ffn_dim, 'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.kv_heads, 'head_dim': cfg.head_dim,
      'hidden_act': 'silu', 'max_position_embeddings': max_positions,
      'rms_norm_eps': cfg.norm_eps, 'rope_theta': cfg.rope_theta,
      'rope_scaling': None, 'attention_bias': False, 'mlp_bias': False,
      'tie_word_embeddings': cfg.tie_embeddings, 'torch_dtype': 'float32',
      # EOS separates documents in training, so it also starts one.
      'bos_token_id': eos_id, 'eos_token_id': eos_id,
      'initializer_range': 0.02, 'use_cache': True,
  }


def _atomic_write(path: str, write) -> None:
  """write(tmp) then rename to path: no half-written file under its name."""
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    write(tmp)
    # safetensors creates its file private (0600); give it the usual mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_checkpoint(out: str, cfg: model_lib.LlamaConfig, weights: dict,
                     eos_id: int, max_positions: int,
                     tokenizer_path: str | None = None) -> None:
  """config.json, model.safetensors (and tokenizer.model) into `out`.

  Each file is written to a temporary name and renamed, so a failure leaves
  no half-written file. The bytes depend only on the arguments.
  """
  os.makedirs(out, exist_ok=True)
  text = json.dumps(hf_config(cfg, eos_id, max_positions), indent=2,
                    sort_keys=True) + '\n'
  tensors = hf_tensors(weights, cfg.tie_embeddings)
  _atomic_write(os.path.join(out, WEIGHTS_FILE),
                lambda p: safetensors.numpy.save_file(
                    tensors, p, metadata={'format': 'pt'}))
  if tokenizer_path:
    _atomic_write(os.path.join(out, 'tokenizer.model'),
                  lambda p: shutil.copyfile(tokenizer_path, p))
    tok = {'tokenizer_class': 'LlamaTokenizer', 'add_bos_token': False,
           'add_eos_token': False}
    _atomic_write(os.path.join(out, 'tokenizer_config.json'),
                  lambda p: _write_text(p, json.dumps(tok, indent=2) + '\n'))
  _atomic_write(os.path.join(out, 'config.json'),
                lambda p: _write_text(p, text))


def _write_text(path: str, text: str) -> None:
  with open(path, 'w') as f:
    f.write(text)


def read_config(path: str) -> dict:
  """config.json of a Llama checkpoint directory; HFError when it is none."""
  file = os.path.join(path, 'config.json')
  if not os.path.isdir(path):
    raise HFError('no such directory; give a Hugging Face Llama checkpoint '
                  'directory (python -m poet_jax.export writes one)')
  try:
    with open(file) as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:
    raise HFError(f'config.json cannot be read ({e}); is it a Hugging Face '
                  'checkpoint directory?') from None
  if (not isinstance(hf, dict) or hf.get('model_type') != 'llama' or
      'LlamaForCausalLM' not in hf.get('architectures', ['LlamaForCausalLM'])):
    kind = hf.get('model_type') if isinstance(hf, dict) else None
    raise HFError(f'not a Llama checkpoint (model_type={kind!r}); only '
                  'LlamaForCausalLM checkpoints can be imported')
  return hf


def tensor_files(path: str) -> dict[str, str]:
  """Tensor name -> the safetensors file of directory `path` holding it;
  HFError when there is none or it cannot be read."""
  single = os.path.join(path, WEIGHTS_FILE)
  index = os.path.join(path, INDEX_FILE)
  try:
    if os.path.isfile(single):
      with safe_open(single, framework='numpy') as f:
        return {name: single for name in f.keys()}
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)['weight_map']
      return {k: os.path.join(path, v) for k, v in weight_map.items()}
  except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
    raise HFError(f'the safetensors files cannot be read ({e})') from None
  raise HFError(f'no {WEIGHTS_FILE} or {INDEX_FILE}; only safetensors '
                'checkpoints can be imported')


def tensor_shapes(files: dict[str, str]) -> dict[str, tuple]:
  """Name -> shape of every tensor of the files (their headers only)."""
  shapes = {}
  try:
    for file in sorted(set(files.values())):
      with safe_open(file, framework='numpy') as f:
        for name in f.keys():
          shapes[name] = tuple(f.get_slice(name).get_shape())
  except (OSError, ValueError, SafetensorError) as e:
    raise HFError(f'the safetensors files cannot be read ({e})') from None
  return shapes


def read_tensors(files: dict[str, str], names) -> dict[str, np.ndarray]:
  """The tensors `names` (those the files hold) as float32 arrays."""
  tensors = {}
  for name in names:
    if name not in files:   # a tied head
      continue
    # framework='flax' reads bfloat16 too; float32 is copied exactly.
    with safe_open(files[name], framework='flax') as f:
      tensors[name] = np.asarray(f.get_tensor(name).astype(jnp.float32))
  return tensors
