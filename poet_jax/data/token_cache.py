"""Token streams and their cache: a split tokenized once, in parallel shards.

The documents of a split are cut into shards of `shard_docs` consecutive
documents (a fixed number, so the cache does not depend on how many workers
or hosts made it). Worker processes tokenize shards (every document followed
by EOS), each into its own .npy with a JSON sidecar, written atomically. The
stream is the shards in order, cut at max_tokens: only the shards up to the
cap are tokenized, and shards are shared by every cap. A manifest, written
last, names the shards a stream uses; every file is checked when loaded.

On several hosts each host tokenizes its own share of the shards first (shard
i belongs to host i % process_count) and visits the others' shards later,
taking the ones it does not find on disk: with a shared cache directory each
host does about its share; without one each does all, as one host would.
See docs/data.md.
"""
import hashlib
import io
import json
import math
import os
import tempfile
from typing import Sequence

import numpy as np

from poet_jax.data import corpora
from poet_jax.data import tokenizer as tokenizer_lib
from poet_jax.data.corpora import DataError

# Part of every cache key: bump it when the layout changes so old caches are
# never read as new ones.
FORMAT = 2

# Shards hold about SHARD_BYTES of stored text, ~1-2 s of one core: fine
# enough to balance workers and to start training early, coarse enough that
# the files stay few (~90,000 for C4's 365 M train documents). SHARD_DOCS is
# for a dataset whose size tfds does not record; C4's documents average
# ~2 KB, so it gives the same there.
SHARD_BYTES = 8 * 2**20
SHARD_DOCS = 4096


def shard_docs_for(docs: corpora.Documents) -> int:
  """Documents per shard for a split: a power of two (a stable cache key)
  near SHARD_BYTES of its text, in [64, 65536]."""
  if not docs.num_bytes or not len(docs):
    return SHARD_DOCS
  per_doc = docs.num_bytes / len(docs)
  return 2 ** min(16, max(6, round(math.log2(SHARD_BYTES / per_doc))))


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def shard_dir(docs: corpora.Documents, tokenizer: tokenizer_lib.Tokenizer,
              cache_dir: str, shard_docs: int = SHARD_DOCS) -> str:
  """The directory of the shards of (dataset, split, tokenizer, shard_docs)."""
  key = json.dumps({'format': FORMAT, 'dataset': docs.identity,
                    'split': docs.split, 'tokenizer': tokenizer.identity,
                    'shard_docs': shard_docs}, sort_keys=True)
  digest = hashlib.sha256(key.encode('utf-8')).hexdigest()[:12]
  readable = docs.name.replace('/', '-')
  tokenizer_name = tokenizer.identity.split('-')[0]
  return os.path.join(
      cache_dir, f'{readable}.{docs.split}.{tokenizer_name}.{digest}')


def stream_path(docs: corpora.Documents, tokenizer: tokenizer_lib.Tokenizer,
                max_tokens: int | None, cache_dir: str,
                shard_docs: int = SHARD_DOCS) -> str:
  """The manifest of the stream of (dataset, split, tokenizer, cap)."""
  return os.path.join(shard_dir(docs, tokenizer, cache_dir, shard_docs),
                      f'stream-{max_tokens or "all"}.json')


def shard_path(directory: str, index: int) -> str:
  return os.path.join(directory, f'shard-{index:06d}.npy')


def sidecar_path(path: str) -> str:
  return path[:-len('.npy')] + '.json'


# ---------------------------------------------------------------------------
# Atomic files.


def _atomic(path: str, write) -> None:
  """Calls write(file) on a temporary file renamed to path once complete."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path),
                             prefix=os.path.basename(path) + '.',
                             suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes it private; caches may be shared.
    os.replace(tmp, path)
  except OSError as e:  # a full disk: the message names the file
    raise OSError(e.errno, e.strerror, path) from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, meta: dict) -> None:
  text = (json.dumps(meta, indent=1) + '\n').encode('utf-8')
  _atomic(path, lambda f: f.write(text))


def write_shard(path: str, tokens: np.ndarray, meta: dict) -> None:
  """The .npy and its sidecar; the .npy is renamed into place last, so an
  existing .npy is always complete and described."""
  buf = io.BytesIO()
  np.save(buf, tokens, allow_pickle=False)
  write_json(sidecar_path(path), {**meta, 'dtype': tokens.dtype.name,
                               'num_tokens': len(tokens),
                               'num_bytes': buf.tell()})
  _atomic(path, lambda f: f.write(buf.getbuffer()))


def read_json(path: str, what: str, fix: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f'{what} has no valid {path} ({type(e).__name__}); '
                    f'{fix}') from None


def load_stream(path: str) -> np.ndarray:
  """A cached shard, memory-mapped, after checking it against its sidecar.

  A damaged cache is reported rather than silently rebuilt: it means a disk
  or copy problem worth knowing about, and other processes may be reading it.
  """
  fix = 'delete it (and its .json) and rerun to rebuild it'
  meta = read_json(sidecar_path(path), f'token cache {path}', fix)
  try:
    expected = (int(meta['num_tokens']), np.dtype(meta['dtype']),
                int(meta['num_bytes']))
  except (ValueError, KeyError, TypeError) as e:
    raise DataError(f'token cache {path} has no valid sidecar '
                    f'{sidecar_path(path)} ({type(e).__name__}); {fix}') from None
  size = os.path.getsize(path) if os.path.exists(path) else 0
  if size != expected[2]:
    raise DataError(f'token cache {path} is {size} bytes, not '
                    f'{expected[2]}: truncated or corrupt; {fix}')
  try:
    tokens = np.load(path, mmap_mode='r')
  except (OSError, ValueError) as e:
    raise DataError(f'token cache {path} is not a readable .npy '
                    f'({str(e).splitlines()[0]}); {fix}') from None
  if tokens.shape != (expected[0],) or tokens.dtype != expected[1]:
    raise DataError(f'token cache {path} holds {tokens.shape} {tokens.dtype}'
                    f', not ({expected[0]},) {expected[1]}; {fix}')
  return tokens


# ---------------------------------------------------------------------------
# A stream made of shards.


class ShardedTokens:
  """Shards read as one 1-D token array (memory-mapped, nothing copied).

  Supports len(), integer-array and slice indexing (what batching uses) and
  np.asarray (which copies everything: for tests and small streams).
  """

  def __init__(self, shards: Sequence[np.ndarray], length: int):
    self._shards = list(shards)
    self._starts = np.cumsum([0] + [len(s) for s in self._shards])
    self.dtype = self._shards[0].dtype
    self.shape = (length,)

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.take(np.arange(*index.indices(len(self))))
    return self.take(index)

  def take(self, index) -> np.ndarray:
    """tokens[index] for an integer array of any shape."""
    flat = np.asarray(index, np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
      raise IndexError(f'token index out of range [0, {len(self)})')
    shard = np.searchsorted(self._starts, flat, side='right') - 1
    out = np.empty(flat.shape, self.dtype)
    for s in np.unique(shard):
      here = shard == s
      out[here] = self._shards[s][flat[here] - self._starts[s]]
    return out

  def __array__(self, dtype=None, copy=None):
    del copy  # Always a copy.
    whole = np.concatenate(self._shards)[:len(self)]
    return whole if dtype is None else whole.astype(dtype)


def load_manifest(path: str) -> np.ndarray | ShardedTokens:
  """The stream a manifest describes, every shard checked."""
  fix = 'delete it and rerun to rebuild it'
  meta = read_json(path, f'token stream {path}', fix)
  try:
    counts, total = [int(n) for n in meta['shards']], int(meta['num_tokens'])
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(f'token stream {path} is not a valid manifest '
                    f'({type(e).__name__}); {fix}') from None
  directory = os.path.dirname(path)
  shards = [load_stream(shard_path(directory, i)) for i in range(len(counts))]
  found = [len(s) for s in shards]
  if found != counts or total > sum(counts):
    raise DataError(f'token stream {path} lists shards of {counts} tokens '
                    f'but {directory} holds {found}; {fix}')
  if not shards:
    return np.zeros(0, np.dtype(meta.get('dtype', 'uint16')))
  if len(shards) == 1:
    return shards[0][:total]  # Still a memmap.
  return ShardedTokens(shards, total)
