"""Training configuration: the defaults, the paper's model table, validation.

Config files under configs/ are Python (ml_collections), built on
`base_config()`; `validate` checks every key before any heavy work, and
raises ConfigError with one line that names the key and the fix.
"""
import math
import os

import ml_collections
from ml_collections import config_dict

METHODS = ('poet', 'adamw', 'galore', 'muon')
DTYPES = ('float32', 'bfloat16')
W0_DTYPES = DTYPES + ('int8',)  # int8: POET-XQ, see poet_jax/quant.py

# Spec, section 8: hidden, FFN for POET-BS (divides 256), FFN for AdamW/FS,
# heads, layers; and the papers' base learning rate and steps.
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
               lr=1e-3, steps=600_000),
    '8b': dict(dim=4096, ffn_block=14336, ffn=14336, heads=32, layers=32,
               lr=1e-3, steps=600_000),
    '13b': dict(dim=5120, ffn_block=13824, ffn=13824, heads=40, layers=40,
                lr=1e-3, steps=600_000),
}


class ConfigError(ValueError):
  """A bad configuration value; its message is one line for the user."""


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every config file (the tiny default model)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.log_every = 10
  c.eval_every = 100
  c.checkpoint_every = 100
  c.keep_checkpoints = 3
  c.eval_tokens = 32 * 1024      # held-out tokens per evaluation
  c.nan_policy = 'skip'          # 'skip' the update or 'stop' the run
  # A Hugging Face Llama checkpoint directory to start from (poet_jax/
  # hf_import.py): a dense run takes its weights, a POET run its linear
  # weights as W0. '': a random init.
  c.init_from = ''

  c.model = ml_collections.ConfigDict()
  c.model.dim = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.ffn_dim = 384          # -1: ffn_dim_block for POET-BS, else _dense
  c.model.ffn_dim_block = 384    # the spec's POET-BS width (divides 256)
  c.model.ffn_dim_dense = 384    # the spec's AdamW / POET-FS width
  c.model.vocab_size = 0         # 0: the tokenizer's vocabulary
  c.model.dtype = 'float32'      # compute dtype; parameters stay float32
  c.model.w0_dtype = 'float32'   # storage of POET's frozen W0; int8: POET-XQ
  c.model.w0_group_size = 256    # W0 rows per 8-bit group (w0_dtype=int8)
  c.model.remat = False
  c.model.loss_chunk_tokens = 8192  # the loss's logits, chunk by chunk; 0: all

  c.train = ml_collections.ConfigDict()
  c.train.steps = 300
  c.train.batch_size = 16        # global, in sequences
  c.train.grad_accum_steps = 1   # micro-batches per optimizer step
  c.train.seq_len = 128
  c.train.lr = 1e-2              # base learning rate (AdamW group)
  c.train.warmup_steps = 0
  c.train.final_lr_fraction = 0.01
  c.train.grad_clip = 0.1        # global norm; 0 disables
  c.train.weight_decay = 0.01

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'poet'
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.galore_rank = 128
  c.optimizer.galore_update_proj_gap = 200
  c.optimizer.galore_scale = 0.25
  c.optimizer.muon_beta = 0.95

  c.poet = ml_collections.ConfigDict()
  c.poet.variant = 'block'
  # An integer for 'block'; for 'full' an integer or a fraction such as 0.5.
  # Stored as a float so that either can be given on the command line.
  c.poet.block_size = 32.0
  c.poet.merge_every = 100
  c.poet.neumann_terms = 3
  c.poet.orthogonal_map = 'neumann'
  c.poet.compute = 'fast'
  c.poet.auto_memory_budget = 0  # 'auto': elements a layer may keep; 0: any
  c.poet.init = 'normalized'
  c.poet.lr = 1e-3
  c.poet.scale = 0.5
  c.poet.max_q_norm = 0.9        # ||Q||_F guard (docs/reliability.md); 0: off
  # Optimizer conventions of POET runs (docs/method.md): 'reference' is the
  # official POET-X code's Adam (eps on the uncorrected sqrt(v), decay after
  # the step) in both groups; 'optax' is optax.adamw / scale_by_adam's.
  c.poet.adam_convention = 'reference'
  c.poet.eps = 1e-6              # Adam eps of both groups of a POET run
  # Clipping threshold ramp after each merge (spec section 7): from 0.1x to
  # 1x train.grad_clip over this many steps, during the first clip_ramp_until
  # steps; 0 disables.
  c.poet.clip_ramp_steps = 10
  c.poet.clip_ramp_until = 2000

  c.data = ml_collections.ConfigDict()
  c.data.name = 'python_stdlib'  # or a tfds name such as 'c4/en', or a dir
  c.data.data_dir = ''           # '' : ~/.cache/poet_jax/tensorflow_datasets
  c.data.tokenizer = 'byte'      # or a SentencePiece .model path
  c.data.max_tokens = 0          # cap on tokens read per split; 0: all

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1               # -1: every remaining device
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  # Several hosts: set these, or leave num_processes at 0 and let
  # jax.distributed.initialize read the launcher's environment (SLURM, ...).
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ''   # host:port of process 0
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  c.distributed.cpu_collectives = 'gloo'   # CPU-only clusters and tests
  return c


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


def _check(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def _choice(key: str, value, choices):
  _check(value in choices,
         f'{key}={value!r} is not one of {", ".join(map(str, choices))}')


def _positive(key: str, value, allow_zero=False):
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
      value >= 0 if allow_zero else value > 0) and math.isfinite(value)
  _check(ok, f'{key}={value!r} must be a {"non-negative" if allow_zero else "positive"} number')


def _leaves(node, prefix: str = '') -> dict:
  """{dotted key: value} of a ConfigDict or dict tree."""
  out = {}
  for key, value in node.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update(_leaves(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _show(value) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + '...'


def _check_keys_and_types(c) -> None:
  """The keys are base_config()'s, each with the type of its default.

  Overrides cannot add keys or change types (the config is locked and typed),
  but a config file can; either way nothing below then meets a value of a
  type it does not expect.
  """
  expected, given = _leaves(base_config()), _leaves(c)
  for key in sorted(given.keys() - expected.keys()):
    raise ConfigError(f'unknown config key {key!r} in the config file; the '
                      'keys are listed in README.md and poet_jax/config.py')
  for key in sorted(expected.keys() - given.keys()):
    raise ConfigError(f'config key {key!r} is missing; build config files '
                      'on poet_jax.config.base_config()')
  for key, default in expected.items():
    value = given[key]
    if isinstance(default, bool):
      ok, kind = isinstance(value, bool), 'True or False'
    elif isinstance(default, int):
      ok = (isinstance(value, int) and not isinstance(value, bool) and
            abs(value) < 2**31)
      kind = 'an integer below 2**31'
    elif isinstance(default, float):
      ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))
      kind = 'a finite number'
    elif isinstance(default, str):
      ok, kind = isinstance(value, str), 'a string'
    else:
      continue
    _check(ok, f'{key}={_show(value)} must be {kind}')


def _check_paths(c) -> None:
  """Files and directories named by the config exist (cheap, before work)."""
  tokenizer = c.data.tokenizer
  if tokenizer != 'byte':
    path = os.path.expanduser(tokenizer)
    _check(os.path.isfile(path),
           f'data.tokenizer={_show(tokenizer)}: no such file; set it to a '
           "SentencePiece .model file or to 'byte'")
  name = c.data.name
  if name.startswith(('/', '.', '~')):
    _check(os.path.isdir(os.path.expanduser(name)),
           f'data.name={_show(name)}: no such directory; pass a directory of '
           ".txt files, 'python_stdlib', or a tfds dataset name")
  if c.data.data_dir:
    path = os.path.expanduser(c.data.data_dir)
    _check(not os.path.exists(path) or os.path.isdir(path),
           f'data.data_dir={_show(c.data.data_dir)} is not a directory')
  if c.init_from:  # sizes included: before train.py writes anything
    from poet_jax import hf_import  # pylint: disable=g-import-not-at-top
    hf_import.check_init_from(c)


def validate(c: ml_collections.ConfigDict) -> None:
  """Check every key; raise ConfigError (one line) on the first bad one."""
  _check_keys_and_types(c)
  for key in ('log_every', 'eval_every', 'checkpoint_every',
              'keep_checkpoints', 'eval_tokens', 'model.dim',
              'model.num_layers', 'model.num_heads', 'train.steps',
              'train.batch_size', 'train.seq_len', 'poet.merge_every',
              'train.grad_accum_steps'):
    value = _get(c, key)
    _check(isinstance(value, int) and not isinstance(value, bool) and
           value > 0, f'{key}={value!r} must be a positive integer')
  for key in ('train.lr', 'poet.lr', 'poet.scale'):
    _positive(key, _get(c, key))
  for key in ('train.grad_clip', 'train.weight_decay', 'poet.max_q_norm'):
    _positive(key, _get(c, key), allow_zero=True)
  _check(c.train.batch_size % c.train.grad_accum_steps == 0,
         f'train.batch_size={c.train.batch_size} is not divisible by '
         f'train.grad_accum_steps={c.train.grad_accum_steps}; the batch is '
         'split into that many equal micro-batches')
  _check(isinstance(c.poet.auto_memory_budget, int) and
         not isinstance(c.poet.auto_memory_budget, bool) and
         c.poet.auto_memory_budget >= 0,
         f'poet.auto_memory_budget={c.poet.auto_memory_budget!r} must be an '
         'integer >= 0 (elements; 0: no limit)')
  _check(isinstance(c.train.warmup_steps, int) and
         0 <= c.train.warmup_steps < c.train.steps,
         f'train.warmup_steps={c.train.warmup_steps!r} must be an integer in '
         f'[0, train.steps={c.train.steps})')
  _check(0 <= c.train.final_lr_fraction <= 1,
         f'train.final_lr_fraction={c.train.final_lr_fraction!r} must be in '
         '[0, 1]')
  for key in ('optimizer.b1', 'optimizer.b2', 'optimizer.muon_beta'):
    value = _get(c, key)
    _check(0 <= value < 1, f'{key}={value!r} must be in [0, 1)')
  _choice('optimizer.name', c.optimizer.name, METHODS)
  _choice('nan_policy', c.nan_policy, ('skip', 'stop'))
  _choice('model.dtype', c.model.dtype, DTYPES)
  _choice('model.w0_dtype', c.model.w0_dtype, W0_DTYPES)
  _choice('poet.variant', c.poet.variant, ('block', 'full'))
  _choice('poet.compute', c.poet.compute,
          ('fast', 'mem', 'materialize', 'auto'))
  _choice('poet.init', c.poet.init,
          ('normalized', 'standard', 'xavier', 'uniform_spectrum'))
  _choice('poet.orthogonal_map', c.poet.orthogonal_map,
          ('neumann', 'taylor', 'exact'))
  _choice('poet.adam_convention', c.poet.adam_convention,
          ('reference', 'optax'))
  _positive('poet.eps', c.poet.eps)
  for key in ('poet.clip_ramp_steps', 'poet.clip_ramp_until'):
    value = _get(c, key)
    _check(isinstance(value, int) and value >= 0,
           f'{key}={value!r} must be an integer >= 0 (0 disables the ramp)')
  _check(isinstance(c.poet.neumann_terms, int) and
         0 <= c.poet.neumann_terms <= 8,
         f'poet.neumann_terms={c.poet.neumann_terms!r} must be an integer '
         'from 0 to 8')
  _check(c.model.vocab_size == 0 or (isinstance(c.model.vocab_size, int)
                                     and c.model.vocab_size > 0),
         f'model.vocab_size={c.model.vocab_size!r} must be 0 (the '
         "tokenizer's) or a positive integer")
  _check(c.model.dim % c.model.num_heads == 0 and
         (c.model.dim // c.model.num_heads) % 2 == 0,
         f'model.dim={c.model.dim} must be a multiple of model.num_heads='
         f'{c.model.num_heads} with an even head size (rotary embeddings)')
  width = ffn_dim(c)
  _check(isinstance(width, int) and width > 0,
         f'model.ffn_dim={width!r} must be a positive integer (or -1)')
  if c.optimizer.name == 'poet':
    _check_poet_sizes(c, width)
    if c.model.w0_dtype == 'int8':
      _check_w0_groups(c, width)
  for key in ('data.name', 'data.tokenizer'):
    _check(isinstance(_get(c, key), str) and _get(c, key),
           f'{key} must be a non-empty string')
  _positive('data.max_tokens', c.data.max_tokens, allow_zero=True)
  d = c.distributed
  _check(isinstance(d.num_processes, int) and d.num_processes >= 0,
         f'distributed.num_processes={d.num_processes!r} must be a '
         'non-negative integer (0: from the launcher environment)')
  _check(isinstance(d.process_id, int) and
         0 <= d.process_id < max(d.num_processes, 1),
         f'distributed.process_id={d.process_id!r} must be in '
         f'[0, distributed.num_processes={d.num_processes})')
  if d.num_processes > 1:
    _check(':' in d.coordinator_address,
           f'distributed.coordinator_address={d.coordinator_address!r} must '
           'be host:port of process 0 when num_processes > 1')
  _choice('distributed.cpu_collectives', d.cpu_collectives, ('gloo', 'mpi'))
  for axis in ('data', 'fsdp', 'tensor'):
    value = c.mesh[axis]
    _check(isinstance(value, int) and (value == -1 or value > 0),
           f'mesh.{axis}={value!r} must be a positive integer or -1')
  _check(0 <= c.seed, f'seed={c.seed!r} must be a non-negative integer')
  for key in ('optimizer.galore_rank', 'optimizer.galore_update_proj_gap',
              'model.ffn_dim_block', 'model.ffn_dim_dense'):
    _check(_get(c, key) > 0, f'{key}={_get(c, key)!r} must be a positive '
           'integer')
  _positive('optimizer.galore_scale', c.optimizer.galore_scale)
  _check(c.model.loss_chunk_tokens >= 0,
         f'model.loss_chunk_tokens={c.model.loss_chunk_tokens!r} must be an '
         'integer >= 0 (0: the whole batch at once)')
  _check(c.model.ffn_dim == -1 or c.model.ffn_dim > 0,
         f'model.ffn_dim={c.model.ffn_dim!r} must be a positive integer or -1')
  _check_paths(c)


def block_size(c):
  """poet.block_size as the layer takes it: an int, or a fraction (full)."""
  b = c.poet.block_size
  if isinstance(b, float) and b.is_integer() and b >= 1:
    return int(b)
  return b


def _check_poet_sizes(c, width: int) -> None:
  b = block_size(c)
  _check(isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0,
         f'poet.block_size={b!r} must be a positive number')
  if c.poet.variant == 'block':
    _check(isinstance(b, int) and b >= 1,
           f'poet.block_size={b!r} must be a whole number for '
           "poet.variant='block'")
    common = math.gcd(c.model.dim, width)
    divisors = [d for d in range(2, common + 1) if common % d == 0]
    hint = max([d for d in divisors if d <= b] or divisors or [1])
    for name, size in (('model.dim', c.model.dim), ('FFN width', width)):
      _check(size % b == 0,
             f'poet.block_size={b} does not divide {name}={size}; choose a '
             f'block size that divides both widths, such as {hint}')
  else:
    ok = (isinstance(b, float) and 0 < b <= 1) or (
        isinstance(b, int) and 0 < b <= min(c.model.dim, width))
    _check(ok, f'poet.block_size={b!r} must be a fraction in (0, 1] or an '
           "integer no larger than the smallest width for poet.variant='full'")


def _check_w0_groups(c, width: int) -> None:
  """The 8-bit groups of W0 run along every POET layer's input dimension."""
  g = c.model.w0_group_size
  _check(isinstance(g, int) and g > 0,
         f'model.w0_group_size={g!r} must be a positive integer')
  common = math.gcd(c.model.dim, width)
  hint = max(d for d in range(1, min(g, common) + 1) if common % d == 0)
  for name, size in (('model.dim', c.model.dim), ('FFN width', width)):
    _check(size % g == 0,
           f'model.w0_group_size={g} does not divide {name}={size} (the '
           'input width of POET layers); choose a group size that divides '
           f'both widths, such as {hint}')


def _get(c, dotted: str):
  for part in dotted.split('.'):
    c = c[part]
  return c


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
