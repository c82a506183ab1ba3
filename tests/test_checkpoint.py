"""Checkpointer: the fingerprint saved with every checkpoint."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from poet_jax.train import checkpoint as checkpoint_lib


def _state():
  # Every kind of leaf a train state holds: float32 and bfloat16 arrays,
  # int8 (a quantized W0), a bool, a typed PRNG key, a scalar step.
  w = jax.random.normal(jax.random.key(0), (100_000,))
  return {'w': w, 'half': w[:1000].astype(jnp.bfloat16),
          'q': jnp.arange(-64, 64, dtype=jnp.int8), 'flag': jnp.bool_(True),
          'key': jax.random.key(1), 'step': jnp.int32(3)}


def _target(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


@pytest.fixture
def saved(tmp_path):
  state = _state()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), asynchronous=False)
  ckpt.save(3, state, {'step': 3})
  ckpt.wait()
  yield ckpt, state
  ckpt.abandon()


def test_a_round_trip_restores_the_arrays_and_the_record(saved):
  ckpt, state = saved
  restored, meta = ckpt.restore(3, _target(state))
  assert meta == {'step': 3} == ckpt.read_meta(3)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_damage_that_still_decodes_is_refused_in_one_line(saved, tmp_path):
  # Arrays that decode but are not the ones saved (a fresh user's test
  # inverted 4 KiB inside a data file: it restored silently, its NaNs were
  # trained on and the last good checkpoint rotated away). Made here
  # deterministically: step 3's arrays replaced by another valid store.
  ckpt, state = saved
  other = checkpoint_lib.Checkpointer(str(tmp_path / 'other'),
                                      asynchronous=False)
  other.save(3, dict(state, w=state['w'].at[50_000].set(0.0)), {'step': 3})
  other.close()
  shutil.rmtree(os.path.join(ckpt.step_path(3), 'state'))
  shutil.copytree(os.path.join(other.step_path(3), 'state'),
                  os.path.join(ckpt.step_path(3), 'state'))
  with pytest.raises(checkpoint_lib.CorruptCheckpointError) as e:
    ckpt.restore(3, _target(state))
  message = str(e.value)
  assert '\n' not in message
  assert "damaged: ['w'] differs from the fingerprint" in message
  assert f'mv {ckpt.step_path(3)} {ckpt.step_path(3)}.bad' in message


def test_every_leaf_kind_has_a_fingerprint_that_sees_one_changed_bit():
  state = _state()
  before = checkpoint_lib.fingerprint(state)
  assert set(before) == {"['w']", "['half']", "['q']", "['flag']", "['key']",
                         "['step']"}
  changed = dict(state, q=state['q'].at[5].add(1), w=state['w'].at[7].set(
      jnp.nextafter(state['w'][7], jnp.inf)), flag=jnp.bool_(False))
  after = checkpoint_lib.fingerprint(changed)
  assert {k for k in before if before[k] != after[k]} == {"['w']", "['q']",
                                                          "['flag']"}
  # Any single bit of any element, the sign and the top exponent bit too
  # (bits 31 and 30; an even position weight would lose them mod 2^32).
  w = state['w'][:70_000]
  for i in (1, 2, 4, 65_522):
    for bit in (31, 30, 0):
      flipped = jax.lax.bitcast_convert_type(
          jax.lax.bitcast_convert_type(w, jnp.uint32).at[i].set(
              jax.lax.bitcast_convert_type(w[i], jnp.uint32) ^ jnp.uint32(1 << bit)),
          jnp.float32)
      assert (checkpoint_lib.fingerprint({'w': flipped}) !=
              checkpoint_lib.fingerprint({'w': w})), (i, bit)
  # Moved values count too: the same numbers in another order.
  swapped = dict(state, q=state['q'][::-1])
  assert checkpoint_lib.fingerprint(swapped)["['q']"] != before["['q']"]
