"""Tokenizers: raw UTF-8 bytes, or a SentencePiece model.

Both share one small interface (`Tokenizer`): `vocab_size`, `eos_id`,
`encode`, `encode_batch`, `decode`, and `identity`, a string that changes
whenever the token ids a text maps to could change; token_cache.py keys its
token caches on it.
"""
import hashlib
import os
from typing import Iterable, Protocol, Sequence

import numpy as np


class TokenizerError(ValueError):
  """An unusable tokenizer file; its message is one line for the user."""


class Tokenizer(Protocol):
  vocab_size: int
  eos_id: int
  identity: str

  def encode(self, text: str) -> np.ndarray:
    ...

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    ...

  def decode(self, ids: Iterable[int]) -> str:
    ...


class ByteTokenizer:
  """Ids 0..255 are UTF-8 bytes; id 256 separates documents (EOS)."""

  vocab_size = 257
  eos_id = 256
  identity = 'byte'

  def encode(self, text: str) -> np.ndarray:
    # One C-level copy per document: the byte values are the ids.
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    ids = np.asarray(ids, np.int64).ravel()
    ids = ids[ids != self.eos_id]
    if ids.size and (ids.min() < 0 or ids.max() > 255):
      raise ValueError(f'byte tokenizer ids must be in [0, 256]; got '
                       f'{ids.min()}..{ids.max()}')
    return ids.astype(np.uint8).tobytes().decode('utf-8', errors='replace')

  def __repr__(self):
    return 'ByteTokenizer()'


class SentencePieceTokenizer:
  """A SentencePiece .model file (for example the T5 tokenizer used on C4).

  A model without an EOS piece gets one appended after its pieces
  (eos_id = number of pieces, vocab_size = pieces + 1), so documents can
  always be separated.
  """

  def __init__(self, path: str):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f'tokenizer file {path} does not exist; set data.tokenizer to a '
          "SentencePiece .model file or to 'byte'")
    with open(path, 'rb') as f:
      proto = f.read()
    try:
      self._sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    except Exception as e:  # sentencepiece raises RuntimeError, undocumented.
      reason = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise TokenizerError(f'tokenizer file {path} is not a SentencePiece '
                           f'model: {reason}') from None
    self.path = path
    self.num_threads = os.cpu_count() or 1  # encode_batch's
    pieces = self._sp.get_piece_size()
    own_eos = self._sp.eos_id()
    self.eos_id = own_eos if own_eos >= 0 else pieces
    self.vocab_size = pieces if own_eos >= 0 else pieces + 1
    # The file's hash, not its path: the same model anywhere shares caches,
    # and a retrained model at the same path does not.
    digest = hashlib.sha256(proto).hexdigest()[:16]
    self.identity = f'sentencepiece-{self.vocab_size}-{digest}'

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    ids = self._sp.encode(list(texts), num_threads=self.num_threads)
    return [np.asarray(i, np.int32) for i in ids]

  def __getstate__(self):
    # The model's bytes, not its path: a worker process gets this model even
    # if the file changes meanwhile.
    return {**self.__dict__, '_sp': self._sp.serialized_model_proto()}

  def __setstate__(self, state):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    self.__dict__.update(state)
    self._sp = sentencepiece.SentencePieceProcessor(model_proto=state['_sp'])

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in np.asarray(ids).ravel() if i != self.eos_id]
    return self._sp.decode(ids)

  def __repr__(self):
    return f'SentencePieceTokenizer({self.path!r})'


def load_tokenizer(spec: str) -> Tokenizer:
  """'byte' -> ByteTokenizer; anything else is a SentencePiece .model path."""
  if spec == 'byte':
    return ByteTokenizer()
  return SentencePieceTokenizer(spec)
