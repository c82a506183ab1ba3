"""Validation of a training configuration (config.py's keys): `validate`
checks every key before any heavy work and raises config.ConfigError with
one line that names the key and the fix."""
import math
import os

import ml_collections

from poet_jax.train import config as config_lib


def _check(ok: bool, message: str):
  if not ok:
    raise config_lib.ConfigError(message)


def _choice(key: str, value, choices):
  _check(value in choices,
         f'{key}={value!r} is not one of {", ".join(map(str, choices))}')


def _positive(key: str, value, allow_zero=False):
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
      value >= 0 if allow_zero else value > 0) and math.isfinite(value)
  kind = 'non-negative' if allow_zero else 'positive'
  _check(ok, f'{key}={value!r} must be a {kind} number')


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
  expected, given = _leaves(config_lib.base_config()), _leaves(c)
  for key in sorted(given.keys() - expected.keys()):
    raise config_lib.ConfigError(
        f'unknown config key {key!r} in the config file; the keys are '
        'listed in README.md and poet_jax/train/config.py')
  for key in sorted(expected.keys() - given.keys()):
    raise config_lib.ConfigError(
        f'config key {key!r} is missing; build config files on '
        'poet_jax.train.config.base_config()')
  for key, default in expected.items():
    value = given[key]
    if isinstance(default, bool):
      ok, kind = isinstance(value, bool), 'True or False'
    elif isinstance(default, int):
      # Token counts at C4 scale pass 2**31; other integers stay below it.
      limit = 2**63 if key == 'data.max_tokens' else 2**31
      ok = (isinstance(value, int) and not isinstance(value, bool) and
            abs(value) < limit)
      kind = f'an integer below 2**{limit.bit_length() - 1}'
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
    from poet_jax.train import init_from  # pylint: disable=g-import-not-at-top
    init_from.check_init_from(c)



def validate(c: ml_collections.ConfigDict) -> None:
  """Check every key; raise ConfigError (one line) on the first bad one."""
  _check_keys_and_types(c)
  _check_numbers(c)
  _check_choices(c)
  _check_model(c)
  _check_data_and_devices(c)
  _check_other_sizes(c)
  _check_paths(c)


def _check_numbers(c) -> None:
  """Counts, rates and coefficients are in range."""
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


def _check_choices(c) -> None:
  """Every key with named values holds one of them; POET's Adam and maps."""
  _choice('optimizer.name', c.optimizer.name, config_lib.METHODS)
  _choice('nan_policy', c.nan_policy, ('skip', 'stop'))
  _choice('eval_at_start', c.eval_at_start, config_lib.EVAL_AT_START)
  _choice('model.dtype', c.model.dtype, config_lib.DTYPES)
  _choice('model.w0_dtype', c.model.w0_dtype, config_lib.W0_DTYPES)
  _choice('model.param_dtype', c.model.param_dtype, config_lib.DTYPES)
  _choice('optimizer.mu_dtype', c.optimizer.mu_dtype,
          ('auto',) + config_lib.DTYPES)
  _choice('model.remat_policy', c.model.remat_policy,
          config_lib.REMAT_POLICIES)
  _check(c.model.remat or c.model.remat_policy == 'full',
         f'model.remat_policy={c.model.remat_policy} takes effect with '
         'model.remat=True; set --config.model.remat=True too')
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


def _check_model(c) -> None:
  """The model's sizes fit together (and POET's blocks and 8-bit groups)."""
  _check(c.model.vocab_size == 0 or (isinstance(c.model.vocab_size, int)
                                     and c.model.vocab_size > 0),
         f'model.vocab_size={c.model.vocab_size!r} must be 0 (the '
         "tokenizer's) or a positive integer")
  _check(c.model.dim % c.model.num_heads == 0 and
         (c.model.dim // c.model.num_heads) % 2 == 0,
         f'model.dim={c.model.dim} must be a multiple of model.num_heads='
         f'{c.model.num_heads} with an even head size (rotary embeddings)')
  kv = c.model.num_kv_heads
  _check(kv == 0 or (kv > 0 and c.model.num_heads % kv == 0),
         f'model.num_kv_heads={kv!r} must divide model.num_heads='
         f'{c.model.num_heads} (grouped-query attention), or be 0 (as many '
         'as num_heads)')
  _positive('model.rope_theta', c.model.rope_theta)
  _positive('model.norm_eps', c.model.norm_eps)
  width = config_lib.ffn_dim(c)
  _check(isinstance(width, int) and width > 0,
         f'model.ffn_dim={width!r} must be a positive integer (or -1)')
  if c.optimizer.name == 'poet':
    _check_poet_sizes(c, width)
    if c.model.w0_dtype == 'int8':
      _check_w0_groups(c, width)


def _check_data_and_devices(c) -> None:
  """The data keys, the processes and the mesh."""
  for key in ('data.name', 'data.tokenizer'):
    _check(isinstance(_get(c, key), str) and _get(c, key),
           f'{key} must be a non-empty string')
  _positive('data.max_tokens', c.data.max_tokens, allow_zero=True)
  _choice('data.decode_errors', c.data.decode_errors,
          config_lib.DECODE_ERRORS)
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


def _check_other_sizes(c) -> None:
  """The baselines' sizes, the table widths and the loss's chunks."""
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


def _check_poet_sizes(c, width: int) -> None:
  b = config_lib.block_size(c)
  _check(isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0,
         f'poet.block_size={b!r} must be a positive number')
  # A block of 1 is the identity for ever: b(b-1)/2 = 0 generators to learn.
  one = (f'poet.block_size={b!r} gives blocks of 1, which have no rotation '
         'to learn (b(b-1)/2 = 0 generators); use blocks of 2 or more')
  if c.poet.variant == 'block':
    _check(isinstance(b, int) and b >= 1,
           f'poet.block_size={b!r} must be a whole number for '
           "poet.variant='block'")
    _check(b >= 2, one)
    kv_width = c.model.dim // c.model.num_heads * (
        c.model.num_kv_heads or c.model.num_heads)
    common = math.gcd(c.model.dim, width, kv_width)
    divisors = [d for d in range(2, common + 1) if common % d == 0]
    hint = max([d for d in divisors if d <= b] or divisors or [1])
    for name, size in (('model.dim', c.model.dim), ('FFN width', width),
                       ('the key/value width', kv_width)):
      _check(size % b == 0,
             f'poet.block_size={b} does not divide {name}={size}; choose a '
             f'block size that divides every width, such as {hint}')
  else:
    ok = (isinstance(b, float) and 0 < b <= 1) or (
        isinstance(b, int) and 0 < b <= min(c.model.dim, width))
    _check(ok, f'poet.block_size={b!r} must be a fraction in (0, 1] or an '
           "integer no larger than the smallest width for poet.variant='full'")
    smallest = min(c.model.dim, width)
    _check((round(b * smallest) if isinstance(b, float) else b) >= 2, one)


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
