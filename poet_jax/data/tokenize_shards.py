"""Tokenizing a split into cached shards with every core (token_cache.py
describes the files).

Shards are made by worker processes (started with 'spawn': the trainer has
JAX's threads running, which fork would copy mid-flight), each opening the
dataset itself from its ArrayRecord files. One shard, or one worker, is done
in this process. Shards are submitted in this host's order (token_cache's
docstring) and the build stops once the shards in order reach max_tokens.
"""
import concurrent.futures
import ctypes
import math
import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import tqdm

from poet_jax.data import corpora
from poet_jax.data import token_cache
from poet_jax.data import tokenizer as tokenizer_lib

# In-flight shards per worker: enough that no worker waits for work, few
# enough that little past max_tokens is tokenized.
_PER_WORKER = 2

# A worker process costs seconds to start (spawn imports the main module,
# and tfds): worth one per this much stored text of the split.
WORKER_BYTES = 64 * 2**20

# Documents per batched read + encode inside a shard.
_READ_CHUNK = 512

_WORKER = {}  # A worker process's tokenizer and documents.


def encode_shard(docs: corpora.Documents, tokenizer: tokenizer_lib.Tokenizer,
                 start: int, stop: int) -> np.ndarray:
  """Documents [start, stop), each followed by EOS, as one 1-D array of
  token_cache.token_dtype(tokenizer.vocab_size)."""
  dtype = token_cache.token_dtype(tokenizer.vocab_size)
  eos = np.array([tokenizer.eos_id], dtype)
  pieces = []
  for texts in docs.chunks(_READ_CHUNK, start, stop):
    for ids in tokenizer.encode_batch(texts):
      pieces += [ids.astype(dtype), eos]
  return np.concatenate(pieces) if pieces else np.zeros(0, dtype)


def _make_shard(docs, tokenizer, task) -> tuple[int, int, int]:
  """Tokenizes and writes one shard; (index, tokens, documents)."""
  index, start, stop, path, meta = task
  tokens = encode_shard(docs, tokenizer, start, stop)
  token_cache.write_shard(path, tokens, {**meta, 'first_document': start,
                                         'documents': stop - start})
  return index, len(tokens), stop - start


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _exit_when_orphaned(parent: int) -> None:
  while os.getppid() == parent:
    time.sleep(0.5)
  os._exit(1)  # pylint: disable=protected-access


def die_with_parent(parent: int) -> None:
  """Ends this process when `parent` (its parent's pid) ends, however that
  ends: a killed trainer must not leave its workers tokenizing (nor, through
  them, multiprocessing's resource tracker) for minutes.

  Linux: the kernel sends SIGKILL at the parent's death (PR_SET_PDEATHSIG;
  the workers are started by the thread that also shuts them down, so that
  thread's end is never early). Elsewhere a thread polls the parent's pid.
  A parent already gone ends it at once.
  """
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
      raise OSError(ctypes.get_errno(), 'prctl')
  except (OSError, AttributeError):  # no prctl
    threading.Thread(target=_exit_when_orphaned, args=(parent,),
                     daemon=True).start()
  if os.getppid() != parent:
    os._exit(1)  # pylint: disable=protected-access


def _init_worker(tokenizer, identity: str, split: str, name: str,
                 parent: int) -> None:
  die_with_parent(parent)
  # One thread each: the processes are the parallelism.
  if hasattr(tokenizer, 'num_threads'):
    tokenizer.num_threads = 1
  _WORKER['tokenizer'] = tokenizer
  _WORKER['docs'] = corpora.reopen_documents(identity, split, name)


def _worker_make_shard(task):
  return _make_shard(_WORKER['docs'], _WORKER['tokenizer'], task)


class _InProcess(concurrent.futures.Executor):
  """The executor interface, running each task when submitted."""

  def __init__(self, docs, tokenizer):
    self._docs, self._tokenizer = docs, tokenizer

  def submit(self, fn, /, *args, **kwargs):
    del fn, kwargs  # Always _worker_make_shard, done here with our objects.
    future = concurrent.futures.Future()
    try:
      future.set_result(_make_shard(self._docs, self._tokenizer, *args))
    except Exception as e:  # pylint: disable=broad-except
      future.set_exception(e)
    return future


def default_workers(docs: corpora.Documents) -> int:
  """Worker processes for a split: one per WORKER_BYTES of its text, at
  most os.cpu_count(); 1 (this process) for the embedded corpus."""
  cores = os.cpu_count() or 1
  if not docs.num_bytes:
    return cores
  return max(1, min(cores, docs.num_bytes // WORKER_BYTES))


def shard_order(num_shards: int, process_index: int, process_count: int,
                lag: int) -> list[int]:
  """The order this host visits shards in: its own (i % process_count ==
  process_index) in order, and each other host's shard `lag` of its own
  later, by when a host sharing the cache has written it."""
  def key(i):
    own = i % process_count == process_index
    return (i // process_count + (0 if own else lag), i)
  return sorted(range(num_shards), key=key)


class Progress:
  """A progress bar for a build: documents and tokens per second, time left,
  and the share of the tokens wanted (max_tokens, the run's tokens when set
  as README's C4 section says) or of the documents (no cap)."""

  def __init__(self, docs, max_tokens, enabled: bool):
    self._cap = max_tokens
    self._start = time.perf_counter()
    self.tokens = self.documents = 0
    self._bar = tqdm.tqdm(
        total=max_tokens or len(docs), unit='tok' if max_tokens else 'doc',
        unit_scale=True, dynamic_ncols=True, disable=not enabled,
        desc=f'tokenizing {docs.name} {docs.split}')

  def update(self, tokens: int, documents: int) -> None:
    self.tokens += tokens
    self.documents += documents
    seconds = max(time.perf_counter() - self._start, 1e-9)
    # The bar gives the rate of its own unit; the other one goes after it.
    if self._cap:
      self._bar.update(min(tokens, self._cap - self._bar.n))
      self._bar.set_postfix_str(f'{self.documents / seconds:,.0f} doc/s',
                                refresh=False)
    else:
      self._bar.update(documents)
      self._bar.set_postfix_str(
          f'{self.tokens / seconds / 1e6:.2f}M tok/s, {self.tokens:,} tokens',
          refresh=False)

  def close(self) -> None:
    self._bar.close()


def _executor(docs, tokenizer, workers: int):
  if workers <= 1:
    return _InProcess(docs, tokenizer)
  return concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context('spawn'),
      initializer=_init_worker,
      initargs=(tokenizer, docs.identity, docs.split, docs.name,
                os.getpid()))


class _Prefix:
  """The shards done so far, and how many of them, in order, the stream
  uses once they reach max_tokens or the end of the split."""

  def __init__(self, directory: str, num_shards: int, max_tokens):
    self.directory, self.num_shards, self.cap = directory, num_shards, max_tokens
    self.counts = {}              # shard index -> tokens
    self.documents = {}           # shard index -> documents
    self._next, self._total = 0, 0  # the shards in order known done

  def on_disk(self, index: int) -> int | None:
    """Documents of a shard found complete on disk (another host's or an
    earlier run's; checked in full when loaded), recording its tokens."""
    path = token_cache.shard_path(self.directory, index)
    if not os.path.exists(path):
      return None
    meta = token_cache.read_json(
        token_cache.sidecar_path(path), f'token cache {path}',
        'delete it (and its .json) and rerun to rebuild it')
    self.counts[index] = int(meta['num_tokens'])
    self.documents[index] = int(meta['documents'])
    return self.documents[index]

  def used(self) -> int | None:
    """The number of shards the stream uses, once known."""
    while self._next < self.num_shards:
      if self._next not in self.counts and self.on_disk(self._next) is None:
        return None
      self._total += self.counts[self._next]
      self._next += 1
      if self.cap and self._total >= self.cap:
        return self._next
    return self.num_shards

  def ready_counts(self) -> list[int]:
    """Tokens of each shard of the prefix done so far (any thread)."""
    return [self.counts[i] for i in range(self._next)]


def _tokenize_missing(pool, docs, prefix, order, meta, bar, in_flight):
  """Runs shards through the pool until the prefix the stream uses is done;
  returns how many shards it uses."""
  pending = set()
  while (used := prefix.used()) is None:
    while len(pending) < in_flight:
      index = next(order, None)
      if index is None:
        break
      if index in prefix.counts or prefix.on_disk(index) is not None:
        bar.update(prefix.counts[index], prefix.documents[index])
        continue
      start = index * meta['shard_docs']
      stop = min(start + meta['shard_docs'], len(docs))
      task = (index, start, stop,
              token_cache.shard_path(prefix.directory, index), meta)
      pending.add(pool.submit(_worker_make_shard, task))
    if not pending:
      raise RuntimeError('no shard left to tokenize, yet the stream is not '
                         'complete')
    done, pending = concurrent.futures.wait(
        pending, return_when=concurrent.futures.FIRST_COMPLETED)
    for future in done:
      index, tokens, documents = future.result()
      prefix.counts[index], prefix.documents[index] = tokens, documents
      bar.update(tokens, documents)
  for future in pending:
    future.cancel()
  return used


def build_stream(docs: corpora.Documents, tokenizer: tokenizer_lib.Tokenizer,
                 path: str, max_tokens: int | None = None,
                 progress: bool = True, workers: int | None = None,
                 shard_docs: int = token_cache.SHARD_DOCS,
                 process_index: int = 0, process_count: int = 1,
                 prefix: _Prefix | None = None) -> None:
  """Tokenizes the shards the stream at `path` (a token_cache.stream_path)
  needs, then writes its manifest.

  Args:
    docs: the split's documents.
    tokenizer: any tokenizer_lib.Tokenizer (picklable, for the workers).
    path: the manifest; shards go beside it.
    max_tokens: the stream's cap; None: the whole split.
    progress: show a progress bar.
    workers: processes tokenizing; None: default_workers(docs); 1: this
      process.
    shard_docs: documents per shard (part of the cache key).
    process_index, process_count: this host and the number of hosts.
    prefix: where the shards done are recorded (BackgroundBuild reads it).
  Raises:
    DataError: a damaged dataset or shard (from the workers too).
  """
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  num_shards = math.ceil(len(docs) / shard_docs)
  workers = max(1, min(workers or default_workers(docs), num_shards))
  prefix = prefix or _Prefix(directory, num_shards, max_tokens)
  order = iter(shard_order(num_shards, process_index, process_count,
                           lag=_PER_WORKER * workers))
  meta = {'format': token_cache.FORMAT, 'dataset': docs.identity,
          'split': docs.split, 'tokenizer': tokenizer.identity,
          'shard_docs': shard_docs}
  bar = Progress(docs, max_tokens, progress)
  pool = _executor(docs, tokenizer, workers)
  try:
    in_flight = _PER_WORKER * workers if workers > 1 else 1
    used = _tokenize_missing(pool, docs, prefix, order, meta, bar, in_flight)
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
  counts = [prefix.counts[i] for i in range(used)]
  total = min(sum(counts), max_tokens or sum(counts))
  token_cache.write_json(path, {
      **meta, 'max_tokens': max_tokens, 'shards': counts, 'num_tokens': total,
      'dtype': token_cache.token_dtype(tokenizer.vocab_size).name,
      'documents': min(used * shard_docs, len(docs)),
      'all_documents': used == num_shards and total == sum(counts)})


class BackgroundBuild:
  """build_stream in a background thread (its workers are processes), so
  training can start on the first shards while the rest are tokenized."""

  def __init__(self, docs, tokenizer, path: str, max_tokens=None, **kwargs):
    shard_docs = kwargs.get('shard_docs', token_cache.SHARD_DOCS)
    self.path, self.cap, self.error = path, max_tokens, None
    self.prefix = _Prefix(os.path.dirname(path),
                          math.ceil(len(docs) / shard_docs), max_tokens)
    self.finished = threading.Event()
    self._thread = threading.Thread(
        target=self._run, args=(docs, tokenizer, path, max_tokens),
        kwargs={**kwargs, 'prefix': self.prefix}, daemon=True,
        name='tokenize')
    self._thread.start()

  def _run(self, *args, **kwargs):
    try:
      build_stream(*args, **kwargs)
    except BaseException as e:  # pylint: disable=broad-except
      self.error = e  # Raised to the reader, in the main thread.
    finally:
      self.finished.set()


class GrowingTokens:
  """The tokens of a stream a BackgroundBuild is making, as one 1-D array
  (token_cache.ShardedTokens): a read waits for the shards it needs, len()
  for the whole stream."""

  def __init__(self, build: BackgroundBuild, dtype: np.dtype):
    self._build, self.dtype = build, np.dtype(dtype)
    self._shards, self._final = [], None

  def ready(self) -> tuple[int, bool]:
    """(tokens readable now, whether that is the whole stream)."""
    if self._final is not None:
      return len(self._final), True
    if self._build.finished.is_set():
      if self._build.error is not None:
        raise self._build.error
      self._final = token_cache.load_manifest(self._build.path)
      return len(self._final), True
    counts = self._build.prefix.ready_counts()
    directory = os.path.dirname(self._build.path)
    for i in range(len(self._shards), len(counts)):
      self._shards.append(token_cache.load_stream(
          token_cache.shard_path(directory, i)))
    return min(sum(counts), self._build.cap or sum(counts)), False

  def wait_for(self, num_tokens: int) -> tuple[int, bool]:
    """ready(), once num_tokens are readable or the stream is complete."""
    while True:
      ready, complete = self.ready()
      if complete or ready >= num_tokens:
        return ready, complete
      self._build.finished.wait(0.05)

  def __len__(self) -> int:
    return self.wait_for(math.inf)[0]

  @property
  def shape(self) -> tuple[int]:
    return (len(self),)

  def __getitem__(self, index):
    if isinstance(index, slice):
      index = np.arange(*index.indices(len(self)))
    flat = np.asarray(index, np.int64)
    if not flat.size:
      return np.zeros(flat.shape, self.dtype)
    ready, complete = self.wait_for(int(flat.max()) + 1)
    if complete:
      return np.asarray(self._final[flat])
    return token_cache.ShardedTokens(self._shards, ready)[flat]

  def __array__(self, dtype=None, copy=None):
    del copy
    self.wait_for(math.inf)
    return np.asarray(self._final, dtype)
