"""Generate text from a trained run: KV-cached decoding in one jitted loop.

  python -m poet_jax.generate --workdir=runs/llama_tiny_poet \
      --prompt="def fib(" --max_new_tokens=200 --temperature=0.8

Loads the latest checkpoint of any method, folds every POET layer into a
dense kernel once (restore.folded_model), prefills the prompt and samples one
token at a time with a key/value cache inside a single jax.lax.while_loop,
printing the text as it is produced. Temperature 0 is greedy decoding.
The prompt is preceded by the tokenizer's EOS, the document separator of
the training stream, so the model reads it as the start of a document.
An empty prompt is refused (exit code 2): the model was trained on examples
cut anywhere in the token stream, so it never learned to predict from one
token of context, and from the separator alone it samples its first token
almost at random (the default tiny model after its 300 steps puts 24% of
that token's probability on bytes that cannot start a UTF-8 character,
printed as U+FFFD).
"""
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from jax.experimental import io_callback

from poet_jax.models import llama as model_lib
from poet_jax.tools import cli
from poet_jax.tools import restore
from poet_jax.train.plan import planner


def sample(logits: jax.Array, key: jax.Array, temperature, top_k,
           top_p) -> jax.Array:
  """Next tokens (B,) int32 from logits (B, V) float32.

  temperature 0: argmax (greedy). Otherwise softmax(logits / temperature)
  restricted to the top_k most likely tokens (0: all) and then to the
  smallest set of them whose probability reaches top_p (nucleus sampling,
  Holtzman et al. 2019; 1: all). Tokens tied at a cut-off are kept. All
  three may be traced scalars.
  """
  vocab = logits.shape[-1]
  scaled = logits / jnp.maximum(temperature, 1e-6)
  ranked = -jnp.sort(-scaled, axis=-1)                       # descending
  k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
  ranked = jnp.where(jnp.arange(vocab) < k, ranked, -jnp.inf)
  probs = jax.nn.softmax(ranked, axis=-1)
  # A ranked token stays if the tokens before it hold less than top_p.
  keep = jnp.cumsum(probs, axis=-1) - probs < top_p
  cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
  sampled = jax.random.categorical(
      key, jnp.where(scaled < cutoff, -jnp.inf, scaled), axis=-1)
  greedy = jnp.argmax(logits, axis=-1)
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@functools.partial(nnx.jit, static_argnames=('max_new_tokens', 'on_token'))
def generate(model: model_lib.Llama, prompt: jax.Array, key: jax.Array,
             temperature=0.0, top_k=0, top_p=1.0, eos_id=-1, *,
             max_new_tokens: int, on_token=None) -> jax.Array:
  """Continue every row of `prompt` by max_new_tokens tokens.

  Args:
    model: a Llama (POET or dense; fold POET first for speed).
    prompt: (B, P) int32, P >= 1.
    key: a jax.random key; unused at temperature 0.
    temperature, top_k, top_p: see `sample`.
    eos_id: a row that produced it is finished: it continues with eos_id,
      and the loop ends when every row is finished. -1: never.
    max_new_tokens: static; the cache holds P + max_new_tokens positions.
    on_token: static; called on the host with each step's tokens (B,) in
      order (jax.experimental.io_callback), for streaming.
  Returns:
    (B, max_new_tokens) int32.
  """
  batch, length = prompt.shape
  cache = model_lib.init_cache(model.cfg, batch, length + max_new_tokens)
  logits, cache = model.decode(prompt, cache, 0)
  key, sub = jax.random.split(key)
  first = sample(logits[:, -1], sub, temperature, top_k, top_p)
  out = jnp.full((batch, max_new_tokens), eos_id, jnp.int32)

  def unfinished(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def step(carry):
    i, token, cache, out, done, key = carry
    token = jnp.where(done, eos_id, token)
    out = out.at[:, i].set(token)
    if on_token is not None:
      io_callback(on_token, None, token, ordered=True)
    done = done | (token == eos_id)
    logits, cache = model.decode(token[:, None], cache, length + i)
    key, sub = jax.random.split(key)
    token = sample(logits[:, 0], sub, temperature, top_k, top_p)
    return i + 1, token, cache, out, done, key

  carry = (jnp.int32(0), first, cache, out, jnp.zeros(batch, bool), key)
  return jax.lax.while_loop(unfinished, step, carry)[3]


class StreamPrinter:
  """Prints the text of row 0 as its tokens arrive.

  A character split over several byte tokens decodes to U+FFFD until its
  last byte arrives, so a trailing U+FFFD is held back.
  """

  def __init__(self, tokenizer, stream=None):
    self.tokenizer = tokenizer
    self.stream = stream or sys.stdout
    self.ids = []
    self.printed = 0

  def __call__(self, tokens) -> None:
    self.ids.append(int(np.asarray(tokens).reshape(-1)[0]))
    self._write(self.tokenizer.decode(self.ids).rstrip('\ufffd'))

  def finish(self) -> None:
    self._write(self.tokenizer.decode(self.ids))
    self.stream.write('\n')
    self.stream.flush()

  def _write(self, text: str) -> None:
    if len(text) > self.printed:
      self.stream.write(text[self.printed:])
      self.stream.flush()
      self.printed = len(text)


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'Work directory of a training run.',
                      flag_values=fv, required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step; default the latest.',
                       flag_values=fv)
  flags.DEFINE_string('prompt', '', 'Text to continue (not empty).',
                      flag_values=fv)
  flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate.',
                       flag_values=fv)
  flags.DEFINE_float('temperature', 0.8, 'Sampling temperature; 0: greedy.',
                     flag_values=fv)
  flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens; '
                       '0: all.', flag_values=fv)
  flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling: the smallest set of '
                     'tokens with this probability; 1: all.', flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'Sampling seed.', flag_values=fv)


def _check(fv: flags.FlagValues) -> None:
  if fv.max_new_tokens < 1:
    raise cli.UsageError(f'--max_new_tokens={fv.max_new_tokens} must be at '
                         'least 1')
  if fv.temperature < 0:
    raise cli.UsageError(f'--temperature={fv.temperature} must be >= 0 '
                         '(0: greedy)')
  if fv.top_k < 0:
    raise cli.UsageError(f'--top_k={fv.top_k} must be >= 0 (0: off)')
  if not 0 < fv.top_p <= 1:
    raise cli.UsageError(f'--top_p={fv.top_p} must be in (0, 1]')
  if not fv.prompt:
    raise cli.UsageError(
        '--prompt is empty; give text for the model to continue, such as '
        "--prompt='def ' (trained on examples cut anywhere in the stream, it "
        'has no learned way to start from nothing)')


def _warn_past_training_length(length: int, seq_len: int) -> None:
  """One stderr line when generation runs past the trained sequence length:
  the model has not seen those positions, and each new token attends to the
  whole cache, so a long run costs time quadratic in its length."""
  if length > seq_len:
    print(f'warning: prompt + --max_new_tokens is {length} tokens, past the '
          f'{seq_len} this model was trained on (train.seq_len): text beyond '
          'that is unreliable and slower per token; lower --max_new_tokens',
          file=sys.stderr)


def check_length(cfg: model_lib.LlamaConfig, length: int,
                 max_new_tokens: int) -> None:
  """UsageError when `length` positions (prompt + max_new_tokens) cannot be
  decoded: past int32 positions, or a key/value cache (its exact shapes, by
  jax.eval_shape) larger than one device's memory."""
  if length >= 2**31:
    raise cli.UsageError(f'--max_new_tokens={max_new_tokens} is past the '
                         f'{2**31 - 1} positions decoding can count')
  cache = jax.eval_shape(lambda: model_lib.init_cache(cfg, 1, length))
  per_position = sum(x.size * x.dtype.itemsize
                     for x in jax.tree.leaves(cache)) / length
  limit = planner.device_memory_gib() * planner.GIB
  if length * per_position > limit:
    fits = int(limit // per_position) - (length - max_new_tokens)
    raise cli.UsageError(
        f'--max_new_tokens={max_new_tokens}: the key/value cache of '
        f'{length:,} positions needs {length * per_position / planner.GIB:.3g}'
        f' GiB, more than this device\'s {limit / planner.GIB:.3g} GiB; at '
        f'most about {max(fits, 0):,} new tokens fit')


def _body(fv: flags.FlagValues) -> int:
  _check(fv)
  run = restore.load_run(fv.workdir, fv.step)
  tokenizer = run.tokenizer
  prompt = np.concatenate([[tokenizer.eos_id],
                           tokenizer.encode(fv.prompt)]).astype(np.int32)
  check_length(run.model.cfg, len(prompt) + fv.max_new_tokens,
               fv.max_new_tokens)
  model = restore.folded_model(run)
  _warn_past_training_length(len(prompt) + fv.max_new_tokens,
                             run.config.train.seq_len)
  printer = StreamPrinter(tokenizer)
  print(fv.prompt, end='', flush=True)
  tokens = generate(model, jnp.asarray(prompt[None]),
                    jax.random.key(fv.seed), fv.temperature, fv.top_k,
                    fv.top_p, tokenizer.eos_id,
                    max_new_tokens=fv.max_new_tokens, on_token=printer)
  jax.block_until_ready(tokens)
  jax.effects_barrier()  # every token's callback has run
  printer.finish()
  return 0


def main(argv=None) -> int:
  """`python -m poet_jax.generate --help`; returns the exit code."""
  return cli.run(__doc__, _define, _body, argv,
                 user_errors=(restore.RunError,))


if __name__ == '__main__':
  sys.exit(main())
