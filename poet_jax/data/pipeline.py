"""Text corpora as packed token streams for language-model training.

The entry points of poet_jax.data; the work is in

  corpora.py          which documents a corpus name means (the embedded
                      standard library, a directory of .txt files, or a tfds
                      dataset such as c4/en), stored as ArrayRecord;
  local_files.py      a local corpus's files, its held-out split, their text;
  tokenize_shards.py  tokenizing a split with every core into cached shards;
  token_cache.py      the shard and manifest files, written atomically and
                      checked when read;
  batches.py          the stream cut into examples; batches as pure functions
                      of (step, seed);
  tokenizer.py        the tokenizers (raw bytes, SentencePiece).

See docs/data.md.
"""
import os
import sys

from poet_jax.data import tokenizer as tokenizer_lib
# Re-exported: the names the trainer, the tools and the tests use.
from poet_jax.data.batches import TokenStream, check_one_batch  # pylint: disable=unused-import
from poet_jax.data.corpora import (  # pylint: disable=unused-import
    DataError, SPLITS, STDLIB, TextCorpus, default_data_dir, open_documents)
from poet_jax.data.local_files import (  # pylint: disable=unused-import
    split_files, stdlib_files, text_files)
from poet_jax.data.token_cache import (  # pylint: disable=unused-import
    SHARD_DOCS, ShardedTokens, load_manifest, load_stream, shard_docs_for,
    stream_path, token_dtype)
from poet_jax.data.tokenize_shards import (  # pylint: disable=unused-import
    BackgroundBuild, GrowingTokens, build_stream)


def _process() -> tuple[int, int]:
  """(jax.process_index(), jax.process_count()) when JAX is in use, so the
  hosts of a run share the tokenizing; (0, 1) otherwise."""
  jax = sys.modules.get('jax')
  return (jax.process_index(), jax.process_count()) if jax else (0, 1)


def open_token_stream(name: str, split: str, data_dir: str | None,
                      tokenizer: tokenizer_lib.Tokenizer, seq_len: int,
                      max_tokens: int | None = None,
                      cache_dir: str | None = None,
                      progress: bool = True, workers: int | None = None,
                      shard_docs: int | None = None,
                      background: bool = False,
                      decode_errors: str = 'strict') -> TokenStream:
  """One split of a corpus as a TokenStream, tokenizing it on first use.

  Args:
    name, split, data_dir: as for open_documents.
    tokenizer: any tokenizer_lib.Tokenizer.
    seq_len: tokens a model reads per example (examples hold seq_len + 1).
    max_tokens: keep only the stream's first max_tokens tokens (a big corpus
      such as C4 is read only that far); None: all.
    cache_dir: where streams are cached; None: data_dir/poet_jax_streams.
    progress: show a progress bar while tokenizing.
    workers: processes tokenizing; None: as many as the split's size is
      worth (tokenize_shards.default_workers); 1: this process only.
    shard_docs: documents per cached shard; None: about SHARD_BYTES of text
      (token_cache.shard_docs_for).
    background: return at once and tokenize in a background thread; reads
      of the stream wait for the shards they need (TokenStream).
    decode_errors: as for open_documents.
  Raises:
    DataError, FileNotFoundError: see open_documents and load_manifest.
  """
  if max_tokens is not None and max_tokens < 1:
    raise DataError(f'max_tokens must be positive or None; got {max_tokens}')
  data_dir = os.path.expanduser(data_dir or default_data_dir())
  cache_dir = os.path.expanduser(
      cache_dir or os.path.join(data_dir, 'poet_jax_streams'))
  docs = open_documents(name, split, data_dir, decode_errors)
  shard_docs = shard_docs or shard_docs_for(docs)
  path = stream_path(docs, tokenizer, max_tokens, cache_dir, shard_docs)
  name = f'{docs.name} {split}'
  source = os.path.relpath(path, cache_dir)
  if os.path.exists(path):
    return TokenStream(load_manifest(path), seq_len, name=name,
                       source=source)
  process_index, process_count = _process()
  settings = dict(progress=progress, workers=workers, shard_docs=shard_docs,
                  process_index=process_index, process_count=process_count)
  if not background:
    build_stream(docs, tokenizer, path, max_tokens, **settings)
    return TokenStream(load_manifest(path), seq_len, name=name,
                       source=source)
  build = BackgroundBuild(docs, tokenizer, path, max_tokens, **settings)
  tokens = GrowingTokens(build, token_dtype(tokenizer.vocab_size))
  return TokenStream(tokens, seq_len, name=name, source=source)


def open_train_and_eval(name: str, data_dir: str | None,
                        tokenizer: tokenizer_lib.Tokenizer, seq_len: int,
                        max_tokens: int | None = None,
                        cache_dir: str | None = None,
                        progress: bool = True, workers: int | None = None,
                        decode_errors: str = 'strict'
                        ) -> tuple[TokenStream, TokenStream]:
  """The 'train' and 'validation' streams (see open_token_stream).

  The validation stream is tokenized first; the train stream then in the
  background, so that training starts once its first window is ready
  (batches.WINDOW_TOKENS).
  """
  validation = open_token_stream(name, 'validation', data_dir, tokenizer,
                                 seq_len, max_tokens, cache_dir, progress,
                                 workers, decode_errors=decode_errors)
  train = open_token_stream(name, 'train', data_dir, tokenizer, seq_len,
                            max_tokens, cache_dir, progress, workers,
                            background=True, decode_errors=decode_errors)
  return train, validation
