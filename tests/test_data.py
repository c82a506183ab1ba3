"""Corpora, cached token streams and the batch position contract."""
import functools
import os
import threading
import sys

import numpy as np
import pytest

from poet_jax.data import batches
from poet_jax.data import pipeline as data
from poet_jax.data import token_cache
from poet_jax.data import tokenize_shards
from poet_jax.data import tokenizer as tokenizer_lib
import test_c4

BYTES = tokenizer_lib.ByteTokenizer()


def _write_corpus(directory, num_files: int = 12) -> dict[str, str]:
  """Small .txt files (some nested), returned as {relative path: text}."""
  rng = np.random.default_rng(0)
  texts = {}
  for i in range(num_files):
    rel = f'part{i % 3}/doc{i:02d}.txt' if i % 2 else f'doc{i:02d}.txt'
    words = rng.choice(['alpha', 'beta', 'gamma', 'héllo', 'wörld', '✓'],
                       size=int(rng.integers(50, 200)))
    texts[rel] = f'document {i}: ' + ' '.join(words) + '\n'
    path = os.path.join(directory, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
      f.write(texts[rel])
  return texts


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """(text directory, its {relative path: text}, a data_dir), prepared once."""
  root = tmp_path_factory.mktemp('corpus')
  texts = _write_corpus(str(root / 'texts'))
  data_dir = str(root / 'tfds')
  data.open_documents(str(root / 'texts'), 'train', data_dir)
  return str(root / 'texts'), texts, data_dir


def _files_under(directory):
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, fs in os.walk(directory) for f in fs}


def _arange_stream(num_examples: int, seq_len: int) -> data.TokenStream:
  """Example i holds i * (seq_len + 1) + [0, seq_len]: its id is row[0] // w."""
  tokens = np.arange(num_examples * (seq_len + 1) + 3, dtype=np.uint32)
  return data.TokenStream(tokens, seq_len, name='arange')


def _ids(stream: data.TokenStream, batch: np.ndarray) -> np.ndarray:
  return batch[:, 0] // (stream.seq_len + 1)


# ---------------------------------------------------------------------------
# Documents.


def test_text_directory_splits_are_disjoint_and_complete(corpus):
  directory, texts, data_dir = corpus
  train = list(data.open_documents(directory, 'train', data_dir))
  validation = list(data.open_documents(directory, 'validation', data_dir))
  assert train and validation
  assert not set(train) & set(validation)
  assert sorted(train + validation) == sorted(texts.values())
  # Sorted path order within each split.
  assert train == [texts[r] for r in sorted(texts) if texts[r] in train]


def test_preparation_is_cached(corpus, monkeypatch):
  directory, _, data_dir = corpus
  before = _files_under(data_dir)

  def fail(*args, **kwargs):
    raise AssertionError('prepared again')

  monkeypatch.setattr(data.TextCorpus, '_generate_examples', fail)
  docs = data.open_documents(directory, 'validation', data_dir)
  assert len(docs) and _files_under(data_dir) == before


def test_changed_directory_is_prepared_anew(tmp_path):
  texts = _write_corpus(str(tmp_path / 'texts'), num_files=4)
  data_dir = str(tmp_path / 'tfds')
  first = data.open_documents(str(tmp_path / 'texts'), 'train', data_dir)
  rel = next(r for r in sorted(texts) if texts[r] in list(first))
  (tmp_path / 'texts' / rel).write_text('rewritten\n', encoding='utf-8')
  second = data.open_documents(str(tmp_path / 'texts'), 'train', data_dir)
  assert second.identity != first.identity
  assert 'rewritten\n' in list(second)


def test_split_rule_is_stable_and_about_five_percent(tmp_path):
  text = tmp_path / 'text.py'
  text.write_text('x')  # every entry reads as this (non-empty) file
  files = [(f'dir/file{i}.py', str(text)) for i in range(4000)]
  held_out = {f[0] for f in data.split_files(files)['validation']}
  assert 0.04 < len(held_out) / len(files) < 0.06
  # A file's split depends on its own path only.
  fewer = {f[0] for f in data.split_files(files[::2])['validation']}
  assert fewer == {f for f in held_out if int(f[8:-3]) % 2 == 0}


def test_missing_directory(tmp_path):
  missing = str(tmp_path / 'no_such_dir')
  with pytest.raises(FileNotFoundError, match='does not exist') as e:
    data.open_documents(missing, 'train', str(tmp_path / 'tfds'))
  assert missing in str(e.value) and '\n' not in str(e.value)


def test_directory_with_one_file(tmp_path):
  (tmp_path / 'texts').mkdir()
  (tmp_path / 'texts' / 'only.txt').write_text('one document')
  with pytest.raises(data.DataError, match='at least 2'):
    data.open_documents(str(tmp_path / 'texts'), 'train', str(tmp_path))


def test_missing_tfds_dataset(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(FileNotFoundError, match='c4/en not found') as e:
    data.open_documents('c4/en', 'train', data_dir)
  message = str(e.value)
  assert data_dir in message and 'tfds build' in message
  assert '\n' not in message


def _prepare_fake_c4(data_dir: str) -> None:
  """A 'c4/en' prepared as ArrayRecord, in the given order (test_c4.py)."""
  test_c4.prepare_c4(data_dir, {
      'train': [f'web page {i} ✓ ' * 20 for i in range(40)],
      'validation': [f'web page {i} ✓ ' * 20 for i in range(40, 50)]},
      shuffled=False)


def test_prepared_tfds_dataset_by_name(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  _prepare_fake_c4(data_dir)
  docs = data.open_documents('c4/en', 'validation', data_dir)
  assert docs.name == 'c4/en/3.1.0'
  assert list(docs) == [f'web page {i} ✓ ' * 20 for i in range(40, 50)]
  with pytest.raises(data.DataError, match="no split 'test'"):
    data.open_documents('c4/en', 'test', data_dir)
  train, validation = data.open_train_and_eval(
      'c4/en', data_dir, BYTES, seq_len=16, max_tokens=500)
  assert len(train.tokens) == len(validation.tokens) == 500


def test_tfds_dataset_without_random_access(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  _prepare_fake_c4(data_dir)
  # As if prepared with tfds's default format (that needs TensorFlow here).
  info = os.path.join(data_dir, 'c4', 'en', '3.1.0', 'dataset_info.json')
  with open(info) as f:
    text = f.read()
  with open(info, 'w') as f:
    f.write(text.replace('"array_record"', '"tfrecord"'))
  with pytest.raises(data.DataError, match='tfds convert_format') as e:
    data.open_documents('c4/en', 'train', data_dir)
  assert 'stored as tfrecord' in str(e.value) and '\n' not in str(e.value)


def test_python_stdlib_prepares(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  train = data.open_documents(data.STDLIB, 'train', data_dir)
  validation = data.open_documents(data.STDLIB, 'validation', data_dir)
  version = '.'.join(map(str, sys.version_info[:3]))
  assert train.name == f'poet_text_corpus/python_stdlib/{version}'
  num_files = len(data.stdlib_files())
  assert len(train) + len(validation) == num_files
  assert 0.02 < len(validation) / num_files < 0.08
  assert any('def ' in validation[i] for i in range(len(validation)))
  streams = data.open_train_and_eval(data.STDLIB, data_dir, BYTES, 128)
  assert all(s.num_examples > 100 for s in streams)


# ---------------------------------------------------------------------------
# Token streams on disk.


def test_stream_is_documents_joined_by_eos(corpus):
  directory, texts, data_dir = corpus
  stream = data.open_token_stream(directory, 'train', data_dir, BYTES, 8)
  docs = list(data.open_documents(directory, 'train', data_dir))
  assert stream.tokens.dtype == np.uint16
  assert isinstance(stream.tokens, np.memmap)
  pieces = np.split(np.asarray(stream.tokens),
                    np.flatnonzero(stream.tokens == BYTES.eos_id) + 1)
  assert [BYTES.decode(p) for p in pieces[:-1]] == docs
  assert pieces[-1].size == 0


def test_stream_is_built_once(corpus, monkeypatch):
  directory, _, data_dir = corpus
  data.open_token_stream(directory, 'validation', data_dir, BYTES, 8)
  before = _files_under(data_dir)

  def fail(*args, **kwargs):
    raise AssertionError('built again')

  monkeypatch.setattr(data, 'build_stream', fail)
  data.open_token_stream(directory, 'validation', data_dir, BYTES, 8)
  assert _files_under(data_dir) == before


def test_stream_cache_key(corpus, tmp_path):
  directory, _, data_dir = corpus
  docs = data.open_documents(directory, 'train', data_dir)
  other_docs = data.open_documents(directory, 'validation', data_dir)

  class OtherTokenizer(tokenizer_lib.ByteTokenizer):
    identity = 'sentencepiece-257-0123456789abcdef'

  paths = {data.stream_path(docs, BYTES, None, 'c'),
           data.stream_path(docs, BYTES, 100, 'c'),
           data.stream_path(other_docs, BYTES, None, 'c'),
           data.stream_path(docs, OtherTokenizer(), None, 'c')}
  assert len(paths) == 4
  assert data.stream_path(docs, BYTES, None, 'c') == data.stream_path(
      data.open_documents(directory, 'train', data_dir), BYTES, None, 'c')


def test_max_tokens_caps_the_stream(corpus, tmp_path):
  directory, _, data_dir = corpus
  stream = data.open_token_stream(directory, 'train', data_dir, BYTES, 8,
                                  max_tokens=100, cache_dir=str(tmp_path))
  full = data.open_token_stream(directory, 'train', data_dir, BYTES, 8,
                                cache_dir=str(tmp_path))
  assert len(stream.tokens) == 100 < len(full.tokens)
  np.testing.assert_array_equal(stream.tokens, full.tokens[:100])


def test_token_dtype_follows_vocab_size():
  assert data.token_dtype(257) == np.uint16
  assert data.token_dtype(65536) == np.uint16
  assert data.token_dtype(65537) == np.uint32


def _shard_files(cache):
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs
                if f.startswith('shard-') and f.endswith('.npy'))


def test_interrupted_build_keeps_only_whole_shards(corpus, tmp_path):
  directory, _, data_dir = corpus

  class Killed(Exception):
    pass

  class DiesMidway(tokenizer_lib.ByteTokenizer):
    calls = 0

    def encode_batch(self, texts):
      DiesMidway.calls += 1
      if DiesMidway.calls == 2:
        raise Killed()
      return super().encode_batch(texts)

  cache = str(tmp_path / 'cache')
  with pytest.raises(Killed):
    data.open_token_stream(directory, 'train', data_dir, DiesMidway(), 8,
                           cache_dir=cache, workers=1, shard_docs=2)
  files = [os.path.join(d, f) for d, _, fs in os.walk(cache) for f in fs]
  # The first shard is complete; no manifest, no temporary file.
  assert sorted(os.path.basename(f) for f in files) == [
      'shard-000000.json', 'shard-000000.npy']
  first = os.stat(_shard_files(cache)[0]).st_mtime_ns
  stream = data.open_token_stream(directory, 'train', data_dir, BYTES, 8,
                                  cache_dir=cache, workers=1, shard_docs=2)
  whole = data.open_token_stream(directory, 'train', data_dir, BYTES, 8,
                                 cache_dir=str(tmp_path / 'other'), workers=1)
  np.testing.assert_array_equal(np.asarray(stream.tokens), whole.tokens)
  assert os.stat(_shard_files(cache)[0]).st_mtime_ns == first  # Reused.


def test_truncated_cache_is_reported(corpus, tmp_path):
  directory, _, data_dir = corpus
  cache = str(tmp_path / 'cache')
  stream = data.open_token_stream(directory, 'train', data_dir, BYTES, 8,
                                  cache_dir=cache, shard_docs=3, workers=1)
  path = _shard_files(cache)[1]
  size = os.path.getsize(path)
  del stream
  with open(path, 'r+b') as f:
    f.truncate(size - 10)
  with pytest.raises(data.DataError, match='truncated or corrupt') as e:
    data.open_token_stream(directory, 'train', data_dir, BYTES, 8,
                           cache_dir=cache, shard_docs=3)
  assert path in str(e.value) and 'delete it' in str(e.value)
  os.remove(path[:-len('.npy')] + '.json')
  with pytest.raises(data.DataError, match='no valid'):
    data.load_stream(path)


# ---------------------------------------------------------------------------
# Tokenizing in parallel shards.


def test_parallel_shards_make_the_one_process_stream(corpus, tmp_path):
  directory, _, data_dir = corpus
  one = data.open_token_stream(directory, 'train', data_dir, BYTES, 8,
                               cache_dir=str(tmp_path / 'one'), workers=1)
  two = data.open_token_stream(directory, 'train', data_dir, BYTES, 8,
                               cache_dir=str(tmp_path / 'two'), workers=2,
                               shard_docs=2)
  assert len(_shard_files(tmp_path / 'two')) > 2
  assert isinstance(two.tokens, data.ShardedTokens)
  np.testing.assert_array_equal(np.asarray(two.tokens), one.tokens)
  for step in range(3):
    np.testing.assert_array_equal(two.train_batch(step, 4, seed=1),
                                  one.train_batch(step, 4, seed=1))


def test_max_tokens_tokenizes_only_the_shards_it_needs(corpus, tmp_path):
  directory, _, data_dir = corpus
  cache = str(tmp_path / 'cache')
  capped = data.open_token_stream(directory, 'train', data_dir, BYTES, 8,
                                  max_tokens=3000, cache_dir=cache,
                                  workers=1, shard_docs=2)
  sizes = [len(data.load_stream(p)) for p in _shard_files(cache)]
  assert len(sizes) > 1 and sum(sizes[:-1]) < 3000 <= sum(sizes)  # Stopped at the cap.
  full = data.open_token_stream(directory, 'train', data_dir, BYTES, 8,
                                cache_dir=cache, workers=1, shard_docs=2)
  assert len(capped.tokens) == 3000
  np.testing.assert_array_equal(np.asarray(capped.tokens),
                                np.asarray(full.tokens)[:3000])


def test_sharded_tokens_index_like_one_array():
  rng = np.random.default_rng(0)
  parts = [rng.integers(0, 9, n).astype(np.uint16) for n in (5, 1, 7)]
  whole = np.concatenate(parts)[:12]
  tokens = data.ShardedTokens(parts, 12)
  assert len(tokens) == 12
  index = rng.integers(0, 12, (4, 3))
  np.testing.assert_array_equal(tokens[index], whole[index])
  np.testing.assert_array_equal(tokens[3:11], whole[3:11])
  np.testing.assert_array_equal(np.asarray(tokens), whole)
  with pytest.raises(IndexError):
    tokens[np.array([12])]


def test_each_host_takes_its_own_shards_first():
  order = tokenize_shards.shard_order(12, 1, 3, lag=2)
  own = [i for i in range(12) if i % 3 == 1]
  assert sorted(order) == list(range(12))
  assert order[:2] == own[:2]  # Others' shards only `lag` own ones later.
  assert order.index(0) == 2 and order[-1] == 11


def test_a_shard_another_host_wrote_is_not_redone(corpus, tmp_path,
                                                  monkeypatch):
  directory, _, data_dir = corpus
  cache = str(tmp_path / 'cache')
  host0 = data.open_token_stream(directory, 'train', data_dir, BYTES, 8,
                                 cache_dir=cache, workers=1, shard_docs=2)
  for f in os.listdir(os.path.dirname(_shard_files(cache)[0])):
    if f.startswith('stream-'):  # As if host 1 came first to the manifest.
      os.remove(os.path.join(os.path.dirname(_shard_files(cache)[0]), f))
  made = []
  real = tokenize_shards._make_shard
  monkeypatch.setattr(tokenize_shards, '_make_shard',
                      lambda *a: made.append(a) or real(*a))
  docs = data.open_documents(directory, 'train', data_dir)
  path = data.stream_path(docs, BYTES, None, cache, 2)
  data.build_stream(docs, BYTES, path, workers=1, shard_docs=2,
                    process_index=1, process_count=2)
  assert not made
  np.testing.assert_array_equal(np.asarray(data.load_manifest(path)),
                                np.asarray(host0.tokens))


def test_progress_reports_rates(corpus, tmp_path, capsys):
  directory, _, data_dir = corpus
  data.open_token_stream(directory, 'train', data_dir, BYTES, 8,
                         cache_dir=str(tmp_path / 'a'), workers=1,
                         shard_docs=2, progress=True)
  err = capsys.readouterr().err
  assert 'tokenizing' in err and 'tok/s' in err and 'doc/s' in err
  data.open_token_stream(directory, 'train', data_dir, BYTES, 8,
                         max_tokens=500, cache_dir=str(tmp_path / 'b'),
                         workers=1, shard_docs=2, progress=True)
  err = capsys.readouterr().err
  assert '100%' in err and '500/500' in err


# ---------------------------------------------------------------------------
# Batches: pure functions of (step, seed).


def test_train_batch_is_deterministic_and_seeded():
  stream = _arange_stream(50, 7)
  batch = stream.train_batch(3, 8, seed=0)
  assert batch.shape == (8, 8) and batch.dtype == np.int32
  np.testing.assert_array_equal(batch, stream.train_batch(3, 8, seed=0))
  np.testing.assert_array_equal(
      batch, _arange_stream(50, 7).train_batch(3, 8, seed=0))
  assert not np.array_equal(batch, stream.train_batch(3, 8, seed=1))
  assert not np.array_equal(batch, stream.train_batch(4, 8, seed=0))
  # Rows are whole, contiguous examples.
  np.testing.assert_array_equal(np.diff(batch, axis=1), 1)
  assert np.all(batch[:, 0] % 8 == 0)


def test_train_batch_covers_each_example_once_per_epoch():
  stream = _arange_stream(50, 7)  # 50 is not a multiple of the batch, 8.
  ids = np.concatenate([_ids(stream, stream.train_batch(s, 8, seed=5))
                        for s in range(25)])  # 200 positions: 4 epochs.
  epochs = ids.reshape(4, 50)
  for epoch in epochs:
    assert sorted(epoch) == list(range(50))
  assert not np.array_equal(epochs[0], epochs[1])  # Reshuffled each epoch.


def test_process_slices_make_the_global_batch():
  stream = _arange_stream(50, 7)
  for step in (0, 6, 13):  # 6 and 13 straddle epoch boundaries.
    whole = stream.train_batch(step, 8, seed=2)
    for count in (2, 4, 8):
      parts = [stream.train_batch(step, 8, 2, p, count) for p in range(count)]
      assert all(p.shape == (8 // count, 8) for p in parts)
      np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_train_batch_errors():
  stream = _arange_stream(5, 7)
  with pytest.raises(data.DataError, match='multiple of the process count'):
    stream.train_batch(0, 4, 0, 0, 3)
  with pytest.raises(data.DataError, match='fewer than one batch'):
    stream.train_batch(0, 8, 0)


def test_eval_batches_are_fixed_and_in_order():
  stream = _arange_stream(50, 7)
  batches = stream.eval_batches(8, 20)
  assert len(batches) == 3  # 20 examples round up to whole batches of 8.
  np.testing.assert_array_equal(
      np.concatenate([_ids(stream, b) for b in batches]), np.arange(24))
  again = stream.eval_batches(8, 20)
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a, b)
  assert len(stream.eval_batches(8, 10_000)) == 6  # Capped at the split.
  halves = [stream.eval_batches(8, 20, p, 2) for p in range(2)]
  for b, (top, bottom) in zip(batches, zip(*halves)):
    np.testing.assert_array_equal(np.concatenate([top, bottom]), b)


# ---------------------------------------------------------------------------
# Windows, and training on a stream still being tokenized.


def test_windows_keep_each_epoch_a_permutation(monkeypatch):
  monkeypatch.setattr(batches, 'WINDOW_TOKENS', 16 * 8)  # 16 examples
  stream = _arange_stream(50, 7)  # windows of 16, 16, 16 and 2 examples
  assert stream.window == 16
  ids = np.concatenate([_ids(stream, stream.train_batch(s, 10, seed=3))
                        for s in range(10)]).reshape(2, 50)
  for epoch in ids:
    assert sorted(epoch) == list(range(50))
    # Windows in order: positions of window k hold window k's examples.
    assert [sorted(epoch[k:k + 16]) for k in (0, 16, 32)] == [
        list(range(k, k + 16)) for k in (0, 16, 32)]
  assert not np.array_equal(ids[0], ids[1])


def test_one_window_is_the_whole_epoch_permutation():
  """A stream within one window (the embedded corpus) keeps the order of a
  permutation of the whole epoch drawn from (seed, epoch)."""
  stream = _arange_stream(50, 7)
  ids = _ids(stream, stream.train_batch(0, 50, seed=4))
  np.testing.assert_array_equal(
      ids, np.random.default_rng([4, 0]).permutation(50))


def test_training_starts_before_tokenizing_ends(corpus, tmp_path,
                                               monkeypatch):
  directory, _, data_dir = corpus
  monkeypatch.setattr(batches, 'WINDOW_TOKENS', 9 * 40)  # 40 examples
  release = threading.Event()

  class Slow(tokenizer_lib.ByteTokenizer):
    """Holds back every shard after the first two until released."""
    calls = 0

    def encode_batch(self, texts):
      Slow.calls += 1
      if Slow.calls > 2:
        assert release.wait(60)
      return super().encode_batch(texts)

  growing = data.open_token_stream(directory, 'train', data_dir, Slow(), 8,
                                   cache_dir=str(tmp_path / 'a'), workers=1,
                                   shard_docs=2, background=True)
  assert isinstance(growing.tokens, data.GrowingTokens)
  first = growing.train_batch(0, 8, seed=1)  # Needs only the first window.
  ready, complete = growing.examples_ready()
  release.set()
  whole = data.open_token_stream(directory, 'train', data_dir, BYTES, 8,
                                 cache_dir=str(tmp_path / 'b'), workers=1)
  assert not complete and 40 <= ready < whole.num_examples / 2
  np.testing.assert_array_equal(first, whole.train_batch(0, 8, seed=1))
  for step in (3, 20, 40):  # Later windows and epochs: waits, then equal.
    np.testing.assert_array_equal(growing.train_batch(step, 8, seed=1),
                                  whole.train_batch(step, 8, seed=1))
  assert growing.num_examples == whole.num_examples
  np.testing.assert_array_equal(np.asarray(growing.tokens), whole.tokens)


def test_background_errors_reach_the_reader(corpus, tmp_path):
  directory, _, data_dir = corpus

  class Broken(tokenizer_lib.ByteTokenizer):

    def encode_batch(self, texts):
      raise data.DataError('tokenizer broke')

  stream = data.open_token_stream(directory, 'train', data_dir, Broken(), 8,
                                  cache_dir=str(tmp_path), workers=1,
                                  background=True)
  with pytest.raises(data.DataError, match='tokenizer broke'):
    stream.train_batch(0, 2, seed=0)


def test_shards_hold_about_shard_bytes_of_text(corpus):
  directory, _, data_dir = corpus
  docs = data.open_documents(directory, 'train', data_dir)
  assert docs.num_bytes > 0
  per_doc = docs.num_bytes / len(docs)
  shard_docs = data.shard_docs_for(docs)
  assert shard_docs & (shard_docs - 1) == 0  # a power of two
  assert shard_docs == 2**16 or (
      token_cache.SHARD_BYTES / 1.5 <= shard_docs * per_doc
      <= 1.5 * token_cache.SHARD_BYTES)
  docs.num_bytes = len(docs) * 10_000  # ~10 KB documents: 2**round(9.7)
  assert data.shard_docs_for(docs) == 1024
  docs.num_bytes = 0  # Unknown size.
  assert data.shard_docs_for(docs) == data.SHARD_DOCS


def test_a_streams_identity_is_known_before_it_is_tokenized(corpus, tmp_path):
  """What a checkpoint records of its data (stream.source) is the same while
  the stream is tokenized in the background and once it is cached, and
  another token cap is another identity."""
  directory, _, data_dir = corpus
  open_stream = functools.partial(
      data.open_token_stream, directory, 'train', data_dir, BYTES, 8,
      cache_dir=str(tmp_path), workers=1)
  growing = open_stream(background=True)
  source = growing.source
  assert source and growing.num_examples > 0  # waits for the whole stream
  cached = open_stream()
  assert not isinstance(cached.tokens, data.GrowingTokens)
  assert cached.source == source
  assert open_stream(max_tokens=1000).source != source
