"""Sharded training on 8 simulated CPU devices (see conftest.py)."""
import jax
import numpy as np
import pytest

from poet_jax.train import config as config_lib
from poet_jax.train import config_checks
from poet_jax.train import sharding
from poet_jax.train import state as train_state
from poet_jax.train import steps as steps_lib
import tolerance

VOCAB = 64
STEPS = 5  # merges after steps 2 and 4


def tiny_config(**mesh):
  c = config_lib.base_config()
  c.model.dim, c.model.num_layers, c.model.num_heads = 64, 2, 2
  c.model.ffn_dim = 128
  c.poet.block_size = 16.0
  c.poet.merge_every = 2
  c.train.batch_size, c.train.seq_len, c.train.steps = 8, 16, STEPS
  c.train.lr = c.poet.lr = 1e-2
  for axis, size in mesh.items():
    c.mesh[axis] = size
  config_checks.validate(c)
  return c


def train_losses(c):
  mesh = sharding.make_mesh(c.mesh)
  setup, abstract = train_state.abstract_state(c, VOCAB)
  steps = steps_lib.compile_steps(setup, abstract, mesh)
  state = jax.jit(lambda: train_state.init_state(c, VOCAB)[1],
                  out_shardings=steps.state_sharding)()
  # One batch, repeated: uniformly random tokens drawn anew at every step
  # leave nothing to learn, and the loss would only wander around log(64).
  batch = np.random.default_rng(0).integers(
      0, VOCAB, (c.train.batch_size, c.train.seq_len + 1), dtype=np.int32)
  losses = []
  for _ in range(STEPS):
    state, m = steps.train(state, jax.device_put(batch, steps.batch_sharding))
    losses.append(float(m['train_loss']))
  return losses, state


def test_eight_devices_are_simulated():
  assert jax.device_count() == 8


def test_data_x_fsdp_mesh_trains_like_one_device():
  single, _ = train_losses(tiny_config(data=1, fsdp=1))
  sharded, state = train_losses(tiny_config(data=4, fsdp=2))
  w0 = state['frozen']['blocks']['mlp']['up']['w0']
  assert len(w0.sharding.device_set) == 8
  assert not w0.sharding.is_fully_replicated  # fsdp really splits it
  # The same steps with the sums split over devices: rounding in another
  # order along the run's chain.
  params = sum(x.size for x in jax.tree.leaves(state['params']))
  c = tiny_config()
  terms = tolerance.training_terms(
      train_state.model_config(c, VOCAB), c.train.seq_len,
      c.train.batch_size, int(c.poet.block_size), params, STEPS)
  tolerance.assert_close_probably(sharded, single, terms)
  assert single[-1] < single[0]


def test_generators_stay_replicated():
  c = tiny_config(data=4, fsdp=2)
  mesh = sharding.make_mesh(c.mesh)
  _, abstract = train_state.abstract_state(c, VOCAB)
  shardings = sharding.state_shardings(mesh, abstract)
  blocks = shardings['params']['blocks']['mlp']['up']['in_blocks']
  assert blocks.is_fully_replicated
  gens = shardings['opt_state'].generators['blocks']['mlp']['up']['in_blocks']
  assert gens.is_fully_replicated


@pytest.mark.parametrize('mesh,devices,batch,message', [
    (dict(data=-1, fsdp=3), 8, 8, 'do not divide the 8 devices'),
    (dict(data=3, fsdp=1), 8, 8,
     'train.batch_size=8 is not divisible by mesh data x fsdp = 3'),
    (dict(data=2, fsdp=4), 6, 8, 'needs 8 devices; there are 6'),
])
def test_bad_meshes_are_one_line_errors(mesh, devices, batch, message):
  c = tiny_config()
  c.mesh.data, c.mesh.fsdp = mesh['data'], mesh['fsdp']
  with pytest.raises(sharding.MeshError, match=message) as info:
    m = sharding.make_mesh(c.mesh, jax.devices()[:devices])
    sharding.check_batch(m, batch)
  assert '\n' not in str(info.value)


def test_fsdp_that_divides_no_axis_names_the_parameter():
  with pytest.raises(sharding.MeshError,
                     match=r"mesh.fsdp=3 divides no axis of embed with shape "
                     r"\(257, 97\)"):
    sharding.leaf_spec((257, 97), 3, 'embed')
