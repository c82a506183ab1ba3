"""Training configuration: the defaults and the paper's model table.

Config files under configs/ are Python (ml_collections), built on
`base_config()`; config_checks.validate checks every key before any heavy
work, and raises ConfigError with one line that names the key and the fix.
"""
import copy
import os

import ml_collections

METHODS = ('poet', 'adamw', 'galore', 'muon')
DTYPES = ('float32', 'bfloat16')
W0_DTYPES = DTYPES + ('int8',)  # int8: POET-XQ, see poet_jax/quant.py
EVAL_AT_START = ('auto', 'always', 'never')
# data.decode_errors: what a directory corpus's bytes that are not UTF-8 text
# do (local_files.decode_text).
DECODE_ERRORS = ('strict', 'replace')
REMAT_POLICIES = ('full', 'products')

# Spec, section 8: hidden, FFN for POET-BS (divides 256), FFN for AdamW/FS,
# heads, layers; and the papers' base learning rate and steps. From 3B on
# the blocks are recomputed in the backward (model.remat): the POET-X
# paper's memory needs it (docs/scaling.md, the H100 table).
MODEL_SIZES = {
    '60m': dict(dim=512, ffn_block=1280, ffn=1376, heads=8, layers=8,
                lr=1e-2, steps=300_000),
    '130m': dict(dim=768, ffn_block=2048, ffn=2048, heads=12, layers=12,
                 lr=5e-3, steps=400_000),
    '350m': dict(dim=1024, ffn_block=2816, ffn=2736, heads=16, layers=24,
                 lr=5e-3, steps=400_000),
    '1b': dict(dim=2048, ffn_block=5376, ffn=5461, heads=32, layers=24,
               lr=1e-3, steps=500_000),
    '3b': dict(dim=2560, ffn_block=7168, ffn=7168, heads=32, layers=32,
               lr=1e-3, steps=600_000, remat=True),
    '8b': dict(dim=4096, ffn_block=14336, ffn=14336, heads=32, layers=32,
               lr=1e-3, steps=600_000, remat=True),
    '13b': dict(dim=5120, ffn_block=13824, ffn=13824, heads=40, layers=40,
                lr=1e-3, steps=600_000, remat=True),
}


class ConfigError(ValueError):
  """A bad configuration value; its message is one line for the user."""


# The defaults of every config file (the tiny default model), one dict per
# section; base_config() builds a ConfigDict of them.
_RUN = {
    'seed': 0,
    'log_every': 10,
    'eval_every': 100,
    'checkpoint_every': 100,
    'keep_checkpoints': 3,
    'eval_tokens': 32 * 1024,  # held-out tokens per evaluation
    'nan_policy': 'skip',      # 'skip' the update or 'stop' the run
    # A Hugging Face Llama checkpoint directory to start from
    # (poet_jax/train/init_from.py): a dense run takes its weights, a POET
    # run its linear weights as W0. '': a random init.
    'init_from': '',
    'eval_at_start': 'auto',   # 'auto', 'always', 'never' (eval_at_start)
    'tensorboard': False,      # also write <workdir>/tensorboard events
}

_MODEL = {
    'dim': 128,
    'num_layers': 4,
    'num_heads': 4,
    'num_kv_heads': 0,          # grouped-query attention; 0: num_heads
    'ffn_dim': 384,             # -1: ffn_dim_block for POET-BS, else _dense
    'ffn_dim_block': 384,       # the spec's POET-BS width (divides 256)
    'ffn_dim_dense': 384,       # the spec's AdamW / POET-FS width
    'vocab_size': 0,            # 0: the tokenizer's vocabulary
    'tie_embeddings': False,    # output head = the embedding transposed
    'rope_theta': 10000.0,      # rotary base (Llama-3: 500000)
    'norm_eps': 1e-6,           # RMSNorm eps (Llama-2/3: 1e-5)
    'dtype': 'float32',         # compute dtype; parameters stay float32
    'w0_dtype': 'float32',      # storage of POET's frozen W0; int8: POET-XQ
    'w0_group_size': 256,       # W0 rows per 8-bit group (w0_dtype=int8)
    'remat': False,
    # With remat: 'full' recomputes the whole block in the backward;
    # 'products' keeps its linear layers' outputs (poet_jax/models/llama.py).
    'remat_policy': 'full',
    # Storage of the parameters AdamW trains: a POET run's embeddings, norms
    # and output head, every parameter of a baseline.
    'param_dtype': 'float32',
    'loss_chunk_tokens': 8192,  # the loss's logits, chunk by chunk; 0: all
}

_TRAIN = {
    'steps': 300,
    'batch_size': 16,       # global, in sequences
    'grad_accum_steps': 1,  # micro-batches per optimizer step
    'seq_len': 128,
    'lr': 1e-2,             # base learning rate (AdamW group)
    'warmup_steps': 0,
    'final_lr_fraction': 0.01,
    'grad_clip': 0.1,       # global norm; 0 disables
    'weight_decay': 0.01,
}

_OPTIMIZER = {
    'name': 'poet',
    'b1': 0.9,
    'b2': 0.999,
    # Adam's first moment, both groups (optax's mu_dtype); 'auto': the
    # compute dtype, model.dtype.
    'mu_dtype': 'auto',
    'galore_rank': 128,
    'galore_update_proj_gap': 200,
    'galore_scale': 0.25,
    'muon_beta': 0.95,
}

_POET = {
    'variant': 'block',
    # An integer for 'block'; for 'full' an integer or a fraction such as 0.5.
    # Stored as a float so that either can be given on the command line.
    'block_size': 32.0,
    'merge_every': 100,
    'neumann_terms': 3,
    'orthogonal_map': 'neumann',
    'compute': 'fast',
    'auto_memory_budget': 0,  # 'auto': elements a layer may keep; 0: any
    'init': 'normalized',
    'lr': 1e-3,
    'scale': 0.5,
    'max_q_norm': 0.9,        # ||Q||_F guard (docs/reliability.md); 0: off
    # Optimizer conventions of POET runs (docs/method.md): 'reference' is the
    # official POET-X code's Adam (eps on the uncorrected sqrt(v), decay after
    # the step) in both groups; 'optax' is optax.adamw / scale_by_adam's.
    'adam_convention': 'reference',
    'eps': 1e-6,              # Adam eps of both groups of a POET run
    # Clipping threshold ramp after each merge (spec section 7): from 0.1x to
    # 1x train.grad_clip over this many steps, during the first clip_ramp_until
    # steps; 0 disables.
    'clip_ramp_steps': 10,
    'clip_ramp_until': 2000,
}

_DATA = {
    'name': 'python_stdlib',  # or a tfds name such as 'c4/en', or a dir
    'data_dir': '',           # '' : ~/.cache/poet_jax/tensorflow_datasets
    'tokenizer': 'byte',      # or a SentencePiece .model path
    'max_tokens': 0,          # cap on tokens read per split; 0: all
    # A directory corpus's bytes that are not UTF-8 text: 'strict' refuses
    # the file, 'replace' reads them as U+FFFD (counted, said at start).
    'decode_errors': 'strict',
}

_MESH = {
    'data': -1,  # -1: every remaining device
    'fsdp': 1,
    'tensor': 1,
}

_DISTRIBUTED = {
    # Several hosts: set these, or leave num_processes at 0 and let
    # jax.distributed.initialize read the launcher's environment (SLURM, ...).
    'coordinator_address': '',  # host:port of process 0
    'num_processes': 1,
    'process_id': 0,
    'cpu_collectives': 'gloo',  # CPU-only clusters and tests
}


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every config file (the tiny default model)."""
  return ml_collections.ConfigDict(copy.deepcopy({
      **_RUN, 'model': _MODEL, 'train': _TRAIN, 'optimizer': _OPTIMIZER,
      'poet': _POET, 'data': _DATA, 'mesh': _MESH,
      'distributed': _DISTRIBUTED}))


def paper_config(size: str) -> ml_collections.ConfigDict:
  """A config of the spec's model table with the papers' hyperparameters."""
  s = MODEL_SIZES[size]
  c = base_config()
  c.model.dim, c.model.num_heads, c.model.num_layers = (s['dim'], s['heads'],
                                                        s['layers'])
  c.model.ffn_dim = -1
  c.model.ffn_dim_block = s['ffn_block']
  c.model.ffn_dim_dense = s['ffn']
  c.model.vocab_size = 32000
  c.train.steps = s['steps']
  c.train.batch_size = 512
  c.train.seq_len = 256
  c.train.lr = s['lr']
  c.model.remat = s.get('remat', False)
  c.poet.block_size = 256.0
  c.poet.merge_every = 400
  c.poet.lr = 1e-3
  c.log_every = 50
  c.eval_every = 2000
  c.checkpoint_every = 2000
  c.eval_tokens = 10_000_000
  c.data.name = 'c4/en'
  return c


def ffn_dim(c) -> int:
  """The FFN width: explicit, or the table's for the method (-1)."""
  if c.model.ffn_dim != -1:
    return c.model.ffn_dim
  block = c.optimizer.name == 'poet' and c.poet.variant == 'block'
  return c.model.ffn_dim_block if block else c.model.ffn_dim_dense


def mu_dtype(c) -> str:
  """optimizer.mu_dtype as stored: 'auto' is the compute dtype."""
  return c.model.dtype if c.optimizer.mu_dtype == 'auto' else (
      c.optimizer.mu_dtype)


def block_size(c):
  """poet.block_size as the layer takes it: an int, or a fraction (full)."""
  b = c.poet.block_size
  if isinstance(b, float) and b.is_integer() and b >= 1:
    return int(b)
  return b


def default_data_dir() -> str:
  return os.path.join(os.path.expanduser('~'), '.cache', 'poet_jax',
                      'tensorflow_datasets')


def flatten(config_json: str) -> dict:
  """Dotted keys of a config serialized with ConfigDict.to_json."""
  import json  # pylint: disable=g-import-not-at-top
  out = {}

  def walk(prefix, node):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(f'{prefix}{k}.', v)
    else:
      out[prefix[:-1]] = node

  walk('', json.loads(config_json))
  return out
