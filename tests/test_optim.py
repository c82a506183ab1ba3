import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from poet_jax import clipping
from poet_jax import optim
import tolerance

# Roundings of one Adam update, relative to it: the moments, the bias
# corrections, the root and the division.
ADAM = 10


def bias_conditioning(t: int, b2: float = 0.999) -> float:
  """How much 1 - b2^t in float32 magnifies the rounding of b2^t (999 at
  t = 1); the square root halves it in the update."""
  return 0.5 * b2**t / (1 - b2**t)


def adam_terms(lr: float, steps: int) -> float:
  """Roundings of parameters of size 1 after `steps` float32 Adam steps of
  rate lr, in units of eps: one for each p - u, and ADAM plus the bias
  correction's conditioning on each update, at most lr sqrt(t)."""
  return sum(1 + lr * np.sqrt(t) * (ADAM + bias_conditioning(t))
             for t in range(1, steps + 1))


def tiny_params():
  """A POET layer's generators, as reparameterize hands them to its inner
  optimizer, plus a dense kernel and a norm scale."""
  return nnx.State({
      'q': {'in_blocks': nnx.Param(jnp.ones((2, 6))),
            'out_blocks': nnx.Param(jnp.ones((3, 6)))},
      'head': {'kernel': nnx.Param(jnp.ones((4, 5)))},
      'norm': {'scale': nnx.Param(jnp.ones((4,)))},
  })


def grads_like(params, seed):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
      tree, [jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])


def test_labels_route_generators_to_poet():
  labels = optim.poet_param_labels(tiny_params())
  assert labels['q']['in_blocks'] == 'poet'
  assert labels['q']['out_blocks'] == 'poet'
  assert optim.poet_param_labels(nnx.as_pure(tiny_params()))['q']['in_blocks'] == 'poet'
  assert labels['head']['kernel'] == 'base'
  assert labels['norm']['scale'] == 'base'


def test_optax_convention_is_optax_adam_times_scale():
  params = {'q': jnp.zeros((3, 6))}
  ours = optim.scale_by_poet(eps=1e-6, scale=0.5, convention='optax')
  ref = optax.scale_by_adam(eps=1e-6)
  s1, s2 = ours.init(params), ref.init(params)
  for seed in range(4):
    g = grads_like(params, seed)
    u1, s1 = ours.update(g, s1)
    u2, s2 = ref.update(g, s2)
    # optax computes 1 - b2**t in float32 (1.3e-5 off at t = 1 here); ours
    # avoids that cancellation.
    tolerance.assert_close(u1['q'], 0.5 * u2['q'],
                           ADAM + bias_conditioning(seed + 1))


def reference_adam(grads, lr, b1=0.9, b2=0.999, eps=1e-6, wd=0.0):
  """The official code's POETAdamW update, in float64 NumPy (spec section 7):
  p <- p - lr sqrt(1-b2^t)/(1-b1^t) m/(sqrt(v)+eps), then p <- p - lr wd p."""
  p = np.ones_like(grads[0], dtype=np.float64)
  m, v = np.zeros_like(p), np.zeros_like(p)
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
    p = p - lr * wd * p
  return p


def test_reference_convention_matches_the_reference_update():
  """Small gradients (RMS 1e-4, as after clipping) are where eps placement
  shows: the optax convention's first step is ~1.4x larger there."""
  params = tiny_params()
  grads = [jax.tree.map(lambda g: 1e-4 * g, grads_like(params, s))
           for s in range(5)]
  tx = optim.poet(1e-2, 1e-3, poet_scale=0.5, weight_decay=0.1)
  p = jax.tree.map(jnp.ones_like, params)
  state = tx.init(p)
  for g in grads:
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
  leaf = lambda tree, *keys: [np.asarray(t[keys[0]][keys[1]][...])
                              for t in tree]
  tolerance.assert_close(
      p['q']['in_blocks'][...],
      reference_adam(leaf(grads, 'q', 'in_blocks'), 5e-4), adam_terms(5e-4, 5))
  tolerance.assert_close(
      p['head']['kernel'][...],
      reference_adam(leaf(grads, 'head', 'kernel'), 1e-2, wd=0.1),
      adam_terms(1e-2, 5) + 5)  # + the decay's product and difference
  tolerance.assert_close(
      p['norm']['scale'][...],
      reference_adam(leaf(grads, 'norm', 'scale'), 1e-2), adam_terms(1e-2, 5))
  # The optax convention's effective eps is smaller by sqrt(1 - b2^t): at
  # t = 1 and this gradient scale its generator step is clearly larger.
  def first(convention):
    tx = optim.poet(1e-2, 1e-3, adam_convention=convention)
    u, _ = tx.update(grads[0], tx.init(params), params)
    return np.abs(u['q']['in_blocks'][...]).mean()

  assert first('optax') > 1.2 * first('reference')


def test_poet_routes_each_group_to_its_rule():
  params = tiny_params()
  # eps far below every gradient: the first Adam step is -lr * sign(g) in
  # both groups (with eps 1e-6 it would be off by an effective 3.2e-5 / |g|).
  tx = optim.poet(learning_rate=1e-2, poet_learning_rate=1e-3, poet_scale=0.5,
                  weight_decay=0.1, eps=1e-12, poet_eps=1e-12)
  state = tx.init(params)
  g = grads_like(params, 0)
  updates, _ = tx.update(g, state, params)
  first = ADAM + bias_conditioning(1)
  tolerance.assert_close(updates['q']['in_blocks'][...],
                         -0.5e-3 * jnp.sign(g['q']['in_blocks'][...]), first)
  # Base: decay after the step on the 2-D kernel (params are ones), none on
  # the norm scale. p_new - p rounds at the parameters' size, 1.
  stepped = 1.0 - 1e-2 * jnp.sign(g['head']['kernel'][...])
  tolerance.assert_close(updates['head']['kernel'][...],
                         stepped * (1 - 1e-3) - 1.0, 3 + 1e-2 * first,
                         scale=1.0)
  tolerance.assert_close(updates['norm']['scale'][...],
                         -1e-2 * jnp.sign(g['norm']['scale'][...]), first)


def test_poet_refuses_a_model_without_generators():
  params = {'kernel': jnp.ones((4, 4)), 'scale': jnp.ones((4,))}
  try:
    optim.poet(1e-2, 1e-3).init(params)
  except ValueError as e:
    assert 'no POET leaf' in str(e)
  else:
    raise AssertionError('poet() trained a model with no generator')


def test_poet_refuses_orthogonal_blocks_handed_over_directly():
  # Adam on the blocks' entries would step off the orthogonal group.
  params = {'in_blocks': jnp.ones((2, 4, 4)), 'kernel': jnp.ones((4, 4))}
  with pytest.raises(ValueError, match='reparameterize'):
    optim.poet(1e-2, 1e-3).init(params)


def test_clip_matches_torch_clip_grad_norm():
  g = {'a': jnp.full((3,), 2.0), 'b': jnp.full((4,), -1.0)}
  norm = float(np.sqrt(3 * 4.0 + 4 * 1.0))
  out, _ = clipping.clip_by_global_norm(0.5).update(
      g, clipping.clip_by_global_norm(0.5).init(g))
  # The norm of 7 entries, its root, the sum, the division and the product.
  tolerance.assert_close(out['a'], np.full(3, 2.0 * 0.5 / (norm + 1e-6)), 11)
  loose = clipping.clip_by_global_norm(100.0)
  small, _ = loose.update(g, loose.init(g))
  np.testing.assert_array_equal(small['a'], g['a'])


def reference_clip_value(step, clip, merge_every, ramp=10, min_ratio=0.1,
                         until=2000):
  """The official code's calc_poet_grad_clipping_value, written from its
  documented rule (spec section 7); `step` counts the updates before."""
  if step < merge_every or step > until:
    return clip
  j = step % merge_every
  if j >= ramp:
    return clip
  return (min_ratio + (1 - min_ratio) * j / ramp) * clip


def test_post_merge_clip_ramp_follows_the_reference_rule():
  ramp = clipping.post_merge_clip_ramp(0.1, merge_every=20, until_step=70)
  for step in range(100):
    # j / ramp, one product and one sum, then the product with clip.
    tolerance.assert_close(float(ramp(jnp.asarray(step))),
                           reference_clip_value(step, 0.1, 20, until=70), 4)
  tolerance.assert_close(float(ramp(jnp.asarray(20))), 0.01, 4)
  # Inside a chain the threshold follows the update count.
  tx = clipping.clip_by_global_norm(
      clipping.post_merge_clip_ramp(1.0, merge_every=2, ramp_steps=1))
  g = {'a': jnp.full((4,), 10.0)}
  state = tx.init(g)
  norms = []
  for _ in range(4):
    out, state = tx.update(g, state)
    norms.append(float(optax.tree.norm(out)))
  # Clipped (the norm of 4, its root, a division, a product), then measured
  # (the norm again); 1 / (1 + 1e-6 / 20) is 1 to below eps.
  tolerance.assert_close(norms, [1.0, 1.0, 0.1, 1.0], 2 * 6)


def test_reset_drops_accumulated_generator_gradients():
  """A merge between two micro-steps of MultiSteps must not apply generator
  gradients taken under the old W0 and permutations."""
  params = tiny_params()
  tx = optax.MultiSteps(optim.poet(1e-2, 1e-3), every_k_schedule=2)
  state = tx.init(params)
  _, state = tx.update(grads_like(params, 0), state, params)
  reset = optim.reset_poet_state(state)
  assert float(jnp.abs(reset.acc_grads['q']['in_blocks'][...]).max()) == 0.0
  np.testing.assert_array_equal(reset.acc_grads['head']['kernel'][...],
                                state.acc_grads['head']['kernel'][...])
  assert int(reset.mini_step) == int(state.mini_step) == 1
  # The boundary update then uses only the post-merge generator gradient.
  g = grads_like(params, 1)
  after, _ = tx.update(g, reset, params)
  alone, _ = optim.poet(1e-2, 1e-3).update(
      jax.tree.map(lambda x: x / 2, g), optim.poet(1e-2, 1e-3).init(params),
      params)
  tolerance.assert_close(after['q']['in_blocks'][...],
                         alone['q']['in_blocks'][...], ADAM)


def _run(tx, params, steps):
  state = tx.init(params)
  for i in range(steps):
    updates, state = tx.update(grads_like(params, i), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_reset_touches_only_the_poet_state_inside_composed_optimizers():
  params = tiny_params()
  schedule = optax.cosine_decay_schedule(1e-3, 100, alpha=0.01)
  tx = optax.MultiSteps(
      optax.chain(optax.clip_by_global_norm(1.0),
                  optim.poet(schedule, schedule)), every_k_schedule=2)
  _, state = _run(tx, params, 6)
  assert int(optim.poet_step_count(state)) == 3
  reset = optim.reset_poet_state(state)
  assert int(optim.poet_step_count(reset)) == 0
  poet_states = [s for s in jax.tree.leaves(
      reset, is_leaf=lambda x: isinstance(x, optim.ScaleByPoetState))
                 if isinstance(s, optim.ScaleByPoetState)]
  assert len(poet_states) == 1
  assert all(float(jnp.abs(x).max()) == 0.0
             for x in jax.tree.leaves(poet_states[0]))
  # Everything else, base moments and the MultiSteps counters, is unchanged.
  strip = lambda s: jax.tree.map(
      lambda x: None if isinstance(x, optim.ScaleByPoetState) else x, s,
      is_leaf=lambda x: isinstance(x, optim.ScaleByPoetState))
  jax.tree.map(np.testing.assert_array_equal, strip(state), strip(reset))
  base_nu = jax.tree.leaves(strip(reset).inner_opt_state)
  assert any(float(jnp.abs(x).max()) > 0 for x in base_nu)


def test_reset_restarts_bias_correction():
  params = tiny_params()
  tx = optim.poet(1e-2, 1e-3)
  p, state = _run(tx, params, 5)
  g = grads_like(params, 42)
  fresh, _ = tx.update(g, tx.init(p), p)
  after_reset, _ = tx.update(g, optim.reset_poet_state(state), p)
  tolerance.assert_close(after_reset['q']['in_blocks'][...],
                         fresh['q']['in_blocks'][...], ADAM)


def test_per_layer_equals_the_transformation_on_each_layer():
  """GaLore's projection (no batch axis in optax) on a stacked kernel."""
  tx = lambda: optax.contrib.galore(0.1, rank=2, update_proj_gap=1)
  stacked = {'k': jnp.arange(3 * 6 * 5, dtype=jnp.float32).reshape(3, 6, 5)
                  / 50.0, 'b': jnp.ones((5,))}
  grads = grads_like(stacked, 0)
  wrapped = optim.per_layer(tx(), stacked=lambda path, x: jnp.ndim(x) == 3)
  out, _ = wrapped.update(grads, wrapped.init(stacked), stacked)
  assert out['k'].shape == (3, 6, 5)
  for i in range(3):
    one = tx()
    alone, _ = one.update({'k': grads['k'][i], 'b': grads['b']},
                          one.init({'k': stacked['k'][i], 'b': stacked['b']}),
                          {'k': stacked['k'][i], 'b': stacked['b']})
    # GaLore: the rank-2 projection from a 6 x 5 SVD (6- and 5-term sums,
    # twice each), its products, and Adam.
    tolerance.assert_close(out['k'][i], alone['k'], 2 * (6 + 5) + 4 + ADAM)
  tolerance.assert_close(out['b'], alone['b'], ADAM)


def test_every_baseline_trains_the_model():
  """adamw, galore and muon build on the stacked Llama and lower the loss."""
  from poet_jax.train import config as config_lib
  from poet_jax.train import steps as steps_lib
  from poet_jax.train import state as train_state
  batch = jax.random.randint(jax.random.key(1), (4, 17), 0, 64)
  for name in ('adamw', 'galore', 'muon'):
    c = config_lib.base_config()
    c.model.update(dim=32, num_layers=2, num_heads=2, ffn_dim=64)
    c.optimizer.name = name
    c.optimizer.galore_rank = 4
    c.train.update(lr=1e-2, warmup_steps=0, steps=100)
    setup, state = train_state.init_state(c, vocab_size=64)
    step = jax.jit(lambda s, b: steps_lib.train_step(setup, s, b))
    losses = []
    for _ in range(5):
      state, metrics = step(state, batch)
      losses.append(float(metrics['train_loss']))
    assert np.all(np.isfinite(losses)), (name, losses)
    assert losses[-1] < losses[0], (name, losses)
