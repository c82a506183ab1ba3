import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from poet_jax import layers
from poet_jax import optim


def tiny_params():
  """A POET layer's generators plus a dense kernel and a norm scale."""
  return nnx.State({
      'q': {'q_in': layers.Generator(jnp.ones((2, 6))),
            'q_out': layers.Generator(jnp.ones((3, 6)))},
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
  assert labels['q']['q_in'] == 'poet'
  assert labels['q']['q_out'] == 'poet'
  assert optim.poet_param_labels(nnx.as_pure(tiny_params()))['q']['q_in'] == 'poet'
  assert labels['head']['kernel'] == 'base'
  assert labels['norm']['scale'] == 'base'


def test_scale_by_poet_is_adam_times_scale():
  params = {'q': jnp.zeros((3, 6))}
  ours, ref = optim.scale_by_poet(eps=1e-6, scale=0.5), optax.scale_by_adam(
      eps=1e-6)
  s1, s2 = ours.init(params), ref.init(params)
  for seed in range(4):
    g = grads_like(params, seed)
    u1, s1 = ours.update(g, s1)
    u2, s2 = ref.update(g, s2)
    np.testing.assert_allclose(u1['q'], 0.5 * u2['q'], rtol=1e-6)


def test_poet_routes_each_group_to_its_rule():
  params = tiny_params()
  tx = optim.poet(learning_rate=1e-2, poet_learning_rate=1e-3, poet_scale=0.5,
                  weight_decay=0.1)
  state = tx.init(params)
  g = grads_like(params, 0)
  updates, _ = tx.update(g, state, params)
  # First Adam step is -lr * sign(g) (up to eps) for both groups.
  np.testing.assert_allclose(updates['q']['q_in'][...],
                             -0.5e-3 * jnp.sign(g['q']['q_in'][...]),
                             rtol=1e-3)
  # Base: AdamW, with decay on the 2-D kernel and none on the norm scale.
  np.testing.assert_allclose(
      updates['head']['kernel'][...],
      -1e-2 * (jnp.sign(g['head']['kernel'][...]) + 0.1), rtol=1e-3)
  np.testing.assert_allclose(updates['norm']['scale'][...],
                             -1e-2 * jnp.sign(g['norm']['scale'][...]),
                             rtol=1e-3)


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
  np.testing.assert_allclose(after_reset['q']['q_in'][...],
                             fresh['q']['q_in'][...], rtol=1e-6)


def test_per_layer_equals_the_transformation_on_each_layer():
  """GaLore's projection (no batch axis in optax) on a stacked kernel."""
  tx = lambda: optax.contrib.galore(0.1, rank=2, update_proj_gap=1)
  stacked = {'k': jnp.arange(3 * 6 * 5, dtype=jnp.float32).reshape(3, 6, 5)
                  / 50.0, 'b': jnp.ones((5,))}
  grads = grads_like(stacked, 0)
  wrapped = optim.per_layer(tx())
  out, _ = wrapped.update(grads, wrapped.init(stacked), stacked)
  assert out['k'].shape == (3, 6, 5)
  for i in range(3):
    one = tx()
    alone, _ = one.update({'k': grads['k'][i], 'b': grads['b']},
                          one.init({'k': stacked['k'][i], 'b': stacked['b']}),
                          {'k': stacked['k'][i], 'b': stacked['b']})
    np.testing.assert_allclose(out['k'][i], alone['k'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out['b'], alone['b'], rtol=1e-6)


def test_every_baseline_trains_the_model():
  """adamw, galore and muon build on the stacked Llama and lower the loss."""
  from poet_jax import config as config_lib
  from poet_jax import train_lib
  batch = jax.random.randint(jax.random.key(1), (4, 17), 0, 64)
  for name in ('adamw', 'galore', 'muon'):
    c = config_lib.base_config()
    c.model.update(dim=32, num_layers=2, num_heads=2, ffn_dim=64)
    c.optimizer.name = name
    c.optimizer.galore_rank = 4
    c.train.update(lr=1e-2, warmup_steps=0, steps=100)
    setup, state = train_lib.init_state(c, vocab_size=64)
    step = jax.jit(lambda s, b: train_lib.train_step(setup, s, b))
    losses = []
    for _ in range(5):
      state, metrics = step(state, batch)
      losses.append(float(metrics['train_loss']))
    assert np.all(np.isfinite(losses)), (name, losses)
    assert losses[-1] < losses[0], (name, losses)
