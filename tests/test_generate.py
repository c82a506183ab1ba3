"""KV-cached decoding, sampling and the generate command line."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from poet_jax import generate
from poet_jax import merge
from poet_jax import model as model_lib
from poet_jax import restore
from trained_runs import trained_run

CFG = model_lib.LlamaConfig(vocab_size=64, dim=32, num_layers=2, num_heads=2,
                            ffn_dim=64, poet=model_lib.POETConfig(block_size=8))


@pytest.fixture(scope='module')
def poet_model():
  """A POET model whose generators are not zero: folding them matters."""
  model = model_lib.Llama(CFG, rngs=nnx.Rngs(0))
  for i, (_, layer) in enumerate(merge.poet_layers(model)):
    for j, q in enumerate((layer.q_in, layer.q_out)):
      q[...] = 0.1 * jax.random.normal(jax.random.key(10 * i + j),
                                       q[...].shape)
  return model


@pytest.fixture(scope='module')
def dense_model(poet_model):
  return restore.dense_model(CFG, nnx.jit(restore.dense_weights)(poet_model))


TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)


def cached_logits(model, tokens, prefill):
  """Logits of a prefill of `prefill` tokens, then one token at a time."""
  cache = model_lib.init_cache(model.cfg, tokens.shape[0], tokens.shape[1])
  decode = nnx.jit(lambda m, t, c, s: m.decode(t, c, s))
  logits, cache = decode(model, tokens[:, :prefill], cache, 0)
  steps = [logits]
  for t in range(prefill, tokens.shape[1]):
    logits, cache = decode(model, tokens[:, t:t + 1], cache, t)
    steps.append(logits)
  return jnp.concatenate(steps, axis=1)


@pytest.mark.parametrize('which', ['poet', 'dense'])
def test_cached_decoding_equals_full_forward(which, poet_model, dense_model):
  model = poet_model if which == 'poet' else dense_model
  full = model(TOKENS)
  np.testing.assert_allclose(cached_logits(model, TOKENS, prefill=5), full,
                             atol=2e-5, rtol=0)


def test_folded_model_equals_poet_model(poet_model, dense_model):
  assert dense_model.cfg.linear == 'dense'
  np.testing.assert_allclose(dense_model(TOKENS), poet_model(TOKENS),
                             atol=2e-5, rtol=0)


def test_greedy_is_deterministic_and_each_token_is_the_argmax(dense_model):
  prompt = TOKENS[:, :4]
  run = lambda seed: generate.generate(dense_model, prompt,
                                       jax.random.key(seed), 0.0,
                                       max_new_tokens=8)
  out = run(0)
  np.testing.assert_array_equal(out, run(1))
  # Each generated token is the argmax of the full forward pass on the
  # sequence before it.
  sequence = jnp.concatenate([prompt, out], axis=1)
  expected = jnp.argmax(dense_model(sequence[:, :-1])[:, 3:], axis=-1)
  np.testing.assert_array_equal(out, expected)


def test_generation_streams_every_token_in_order(dense_model):
  seen = []
  out = generate.generate(dense_model, TOKENS[:, :4], jax.random.key(0), 1.0,
                          max_new_tokens=6, on_token=seen.append)
  jax.effects_barrier()
  np.testing.assert_array_equal(np.stack(seen, axis=1), out)


def test_rows_stop_at_eos(dense_model):
  prompt = TOKENS[:, :4]
  greedy = generate.generate(dense_model, prompt, jax.random.key(0), 0.0,
                             max_new_tokens=6)
  eos = int(greedy[0, 2])
  out = generate.generate(dense_model, prompt, jax.random.key(0), 0.0,
                          eos_id=eos, max_new_tokens=6)
  first = int(np.argmax(np.asarray(greedy[0]) == eos))
  np.testing.assert_array_equal(out[0, :first + 1], greedy[0, :first + 1])
  assert (np.asarray(out[0, first:]) == eos).all()


LOGITS = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))


def draws(n=2000, **kwargs):
  keys = jax.random.split(jax.random.key(0), n)
  one = lambda k: generate.sample(LOGITS, k, kwargs.get('temperature', 1.0),
                                  kwargs.get('top_k', 0),
                                  kwargs.get('top_p', 1.0))[0]
  return np.bincount(np.asarray(jax.vmap(one)(keys)), minlength=4) / n


def test_sampling_follows_the_distribution_and_its_cuts():
  np.testing.assert_allclose(draws(), [0.5, 0.3, 0.15, 0.05], atol=0.04)
  top2 = draws(top_k=2)
  assert top2[2:].sum() == 0
  np.testing.assert_allclose(top2[:2], [0.625, 0.375], atol=0.04)
  # 0.5 + 0.3 reach top_p=0.7; the tokens after them are cut.
  nucleus = draws(top_p=0.7)
  assert nucleus[2:].sum() == 0 and nucleus[1] > 0.3
  assert draws(top_p=0.4)[0] == 1.0
  assert draws(temperature=0.0)[0] == 1.0
  assert draws(temperature=0.2)[0] > 0.9  # sharper than at 1


def test_command_line_prints_the_greedy_continuation(tmp_path_factory, capsys):
  workdir, _ = trained_run(tmp_path_factory)
  code = generate.main(['generate', f'--workdir={workdir}', '--prompt=def ',
                        '--max_new_tokens=16', '--temperature=0'])
  printed = capsys.readouterr().out
  assert code == 0
  run = restore.load_run(workdir)
  prompt = np.concatenate([[256], run.tokenizer.encode('def ')])
  out = generate.generate(restore.folded_model(run),
                          jnp.asarray(prompt[None], jnp.int32),
                          jax.random.key(0), 0.0, eos_id=256,
                          max_new_tokens=16)
  assert printed == 'def ' + run.tokenizer.decode(out[0]) + '\n'


@pytest.mark.parametrize('args,expected', [
    (('--workdir={empty}',), 'has no config.json'),
    (('--workdir={run}', '--step=3'), 'no checkpoint of step 3'),
    (('--workdir={run}', '--top_p=0'), '--top_p=0.0 must be in (0, 1]'),
    (('--workdir={run}', '--max_new_tokens=0'), 'at least 1'),
    (('--prompt=x',), 'workdir'),
])
def test_bad_input_is_one_line_and_exit_code_2(args, expected, tmp_path,
                                               tmp_path_factory, capsys):
  workdir, _ = trained_run(tmp_path_factory)
  before = sorted(os.walk(workdir))
  args = [a.format(empty=tmp_path, run=workdir) for a in args]
  assert generate.main(['generate', *args]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: '), err
  assert expected in err[0], err
  assert sorted(os.walk(workdir)) == before
  assert os.listdir(tmp_path) == []
