"""The papers' weight diagnostics (SVD entropy, hyperspherical energy, vector
probing; spec section 10), where runs log them, and the logged grad_norm of
a POET run (the generators' gradient, as the clip sees it)."""
import contextlib
import io
import json
import math
import os

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import optax
import pytest
from flax import nnx

from poet_jax import generator_map
from poet_jax import inject
from poet_jax import layers
from poet_jax import orthogonal
from poet_jax import reparam
from poet_jax.models import llama as model_lib
from poet_jax.train import metrics as metrics_lib
from poet_jax.train import plot
from poet_jax.train import state as train_state
from poet_jax.train import steps as steps_lib
from tolerance import EPS32, assert_close
from train_util import read_metrics, tiny_config

WEIGHT_KEYS = ('svd_entropy', 'hyperspherical_energy')
PROBE_KEYS = ('vector_probe_r', 'vector_probe_p')


def random_orthogonal(key, n):
  q, r = np.linalg.qr(np.asarray(jax.random.normal(key, (n, n)), np.float64))
  return q * np.sign(np.diag(r))


# ------------------------------------------------------------ SVD entropy


def test_svd_entropy_of_equal_single_and_two_singular_values():
  assert_close(metrics_lib.svd_entropy(jnp.eye(6)), 1.0, terms=12)
  rank_one = jnp.outer(jnp.arange(1.0, 5.0), jnp.arange(1.0, 7.0))
  assert float(metrics_lib.svd_entropy(rank_one)) < 1e-4
  # Two equal singular values out of four: log 2 / log 4.
  assert_close(metrics_lib.svd_entropy(jnp.diag(jnp.array([3., 3., 0., 0.]))),
               0.5, terms=12)


def test_svd_entropy_ignores_scale_and_orthogonal_factors():
  """So a POET layer keeps W0's (R W0 P has W0's singular values)."""
  keys = jax.random.split(jax.random.key(0), 3)
  w = np.asarray(jax.random.normal(keys[0], (2, 12, 8)), np.float64)
  rotated = random_orthogonal(keys[1], 12) @ w @ random_orthogonal(keys[2], 8)
  entropy = metrics_lib.svd_entropy(jnp.asarray(w, jnp.float32))
  assert entropy.shape == (2,)
  # Singular values to a few float32 roundings of the largest (12 terms).
  assert_close(metrics_lib.svd_entropy(jnp.asarray(3 * rotated, jnp.float32)),
               entropy, terms=48)
  assert float(jnp.min(entropy)) < 0.99


# ------------------------------------------------- hyperspherical energy


def test_hyperspherical_energy_of_known_configurations():
  # Orthonormal neurons: every pairwise distance sqrt(2).
  assert_close(metrics_lib.hyperspherical_energy(jnp.eye(5)),
               1 / math.sqrt(2), terms=25)
  # Three neurons in the plane at 0, 90 and 180 degrees, scaled: the pairs
  # are sqrt(2), 2 and sqrt(2) apart.
  kernel = jnp.array([[2.0, 0.0, -0.5], [0.0, 3.0, 0.0]])
  assert_close(metrics_lib.hyperspherical_energy(kernel),
               (2 / math.sqrt(2) + 1 / 2) / 3, terms=9)
  # Neurons that crowd have a higher energy.
  close = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.1, 1.0]])
  assert float(metrics_lib.hyperspherical_energy(close)) > 1 / math.sqrt(2)


def test_hyperspherical_energy_keeps_under_input_side_rotations():
  """An orthogonal map on the input side (POET's P) keeps every angle
  between neurons; one that mixes the neurons (R) does not."""
  keys = jax.random.split(jax.random.key(1), 3)
  kernel = np.asarray(jax.random.normal(keys[0], (16, 8)), np.float64)
  energy = metrics_lib.hyperspherical_energy(jnp.asarray(kernel, jnp.float32))
  inputs = random_orthogonal(keys[1], 16) @ kernel
  assert_close(metrics_lib.hyperspherical_energy(
      jnp.asarray(inputs, jnp.float32)), energy, terms=64)
  mixed = kernel @ random_orthogonal(keys[2], 8)
  assert abs(float(metrics_lib.hyperspherical_energy(
      jnp.asarray(mixed, jnp.float32))) - float(energy)) > 1e-3


# ------------------------------------------------------- vector probing


@pytest.mark.parametrize('variant', ['block', 'full'])
def test_vector_probe_is_the_quadratic_form_of_the_dense_rotation(variant):
  """v^T R v and v^T P v against R and P built densely by the layer itself:
  with W0 = I and the other side at I, the effective kernel is the side's
  orthogonal matrix in the layer's coordinates."""
  n, b = 8, 4
  layer = layers.POETLinear(n, n, block_size=b if variant == 'block' else 0.5,
                            variant=variant, rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(2), 5)
  in_place, out_place = layer.in_place[...], layer.out_place[...]
  if variant == 'block':
    in_place = jax.random.permutation(keys[0], n).astype(jnp.int32)
    out_place = jax.random.permutation(keys[1], n).astype(jnp.int32)
  inject.set_poet_layer(layer, jnp.eye(n), in_place, out_place)
  v = jax.random.normal(keys[2], (n,))
  v = v / jnp.linalg.norm(v)
  for side, key in (('in_blocks', keys[3]), ('out_blocks', keys[4])):
    layer.reset_blocks()
    blocks = getattr(layer, side)
    u = 0.3 * jax.random.normal(key, blocks[...].shape[:-2] + (b * (b - 1)
                                                              // 2,))
    blocks[...] = orthogonal.orthogonal_blocks(u, b, method='exact')
    dense = layer.effective_weight()
    gather = in_place
    if side == 'out_blocks':
      gather = jnp.argsort(out_place) if variant == 'block' else out_place
    probe = metrics_lib.vector_probe(blocks[...], gather, v, variant)
    assert_close(probe, v @ dense @ v, terms=3 * n)
    assert float(probe) < 1 - 1e-3


# --------------------------------------------- the model's diagnostics


def tiny_state(method):
  c = tiny_config()
  c.optimizer.name = method
  return c, train_state.init_state(c, 257)


def model_of(setup, state):
  return nnx.merge(setup.graphdef, state['params'], state['frozen'])


def test_poet_model_diagnostics_are_means_over_every_layer_of_the_stacks():
  _, (setup, state) = tiny_state('poet')
  model = model_of(setup, state)
  poet = metrics_lib.reparameterized_layers(model)
  assert len(poet) == 7  # q, k, v, o, gate, up, down; stacked over 2 layers
  start = jax.jit(metrics_lib.weight_diagnostics)(model)
  assert sorted(start) == sorted(WEIGHT_KEYS + PROBE_KEYS)
  assert float(start['vector_probe_r']) == float(
      start['vector_probe_p']) == 1.0
  entropies = [metrics_lib.svd_entropy(layer.effective_weight())
               for _, layer in poet]
  assert_close(start['svd_entropy'], jnp.mean(jnp.concatenate(entropies)),
               terms=64)
  # Rotate every block: the probes fall, the spectrum (hence the SVD
  # entropy) stays W0's up to float32 rounding of the exact Cayley map.
  for i, (_, layer) in enumerate(poet):
    for j, blocks in enumerate((layer.in_blocks, layer.out_blocks)):
      b = blocks[...].shape[-1]
      u = 0.2 * jax.random.normal(jax.random.key(10 * i + j),
                                  blocks[...].shape[:-2] + (b * (b - 1) // 2,))
      blocks[...] = orthogonal.orthogonal_blocks(u, b, method='exact')
  after = jax.jit(metrics_lib.weight_diagnostics)(model)
  assert float(after['vector_probe_r']) < 0.999
  assert float(after['vector_probe_p']) < 0.999
  assert_close(after['svd_entropy'], start['svd_entropy'], terms=64)
  assert abs(float(after['hyperspherical_energy']) -
             float(start['hyperspherical_energy'])) > 1e-5


def test_dense_model_diagnostics_leave_out_the_head():
  _, (setup, state) = tiny_state('adamw')
  model = model_of(setup, state)
  dense = metrics_lib.reparameterized_layers(model)
  assert sorted('.'.join(map(str, p)) for p, _ in dense) == sorted(
      f'blocks.{n}' for n in ('attention.q', 'attention.k', 'attention.v',
                              'attention.o', 'mlp.gate', 'mlp.up', 'mlp.down'))
  values = jax.jit(metrics_lib.weight_diagnostics)(model)
  assert sorted(values) == sorted(WEIGHT_KEYS)
  energies = [metrics_lib.hyperspherical_energy(layer.kernel[...])
              for _, layer in dense]
  assert_close(values['hyperspherical_energy'],
               jnp.mean(jnp.concatenate(energies)), terms=64)


# ------------------------------------------------------ logged by runs


def test_a_run_logs_the_diagnostics_with_its_evaluations_only(reference):
  """The reference POET run (train_util.SHORT); a dense run's are in the
  reproduction study's test (tests/test_experiments.py)."""
  entries = read_metrics(reference)
  assert [e['step'] for e in entries if 'eval_loss' in e] == [0, 4, 8]
  for entry in entries:
    logged = [k for k in WEIGHT_KEYS + PROBE_KEYS if k in entry]
    assert logged == (list(WEIGHT_KEYS + PROBE_KEYS) if 'eval_loss' in entry
                      else []), entry
    assert all(math.isfinite(entry[k]) for k in logged), entry


def test_plot_draws_the_diagnostics_panels(tmp_path):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  entries = [{'step': s, 'train_loss': 3 - s / 100, 'learning_rate': 1e-3,
              **({'eval_loss': 3.1 - s / 100, 'svd_entropy': 0.9,
                  'hyperspherical_energy': 0.71, 'vector_probe_r': 1 - s / 1e3,
                  'vector_probe_p': 1 - s / 2e3} if s % 50 == 0 else {})}
             for s in range(0, 201, 10)]
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(e) + '\n' for e in entries)
  keys = [key for key, _, _ in plot.PANELS]
  for key in WEIGHT_KEYS + PROBE_KEYS:
    assert key in keys
  out = str(tmp_path / 'runs.png')
  with contextlib.redirect_stdout(io.StringIO()):
    assert plot.main([workdir, f'--out={out}']) == 0
  assert matplotlib.image.imread(out).shape[0] > 1000


# --------------------------------------------------------- grad_norm


def test_poet_grad_norm_is_the_generators_gradient_norm():
  """The logged grad_norm is the global norm the clip sees: of the
  generators' gradient (through the Cayley-Neumann map at the current
  generators) and the other leaves' gradient, taken here by differentiating
  the loss through the map directly; the blocks' gradient norm differs."""
  c, (setup, state) = tiny_state('poet')
  c.train.steps = 10
  batch = jax.random.randint(jax.random.key(3), (4, 33), 0, 257)
  step = jax.jit(lambda s, b: steps_lib.train_step(setup, s, b))
  for _ in range(2):  # generators away from 0, before any merge
    state, _ = step(state, batch)
  _, logged = step(state, batch)
  generators = reparam.generators(state['opt_state'])

  def loss(params, generators):
    blocks = jax.tree.map(
        lambda u, p: p if u is None else generator_map.block_map(
            c.poet.neumann_terms, c.poet.orthogonal_map, p.shape[-1])(u),
        generators, params, is_leaf=lambda x: x is None)
    return model_lib.next_token_loss(
        nnx.merge(setup.graphdef, blocks, state['frozen']), batch)

  g_params, g_generators = jax.jit(jax.grad(loss, argnums=(0, 1)))(
      state['params'], generators)
  rest = jax.tree.map(lambda u, g: g if u is None else jnp.zeros(()),
                      generators, g_params, is_leaf=lambda x: x is None)
  expected = math.hypot(float(optax.tree.norm(rest)),
                        float(optax.tree.norm(g_generators)))
  # The blocks equal map(u) to one rounding: gradients to a few float32
  # roundings over the model's sums (about dim x tokens terms).
  assert abs(float(logged['grad_norm']) - expected) <= (
      4 * 32 * 128 * EPS32 * expected)
  blocks_norm = float(optax.tree.norm(jax.jit(jax.grad(
      lambda p: model_lib.next_token_loss(
          nnx.merge(setup.graphdef, p, state['frozen']), batch)))(
              state['params'])))
  assert abs(blocks_norm - expected) > 0.01 * expected
