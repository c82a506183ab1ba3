"""Text corpora and packed token streams for language-model training.

Documents are stored by tensorflow-datasets as ArrayRecord and read by random
access (`as_data_source`), so no TensorFlow is needed. A corpus is one of

  'python_stdlib'  the .py files of this interpreter's standard library,
                   prepared on first use (nothing is downloaded);
  a directory      its .txt files, one document per file, prepared on first
                   use;
  a tfds name      a dataset already prepared as ArrayRecord in data_dir, such
                   as 'c4/en' (its 'text' feature).

Each split is tokenized once into one stream (every document followed by EOS),
cached next to the data as .npy and memory-mapped, and cut into
non-overlapping examples of seq_len + 1 tokens. A batch is a pure function of
(step, seed), so the data position of a run is its step. See docs/data.md.
"""
import collections.abc
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import sysconfig
import tempfile
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from poet_jax import tokenizer as tokenizer_lib

STDLIB = 'python_stdlib'
SPLITS = ('train', 'validation')

# A document is held out when the hash of its relative path falls in the
# first 5% of buckets: stable across machines, runs and file additions.
_HASH_BUCKETS = 10_000
_VALIDATION_BUCKETS = 500

# Documents tokenized per batched read + encode while building a stream.
_BUILD_CHUNK = 512

# Part of every stream's cache key: bump it when the stream layout changes so
# old caches are never read as new ones.
_STREAM_FORMAT = 1


class DataError(ValueError):
  """Unusable data or data settings; its message is one line for the user."""


def default_data_dir() -> str:
  return os.path.join(os.path.expanduser('~'), '.cache', 'poet_jax',
                      'tensorflow_datasets')


# ---------------------------------------------------------------------------
# Source files and the held-out split.


def _files_under(root: str, suffix: str,
                 skip_dirs: frozenset[str] = frozenset()
                 ) -> list[tuple[str, str]]:
  """Sorted (posix relative path, path) of files under root ending in suffix.

  Hidden files and directories are skipped (editor and notebook droppings).
  """
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames
                   if d not in skip_dirs and not d.startswith('.')]
    for name in filenames:
      if name.endswith(suffix) and not name.startswith('.'):
        path = os.path.join(dirpath, name)
        found.append((os.path.relpath(path, root).replace(os.sep, '/'), path))
  return sorted(found)


def stdlib_files() -> list[tuple[str, str]]:
  """The standard library's .py files, tests included, without site-packages.

  Tests stay in: they are ordinary Python and nearly double the corpus.
  """
  root = sysconfig.get_paths()['stdlib']
  return _files_under(root, '.py', frozenset(
      {'site-packages', 'dist-packages', '__pycache__'}))


def text_files(directory: str) -> list[tuple[str, str]]:
  return _files_under(directory, '.txt')


def _bucket(relpath: str) -> int:
  digest = hashlib.sha256(relpath.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') % _HASH_BUCKETS


def _held_out(buckets: dict[str, int], candidates) -> set[str]:
  held_out = {rel for rel in candidates if buckets[rel] < _VALIDATION_BUCKETS}
  if not held_out and candidates:
    # A handful of files may all miss the 5%: hold out the one nearest the
    # cut so that both splits exist, still independent of the other files.
    held_out = {min(candidates, key=buckets.get)}
  return held_out


def split_files(files: Sequence[tuple[str, str]]
                ) -> dict[str, list[tuple[str, str]]]:
  """{'train': [...], 'validation': [...]}, each in the given order.

  A file is held out when the hash of its relative path falls in the first
  5% of buckets. Empty files are never held out: a held-out split of empty
  files could not be evaluated on.
  """
  buckets = {rel: _bucket(rel) for rel, _ in files}
  held_out = _held_out(buckets, [rel for rel, path in files
                                 if os.path.getsize(path)])
  return {'train': [f for f in files if f[0] not in held_out],
          'validation': [f for f in files if f[0] in held_out]}


def _held_out_an_empty_file(files: Sequence[tuple[str, str]]) -> bool:
  """Whether the split before empty files were kept in training (datasets
  prepared then are not reused) held out an empty file."""
  buckets = {rel: _bucket(rel) for rel, _ in files}
  old = _held_out(buckets, list(buckets))
  return any(not os.path.getsize(path) for rel, path in files if rel in old)


def split_sources(name: str, split: str) -> list[tuple[str, int]] | None:
  """(relative path, bytes) of the files of one split of a local corpus
  ('python_stdlib' or a directory); None for a tfds dataset."""
  path = os.path.expanduser(name)
  if name == STDLIB:
    files = stdlib_files()
  elif os.path.isdir(path):
    files = text_files(path)
  else:
    return None
  return [(rel, os.path.getsize(p)) for rel, p in split_files(files)[split]]


def _directory_fingerprint(files: Sequence[tuple[str, str]]) -> str:
  """Changes when a file is added, removed or rewritten."""
  h = hashlib.sha256()
  for rel, path in files:
    st = os.stat(path)
    h.update(f'{rel}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode('utf-8'))
  return h.hexdigest()[:10]


# ---------------------------------------------------------------------------
# The tfds builder for local text.


@dataclasses.dataclass(eq=False)
class TextCorpusConfig(tfds.core.BuilderConfig):
  directory: str = ''  # '': the Python standard library.


class TextCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Plain-text documents from local files, one document per file.

  Not registered with tfds (it is always built from here with its config);
  once prepared, tfds can still read it by name from its files.
  """

  name = 'poet_text_corpus'
  VERSION = tfds.core.Version('1.0.0')
  # Nothing is downloaded, so there is no checksums file beside the code to
  # look for; finding one makes tfds 4.9 import importlib_resources, which it
  # does not declare as a dependency.
  code_path = None
  BUILDER_CONFIGS = [TextCorpusConfig(
      name=STDLIB,
      # Each interpreter release has its own library, so its own dataset.
      version=tfds.core.Version('.'.join(map(str, sys.version_info[:3]))),
      description='.py files of the Python standard library')]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Local text files, one document per file.',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        # Keep sorted path order: the stream, and so every batch, then
        # follows the files rather than a hash of their keys.
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    directory = self.builder_config.directory
    files = text_files(directory) if directory else stdlib_files()
    return {split: self._generate_examples(split_list)
            for split, split_list in split_files(files).items()}

  def _generate_examples(self, files):
    for index, (_, path) in enumerate(files):
      with open(path, 'rb') as f:
        # Some test files are deliberately not UTF-8; keep them, mangled.
        yield index, {'text': f.read().decode('utf-8', errors='replace')}


def _text_dir_config(directory: str) -> TextCorpusConfig:
  """A config per directory and contents, so caches never collide or go stale.

  Raises DataError if the directory cannot make both splits.
  """
  directory = os.path.abspath(directory)
  files = text_files(directory)
  nonempty = sum(1 for _, path in files if os.path.getsize(path))
  if nonempty < 2:
    raise DataError(
        f'directory {directory} has {nonempty} non-empty .txt file(s); it '
        'needs at least 2 (one is held out as the validation split)')
  path_hash = hashlib.sha256(directory.encode('utf-8')).hexdigest()[:10]
  rule = '_e' if _held_out_an_empty_file(files) else ''
  return TextCorpusConfig(
      name=f'dir_{path_hash}_{_directory_fingerprint(files)}{rule}',
      directory=directory,
      description=f'.txt files under {directory}')


def prepare_text_corpus(config: TextCorpusConfig, data_dir: str) -> TextCorpus:
  """Builds the ArrayRecord files once; later calls only read their info."""
  builder = TextCorpus(config=config, data_dir=data_dir,
                       file_format='array_record')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


# ---------------------------------------------------------------------------
# Documents.


class Documents(collections.abc.Sequence):
  """One split of a prepared dataset as random-access strings."""

  def __init__(self, source, name: str, split: str, identity: str):
    self._source = source
    self.name = name          # e.g. 'c4/en/3.1.0'
    self.split = split
    self.identity = identity  # where it is stored: keys the token caches

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    # ArrayRecord raises ValueError out of range; a Sequence needs IndexError.
    if not -len(self) <= index < len(self):
      raise IndexError(f'document {index} of {len(self)}')
    return self._read([index % len(self)])[0]

  def __iter__(self) -> Iterator[str]:
    for chunk in self.chunks(_BUILD_CHUNK):
      yield from chunk

  def chunks(self, size: int) -> Iterator[list[str]]:
    """All documents in order, size at a time, one batched read each."""
    for start in range(0, len(self), size):
      keys = list(range(start, min(start + size, len(self))))
      yield self._read(keys)

  def _read(self, keys: list[int]) -> list[str]:
    """The documents at keys; a damaged file is a DataError, never garbage.

    A truncated or overwritten ArrayRecord file either fails to read (the
    records library raises RuntimeError) or, cut at a block boundary, yields
    records without text: both are reported.
    """
    try:
      texts = [_text(r) for r in self._source.__getitems__(keys)]
    except (RuntimeError, OSError) as e:
      raise _damaged(self.name, self.split, self.identity, e) from None
    if None in texts:
      raise _damaged(self.name, self.split, self.identity,
                     f'document {keys[texts.index(None)]} has no text')
    return texts


def _text(record) -> str | None:
  text = record['text']  # numpy decoding gives tfds Text as bytes.
  if isinstance(text, bytes):
    return text.decode('utf-8', errors='replace')
  return None if text is None else str(text)


def _damaged(name: str, split: str, where: str, reason) -> DataError:
  if isinstance(reason, BaseException):
    reason = ' '.join(str(reason).split()) or type(reason).__name__
  reason = reason if len(reason) <= 120 else reason[:117] + '...'
  return DataError(
      f'dataset {name} ({split}) in {where} is truncated or corrupt '
      f'({reason}); delete that directory and rerun to prepare it again (a '
      'tfds dataset such as c4: prepare it again with `tfds build`)')


def _open_builder(name: str, data_dir: str):
  """The prepared builder for a corpus name (see module docstring)."""
  if name == STDLIB:
    return prepare_text_corpus(TextCorpus.BUILDER_CONFIGS[0], data_dir)
  path = os.path.expanduser(name)
  if os.path.isdir(path):
    return prepare_text_corpus(_text_dir_config(path), data_dir)
  if name.startswith(('/', '.', '~')):
    raise FileNotFoundError(
        f'directory {path} does not exist; pass a directory of .txt files, '
        f"'{STDLIB}', or a tfds dataset name prepared in data.data_dir")
  return _open_tfds_builder(name, data_dir)


def _open_tfds_builder(name: str, data_dir: str):
  """A dataset someone prepared with tfds: checked, never downloaded."""
  hint = (f'prepare it with `tfds build {name} --data_dir={data_dir} '
          '--file_format=array_record` or set data.data_dir to where it is')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except ValueError:  # DatasetNotFoundError, or a name tfds cannot parse.
    builder = None
  if builder is None or not builder.is_prepared():
    raise FileNotFoundError(
        f'dataset {name} not found in {data_dir} (nor is it a directory); '
        f'{hint}')
  formats = builder.info.available_file_formats()
  if not formats & set(tfds.core.FileFormat.with_random_access()):
    raise DataError(
        f'dataset {name} in {data_dir} is stored as '
        f'{", ".join(sorted(f.value for f in formats))}, which has no random '
        f'access; convert it with `tfds convert_format --dataset_version_dir='
        f'{builder.data_dir} --out_file_format=array_record`')
  if 'text' not in builder.info.features:
    raise DataError(
        f'dataset {name} has no \'text\' feature (it has '
        f'{", ".join(builder.info.features)}); use a text corpus')
  return builder


def open_documents(name: str, split: str,
                   data_dir: str | None = None) -> Documents:
  """The documents (str) of one split of a corpus, by random access.

  Args:
    name: 'python_stdlib', a directory of .txt files, or the name of a tfds
      dataset prepared as ArrayRecord in data_dir (e.g. 'c4/en').
    split: 'train' or 'validation' (any split the tfds dataset has).
    data_dir: where tfds datasets live and local corpora are prepared;
      None: ~/.cache/poet_jax/tensorflow_datasets.
  """
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  builder = _open_builder(name, data_dir)
  if split not in builder.info.splits:
    raise DataError(
        f'dataset {name} has no split {split!r}; it has '
        f'{", ".join(sorted(builder.info.splits))}')
  identity = os.path.abspath(str(builder.data_path))
  try:
    source = builder.as_data_source(split=split)
  except (RuntimeError, OSError) as e:
    raise _damaged(builder.info.full_name, split, identity, e) from None
  return Documents(source, name=builder.info.full_name, split=split,
                   identity=identity)


# ---------------------------------------------------------------------------
# Token streams: build once, atomically; load memory-mapped and checked.


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _npy_header(dtype: np.dtype, length: int) -> bytes:
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(buf, {
      'descr': np.lib.format.dtype_to_descr(dtype), 'fortran_order': False,
      'shape': (length,)})
  return buf.getvalue()


def stream_path(docs: Documents, tokenizer: tokenizer_lib.Tokenizer,
                max_tokens: int | None, cache_dir: str) -> str:
  """Where the stream of (dataset, split, tokenizer, cap) is cached."""
  key = json.dumps({'format': _STREAM_FORMAT, 'dataset': docs.identity,
                    'split': docs.split, 'tokenizer': tokenizer.identity,
                    'max_tokens': max_tokens}, sort_keys=True)
  digest = hashlib.sha256(key.encode('utf-8')).hexdigest()[:12]
  readable = docs.name.replace('/', '-')
  tokenizer_name = tokenizer.identity.split('-')[0]
  return os.path.join(
      cache_dir, f'{readable}.{docs.split}.{tokenizer_name}.{digest}.npy')


def _sidecar(path: str) -> str:
  return path[:-len('.npy')] + '.json'


def build_stream(docs: Documents, tokenizer: tokenizer_lib.Tokenizer,
                 path: str, max_tokens: int | None = None,
                 progress: bool = True) -> None:
  """Tokenizes docs (each followed by EOS) into the .npy file at path.

  The array is written to a temporary file whose .npy header is rewritten
  with the final length at the end (numpy pads the header so the length can
  grow in place); the JSON sidecar is written next and the .npy is renamed
  into place last, so an existing .npy is always complete and described.
  """
  dtype = token_dtype(tokenizer.vocab_size)
  eos = np.array([tokenizer.eos_id], dtype)
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory,
                             prefix=os.path.basename(path) + '.',
                             suffix='.tmp')
  count, used = 0, 0
  try:
    with os.fdopen(fd, 'wb') as f:
      header = _npy_header(dtype, 0)
      f.write(header)
      bar = tqdm.tqdm(total=max_tokens or len(docs),
                      unit='tok' if max_tokens else 'doc', unit_scale=True,
                      desc=f'tokenizing {docs.name} {docs.split}',
                      disable=not progress)
      with bar:
        for texts in docs.chunks(_BUILD_CHUNK):
          pieces = []
          for ids in tokenizer.encode_batch(texts):
            pieces += [ids.astype(dtype), eos]
          chunk = np.concatenate(pieces)
          if max_tokens:
            chunk = chunk[:max_tokens - count]
          f.write(chunk.tobytes())
          count += len(chunk)
          used += len(texts)
          bar.update(len(chunk) if max_tokens else len(texts))
          if max_tokens and count >= max_tokens:
            break
      final = _npy_header(dtype, count)
      if len(final) != len(header):  # Only past 10**21 tokens.
        raise DataError(f'token stream of {count} tokens is too long')
      f.seek(0)
      f.write(final)
      f.flush()
      os.fsync(f.fileno())
    meta = {'format': _STREAM_FORMAT, 'dataset': docs.identity,
            'split': docs.split, 'tokenizer': tokenizer.identity,
            'max_tokens': max_tokens, 'dtype': dtype.name, 'num_tokens': count,
            'num_bytes': len(header) + count * dtype.itemsize,
            'documents': used, 'all_documents': used == len(docs)}
    _write_atomic(_sidecar(path), json.dumps(meta, indent=1) + '\n')
    os.chmod(tmp, 0o644)  # mkstemp makes it private; caches may be shared.
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _write_atomic(path: str, text: str) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path),
                             prefix=os.path.basename(path) + '.',
                             suffix='.tmp')
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load_stream(path: str) -> np.ndarray:
  """The cached stream, memory-mapped, after checking it against its sidecar.

  A damaged cache is reported rather than silently rebuilt: it means a disk
  or copy problem worth knowing about, and other processes may be reading it.
  """
  fix = 'delete it (and its .json) and rerun to rebuild it'
  try:
    with open(_sidecar(path)) as f:
      meta = json.load(f)
    expected = (int(meta['num_tokens']), np.dtype(meta['dtype']),
                int(meta['num_bytes']))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f'token cache {path} has no valid sidecar '
                    f'{_sidecar(path)} ({type(e).__name__}); {fix}') from None
  size = os.path.getsize(path)
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
# Examples and batches.


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


def open_token_stream(name: str, split: str, data_dir: str | None,
                      tokenizer: tokenizer_lib.Tokenizer, seq_len: int,
                      max_tokens: int | None = None,
                      cache_dir: str | None = None,
                      progress: bool = True) -> TokenStream:
  """One split of a corpus as a TokenStream, tokenizing it on first use.

  Args:
    name, split, data_dir: as for open_documents.
    tokenizer: any tokenizer_lib.Tokenizer.
    seq_len: tokens a model reads per example (examples hold seq_len + 1).
    max_tokens: keep only the stream's first max_tokens tokens (a big corpus
      such as C4 is read only that far); None: all.
    cache_dir: where streams are cached; None: data_dir/poet_jax_streams.
    progress: show a progress bar while tokenizing.
  """
  if max_tokens is not None and max_tokens < 1:
    raise DataError(f'max_tokens must be positive or None; got {max_tokens}')
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  cache_dir = os.path.expanduser(
      cache_dir or os.path.join(data_dir, 'poet_jax_streams'))
  docs = open_documents(name, split, data_dir)
  path = stream_path(docs, tokenizer, max_tokens, cache_dir)
  if not os.path.exists(path):
    build_stream(docs, tokenizer, path, max_tokens, progress)
  return TokenStream(load_stream(path), seq_len, name=f'{docs.name} {split}')


def open_train_and_eval(name: str, data_dir: str | None,
                        tokenizer: tokenizer_lib.Tokenizer, seq_len: int,
                        max_tokens: int | None = None,
                        cache_dir: str | None = None,
                        progress: bool = True
                        ) -> tuple[TokenStream, TokenStream]:
  """The 'train' and 'validation' streams (see open_token_stream)."""
  return tuple(open_token_stream(name, split, data_dir, tokenizer, seq_len,
                                 max_tokens, cache_dir, progress)
               for split in SPLITS)
