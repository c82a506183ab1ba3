"""What every config key means: the source of `--help` and of README.md's
config-key table (tests/test_readme.py checks that the two agree), so
neither can drift from config.base_config().
"""
import ml_collections

from poet_jax.train import config as config_lib

# One line per key of base_config(), in the order the table shows them.
MEANINGS = {
    'seed': 'model init, data order and merge permutations',
    'log_every': 'steps between metrics lines',
    'eval_every': 'steps between evaluations (and at the end)',
    'eval_at_start': ("evaluate before the first step: `auto` (when the run "
                      'evaluates before its end and one evaluation costs '
                      'less than `eval_every` steps), `always` or `never`'),
    'checkpoint_every': 'steps between checkpoints (and at the end)',
    'keep_checkpoints': 'checkpoints kept',
    'eval_tokens': 'held-out tokens per evaluation, identical for all methods',
    'nan_policy': 'non-finite loss/gradient: `skip` the update, or `stop`',
    'init_from': ('a Hugging Face Llama checkpoint directory to start from '
                  '(see "After training")'),
    'tensorboard': 'also write the metrics as TensorBoard event files to '
                   '`<workdir>/tensorboard`',
    'model.dim': 'model width',
    'model.num_layers': 'transformer blocks',
    'model.num_heads': 'attention heads',
    'model.num_kv_heads': ('key/value heads (grouped-query attention, as '
                           'Llama-3); must divide `num_heads`; 0: '
                           '`num_heads`'),
    'model.ffn_dim': ('SwiGLU width; -1 picks `ffn_dim_block` for POET-BS, '
                      'else `ffn_dim_dense`'),
    'model.ffn_dim_block': "the paper table's FFN width for POET-BS",
    'model.ffn_dim_dense': "the paper table's FFN width for AdamW and POET-FS",
    'model.vocab_size': ("0: the tokenizer's; may be larger (32000 to match "
                         'the papers)'),
    'model.tie_embeddings': ('the output head is the embedding transposed '
                             '(one matrix, as Llama-3.2 1B)'),
    'model.rope_theta': 'rotary embedding base (Llama-3: 500000)',
    'model.norm_eps': 'RMSNorm epsilon (Llama-2 and -3: 1e-5)',
    'model.dtype': ('compute dtype (`bfloat16` possible); parameters stay '
                    'float32'),
    'model.w0_dtype': ("storage of POET's frozen W0 (`bfloat16` halves it; "
                       '`int8` is POET-XQ: 8-bit codes with a scale and zero '
                       'point per group, a quarter; docs/scaling.md)'),
    'model.w0_group_size': ('W0 rows (input features) per 8-bit group for '
                            '`w0_dtype=int8`; must divide `model.dim` and the '
                            'FFN width'),
    'model.remat': 'recompute each block in the backward',
    'model.remat_policy': ('with `remat`: `full` recomputes the whole block; '
                           "`products` keeps its linear layers' outputs (and "
                           "a POET layer's W0 product) and recomputes the "
                           'rest (norms, attention core, activations)'),
    'model.param_dtype': ('storage of the parameters AdamW trains (a POET '
                          "run's embeddings, norms and head; all of a "
                          "baseline's): `bfloat16` halves them and their "
                          'gradients, as the paper\'s all-bfloat16 AdamW'),
    'model.loss_chunk_tokens': ('the output head and cross-entropy run over '
                                'chunks of this many tokens, so the whole '
                                "batch's logits never exist at once; 0: all "
                                'at once'),
    'train.steps': 'optimizer steps; the LR schedule is fixed by this',
    'train.batch_size': 'global batch, in sequences',
    'train.grad_accum_steps': ('micro-batches the batch is split into inside '
                               'one step (same result, less memory; each '
                               'must split over the devices)'),
    'train.seq_len': 'tokens per sequence',
    'train.lr': ('base learning rate (AdamW group; the whole model for '
                 'baselines)'),
    'train.warmup_steps': 'linear warmup, then cosine decay',
    'train.final_lr_fraction': 'the cosine ends at this fraction of the peak',
    'train.grad_clip': 'global gradient-norm clip; 0 disables',
    'train.weight_decay': ('decoupled decay on tensors with 2+ dims (not '
                           'norms, not generators); POET runs apply it after '
                           'the step, as the reference'),
    'optimizer.name': '`poet`, `adamw`, `galore`, `muon`',
    'optimizer.b1': 'Adam beta1 (both groups)',
    'optimizer.b2': 'Adam beta2 (both groups)',
    'optimizer.mu_dtype': ("storage of Adam's first moment (both groups, "
                           "every method; optax's `mu_dtype`): `auto` (the "
                           'compute dtype, `model.dtype`), `float32` or '
                           '`bfloat16`; the second stays float32 (a '
                           "baseline's: its parameters' dtype)"),
    'optimizer.galore_rank': 'GaLore projection rank',
    'optimizer.galore_update_proj_gap': 'steps between GaLore projections',
    'optimizer.galore_scale': 'GaLore update scale',
    'optimizer.muon_beta': 'Muon momentum',
    'poet.variant': '`block` (POET-BS) or `full` (POET-FS)',
    'poet.block_size': ('block size b; for `full` also a fraction (0.5 = '
                        '"b = 1/2")'),
    'poet.merge_every': 'optimizer steps between merges (paper: 400)',
    'poet.neumann_terms': 'Cayley–Neumann terms',
    'poet.orthogonal_map': ('`neumann` (paper), `taylor`, or `exact` (linear '
                            'solve)'),
    'poet.compute': ('`fast`, `mem`, `materialize`, `auto` (cheaper path per '
                     'layer)'),
    'poet.auto_memory_budget': (
        'for `auto`: elements a layer may keep for its backward (`fast` '
        'keeps tokens x out, `materialize` in x out); a path over it is '
        'passed over, `mem` if both are; 0: no limit'),
    'poet.init': ('W0 init: `normalized`, `standard`, `xavier`, '
                  '`uniform_spectrum`'),
    'poet.lr': 'generator learning rate, before `poet.scale`',
    'poet.scale': "explicit factor on the POET step (the reference's 0.5)",
    'poet.max_q_norm': ("keep every block's ‖Q‖_F at most this (below 1 the "
                        'Cayley–Neumann series converges); 0: off'),
    'poet.adam_convention': ('Adam of both groups of a POET run: `reference` '
                             "(the official code's eps placement, decay after "
                             'the step) or `optax` (docs/method.md)'),
    'poet.eps': 'Adam eps of both groups of a POET run',
    'poet.clip_ramp_steps': ('after each merge the clip threshold ramps from '
                             '0.1x to 1x `train.grad_clip` over this many '
                             'steps; 0 disables'),
    'poet.clip_ramp_until': ("the ramp applies during the first this many "
                             "steps (the reference's)"),
    'data.name': ('embedded corpus, a directory of `.txt` files, or a tfds '
                  'name (`c4/en`)'),
    'data.data_dir': ('tfds data and token caches; empty: '
                      '`~/.cache/poet_jax/tensorflow_datasets`'),
    'data.tokenizer': '`byte`, or a SentencePiece `.model` path',
    'data.max_tokens': 'read at most this many tokens per split (0: all)',
    'data.decode_errors': ("a directory corpus's files that are not UTF-8 "
                           'text: `strict` refuses them, `replace` reads each '
                           'such byte sequence as U+FFFD (counted and said)'),
    'mesh.data': 'data-parallel devices; -1 takes the remaining devices',
    'mesh.fsdp': 'devices the parameters and optimizer state are sharded over',
    'mesh.tensor': 'tensor-parallel devices',
    'distributed.coordinator_address': ('host:port of process 0 (several '
                                        'hosts)'),
    'distributed.num_processes': ('processes; 0: from the launcher '
                                  '(SLURM, ...)'),
    'distributed.process_id': 'this process, from 0',
    'distributed.cpu_collectives': ('`gloo` or `mpi`: collectives between '
                                    'CPU-only hosts'),
}


def defaults(c: ml_collections.ConfigDict | None = None) -> dict:
  """{dotted key: value} of a config (default: base_config()), in order."""
  return config_lib.flatten((c or config_lib.base_config()).to_json())


def show(value) -> str:
  """A value as typed on the command line."""
  if isinstance(value, str):
    return repr(value) if not value or ' ' in value else value
  return repr(value)


def help_text(c: ml_collections.ConfigDict | None = None) -> str:
  """Every --config.KEY with its value in c and its meaning, for --help."""
  values = defaults(c)
  width = max(len(k) + len(show(v)) for k, v in values.items()) + 12
  lines = ['Config keys (--config.KEY=VALUE; the values are the chosen '
           "config file's):"]
  for key, value in values.items():
    flag = f'--config.{key}={show(value)}'
    lines.append(f'  {flag:<{width}} {MEANINGS.get(key, "(undocumented)")}')
  return '\n'.join(lines)


def markdown_table() -> str:
  """README.md's config-key table, generated from base_config()."""
  rows = ['| key | default (tiny) | meaning |', '|---|---|---|']
  for key, value in defaults().items():
    shown = f'`{value}`' if isinstance(value, str) and value else (
        "''" if value == '' else show(value))
    rows.append(f'| `{key}` | {shown} | {MEANINGS.get(key, "")} |')
  return '\n'.join(rows)
