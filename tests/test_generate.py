"""KV-cached decoding, sampling and the generate command line."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from poet_jax import merge
from poet_jax.models import llama as model_lib
from poet_jax.tools import generate
from poet_jax.tools import restore
import tolerance
from trained_runs import trained_run

@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A trained tiny POET run; its last step has non-zero generators."""
  return restore.load_run(trained_run(tmp_path_factory)[0])


@pytest.fixture(scope='module')
def poet_model(run):
  model = run.model
  assert max(float(jnp.abs(layer.in_blocks[...] - jnp.eye(
      layer.in_block)).max())
             for _, layer in merge.poet_layers(model)) > 0
  return model


@pytest.fixture(scope='module')
def dense_model(run):
  return restore.folded_model(run)


TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, 257)
NEW = 8          # one compiled generation loop for the module
SEEN = []        # tokens streamed by generate's on_token


def generate_tokens(model, prompt, temperature=0.0, seed=0, eos_id=-1):
  SEEN.clear()
  out = generate.generate(model, prompt, jax.random.key(seed), temperature,
                          eos_id=eos_id, max_new_tokens=NEW,
                          on_token=SEEN.append)
  jax.effects_barrier()
  return out


def test_cached_decoding_equals_full_forward_token_by_token(dense_model):
  """A prefill of 5 tokens, then one token at a time."""
  cache = model_lib.init_cache(dense_model.cfg, *TOKENS.shape)
  decode = nnx.jit(lambda m, t, c, s: m.decode(t, c, s))
  logits, cache = decode(dense_model, TOKENS[:, :5], cache, 0)
  steps = [logits]
  for t in range(5, TOKENS.shape[1]):
    logits, cache = decode(dense_model, TOKENS[:, t:t + 1], cache, t)
    steps.append(logits)
  tolerance.assert_close(jnp.concatenate(steps, axis=1), dense_model(TOKENS),
                         tolerance.llama_terms(dense_model.cfg,
                                               TOKENS.shape[1]))


def test_cached_decoding_with_grouped_query_attention_and_a_tied_head():
  """The cache holds the key/value heads only (2 for 4 query heads)."""
  cfg = model_lib.LlamaConfig(vocab_size=257, dim=32, num_layers=2,
                              num_heads=4, num_kv_heads=2, ffn_dim=64,
                              tie_embeddings=True, rope_theta=500000.0)
  model = model_lib.Llama(cfg, rngs=nnx.Rngs(0))
  cache = model_lib.init_cache(cfg, *TOKENS.shape)
  assert cache['k'].shape[-2] == 2
  decode = nnx.jit(lambda m, t, c, s: m.decode(t, c, s))
  logits, cache = decode(model, TOKENS[:, :5], cache, 0)
  steps = [logits]
  for t in range(5, TOKENS.shape[1]):
    logits, cache = decode(model, TOKENS[:, t:t + 1], cache, t)
    steps.append(logits)
  full = model(TOKENS)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full,
                             atol=2e-5 * float(jnp.abs(full).max()), rtol=0)


def test_folded_model_equals_poet_model(poet_model, dense_model):
  assert not list(merge.poet_layers(dense_model))
  # The POET forward's block sums against the folded kernels' (8 x b).
  tolerance.assert_close(dense_model(TOKENS), poet_model(TOKENS),
                         tolerance.llama_terms(dense_model.cfg,
                                               TOKENS.shape[1], 8))


def test_greedy_is_deterministic_and_each_token_is_the_argmax(dense_model):
  prompt = TOKENS[:, :4]
  out = generate_tokens(dense_model, prompt, seed=0)
  # Streamed in order, every step.
  np.testing.assert_array_equal(np.stack(SEEN, axis=1), out)
  np.testing.assert_array_equal(out, generate_tokens(dense_model, prompt,
                                                     seed=1))
  # Each generated token is the argmax of the full forward pass on the
  # sequence before it.
  sequence = jnp.concatenate([prompt, out], axis=1)
  expected = jnp.argmax(dense_model(sequence[:, :-1])[:, 3:], axis=-1)
  np.testing.assert_array_equal(out, expected)
  # Sampling at a temperature is not greedy and depends on the seed.
  hot = [generate_tokens(dense_model, prompt, 1.0, seed) for seed in (0, 1)]
  assert not np.array_equal(hot[0], hot[1])


def test_rows_stop_at_eos(dense_model):
  prompt = TOKENS[:, :4]
  greedy = np.asarray(generate_tokens(dense_model, prompt))
  eos = int(greedy[0, 2])
  first = int(np.argmax(greedy[0] == eos))
  out = np.asarray(generate_tokens(dense_model, prompt, eos_id=eos))
  np.testing.assert_array_equal(out[0, :first + 1], greedy[0, :first + 1])
  assert (out[0, first:] == eos).all()


LOGITS = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))


def within_sampling_error(frequencies, p, n=2000):
  """Each frequency within 5 standard deviations, sqrt(p (1 - p) / n), of
  its probability (the draws are a fixed sequence of keys; 5 sigma leaves
  room for rounding to move a draw across a boundary)."""
  p = np.asarray(p)
  assert np.all(np.abs(frequencies - p) <= 5 * np.sqrt(p * (1 - p) / n)), (
      frequencies, p)


def draws(n=2000, **kwargs):
  keys = jax.random.split(jax.random.key(0), n)
  one = lambda k: generate.sample(LOGITS, k, kwargs.get('temperature', 1.0),
                                  kwargs.get('top_k', 0),
                                  kwargs.get('top_p', 1.0))[0]
  return np.bincount(np.asarray(jax.vmap(one)(keys)), minlength=4) / n


def test_sampling_follows_the_distribution_and_its_cuts():
  within_sampling_error(draws(), [0.5, 0.3, 0.15, 0.05])
  top2 = draws(top_k=2)
  assert top2[2:].sum() == 0
  within_sampling_error(top2[:2], [0.625, 0.375])
  # 0.5 + 0.3 reach top_p=0.7; the tokens after them are cut.
  nucleus = draws(top_p=0.7)
  assert nucleus[2:].sum() == 0 and nucleus[1] > 0.3
  assert draws(top_p=0.4)[0] == 1.0
  assert draws(temperature=0.0)[0] == 1.0
  assert draws(temperature=0.2)[0] > 0.9  # sharper than at 1


def test_command_line_prints_the_greedy_continuation(run, dense_model,
                                                     capsys):
  code = generate.main(['generate', f'--workdir={run.workdir}',
                        '--prompt=def', f'--max_new_tokens={NEW}',
                        '--temperature=0'])
  printed = capsys.readouterr().out
  assert code == 0
  # EOS starts the prompt; two rows, the shape of the loop compiled above.
  prompt = np.concatenate([[256], run.tokenizer.encode('def')])
  out = generate_tokens(dense_model, jnp.asarray(np.stack([prompt] * 2),
                                                 jnp.int32), eos_id=256)
  assert printed == 'def' + run.tokenizer.decode(out[0]) + '\n'


@pytest.mark.parametrize('args,expected', [
    (('--workdir={empty}', '--prompt=x'), 'has no config.json'),
    (('--workdir={untrained}', '--prompt=x'), 'no checkpoint in'),
    (('--workdir={run}', '--prompt=x', '--step=3'), 'no checkpoint of step 3'),
    (('--workdir={run}', '--prompt=x', '--top_p=0'),
     '--top_p=0.0 must be in (0, 1]'),
    (('--workdir={run}', '--prompt=x', '--max_new_tokens=0'), 'at least 1'),
    # More than positions can count, or a cache larger than the device.
    (('--workdir={run}', '--prompt=x', '--max_new_tokens=3000000000'),
     'past the 2147483647 positions'),
    (('--workdir={run}', '--prompt=x', '--max_new_tokens=2000000000'),
     "the key/value cache of 2,000,000,002 positions needs"),
    (('--prompt=x',), 'workdir'),
    # Nothing to continue: from the separator alone the first token is
    # sampled almost at random (see generate's doc).
    (('--workdir={run}', '--prompt='), '--prompt is empty; give text'),
    (('--workdir={run}',), '--prompt is empty; give text'),
    # Unparsable numbers: the flag and the type it takes, not absl's text.
    (('--workdir={run}', '--step=1e'),
     '--step=1e is not an integer; give --step an integer'),
    (('--workdir={run}', '--temperature=warm'),
     '--temperature=warm is not a number; give --temperature a number, '
     'such as 0.8'),
])
def test_bad_input_is_one_line_and_exit_code_2(args, expected, tmp_path,
                                               run, capsys):
  workdir = run.workdir
  before = sorted(os.walk(workdir))
  untrained = tmp_path / 'untrained'   # a config.json, no checkpoints
  untrained.mkdir()
  shutil.copy(os.path.join(workdir, 'config.json'), untrained)
  empty = tmp_path / 'empty'
  empty.mkdir()
  args = [a.format(empty=empty, untrained=untrained, run=workdir)
          for a in args]
  assert generate.main(['generate', *args]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: '), err
  assert expected in err[0], err
  assert sorted(os.walk(workdir)) == before
  assert os.listdir(empty) == [] and os.listdir(untrained) == ['config.json']


def test_generating_past_the_trained_length_warns_once(capsys):
  from poet_jax.tools import generate as generate_lib  # pylint: disable=g-import-not-at-top
  generate_lib._warn_past_training_length(128, 128)
  assert capsys.readouterr().err == ''
  generate_lib._warn_past_training_length(1000, 128)
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and '1000' in err and 'train.seq_len' in err
