"""Hugging Face Llama export and import (--config.init_from).

The exported file is checked against a NumPy forward pass written here from
transformers' modeling_llama.py (LlamaRMSNorm, LlamaRotaryEmbedding with
rotate_half, eager attention with repeat_kv, LlamaMLP), independent of
poet_jax.models.llama; and, when transformers and torch are installed, against
transformers itself (tests/hf_reference.py), which then also builds the
random Llama-3-shaped checkpoints the import is tested on:

  pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  pip install transformers
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import hf_reference
from poet_jax.models import hf as hf_lib
from poet_jax.tools import export
from poet_jax.tools import restore
from poet_jax.train import cli as train
from poet_jax.train import config as config_lib
from poet_jax.train import config_checks
from poet_jax.train import init_from
from poet_jax.train import state as train_state
from poet_jax.train import steps as steps_lib
from spectra import assert_spectrum_kept
import tolerance
from trained_runs import trained_run
from train_util import read_metrics, run_train

BATCH = np.random.default_rng(0).integers(0, 257, (2, 16)).astype(np.int32)


@pytest.fixture(scope='module', params=['poet', 'adamw'])
def exported(request, tmp_path_factory):
  """(restored run, its export directory) for each kind of run."""
  run = restore.load_run(trained_run(tmp_path_factory, request.param)[0])
  out = str(tmp_path_factory.mktemp(f'hf_{request.param}'))
  assert export.main(['export', f'--workdir={run.workdir}',
                      f'--out={out}']) == 0
  return run, out


# ------------------------------------------- NumPy Llama from transformers'


def rms_norm(x, weight, eps):
  variance = np.mean(x ** 2, axis=-1, keepdims=True)
  return weight * (x / np.sqrt(variance + eps))


def rotate_half(x):
  half = x.shape[-1] // 2
  return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def hf_llama_logits(hf, t, ids):
  """LlamaForCausalLM.forward(ids).logits in float64 NumPy; t: state dict.

  Grouped-query attention as repeat_kv (query head h reads key/value head
  h // (heads / kv_heads)); a tied head (no lm_head.weight) is the
  embedding.
  """
  heads, dim = hf['num_attention_heads'], hf['hidden_size']
  kv_heads = hf.get('num_key_value_heads') or heads
  head_dim, eps = dim // heads, hf['rms_norm_eps']
  batch, seq = ids.shape
  inv_freq = 1.0 / hf['rope_theta'] ** (np.arange(0, head_dim, 2) / head_dim)
  freqs = np.arange(seq)[:, None] * inv_freq[None]
  emb = np.concatenate([freqs, freqs], axis=-1)
  cos, sin = np.cos(emb), np.sin(emb)                       # (seq, head_dim)
  causal = np.tril(np.ones((seq, seq), bool))
  x = t['model.embed_tokens.weight'][ids]
  for i in range(hf['num_hidden_layers']):
    p = lambda name: t[f'model.layers.{i}.{name}.weight']
    h = rms_norm(x, p('input_layernorm'), eps)
    split = lambda y: y.reshape(batch, seq, -1, head_dim).transpose(
        0, 2, 1, 3)
    q, k, v = (split(h @ p(f'self_attn.{n}_proj').T) for n in 'qkv')
    k, v = (np.repeat(y, heads // kv_heads, axis=1) for y in (k, v))
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
    scores = np.where(causal, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, dim)
    x = x + attn @ p('self_attn.o_proj').T
    h = rms_norm(x, p('post_attention_layernorm'), eps)
    gate = h @ p('mlp.gate_proj').T
    x = x + ((gate / (1 + np.exp(-gate))) * (h @ p('mlp.up_proj').T)) @ (
        p('mlp.down_proj').T)
  x = rms_norm(x, t['model.norm.weight'], eps)
  return x @ t.get('lm_head.weight', t['model.embed_tokens.weight']).T


def read_export(out):
  with open(os.path.join(out, 'config.json')) as f:
    hf = json.load(f)
  tensors = safetensors.numpy.load_file(os.path.join(out,
                                                     'model.safetensors'))
  return hf, tensors


def poet_jax_logits(run, ids):
  return np.asarray(nnx.jit(lambda m, x: m(x))(run.model, jnp.asarray(ids)))


def forward_terms(run, seq_len):
  """The float32 forward's chain (tolerance.llama_terms); a POET run's
  blocks add their sums, which the export folds into its kernels."""
  poet = run.config.optimizer.name == 'poet'
  return tolerance.llama_terms(run.model.cfg, seq_len,
                               int(run.config.poet.block_size) if poet else 0)


def test_export_has_transformers_names_shapes_and_logits(exported):
  run, out = exported
  hf, tensors = read_export(out)
  c = run.config.model
  assert hf['architectures'] == ['LlamaForCausalLM']
  assert (hf['hidden_size'], hf['num_hidden_layers'],
          hf['num_attention_heads'], hf['intermediate_size'],
          hf['vocab_size']) == (c.dim, c.num_layers, c.num_heads, c.ffn_dim,
                                257)
  assert hf['tie_word_embeddings'] is False
  d, f = c.dim, c.ffn_dim
  expected = {'model.embed_tokens.weight': (257, d),
              'model.norm.weight': (d,), 'lm_head.weight': (257, d)}
  for i in range(c.num_layers):
    layer = f'model.layers.{i}.'
    expected.update({layer + 'input_layernorm.weight': (d,),
                     layer + 'post_attention_layernorm.weight': (d,),
                     layer + 'mlp.gate_proj.weight': (f, d),
                     layer + 'mlp.up_proj.weight': (f, d),
                     layer + 'mlp.down_proj.weight': (d, f)})
    for n in 'qkvo':
      expected[f'{layer}self_attn.{n}_proj.weight'] = (d, d)
  assert {k: v.shape for k, v in tensors.items()} == expected
  assert all(v.dtype == np.float32 for v in tensors.values())
  reference = hf_llama_logits(hf, {k: v.astype(np.float64)
                                   for k, v in tensors.items()}, BATCH)
  tolerance.assert_close(poet_jax_logits(run, BATCH), reference,
                         forward_terms(run, BATCH.shape[1]))


def test_transformers_loads_the_export_with_the_same_logits(exported):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  run, out = exported
  model = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation='eager')
  assert type(model).__name__ == 'LlamaForCausalLM'
  with torch.no_grad():
    theirs = model(torch.from_numpy(BATCH.astype(np.int64))).logits.numpy()
  ours = poet_jax_logits(run, BATCH)
  tolerance.assert_close(theirs, ours, forward_terms(run, BATCH.shape[1]))


def files(out):
  return {name: open(os.path.join(out, name), 'rb').read()
          for name in ('config.json', 'model.safetensors')}


def test_export_import_export_is_bit_identical(exported, tmp_path):
  """Import into a fresh run of the same config (a POET run takes the merged
  weights as W0), export again: the same bytes."""
  run, out = exported
  c = run.config
  c.init_from = out
  setup, state = train_state.init_state(c, run.model.cfg.vocab_size)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = init_from.init_state_from(out, setup, state,
                                    jax.tree.map(lambda _: device, state))
  again = restore.Run(c, '', 0, {}, run.tokenizer, setup, state)
  export.export_run(again, str(tmp_path))
  assert files(str(tmp_path)) == files(out)


def test_training_from_an_export_starts_where_the_run_ended(tmp_path_factory):
  """A POET run from the POET export: its step-0 evaluation is the source
  run's last (W0 = merged weights, R = P = I)."""
  workdir, _ = trained_run(tmp_path_factory, 'poet')
  out = str(tmp_path_factory.mktemp('hf_for_init'))
  assert export.main(['export', f'--workdir={workdir}', f'--out={out}']) == 0
  new = str(tmp_path_factory.mktemp('from_hf'))
  result = run_train(new, '--config.train.steps=1', f'--config.init_from={out}',
                     '--config.eval_at_start=always')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'initialized from {out}' in result.stdout
  source = [e['eval_loss'] for e in read_metrics(workdir) if 'eval_loss' in e]
  start = [e for e in read_metrics(new) if 'eval_loss' in e][0]
  assert start['step'] == 0
  # Folded (export) and unfolded (the source run) compute differ by rounding:
  # the forward over 32 tokens, the log-sum-exp over 257 and the mean over
  # the 256 held-out tokens (train_util.TINY); scale: the loss.
  run = restore.load_run(workdir)
  tolerance.assert_close(start['eval_loss'], source[-1],
                         forward_terms(run, 32) + 257 + 256)


def write_config(directory, **changes):
  hf = hf_lib.hf_config(restore.dense_config(
      train_state.model_config(train.parse_command_line(
          ['train.py', *TINY_FLAGS]).config, 257)), 256, 32)
  hf.update(changes)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(hf, f)
  return str(directory)


def truncated_weights(directory):
  """A checkpoint directory whose model.safetensors lost its last bytes."""
  write_config(directory)
  path = os.path.join(directory, hf_lib.WEIGHTS_FILE)
  safetensors.numpy.save_file({'x': np.zeros(64, np.float32)}, path)
  os.truncate(path, os.path.getsize(path) - 16)
  return str(directory)


TINY_FLAGS = ('--config.model.dim=32', '--config.model.num_layers=2',
              '--config.model.num_heads=2', '--config.model.ffn_dim=64',
              '--config.poet.block_size=8')


@pytest.mark.parametrize('case,expected', [
    ('missing', 'no such directory'),
    ('gpt2', "not a Llama checkpoint (model_type='gpt2')"),
    ('sizes', 'hidden_size=64 but model.dim=32'),
    ('gqa', 'num_key_value_heads=1 but model.num_kv_heads=2 (set '
            '--config.model.num_kv_heads=1)'),
    ('theta', 'rope_theta=500000.0 but model.rope_theta=10000.0'),
    ('no_weights', 'no model.safetensors'),
    ('truncated', 'the safetensors files cannot be read'),
])
def test_bad_init_from_is_one_line_and_nothing_is_written(case, expected,
                                                          tmp_path, capsys):
  source = {'missing': lambda: str(tmp_path / 'nothing'),
            'gpt2': lambda: write_config(tmp_path / 'hf', model_type='gpt2'),
            'sizes': lambda: write_config(tmp_path / 'hf', hidden_size=64),
            'gqa': lambda: write_config(tmp_path / 'hf',
                                        num_key_value_heads=1),
            'theta': lambda: write_config(tmp_path / 'hf',
                                          rope_theta=500000.0),
            'no_weights': lambda: write_config(tmp_path / 'hf'),
            'truncated': lambda: truncated_weights(tmp_path / 'hf')}[case]()
  workdir = tmp_path / 'run'
  code = train.main(['train.py', f'--workdir={workdir}', *TINY_FLAGS,
                     f'--config.init_from={source}'])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert len(err) == 1 and expected in err[0], err
  assert not workdir.exists()


def test_bad_export_is_one_line_and_changes_nothing(tmp_path_factory,
                                                    tmp_path, capsys):
  workdir, _ = trained_run(tmp_path_factory, 'poet')
  before = sorted(os.walk(workdir))
  blocker = tmp_path / 'file'
  blocker.write_text('')
  for args, expected in [
      ((f'--workdir={tmp_path}', f'--out={tmp_path / "o"}'), 'no config'),
      ((f'--workdir={workdir}', f'--out={blocker / "o"}'), 'cannot be written'),
      ((f'--workdir={workdir}', f'--out={tmp_path / "o"}', '--step=x'),
       '--step=x is not an integer; give --step an integer'),
  ]:
    assert export.main(['export', *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
  assert sorted(os.listdir(tmp_path)) == ['file']
  assert sorted(os.walk(workdir)) == before


def test_a_sentencepiece_tokenizer_is_exported_beside_the_model(exported,
                                                                tmp_path):
  run, _ = exported
  model = tmp_path / 'spiece.model'
  model.write_bytes(b'a SentencePiece model proto')
  weights = jax.device_get(nnx.jit(restore.dense_weights)(run.model))
  hf_lib.write_checkpoint(str(tmp_path / 'out'), run.model.cfg, weights,
                          256, 32, tokenizer_path=str(model))
  assert (tmp_path / 'out' / 'tokenizer.model').read_bytes() == (
      model.read_bytes())
  tokenizer_config = json.loads(
      (tmp_path / 'out' / 'tokenizer_config.json').read_text())
  assert tokenizer_config['tokenizer_class'] == 'LlamaTokenizer'


# ------------------------------------------ a Llama-3-shaped checkpoint


def has_transformers() -> bool:
  try:
    import torch, transformers  # pylint: disable=g-import-not-at-top,unused-import,multiple-imports
  except ImportError:
    return False
  return True


def llama3_checkpoint(directory: str, tied: bool) -> np.ndarray:
  """A random checkpoint of hf_reference.LLAMA3's shape in `directory`, and
  its logits of hf_reference.IDS: built, saved and run by transformers
  when installed, else written here and run by the NumPy forward."""
  if has_transformers():
    return hf_reference.build(directory, tied)
  hf = {**hf_reference.LLAMA3, 'model_type': 'llama',
        'architectures': ['LlamaForCausalLM'], 'hidden_act': 'silu',
        'tie_word_embeddings': tied}
  d, f, v = hf['hidden_size'], hf['intermediate_size'], hf['vocab_size']
  kv = hf['num_key_value_heads'] * d // hf['num_attention_heads']
  shapes = {'q_proj': (d, d), 'k_proj': (kv, d), 'v_proj': (kv, d),
            'o_proj': (d, d)}
  mlp = {'gate_proj': (f, d), 'up_proj': (f, d), 'down_proj': (d, f)}
  rng = np.random.default_rng(0)
  draw = lambda shape: (0.1 * rng.standard_normal(shape)).astype(np.float32)
  tensors = {'model.embed_tokens.weight': draw((v, d)),
             'model.norm.weight': 1 + draw((d,))}
  if not tied:
    tensors['lm_head.weight'] = draw((v, d))
  for i in range(hf['num_hidden_layers']):
    layer = f'model.layers.{i}.'
    tensors.update({f'{layer}self_attn.{n}.weight': draw(s)
                    for n, s in shapes.items()})
    tensors.update({f'{layer}mlp.{n}.weight': draw(s) for n, s in mlp.items()})
    for norm in ('input_layernorm', 'post_attention_layernorm'):
      tensors[f'{layer}{norm}.weight'] = 1 + draw((d,))
  os.makedirs(directory)
  with open(os.path.join(directory, 'config.json'), 'w') as file:
    json.dump(hf, file)
  safetensors.numpy.save_file(tensors, os.path.join(directory,
                                                    'model.safetensors'))
  return reference_logits(directory)


def reference_logits(directory: str) -> np.ndarray:
  """transformers' logits of hf_reference.IDS from a checkpoint directory,
  or the NumPy forward's without transformers."""
  if has_transformers():
    return hf_reference.logits(directory)
  hf, tensors = read_export(directory)
  return hf_llama_logits(hf, {k: v.astype(np.float64)
                              for k, v in tensors.items()}, hf_reference.IDS)


def llama3_config(source: str, tied: bool):
  """A run of the checkpoint's sizes and settings, starting from it."""
  hf = hf_reference.LLAMA3
  c = config_lib.base_config()
  c.model.update(dim=hf['hidden_size'], num_layers=hf['num_hidden_layers'],
                 num_heads=hf['num_attention_heads'],
                 num_kv_heads=hf['num_key_value_heads'],
                 ffn_dim=hf['intermediate_size'], vocab_size=hf['vocab_size'],
                 rope_theta=hf['rope_theta'], norm_eps=hf['rms_norm_eps'],
                 tie_embeddings=tied)
  c.train.update(steps=4, batch_size=2, seq_len=16, lr=1e-3)
  c.poet.update(block_size=8.0, merge_every=2, lr=1e-2)
  c.init_from = source
  return c


def start_from(c, method: str):
  """(setup, train state) of a fresh run of `method` from c.init_from."""
  c.optimizer.name = method
  config_checks.validate(c)  # the checkpoint's config and tensor headers
  setup, state = train_state.init_state(c, c.model.vocab_size)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = init_from.init_state_from(c.init_from, setup, state,
                                    jax.tree.map(lambda _: device, state))
  return setup, state


def logits_of(setup, state) -> np.ndarray:
  """The run's logits of hf_reference.IDS."""
  model = nnx.merge(setup.graphdef, state['params'], state['frozen'])
  return np.asarray(nnx.jit(lambda m, x: m(x))(
      model, jnp.asarray(hf_reference.IDS, jnp.int32)))


def assert_same_logits(ours, theirs):
  np.testing.assert_allclose(ours, theirs, rtol=1e-4,
                             atol=1e-4 * np.abs(theirs).max())


def finetune(setup, state, steps: int):
  """The run after `steps` trainer steps on one batch; (state, losses)."""
  step = jax.jit(lambda s, b: steps_lib.train_step(setup, s, b))
  batch = jnp.asarray(np.random.default_rng(2).integers(0, 257, (2, 17)),
                      jnp.int32)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics['train_loss']))
  return state, losses


@pytest.mark.parametrize('tied', [False, True], ids=['untied', 'tied'])
def test_a_llama3_shaped_checkpoint_round_trips(tied, tmp_path):
  """Grouped-query attention, rope_theta 500000, rms_norm_eps 1e-5, tied
  or untied head: a dense and a POET run start from the checkpoint with
  its logits; the POET run finetunes it (W0 = its weights; the untied
  case, 4 steps with merges after 2 and 4), every projection keeping its
  singular values; the export loads back with the model's logits."""
  source = str(tmp_path / 'hf')
  theirs = llama3_checkpoint(source, tied)
  c = llama3_config(source, tied)
  imported = init_from.load_weights(source, train_state.model_config(
      c, c.model.vocab_size))
  for method in ('adamw', 'poet'):
    setup, state = start_from(c, method)
    assert_same_logits(logits_of(setup, state), theirs)
  if not tied:
    state, losses = finetune(setup, state, 4)
    assert losses[-1] < losses[0], losses
  model = nnx.merge(setup.graphdef, state['params'], state['frozen'])
  weights = jax.device_get(nnx.jit(restore.dense_weights)(model))
  for name in hf_lib.KERNELS if not tied else ():
    assert not np.allclose(weights[name], imported[name], atol=1e-5), name
    assert_spectrum_kept(weights[name], imported[name], 8, merges=2)
  out = str(tmp_path / 'out')
  hf_lib.write_checkpoint(out, model.cfg, weights, 256, 64)
  hf, tensors = read_export(out)
  assert (hf['num_key_value_heads'], hf['rope_theta'], hf['rms_norm_eps'],
          hf['tie_word_embeddings']) == (2, 500000.0, 1e-5, tied)
  assert ('lm_head.weight' in tensors) is not tied
  assert_same_logits(reference_logits(out), logits_of(setup, state))
