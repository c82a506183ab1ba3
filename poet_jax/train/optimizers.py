"""Which optimizer a config means: POET or a baseline (AdamW, GaLore, Muon),
its learning-rate schedules, and the rates it applies at a step."""
import jax
import jax.numpy as jnp
import optax

from poet_jax import clipping
from poet_jax import optim
from poet_jax import reparam
from poet_jax.train import config as config_lib


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
  the denominator) with the threshold ramp after each merge, all inside
  `reparam.reparameterize`, which owns the generators, the Cayley–Neumann
  map (poet.orthogonal_map, poet.neumann_terms), the ||Q|| guard
  (poet.max_q_norm) and the merge counter (poet.merge_every). Baselines use
  optax's AdamW, GaLore and Muon, as their own references do.
  """
  lr = schedule(c, c.train.lr)
  o, wd = c.optimizer, c.train.weight_decay
  mu_dtype = jnp.dtype(config_lib.mu_dtype(c))
  if o.name == 'poet':
    p = c.poet
    tx = optim.poet(lr, schedule(c, p.lr), poet_scale=p.scale, b1=o.b1,
                    b2=o.b2, eps=p.eps, weight_decay=wd, poet_b1=o.b1,
                    poet_b2=o.b2, poet_eps=p.eps,
                    adam_convention=p.adam_convention, mu_dtype=mu_dtype)
    if c.train.grad_clip:
      limit = clipping.post_merge_clip_ramp(
          c.train.grad_clip, p.merge_every, ramp_steps=p.clip_ramp_steps,
          until_step=p.clip_ramp_until)
      tx = optax.chain(clipping.clip_by_global_norm(limit), tx)
    return reparam.reparameterize(
        tx, num_terms=p.neumann_terms, orthogonal_map=p.orthogonal_map,
        merge_every=p.merge_every, max_q_norm=p.max_q_norm or None)
  if o.name == 'adamw':
    tx = optax.adamw(lr, o.b1, o.b2, mu_dtype=mu_dtype, weight_decay=wd,
                     mask=optim.decay_mask)
  elif o.name == 'muon':
    # Muon on the stacked block kernels (L, in, out); Adam on the rest.
    dims = lambda params: jax.tree_util.tree_map_with_path(
        lambda p, x: optax.contrib.MuonDimensionNumbers(1, 2)
        if _is_block_kernel(p, x) else None, params)
    # Decay on both parts, unmasked, as the reference trainer's Muon groups.
    tx = optax.contrib.muon(lr, beta=o.muon_beta, weight_decay=wd,
                            adam_weight_decay=wd, adam_b1=o.b1, adam_b2=o.b2,
                            mu_dtype=mu_dtype,
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
            base_optimizer=optax.scale_by_adam(o.b1, o.b2,
                                               mu_dtype=mu_dtype)),
            stacked=_is_block_kernel),
        'adamw': optax.adamw(lr, o.b1, o.b2, mu_dtype=mu_dtype,
                             weight_decay=wd, mask=optim.decay_mask),
    }, labels)
  else:
    raise config_lib.ConfigError(f'unknown optimizer.name {o.name!r}')
  if c.train.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(c.train.grad_clip), tx)
  return tx


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
