"""Batching: a token stream cut into examples, and batches as pure functions
of (step, seed), so the data position of a run is its step. See docs/data.md.
"""
import math

import numpy as np

from poet_jax.data.corpora import DataError
from poet_jax.data.corpora import split_sources


# Examples are shuffled within windows of this many tokens (in examples:
# WINDOW_TOKENS // (seq_len + 1)), taken in order: step s then needs only the
# windows up to its own, so training starts once the first window is
# tokenized. 2**25 (~34 M tokens, 64 MiB of uint16) holds the whole embedded
# corpus, so its order is one permutation per epoch, as before windows.
WINDOW_TOKENS = 2**25


class TokenStream:
  """A split's token stream cut into non-overlapping examples.

  Example i is tokens[i * (seq_len + 1) : (i + 1) * (seq_len + 1)]; a model
  reads example[:-1] and predicts example[1:]. The tail shorter than one
  example is unused. `tokens` is a (memory-mapped) array, a
  token_cache.ShardedTokens, or a tokenize_shards.GrowingTokens still being
  tokenized, whose reads wait for the shards they need.
  """

  def __init__(self, tokens, seq_len: int, name: str = '', source: str = ''):
    if seq_len < 1:
      raise DataError(f'seq_len must be positive; got {seq_len}')
    self.tokens = tokens
    self.seq_len = seq_len
    self.name = name
    # What the tokens are, known before they are all tokenized: the cache key
    # of (dataset, split, tokenizer, cap); what a checkpoint records.
    self.source = source
    self.window = max(1, WINDOW_TOKENS // (seq_len + 1))  # in examples
    self._orders = {}

  @property
  def num_examples(self) -> int:
    """All examples; waits for a stream still being tokenized."""
    return len(self.tokens) // (self.seq_len + 1)

  def examples_ready(self, wanted: int = 0) -> tuple[int, bool]:
    """(examples readable now, whether that is all of them), after waiting
    until `wanted` are readable or all are."""
    if not hasattr(self.tokens, 'wait_for'):
      return self.num_examples, True
    ready, complete = self.tokens.wait_for(wanted * (self.seq_len + 1))
    return ready // (self.seq_len + 1), complete

  def __repr__(self):
    ready, complete = self.examples_ready()
    return (f'TokenStream({self.name!r}, {ready:,}{"" if complete else "+"} '
            f'examples of {self.seq_len + 1})')

  def examples(self, indices) -> np.ndarray:
    """(len(indices), seq_len + 1) int32; reads only those rows' pages."""
    width = self.seq_len + 1
    rows = np.asarray(indices, np.int64).reshape(-1, 1)
    return np.asarray(self.tokens[rows * width + np.arange(width)], np.int32)

  def _order(self, seed: int, epoch: int, window: int, size: int
             ) -> np.ndarray:
    """The permutation of a window's `size` examples in one epoch; window 0
    keeps the seed of a whole-epoch permutation."""
    key = (seed, epoch, window, size)
    if key not in self._orders:
      # Four suffice: a batch spans at most two windows. Kept because a
      # permutation costs far more than a batch.
      while len(self._orders) >= 4:
        self._orders.pop(next(iter(self._orders)))
      rng = np.random.default_rng([seed, epoch] + ([window] if window else []))
      self._orders[key] = rng.permutation(size).astype(
          np.int32 if size < 2**31 else np.int64)
    return self._orders[key]

  def _check_batch(self, batch_size: int, process_index: int,
                   process_count: int) -> None:
    if batch_size < 1 or process_count < 1 or batch_size % process_count:
      raise DataError(
          f'batch_size={batch_size} must be a positive multiple of the '
          f'process count {process_count}')
    if not 0 <= process_index < process_count:
      raise DataError(f'process_index={process_index} is not in '
                      f'[0, {process_count})')
    ready, _ = self.examples_ready(batch_size)
    if ready < batch_size:
      raise DataError(
          f'{self.name or "the stream"} has {ready} examples '
          f'of {self.seq_len + 1} tokens, fewer than one batch of '
          f'{batch_size}; lower the batch size or seq_len, or use more data')

  def indices(self, positions: np.ndarray, seed: int) -> np.ndarray:
    """Example indices at positions of the endless sequence of epochs.

    Epoch e visits the windows in order, each permuted from (seed, e,
    window); the last window holds the examples left over. Waits for the
    windows the positions fall in (and, past the first epoch, for all).
    """
    w = self.window
    ready, complete = self.examples_ready((int(positions.max()) // w + 1) * w)
    if complete:
      total = ready
      epochs, offsets = np.divmod(positions, total)
    else:  # The windows wanted are ready and full, all in the first epoch.
      total, epochs, offsets = None, np.zeros_like(positions), positions
    windows = offsets // w
    indices = np.empty(len(positions), np.int64)
    for epoch, window in set(zip(epochs.tolist(), windows.tolist())):
      here = (epochs == epoch) & (windows == window)
      first = window * w
      size = min(w, total - first) if complete else w
      order = self._order(seed, epoch, window, size)
      indices[here] = first + order[offsets[here] - first]
    return indices

  def train_batch(self, step: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1
                  ) -> np.ndarray:
    """This process's rows of the global batch for optimizer step `step`.

    The global batch is examples [step * B, (step + 1) * B) of an endless
    sequence of epochs, each the stream's windows in order, shuffled within
    from (seed, epoch, window) (see indices). Process p gets rows
    [p * B / P, (p + 1) * B / P). A pure function of its arguments and the
    stream: resuming at a step is exact, any number of processes together
    see the single-process batch, and a stream still being tokenized gives
    the batches it gives when complete.

    Returns:
      (batch_size // process_count, seq_len + 1) int32.
    """
    self._check_batch(batch_size, process_index, process_count)
    if step < 0 or seed < 0:
      raise DataError(f'step ({step}) and seed ({seed}) must be >= 0')
    local = batch_size // process_count
    positions = (step * batch_size + process_index * local
                 + np.arange(local, dtype=np.int64))
    return self.examples(self.indices(positions, seed))

  def eval_batches(self, batch_size: int, num_examples: int,
                   process_index: int = 0, process_count: int = 1
                   ) -> list[np.ndarray]:
    """Fixed evaluation batches: the split's first examples, in order.

    num_examples is rounded up to whole batches (evaluation has no padding
    mask) and capped at the whole batches the split holds. The same for
    every run and method, so losses are comparable.
    """
    self._check_batch(batch_size, process_index, process_count)
    wanted = max(1, math.ceil(num_examples / batch_size))
    ready, _ = self.examples_ready(wanted * batch_size)
    num_batches = min(wanted, ready // batch_size)
    local = batch_size // process_count
    return [self.examples(b * batch_size + process_index * local
                          + np.arange(local))
            for b in range(num_batches)]


def check_one_batch(stream: TokenStream, batch_size: int, name: str = '',
                    split: str = '', max_tokens: int = 0) -> None:
  """DataError unless the stream holds one batch of batch_size examples.

  For a local corpus `name` the message names the files of `split`, and it
  says which settings would make the batch fit. Cheap: run it before any
  model is built.
  """
  if stream.examples_ready(batch_size)[0] >= batch_size:
    return  # Waits only for the first batch of a stream being tokenized.
  sources = split_sources(name, split) if name else None
  tokens, width = len(stream.tokens), stream.seq_len + 1
  fixes = []
  if tokens // batch_size >= 2:
    fixes.append(f'train.seq_len to at most {tokens // batch_size - 1}')
  if stream.num_examples:
    fixes.append(f'train.batch_size to at most {stream.num_examples}')
  fix = ('lower ' + ' or '.join(fixes) + ', or ') if fixes else ''
  more = 'add text to these files or more .txt files' if sources else (
      'use more data')
  if max_tokens:
    more = f'raise data.max_tokens={max_tokens}'
  where = ''
  if sources is not None:
    shown = ', '.join(f'{rel} ({size} bytes)' for rel, size in sources[:5])
    where = (f' from {len(sources)} file(s): {shown}'
             f'{", ..." if len(sources) > 5 else ""}')
  raise DataError(
      f'{stream.name} has {tokens} tokens{where}, {stream.num_examples} '
      f'example(s) of {width} tokens: fewer than one batch of {batch_size} '
      f'({batch_size * width} tokens); {fix}{more}')
