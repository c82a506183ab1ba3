"""The memory options: optimizer.mu_dtype, model.param_dtype and
model.remat_policy; each validated, each doing what it says."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from poet_jax import optim
from poet_jax.models import llama as model_lib
from poet_jax.train import config as config_lib
from poet_jax.train import config_checks
from poet_jax.train import state as train_state
from poet_jax.train import steps as steps_lib

VOCAB = 64


def tiny(method='poet'):
  c = config_lib.base_config()
  c.model.update(dim=32, num_layers=2, num_heads=2, ffn_dim=64,
                 vocab_size=VOCAB)
  c.optimizer.name = method
  c.poet.block_size = 8.0
  c.train.batch_size, c.train.seq_len = 2, 16
  return c


@pytest.mark.parametrize('key, value, says', [
    ('model.param_dtype', 'float16', 'model.param_dtype='),
    ('optimizer.mu_dtype', 'int8', 'optimizer.mu_dtype='),
    ('model.remat_policy', 'dots', 'model.remat_policy='),
    ('model.remat_policy', 'products', 'model.remat=True'),
])
def test_bad_memory_options_are_refused_in_one_line(key, value, says):
  c = tiny()
  section, name = key.split('.')
  c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=re.escape(says)) as e:
    config_checks.validate(c)
  assert '\n' not in str(e.value)


def _first_step(c):
  setup, state = train_state.init_state(c, VOCAB)
  batch = np.random.default_rng(0).integers(0, VOCAB, (2, 17), np.int32)
  return state, jax.jit(lambda s, b: steps_lib.train_step(setup, s, b))(
      state, batch)[0]


def _moments(opt_state):
  """Every Adam state (POET group and base group) inside opt_state."""
  kinds = (optim.ScaleByPoetState, optax.ScaleByAdamState)
  return [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, kinds)) if isinstance(s, kinds)]


@pytest.mark.parametrize('method', ['poet', 'adamw'])
def test_mu_dtype_stores_the_first_moment_and_only_it(method):
  """bfloat16 first moments in both groups, float32 second moments; the
  first update, taken from the moment before it is stored, is the float32
  run's exactly, and the stored moment is the float32 one rounded."""
  c32, c16 = tiny(method), tiny(method)
  c16.optimizer.mu_dtype = 'bfloat16'
  _, after32 = _first_step(c32)
  _, after16 = _first_step(c16)
  groups16, groups32 = _moments(after16['opt_state']), _moments(
      after32['opt_state'])
  assert len(groups16) == (2 if method == 'poet' else 1)
  for m16, m32 in zip(groups16, groups32):
    for mu16, mu32, nu16 in zip(jax.tree.leaves(m16.mu),
                                jax.tree.leaves(m32.mu),
                                jax.tree.leaves(m16.nu)):
      assert mu16.dtype == jnp.bfloat16 and nu16.dtype == jnp.float32
      np.testing.assert_array_equal(mu16, mu32.astype(jnp.bfloat16))
  jax.tree.map(np.testing.assert_array_equal, after16['params'],
               after32['params'])


def test_param_dtype_stores_the_dense_group_only():
  """bfloat16 embeddings, norms and head; POET's blocks keep their dtype;
  the values are the float32 init's, rounded."""
  c32, c16 = tiny(), tiny()
  c16.model.param_dtype = 'bfloat16'
  init16, after16 = _first_step(c16)
  init32, _ = _first_step(c32)
  paths = jax.tree_util.tree_leaves_with_path(init16['params'])
  for (path, x16), x32 in zip(paths, jax.tree.leaves(init32['params'])):
    if optim.is_poet_path(path):
      assert x16.dtype == x32.dtype == jnp.float32
    else:
      assert x16.dtype == jnp.bfloat16, jax.tree_util.keystr(path)
      np.testing.assert_array_equal(x16, x32.astype(jnp.bfloat16))
  dtypes = lambda s: [x.dtype for x in jax.tree.leaves(s['params'])]
  assert dtypes(after16) == dtypes(init16)  # the step keeps them so
  assert all(bool(jnp.all(jnp.isfinite(x)))
             for x in jax.tree.leaves(after16['params']))


def _residual_shapes(policy, capsys):
  cfg = model_lib.LlamaConfig(vocab_size=VOCAB, dim=32, num_layers=2,
                              num_heads=2, ffn_dim=48, remat=True,
                              remat_policy=policy)
  graphdef, params = nnx.split(model_lib.Llama(cfg, rngs=nnx.Rngs(0)))
  tokens = jnp.zeros((2, 9), jnp.int32)
  loss = lambda p: model_lib.next_token_loss(nnx.merge(graphdef, p), tokens)
  print_saved_residuals(loss, params)
  return capsys.readouterr().out, jax.grad(loss)(params)


def test_the_products_policy_keeps_the_linear_outputs(capsys):
  """'full' keeps each block's input only; 'products' also keeps its linear
  layers' outputs (the FFN-wide gate and up among them), and the gradients
  are the same."""
  full, grads_full = _residual_shapes('full', capsys)
  products, grads_products = _residual_shapes('products', capsys)
  ffn_wide = re.compile(r'\[2,(2,8|16),48\]')  # (layers, tokens, ffn)
  assert not ffn_wide.search(full)
  assert len(ffn_wide.findall(products)) >= 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               grads_full, grads_products)


def test_mu_dtype_auto_is_the_compute_dtype():
  for dtype in ('float32', 'bfloat16'):
    c = tiny()
    c.model.dtype = dtype
    setup, state = train_state.init_state(c, VOCAB)
    for group in _moments(state['opt_state']):
      assert {x.dtype for x in jax.tree.leaves(group.mu)} == {jnp.dtype(dtype)}
