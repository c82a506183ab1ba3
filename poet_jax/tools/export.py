"""Hugging Face Llama checkpoints: export a run's merged model, import one.

  python -m poet_jax.export --workdir=runs/llama_tiny_poet --out=hf/tiny

writes the model with every POET layer folded into its dense kernel
(W = P_in W0 R_out) as a `transformers` LlamaForCausalLM directory:
config.json and model.safetensors (float32), plus tokenizer.model when the
run used a SentencePiece model. `--config.init_from=DIR` of train.py reads
such a directory back (poet_jax/hf_import.py).

The layouts agree without any reordering of q/k rows: transformers' Linear
weight is the transpose of our (in, out) kernel, and its rotary embedding
turns the pairs (x_i, x_{i + d/2}) of each head (`rotate_half`), as
model.rotary does. Checkpoints converted from Meta's interleaved-pair layout
have already been permuted into that convention by their converter.
"""
import json
import os
import shutil
import sys

import jax
import numpy as np
import safetensors.numpy
from absl import flags
from flax import nnx

from poet_jax import tool_cli as cli
from poet_jax import model as model_lib
from poet_jax import restore
from poet_jax import workdir as workdir_lib

WEIGHTS_FILE = 'model.safetensors'
# Our dense_weights keys -> the module names of a transformers LlamaDecoderLayer.
LAYER_NAMES = {'attention_norm': 'input_layernorm',
               'mlp_norm': 'post_attention_layernorm',
               'q': 'self_attn.q_proj', 'k': 'self_attn.k_proj',
               'v': 'self_attn.v_proj', 'o': 'self_attn.o_proj',
               'gate': 'mlp.gate_proj', 'up': 'mlp.up_proj',
               'down': 'mlp.down_proj'}
KERNELS = restore.ATTENTION + restore.MLP


class HFError(ValueError):
  """A checkpoint directory that cannot be read or written; one line."""


def hf_tensors(weights: dict, tied: bool = False) -> dict[str, np.ndarray]:
  """restore.dense_weights arrays -> transformers' state dict (float32).

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
  """Inverse of hf_tensors: float32 arrays keyed as restore.dense_weights
  (a tied checkpoint's 'lm_head' is its embedding transposed)."""
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


def check_writable(out: str) -> None:
  """`out` is, or can be created as, a writable directory; else HFError.

  Creates nothing (workdir.unwritable).
  """
  problem = workdir_lib.unwritable(out)
  if problem:
    where, why = problem
    raise HFError(f'output directory {out} cannot be written ({where}: '
                  f'{why}); choose another --out')


def export_run(run: restore.Run, out: str) -> None:
  """Write a restored run's merged dense model to `out` (see module doc)."""
  model = run.model
  weights = jax.device_get(nnx.jit(restore.dense_weights)(model))
  tokenizer = run.config.data.tokenizer
  write_checkpoint(out, model.cfg, weights, run.tokenizer.eos_id,
                   run.config.train.seq_len,
                   None if tokenizer == 'byte' else os.path.expanduser(
                       tokenizer))


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'Work directory of a training run.',
                      flag_values=fv, required=True)
  flags.DEFINE_string('out', None, 'Directory to write the Hugging Face '
                      'checkpoint to (created if needed).', flag_values=fv,
                      required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step; default the latest.',
                       flag_values=fv)


def _body(fv: flags.FlagValues) -> int:
  workdir_lib.check_outside_runs(fv.out, '--out')
  check_writable(fv.out)
  run = restore.load_run(fv.workdir, fv.step)
  try:
    export_run(run, fv.out)
  except OSError as e:
    raise HFError(f'output directory {fv.out} cannot be written '
                  f'({e.strerror or e}); choose another --out') from None
  print(f'wrote step {run.step} of {fv.workdir} as a Hugging Face Llama to '
        f'{os.path.abspath(fv.out)}')
  return 0


def main(argv=None) -> int:
  """`python -m poet_jax.export --help`; returns the exit code."""
  return cli.run(__doc__, _define, _body, argv,
                 user_errors=(restore.RunError, HFError))


if __name__ == '__main__':
  sys.exit(main())
