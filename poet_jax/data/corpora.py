"""Corpora: which documents a corpus name means, stored by tfds as ArrayRecord.

A corpus is one of

  'python_stdlib'  the .py files of this interpreter's standard library,
                   prepared on first use (nothing is downloaded);
  a directory      its .txt files, one document per file, prepared on first
                   use;
  a tfds name      a dataset already prepared as ArrayRecord in data_dir, such
                   as 'c4/en' (its 'text' feature).

Documents are read by random access (`as_data_source`), so no TensorFlow is
needed. See docs/data.md.
"""
import collections.abc
import contextlib
import dataclasses
import fcntl
import io
import logging
import os
import sys
from typing import Iterator

import tensorflow_datasets as tfds

from poet_jax.data import local_files

STDLIB = 'python_stdlib'
SPLITS = ('train', 'validation')

# Documents per batched read.
_READ_CHUNK = 512


class DataError(ValueError):
  """Unusable data or data settings; its message is one line for the user."""


class PrepareError(OSError):
  """A corpus could not be written into data_dir (disk full, I/O error);
  its message is one line for the user."""


def default_data_dir() -> str:
  return os.path.join(os.path.expanduser('~'), '.cache', 'poet_jax',
                      'tensorflow_datasets')


def split_sources(name: str, split: str) -> list[tuple[str, int]] | None:
  """(relative path, bytes) of the files of one split of a local corpus
  ('python_stdlib' or a directory), paths printable; None for a tfds
  dataset."""
  path = os.path.expanduser(name)
  if name == STDLIB:
    files = local_files.stdlib_files()
  elif os.path.isdir(path):
    files = local_files.text_files(path)
  else:
    return None
  return [(local_files.printable(rel), os.path.getsize(p))
          for rel, p in local_files.split_files(files)[split]]


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
    files = (local_files.text_files(directory) if directory
             else local_files.stdlib_files())
    return {split: self._generate_examples(split_list)
            for split, split_list in local_files.split_files(files).items()}

  def _generate_examples(self, files):
    directory = self.builder_config.directory
    for index, (_, path) in enumerate(files):
      if directory:
        # Checked by _text_dir_config: clean, or replacing was asked for.
        text = local_files.decode_text(local_files.read_bytes(path))[0]
      else:
        with open(path, 'rb') as f:
          # Some test files are deliberately not UTF-8; kept, mangled (the
          # embedded corpus, as it always was: docs/data.md).
          text = f.read().decode('utf-8', errors='replace')
      yield index, {'text': text}


def _text_dir_config(directory: str,
                     decode_errors: str = 'strict') -> TextCorpusConfig:
  """A config per directory contents (not its path or time stamps), so
  caches never collide or go stale and a run resumes on the same files.

  Raises DataError if the directory cannot make both splits, or holds a file
  that is not UTF-8 text and decode_errors is 'strict'; with 'replace' one
  line says how many byte sequences were read as U+FFFD, and where.
  """
  directory = os.path.abspath(directory)
  shown = local_files.printable(directory)
  files = local_files.text_files(directory)
  try:
    nonempty = sum(1 for _, path in files if os.path.getsize(path))
    scan, fresh = local_files.scan(files)
  except OSError as e:  # a broken link, a file without read permission
    raise DataError(
        f'corpus file {local_files.printable(str(e.filename))} cannot be '
        f'read ({e.strerror}); fix or remove it') from None
  if nonempty < 2:
    raise DataError(
        f'directory {shown} has {nonempty} non-empty .txt file(s); it '
        'needs at least 2 (one is held out as the validation split)')
  if scan.not_text:
    rel, _, first = scan.not_text[0]
    count = sum(n for _, n, _ in scan.not_text)
    where = (f'{len(scan.not_text)} file(s) under {shown} are not UTF-8 '
             f'text, such as {local_files.printable(rel)} at byte {first}')
    if decode_errors == 'strict':
      raise DataError(
          f'{where} (Latin-1, UTF-16 or binary?); convert them to UTF-8 (iconv '
          '-f latin1 -t utf-8), remove them, or read each such byte sequence '
          'as U+FFFD with --config.data.decode_errors=replace (evaluate: '
          '--decode_errors=replace)')
    if fresh:  # once per process
      print(f'data: {where}: {count} byte sequence(s) read as U+FFFD '
            '(data.decode_errors=replace)', flush=True)
  return TextCorpusConfig(
      name=f'txt_{scan.digest}', directory=directory,
      description=f'.txt files under {shown}')


@contextlib.contextmanager
def _quiet_tfds():
  """tfds without its own output: its 'Downloading and preparing' lines
  (nothing is downloaded here), absl warnings about custom configs, and its
  progress bars. We say in one line what is being prepared instead."""
  tfds.disable_progress_bar()
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    absl_logger.setLevel(level)


def prepare_text_corpus(config: TextCorpusConfig, data_dir: str) -> TextCorpus:
  """Builds the ArrayRecord files once; later calls only read their info.

  Processes that prepare the same corpus at once (two trainers, two test
  workers) take turns on a lock file beside it: the second finds it prepared
  instead of failing to rename its own copy over the first one's.
  """
  with _quiet_tfds():
    builder = TextCorpus(config=config, data_dir=data_dir,
                         file_format='array_record')
    if builder.is_prepared():
      return builder
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f'.{config.name}.lock'), 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
    with _quiet_tfds():
      builder = TextCorpus(config=config, data_dir=data_dir,
                           file_format='array_record')
      if builder.is_prepared():
        return builder
    print(f'preparing {config.description} for tfds in {data_dir} (once; '
          'nothing is downloaded)', flush=True)
    try:
      with _quiet_tfds():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                try_download_gcs=False))
    except (OSError, RuntimeError) as e:  # the records writer: RuntimeError
      reason = ' '.join(str(e).split())
      raise PrepareError(
          f'could not prepare {config.description} in {data_dir} ('
          f'{reason[:300]}); free space there or set data.data_dir to '
          'another disk') from None
  return builder


# ---------------------------------------------------------------------------
# Documents.


class Documents(collections.abc.Sequence):
  """One split of a prepared dataset as random-access strings."""

  def __init__(self, source, name: str, split: str, identity: str,
               num_bytes: int = 0):
    self._source = source
    self.name = name          # e.g. 'c4/en/3.1.0'
    self.split = split
    self.identity = identity  # where it is stored: keys the token caches
    self.num_bytes = num_bytes  # stored size as tfds records it; 0: unknown

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
    for chunk in self.chunks(_READ_CHUNK):
      yield from chunk

  def chunks(self, size: int, start: int = 0,
             stop: int | None = None) -> Iterator[list[str]]:
    """Documents [start, stop) in order, size at a time, one batched read
    each."""
    stop = len(self) if stop is None else min(stop, len(self))
    for first in range(start, stop, size):
      yield self._read(list(range(first, min(first + size, stop))))

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


def _open_builder(name: str, data_dir: str, decode_errors: str):
  """The prepared builder for a corpus name (see module docstring)."""
  if name == STDLIB:
    return prepare_text_corpus(TextCorpus.BUILDER_CONFIGS[0], data_dir)
  path = os.path.expanduser(name)
  if os.path.isdir(path):
    return prepare_text_corpus(_text_dir_config(path, decode_errors),
                               data_dir)
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


def open_documents(name: str, split: str, data_dir: str | None = None,
                   decode_errors: str = 'strict') -> Documents:
  """The documents (str) of one split of a corpus, by random access.

  Args:
    name: 'python_stdlib', a directory of .txt files, or the name of a tfds
      dataset prepared as ArrayRecord in data_dir (e.g. 'c4/en').
    split: 'train' or 'validation' (any split the tfds dataset has).
    data_dir: where tfds datasets live and local corpora are prepared;
      None: ~/.cache/poet_jax/tensorflow_datasets.
    decode_errors: a directory's files that are not UTF-8 text: 'strict'
      refuses them (DataError), 'replace' reads each byte sequence that is
      not text as U+FFFD and says so.
  """
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  builder = _open_builder(name, data_dir, decode_errors)
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
                   identity=identity, num_bytes=_split_bytes(builder, split))


def reopen_documents(identity: str, split: str, name: str) -> Documents:
  """The documents of a prepared dataset by its directory (Documents.identity),
  without its builder code: how worker processes open a split."""
  with _quiet_tfds():
    builder = tfds.builder_from_directory(identity)
  try:
    source = builder.as_data_source(split=split)
  except (RuntimeError, OSError) as e:
    raise _damaged(name, split, identity, e) from None
  return Documents(source, name=name, split=split, identity=identity,
                   num_bytes=_split_bytes(builder, split))


def _split_bytes(builder, split: str) -> int:
  try:
    return int(builder.info.splits[split].num_bytes or 0)
  except (KeyError, TypeError, ValueError):
    return 0
