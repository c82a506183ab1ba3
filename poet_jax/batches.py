"""Batching: a token stream cut into examples, and batches as pure functions
of (step, seed), so the data position of a run is its step. See docs/data.md.
"""
import math

import numpy as np

from poet_jax.corpora import DataError
from poet_jax.corpora import split_sources


class TokenStream:
  """A split's token stream cut into non-overlapping examples.

  Example i is tokens[i * (seq_len + 1) : (i + 1) * (seq_len + 1)]; a model
  reads example[:-1] and predicts example[1:]. The tail shorter than one
  example is unused.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, name: str = ''):
    if seq_len < 1:
      raise DataError(f'seq_len must be positive; got {seq_len}')
    self.tokens = tokens
    self.seq_len = seq_len
    self.name = name
    self.num_examples = len(tokens) // (seq_len + 1)
    self._orders = {}

  def __repr__(self):
    return (f'TokenStream({self.name!r}, {len(self.tokens):,} tokens, '
            f'{self.num_examples:,} examples of {self.seq_len + 1})')

  def examples(self, indices) -> np.ndarray:
    """(len(indices), seq_len + 1) int32; reads only those rows' pages."""
    width = self.seq_len + 1
    rows = np.asarray(indices, np.int64).reshape(-1, 1)
    # A plain or memory-mapped array, or token_cache.ShardedTokens.
    return np.asarray(self.tokens[rows * width + np.arange(width)], np.int32)

  def _order(self, seed: int, epoch: int) -> np.ndarray:
    """The permutation of example indices for one epoch."""
    key = (seed, epoch)
    if key not in self._orders:
      # Two suffice: a batch spans at most two epochs. Kept because a
      # permutation of a large corpus costs far more than a batch.
      while len(self._orders) >= 2:
        self._orders.pop(next(iter(self._orders)))
      order = np.random.default_rng([seed, epoch]).permutation(
          self.num_examples)
      self._orders[key] = order.astype(
          np.int32 if self.num_examples < 2**31 else np.int64)
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
    if self.num_examples < batch_size:
      raise DataError(
          f'{self.name or "the stream"} has {self.num_examples} examples '
          f'of {self.seq_len + 1} tokens, fewer than one batch of '
          f'{batch_size}; lower the batch size or seq_len, or use more data')

  def train_batch(self, step: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1
                  ) -> np.ndarray:
    """This process's rows of the global batch for optimizer step `step`.

    The global batch is examples order[step * B : (step + 1) * B] of an
    endless sequence of epochs, each a fresh permutation drawn from
    (seed, epoch). Process p gets rows [p * B / P, (p + 1) * B / P). A pure
    function of its arguments: resuming at a step is exact, and any number
    of processes together see the single-process batch.

    Returns:
      (batch_size // process_count, seq_len + 1) int32.
    """
    self._check_batch(batch_size, process_index, process_count)
    if step < 0 or seed < 0:
      raise DataError(f'step ({step}) and seed ({seed}) must be >= 0')
    local = batch_size // process_count
    positions = (step * batch_size + process_index * local
                 + np.arange(local, dtype=np.int64))
    epochs, offsets = np.divmod(positions, self.num_examples)
    indices = np.empty(local, np.int64)
    for epoch in np.unique(epochs):
      here = epochs == epoch
      indices[here] = self._order(seed, int(epoch))[offsets[here]]
    return self.examples(indices)

  def eval_batches(self, batch_size: int, num_examples: int,
                   process_index: int = 0, process_count: int = 1
                   ) -> list[np.ndarray]:
    """Fixed evaluation batches: the split's first examples, in order.

    num_examples is rounded up to whole batches (evaluation has no padding
    mask) and capped at the whole batches the split holds. The same for
    every run and method, so losses are comparable.
    """
    self._check_batch(batch_size, process_index, process_count)
    num_batches = min(max(1, math.ceil(num_examples / batch_size)),
                      self.num_examples // batch_size)
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
  if stream.num_examples >= batch_size:
    return
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
