"""The reproduction study's sizes (SCALES) and the settings of its runs.

A run is a dict of config overrides; its work directory is named by the
settings it varies and its seed (run_name), so a run shared by two studies
trains once.
"""
from poet_jax.train import config as config_lib
from poet_jax.train import config_checks

INITS = ('normalized', 'xavier', 'standard', 'uniform_spectrum')
STUDIES = ('compare', 'neumann', 'merge', 'init', 'spectrum',
           'orthogonality', 'diagnostics')

# base: config overrides of every run; adamw_lr, poet_lr: the sweeps;
# base_lr: POET's base-group rates tried at the best poet.lr (the first is
# the one the poet.lr sweep uses); merge_every: T_m (the first is the
# default of the other studies); sweep_seeds: the seeds of the sweeps;
# compare_seeds: of the best POET and AdamW settings; seeds: of every
# ablation; why: the page's reason for the size.
_STUDY_MODEL = {'model.dim': 128, 'model.num_layers': 2, 'model.num_heads': 4,
                'model.ffn_dim': 256, 'train.seq_len': 64,
                'train.batch_size': 16, 'poet.block_size': 64.0,
                'eval_tokens': 16384}
_SEEDS = dict(sweep_seeds=(0, 1, 2), compare_seeds=(0, 1, 2, 3, 4),
              seeds=(0, 1, 2))
_LRS = dict(adamw_lr=(3e-4, 1e-3, 3e-3, 1e-2),
            poet_lr=(3e-3, 6e-3, 1.2e-2, 2.4e-2), base_lr=(1e-2, 3e-3))
SCALES = {
    # About 80 min on 2 quiet cores: 64 runs.
    'study': dict(
        base={**_STUDY_MODEL, 'train.steps': 500, 'eval_every': 50,
              'log_every': 10, 'checkpoint_every': 250},
        merge_every=(100, 10, 25, 250, 500), **_LRS, **_SEEDS,
        why=('The whole study is 64 runs: 9 learning-rate settings at 3 '
             'seeds, 2 more seeds of the best POET and AdamW settings, and '
             '11 ablation settings at 3 seeds. The size was chosen from CPU '
             'times measured beforehand on this machine while it was shared: '
             'a POET run of this model costs '
             'about 16 CPU-s of compiling and 0.18 CPU-s a step, an AdamW run '
             '3 CPU-s and 0.13 CPU-s a step, and one run keeps about 1.7 of '
             'the 2 cores busy: 500 steps a run come to somewhat over an '
             'hour on 2 quiet cores (the measured time is above). Width 128 '
             'with POET-BS b = 64 keeps the papers\' b = half the width, and '
             'is wide enough that width effects (the standard '
             'initialization\'s singular values shrink with width) weigh '
             'less than at 64; two layers and '
             '500 steps rather than four layers and fewer steps, because the '
             'ablations act through the number of merges and the growth of '
             'Q, which need steps more than depth. T_m = 100 gives 5 merges; '
             'the T_m sweep runs from 50 merges (T_m = 10) to none before '
             'the last step (T_m = 500).')),
    # The study's model and seeds in 100-step runs: a check of the whole
    # pipeline on a shared machine (84 min of training at load averages
    # of 3 to 11; about 25 min on 2 quiet cores by the study's figures).
    'quick': dict(
        base={**_STUDY_MODEL, 'train.steps': 100, 'eval_every': 10,
              'log_every': 5, 'checkpoint_every': 100},
        merge_every=(25, 5, 10, 50, 100), **_LRS, **_SEEDS,
        why=('A reduced run of the study\'s model, seeds and settings, in '
             '100-step runs (T_m = 25: 4 merges), to check the whole '
             'pipeline while the machine was shared; 100 steps are far too '
             'few for the papers\' findings, and the full study (`--scale='
             'study`, 500 steps) is the one to read.')),
    # The whole pipeline in minutes (tests/test_experiments.py).
    'smoke': dict(
        base={'model.dim': 32, 'model.num_layers': 2, 'model.num_heads': 2,
              'model.ffn_dim': 64, 'poet.block_size': 8.0,
              'train.batch_size': 4, 'train.seq_len': 32, 'train.steps': 4,
              'eval_tokens': 256, 'eval_every': 2, 'log_every': 1,
              'checkpoint_every': 4},
        adamw_lr=(1e-2,), poet_lr=(1e-2,), base_lr=(1e-2,),
        merge_every=(2, 4), sweep_seeds=(0,), compare_seeds=(0, 1),
        seeds=(0, 1),
        why='A pipeline check: its numbers mean nothing.'),
}
# Every run: one device, one kept checkpoint.
# The papers' method has no guard on ||Q||: the study runs without the
# trainer's default poet.max_q_norm (docs/reproduction.md). The tables
# report the step-0 evaluation of every run.
COMMON = {'mesh.data': 1, 'keep_checkpoints': 1, 'poet.max_q_norm': 0.0,
          'eval_at_start': 'always'}


def run_name(overrides: dict) -> str:
  """The work directory name of a run: the method and the varied settings."""
  o = overrides
  seed = f"_seed{o['seed']}" if o.get('seed') else ''
  if o['optimizer.name'] == 'adamw':
    return f"adamw_lr{o['train.lr']:g}{seed}"
  return (f"poet_lr{o['train.lr']:g}_plr{o['poet.lr']:g}"
          f"_k{o['poet.neumann_terms']}_tm{o['poet.merge_every']}"
          f"_{o['poet.init']}{seed}")


def make_config(base: dict, overrides: dict, common=None):
  """base_config() with COMMON (or `common`), a scale's base overrides and
  the run's, validated."""
  c = config_lib.base_config()
  c.update_from_flattened_dict({**(COMMON if common is None else common),
                                **base, **overrides})
  config_checks.validate(c)
  return c


def poet_run(train_lr, poet_lr, k=3, merge_every=None, init='normalized',
             scale=None) -> dict:
  """Config overrides of a POET-BS run (merge_every None: the scale's)."""
  return {'optimizer.name': 'poet', 'train.lr': train_lr, 'poet.lr': poet_lr,
          'poet.neumann_terms': k,
          'poet.merge_every': merge_every or scale['merge_every'][0],
          'poet.init': init}


def adamw_run(lr) -> dict:
  """Config overrides of an AdamW run (dense layers)."""
  return {'optimizer.name': 'adamw', 'train.lr': lr}


def at_seed(overrides: dict, seed: int) -> dict:
  """The run of `overrides` (a setting) at `seed` (seed 0: the default)."""
  setting = {k: v for k, v in overrides.items() if k != 'seed'}
  return {**setting, 'seed': seed} if seed else setting
