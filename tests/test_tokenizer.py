"""Tokenizers: byte-level and SentencePiece, and their load errors."""
import numpy as np
import pytest
import sentencepiece

from poet_jax.data import tokenizer as tokenizer_lib

UNICODE_TEXT = 'héllo wörld ✓ 🙂 日本語\n\tdef f(x): return x  # ünïcödé\n'


def _train_sentencepiece(tmp_path, name: str, **options) -> str:
  """A tiny model trained on a generated text file (a second or so)."""
  rng = np.random.default_rng(0)
  # Enough distinct pieces for a vocabulary of 100, plus the test's words.
  words = [''.join(rng.choice(list('abcdefghijklmnopqrstuvwxyzéö'),
                              size=rng.integers(3, 9))) for _ in range(300)]
  words += ['alpha', 'beta', 'gamma', 'héllo', 'wörld', '日本語', 'training']
  lines = [' '.join(rng.choice(words, size=12)) for _ in range(1000)]
  corpus = tmp_path / f'{name}.txt'
  corpus.write_text('\n'.join(lines), encoding='utf-8')
  prefix = str(tmp_path / name)
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=prefix, vocab_size=100,
      character_coverage=1.0, minloglevel=2, **options)
  return prefix + '.model'


@pytest.fixture(scope='module')
def sp_model(tmp_path_factory):
  return _train_sentencepiece(tmp_path_factory.mktemp('sp'), 'tiny')


def test_byte_round_trip_unicode():
  tok = tokenizer_lib.ByteTokenizer()
  ids = tok.encode(UNICODE_TEXT)
  assert ids.dtype == np.int32
  assert ids.min() >= 0 and ids.max() <= 255
  assert len(ids) == len(UNICODE_TEXT.encode('utf-8'))
  assert tok.decode(ids) == UNICODE_TEXT
  assert (tok.vocab_size, tok.eos_id) == (257, 256)


def test_byte_decode_skips_eos_and_replaces_bad_bytes():
  tok = tokenizer_lib.ByteTokenizer()
  ids = np.concatenate([tok.encode('ab'), [tok.eos_id], tok.encode('c')])
  assert tok.decode(ids) == 'abc'
  assert tok.decode([0xff, ord('a')]) == '\ufffda'
  with pytest.raises(ValueError, match='must be in'):
    tok.decode([300])


def test_byte_encode_batch_matches_encode():
  tok = tokenizer_lib.ByteTokenizer()
  texts = ['', 'a', UNICODE_TEXT]
  for batched, text in zip(tok.encode_batch(texts), texts):
    np.testing.assert_array_equal(batched, tok.encode(text))


def test_load_tokenizer_byte():
  assert isinstance(tokenizer_lib.load_tokenizer('byte'),
                    tokenizer_lib.ByteTokenizer)


def test_sentencepiece_round_trip(sp_model):
  tok = tokenizer_lib.load_tokenizer(sp_model)
  assert isinstance(tok, tokenizer_lib.SentencePieceTokenizer)
  assert tok.vocab_size == 100
  # The trainer's default reserves <unk>=0, <s>=1, </s>=2.
  assert tok.eos_id == 2
  text = 'héllo wörld alpha gamma 日本語 training'
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.max() < tok.vocab_size
  assert tok.decode(ids) == text
  assert tok.decode(np.append(ids, tok.eos_id)) == text
  batched = tok.encode_batch([text, 'beta'])
  np.testing.assert_array_equal(batched[0], ids)
  np.testing.assert_array_equal(batched[1], tok.encode('beta'))


def test_sentencepiece_without_eos_gets_one_appended(tmp_path):
  path = _train_sentencepiece(tmp_path, 'no_eos', eos_id=-1)
  tok = tokenizer_lib.SentencePieceTokenizer(path)
  assert tok.eos_id == 100 and tok.vocab_size == 101
  assert tok.decode(np.append(tok.encode('alpha beta'), tok.eos_id)) == (
      'alpha beta')


def test_sentencepiece_identity_follows_file_contents(sp_model, tmp_path):
  same = tmp_path / 'copy.model'
  same.write_bytes(open(sp_model, 'rb').read())
  other = _train_sentencepiece(tmp_path, 'other', eos_id=-1)
  identity = tokenizer_lib.SentencePieceTokenizer(sp_model).identity
  assert tokenizer_lib.SentencePieceTokenizer(str(same)).identity == identity
  assert tokenizer_lib.SentencePieceTokenizer(other).identity != identity
  assert tokenizer_lib.ByteTokenizer().identity != identity


def test_missing_tokenizer_file(tmp_path):
  missing = str(tmp_path / 'nope.model')
  with pytest.raises(FileNotFoundError, match='does not exist') as e:
    tokenizer_lib.load_tokenizer(missing)
  assert missing in str(e.value) and '\n' not in str(e.value)


def test_corrupt_tokenizer_file(tmp_path):
  bad = tmp_path / 'bad.model'
  bad.write_bytes(b'this is not a protobuf \x00\xff' * 10)
  with pytest.raises(ValueError, match='is not a SentencePiece model') as e:
    tokenizer_lib.load_tokenizer(str(bad))
  assert str(bad) in str(e.value) and '\n' not in str(e.value)
  assert isinstance(e.value, tokenizer_lib.TokenizerError)
