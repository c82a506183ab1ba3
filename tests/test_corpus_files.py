"""A directory corpus's files: text or refused in one line (or read with
the replacement the user asked for, counted); the corpus is its contents
(not its path or time stamps); any file name; a full disk while preparing
is one line; a killed tokenizer leaves no process behind."""
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from poet_jax.data import corpora
from poet_jax.data import local_files
from poet_jax.data import pipeline as data
from poet_jax.train import cli as train
from train_util import (ROOT, assert_one_error_line, run_train, snapshot,
                        train_env)

pytestmark = pytest.mark.filterwarnings(
    'ignore:the load_module:DeprecationWarning')  # ml_collections


def _texts(directory, count=6, size=3000):
  os.makedirs(directory, exist_ok=True)
  for i in range(count):
    with open(os.path.join(directory, f'doc{i}.txt'), 'w',
              encoding='utf-8') as f:
      f.write(f'document {i} héllo ' * (size // 20))
  return str(directory)


# Bytes appended to a UTF-8 file, and where in them the first non-text is.
NOT_TEXT = {
    'latin-1': ('café naïve\n'.encode('latin-1'), 3),
    'utf-16': ('plain words\n'.encode('utf-16'), 0),     # the BOM
    'utf-16 without a BOM': ('plain words\n'.encode('utf-16-le'), 1),  # NUL
    'binary': (bytes(range(256)), 0),
}


@pytest.mark.parametrize('kind', sorted(NOT_TEXT))
def test_a_file_that_is_not_utf8_text_is_refused_in_one_line(kind, tmp_path):
  texts = _texts(tmp_path / 'texts')
  path = os.path.join(texts, 'doc3.txt')
  appended, first = NOT_TEXT[kind]
  offset = os.path.getsize(path) + first
  with open(path, 'ab') as f:
    f.write(appended)
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(data.DataError) as e:
    data.open_documents(texts, 'train', data_dir)
  message = str(e.value)
  assert '\n' not in message
  for text in (f'doc3.txt at byte {offset}', 'not UTF-8 text',
               '--config.data.decode_errors=replace'):
    assert text in message, (text, message)
  assert not os.path.exists(data_dir)  # nothing prepared


def test_replace_reads_each_undecodable_sequence_as_one_mark_and_says_so(
    tmp_path, capsys):
  texts = _texts(tmp_path / 'texts')
  raw = b'caf\xe9 na\xefve \xef\xbf\xbd ok \x00 end'  # 2 invalid, 1 NUL
  with open(os.path.join(texts, 'doc3.txt'), 'wb') as f:
    f.write(raw)
  assert local_files.decode_text(raw) == (
      'caf\ufffd na\ufffdve \ufffd ok \ufffd end', 3, 3)
  docs = {}
  for split in data.SPLITS:
    docs.update(enumerate(data.open_documents(
        texts, split, str(tmp_path / 'tfds'), decode_errors='replace'),
        start=len(docs)))
  assert 'caf\ufffd na\ufffdve \ufffd ok \ufffd end' in docs.values()
  said = [l for l in capsys.readouterr().out.splitlines() if 'U+FFFD' in l]
  assert len(said) == 1, said  # once, though both splits were opened
  for text in ('1 file(s)', 'doc3.txt at byte 3', '3 byte sequence(s)',
               'data.decode_errors=replace'):
    assert text in said[0], (text, said[0])


def test_the_corpus_is_its_contents_not_its_path_or_time_stamps(
    tmp_path, monkeypatch):
  texts = _texts(tmp_path / 'texts')
  data_dir = str(tmp_path / 'tfds')
  monkeypatch.chdir(tmp_path)
  first = data.open_documents('texts', 'train', data_dir)
  later = time.time() + 100
  for name in os.listdir(texts):
    os.utime(os.path.join(texts, name), (later, later))
  moved = str(tmp_path / 'moved')
  os.rename(texts, moved)
  for name in (moved, os.path.relpath(moved), moved + '/'):
    same = data.open_documents(name, 'train', data_dir)
    assert (same.name, same.identity) == (first.name, first.identity), name
  with open(os.path.join(moved, 'doc0.txt'), 'a', encoding='utf-8') as f:
    f.write('one more word')
  assert data.open_documents(moved, 'train', data_dir).name != first.name


def test_file_names_that_are_not_utf8_are_read_and_named(tmp_path):
  texts = _texts(tmp_path / 'texts', count=3)
  name = os.fsdecode(b'caf\xe9.txt')  # Latin-1 bytes in the name
  with open(os.path.join(texts, name), 'w', encoding='utf-8') as f:
    f.write('a document under a Latin-1 name')
  data_dir = str(tmp_path / 'tfds')
  documents = [d for split in data.SPLITS
               for d in data.open_documents(texts, split, data_dir)]
  assert 'a document under a Latin-1 name' in documents
  assert len(documents) == 4
  with open(os.path.join(texts, name), 'ab') as f:
    f.write(b'\xff')
  with pytest.raises(data.DataError, match=r'caf\\xe9\.txt at byte 31'):
    data.open_documents(texts, 'train', data_dir)


def test_a_resumed_run_continues_on_the_same_files_whatever_their_path(
    tmp_path):
  """Trained on a relative path, resumed on the absolute one after every
  file was touched: the same data. An edited file is refused, naming the
  flag that continues on it; with that flag the run goes on."""
  texts = _texts(tmp_path / 'texts', count=8)
  workdir, data_dir = str(tmp_path / 'run'), str(tmp_path / 'tfds')
  common = ('--config.train.steps=3', '--config.checkpoint_every=1',
            '--config.eval_every=3', f'--config.data.data_dir={data_dir}')
  first = run_train(workdir, *common,
                    f'--config.data.name={os.path.relpath(texts, ROOT)}',
                    env={'POET_JAX_KILL_AT_STEP': '1'})
  assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
  for name in os.listdir(texts):
    os.utime(os.path.join(texts, name))
  absolute = (*common, f'--config.data.name={texts}')
  resumed = run_train(workdir, *absolute, env={'POET_JAX_KILL_AT_STEP': '2'})
  assert resumed.returncode == -signal.SIGKILL, resumed.stderr[-3000:]
  assert 'resumed from' in resumed.stdout
  with open(os.path.join(texts, 'doc0.txt'), 'a', encoding='utf-8') as f:
    f.write('a fixed typo')
  before = snapshot(workdir)
  refused = run_train(workdir, *absolute)
  assert refused.returncode == 2, refused.stderr[-3000:]
  assert_one_error_line(refused.stderr, 'the data differs',
                        '--allow_data_change')
  assert snapshot(workdir) == before
  allowed = run_train(workdir, *absolute, '--allow_data_change')
  assert allowed.returncode == 0, allowed.stderr[-3000:]
  assert 'continuing on the new data (--allow_data_change)' in allowed.stdout
  assert 'at step 2' in allowed.stdout


# ------------------------------------------------------------ a full disk


@pytest.mark.parametrize('where', ['preparing', 'tokenizing'])
def test_a_full_disk_while_preparing_the_data_is_one_line(
    where, tmp_path, monkeypatch, capsys):
  """Before any checkpoint exists: names the file or directory, says how to
  fix it and claims no checkpoint; exit 5; no work directory made. (The
  failures as tfds's writer and the shard writer raise them on a full
  tmpfs.)"""
  texts, data_dir = _texts(tmp_path / 'texts'), str(tmp_path / 'tfds')
  if where == 'preparing':
    def full(*args, **kwargs):
      raise RuntimeError('Failed to finalize writing of split "train": '
                         'write() failed: No space left on device')
    monkeypatch.setattr(corpora.TextCorpus, 'download_and_prepare', full)
    expected = (f'could not prepare .txt files under {texts} in {data_dir}',
                'No space left on device', 'set data.data_dir')
  else:
    data.open_documents(texts, 'train', data_dir)  # prepared; then no room
    def full(*args, **kwargs):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, 'fsync', full)
    expected = (f'could not write {data_dir}', 'shard-000000.',
                os.strerror(errno.ENOSPC))
  workdir = tmp_path / 'run'
  capsys.readouterr()
  code = train.main(['train.py', f'--workdir={workdir}', '--no_progress',
                     f'--config.data.name={texts}',
                     f'--config.data.data_dir={data_dir}'])
  assert code == 5
  line = assert_one_error_line(capsys.readouterr().err, *expected,
                               'then run the same command',
                               'no checkpoint had been written yet')
  assert 'intact' not in line
  assert not workdir.exists()


# ------------------------------------------------- no orphaned processes


_SLOW_BUILD = textwrap.dedent('''
    import os, sys, time
    from poet_jax.data import pipeline as data, tokenizer

    class SlowBytes(tokenizer.ByteTokenizer):
      """A minute a shard, after leaving a mark: long work in flight when the
      build is killed, as a large corpus has."""

      def __init__(self, marks):
        super().__init__()
        self.marks = marks

      def encode_batch(self, texts):
        open(os.path.join(self.marks, str(os.getpid())), 'w').close()
        time.sleep(60)
        return super().encode_batch(texts)

    if __name__ == '__main__':
      data.open_token_stream(sys.argv[1], 'train', sys.argv[2],
                             SlowBytes(sys.argv[3]), 8, workers=2,
                             shard_docs=1, progress=False)
''')


def _children(pid: int) -> set[int]:
  found = set()
  for task in os.listdir(f'/proc/{pid}/task'):
    with open(f'/proc/{pid}/task/{task}/children') as f:
      found.update(int(p) for p in f.read().split())
  return found


def _alive(pid: int) -> bool:
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().split(')')[-1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='/proc')
def test_a_killed_tokenizer_leaves_no_process_behind(tmp_path):
  """kill -9 while worker processes tokenize: the workers and
  multiprocessing's resource tracker end within seconds, not once their
  work (here a minute) is done."""
  texts = _texts(tmp_path / 'texts', count=40, size=200)
  script, marks = tmp_path / 'build.py', tmp_path / 'marks'
  script.write_text(_SLOW_BUILD)
  marks.mkdir()
  data.open_documents(texts, 'train', str(tmp_path / 'tfds'))  # prepared
  proc = subprocess.Popen([sys.executable, str(script), texts,
                           str(tmp_path / 'tfds'), str(marks)],
                          env=train_env({'PYTHONPATH': ROOT}), cwd=ROOT)
  deadline = time.monotonic() + 120
  while len(os.listdir(marks)) < 2:  # both workers are at work
    assert proc.poll() is None and time.monotonic() < deadline
    time.sleep(0.05)
  children = _children(proc.pid)
  assert len(children) >= 3  # two workers and the resource tracker
  proc.kill()
  proc.wait()
  deadline = time.monotonic() + 10
  while any(map(_alive, children)) and time.monotonic() < deadline:
    time.sleep(0.1)
  left = [p for p in children if _alive(p)]
  for pid in left:  # not to leave them to the next test
    os.kill(pid, signal.SIGKILL)
  assert not left
