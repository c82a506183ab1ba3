"""Bad input and bad files: one line on stderr naming what is wrong and
the fix, exit code 2, and no change at all to the work directory,
checkpoints or data.

Where a subprocess is not needed (a file that cannot be read, a config that
cannot run) train.main runs in-process. Damaged checkpoints are copies of one
uninterrupted reference run (tests/conftest.py).
"""
import os
import shutil
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from poet_jax.data import pipeline as data_lib
from poet_jax.data import tokenizer as tokenizer_lib
from poet_jax.train import checkpoint as checkpoint_lib
from poet_jax.train import cli as train
from poet_jax.train import state as train_state
from poet_jax.train import steps as steps_lib
from poet_jax.train import workdir as workdir_lib
from train_util import (SHORT, assert_one_error_line, run_train, snapshot,
                        tiny_target)

pytestmark = pytest.mark.filterwarnings(
    'ignore:the load_module:DeprecationWarning')  # ml_collections


# ------------------------------------------------------------------ files


def _main(argv, capsys):
  """train.main in-process: (exit code, stdout, stderr)."""
  capsys.readouterr()  # what the test printed before
  code = train.main(['train.py', *argv])
  out, err = capsys.readouterr()
  return code, out, err


# In-process runs see the 8 simulated devices of conftest.py: a batch of 8.
INPROC = ('--config.model.dim=32', '--config.model.num_layers=2',
          '--config.model.num_heads=2', '--config.model.ffn_dim=64',
          '--config.poet.block_size=8', '--config.train.batch_size=8',
          '--config.train.seq_len=32', '--config.eval_tokens=256',
          '--no_progress')


@pytest.fixture
def read_only_dir(tmp_path):
  """A directory holding a file, that this process cannot write to."""
  path = tmp_path / 'ro'
  path.mkdir()
  (path / 'keep.txt').write_text('earlier results')
  if os.geteuid() != 0:
    path.chmod(0o555)
    yield str(path)
    path.chmod(0o755)
    return
  # root ignores permissions: a read-only bind mount of it.
  ok = subprocess.run(['mount', '--bind', str(path), str(path)]).returncode == 0
  ok = ok and subprocess.run(['mount', '-o', 'remount,ro,bind', str(path),
                              str(path)]).returncode == 0
  if not ok:
    subprocess.run(['umount', str(path)], stderr=subprocess.DEVNULL)
    pytest.skip('cannot make a read-only directory here')
  try:
    yield str(path)
  finally:
    subprocess.run(['umount', str(path)], check=True)


def test_unwritable_workdir_is_one_line_and_changes_nothing(
    read_only_dir, tmp_path, capsys):
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  for workdir in (read_only_dir, str(a_file), str(a_file / 'sub')):
    before = snapshot(tmp_path)
    code, _, err = _main([f'--workdir={workdir}', *INPROC], capsys)
    assert code == 2, err
    assert_one_error_line(err, 'work directory', 'cannot be written')
    assert snapshot(tmp_path) == before


@pytest.fixture
def no_compile(monkeypatch):
  """Fails a test whose run gets as far as building or compiling a step."""
  def refuse(*args, **kwargs):
    raise AssertionError('the run got as far as building the model')
  monkeypatch.setattr(train_state, 'abstract_state', refuse)
  monkeypatch.setattr(steps_lib, 'compile_steps', refuse)


def _corpus_of(directory, sizes):
  """A directory of .txt files of the given sizes (bytes)."""
  os.makedirs(directory)
  rng = np.random.default_rng(0)
  for name, size in sizes.items():
    with open(os.path.join(directory, name), 'w') as f:
      f.write(''.join(rng.choice(list('abcdefgh \n'), size=size)))
  return str(directory)


@pytest.mark.parametrize('override,expected', [
    ('--config.train.seq_len=2000000', 'fewer than one batch'),
    ('--config.model.vocab_size=200', 'model.vocab_size=200'),
    ('--config.train.batch_size=12', 'mesh data x fsdp = 8'),
    ('--config.train.grad_accum_steps=2', 'micro-batch'),
    ('--config.data.max_tokens=200', 'raise data.max_tokens=200'),
])
def test_a_refused_start_leaves_the_work_directory_as_it_was(
    override, expected, tmp_path, capsys, no_compile):
  """Before anything is written or compiled: a new work directory is not
  created; an existing one, holding config.json of another config and no
  checkpoint (no run to protect), is left as it was and does not refuse."""
  new = tmp_path / 'new'
  code, _, err = _main([f'--workdir={new}', *INPROC, override], capsys)
  assert code == 2
  assert_one_error_line(err, expected)
  assert not new.exists()
  old = tmp_path / 'old'
  old.mkdir()
  (old / 'config.json').write_text('{"seed": 7}')
  (old / 'metrics.jsonl').write_text('')
  before = snapshot(str(old))
  code, _, err = _main([f'--workdir={old}', *INPROC, override], capsys)
  assert code == 2
  assert_one_error_line(err, expected)
  assert snapshot(str(old)) == before


def test_empty_files_are_never_held_out(tmp_path):
  """A directory where, by the hash rule alone, a.txt (empty) would be held
  out."""
  texts = _corpus_of(tmp_path / 'texts', {'a.txt': 0, 'b.txt': 64_000,
                                          'c.txt': 99_000})
  split = data_lib.split_files(data_lib.text_files(texts))
  assert [rel for rel, _ in split['validation']] == ['c.txt']
  _, held_out = data_lib.open_train_and_eval(
      texts, str(tmp_path / 'tfds'), tokenizer_lib.ByteTokenizer(), 32,
      progress=False)
  assert held_out.num_examples * 33 > 90_000


def test_a_held_out_split_too_small_names_its_files_and_the_fix(
    tmp_path, capsys, no_compile):
  texts = _corpus_of(tmp_path / 'texts', {'a.txt': 0, 'b.txt': 64_000,
                                          'c.txt': 99_000})
  (held_out, path), = data_lib.split_files(
      data_lib.text_files(texts))['validation']
  with open(path, 'w') as f:
    f.write('x' * 200)  # with EOS, 6 examples of 33 tokens
  data_lib.open_documents(texts, 'train', str(tmp_path / 'tfds'))  # prepared
  workdir = tmp_path / 'run'
  code, _, err = _main([f'--workdir={workdir}', *INPROC,
                        f'--config.data.name={texts}',
                        f'--config.data.data_dir={tmp_path / "tfds"}'], capsys)
  assert code == 2
  line = assert_one_error_line(err, 'validation', 'fewer than one batch of 8',
                               f'{held_out} (200 bytes)',
                               'train.batch_size to at most 6',
                               'train.seq_len to at most 24')
  assert not workdir.exists(), line


def _overwrite_data_files(step_dir, how):
  for root, _, files in os.walk(os.path.join(step_dir, 'state')):
    for name in files:
      if os.sep + 'd' in root:  # the array data of the OCDBT store
        path = os.path.join(root, name)
        size = os.path.getsize(path)
        with open(path, 'r+b') as f:
          if how == 'truncate':
            f.truncate(size // 2)
          else:
            f.write(np.random.default_rng(0).bytes(size))


CORRUPTIONS = {
    'data truncated': lambda d: _overwrite_data_files(d, 'truncate'),
    'data overwritten': lambda d: _overwrite_data_files(d, 'garbage'),
    'index garbage': lambda d: open(os.path.join(d, 'state', 'manifest.ocdbt'),
                                    'wb').write(b'\x00' * 8),
    'metadata missing': lambda d: os.remove(os.path.join(d, 'state',
                                                         '_METADATA')),
    'state missing': lambda d: shutil.rmtree(os.path.join(d, 'state')),
    'empty step directory': lambda d: [shutil.rmtree(d), os.mkdir(d)],
}


# orbax gives up the reads still in flight; their callbacks then meet a
# closed event loop (train.py drops that noise on the command line).
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('kind', sorted(CORRUPTIONS))
def test_corrupted_checkpoint_is_a_one_line_error(kind, reference, tmp_path):
  directory = str(tmp_path / 'checkpoints')
  shutil.copytree(os.path.join(reference, 'checkpoints'), directory)
  CORRUPTIONS[kind](os.path.join(directory, '8'))
  ckpt = checkpoint_lib.Checkpointer(directory)
  try:
    assert ckpt.latest_step() == 8
    with pytest.raises(checkpoint_lib.CorruptCheckpointError) as e:
      ckpt.restore(8, tiny_target())
    message = str(e.value)
    assert '\n' not in message and 'cannot be read' in message
    assert f'mv {directory}/8 {directory}/8.bad' in message
    assert 'resume from step 6' in message
    # The one before is untouched and restores.
    state, meta = ckpt.restore(6, tiny_target())
    assert meta['step'] == 6 and int(state['step']) == 6
  finally:
    ckpt.abandon()


def test_corrupted_checkpoint_on_the_command_line(reference, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  _overwrite_data_files(os.path.join(workdir, 'checkpoints', '8'), 'garbage')
  before = snapshot(workdir)
  result = run_train(workdir, *SHORT)
  assert result.returncode == 2, result.stderr[-3000:]
  assert_one_error_line(result.stderr, 'checkpoints/8 cannot be read',
                        'resume from step 6')
  assert snapshot(workdir) == before
  # Following the advice, the earlier checkpoint is used.
  checkpoints = os.path.join(workdir, 'checkpoints')
  os.rename(os.path.join(checkpoints, '8'), os.path.join(checkpoints, '8.bad'))
  ckpt = checkpoint_lib.Checkpointer(checkpoints)
  try:
    assert ckpt.latest_step() == 6
    assert int(ckpt.restore(6, tiny_target())[0]['step']) == 6
  finally:
    ckpt.abandon()


def _write_corpus(directory):
  os.makedirs(directory)
  rng = np.random.default_rng(0)
  words = ['alpha', 'beta', 'gamma', 'delta', 'héllo', 'wörld']
  for i in range(12):
    with open(os.path.join(directory, f'doc{i:02d}.txt'), 'w') as f:
      f.write(' '.join(rng.choice(words, size=400)) + '\n')


def _prepared_corpus(root):
  """A small text corpus, prepared (ArrayRecord and token streams)."""
  texts, data_dir = str(root / 'texts'), str(root / 'tfds')
  _write_corpus(texts)
  data_lib.open_train_and_eval(texts, data_dir, tokenizer_lib.ByteTokenizer(),
                               32, progress=False)
  return texts, data_dir


def _run_dir_with_checkpoint(workdir, argv, meta=None):
  """A work directory as a run of argv leaves it: config.json and a
  checkpoint (a stand-in state: these runs fail before restoring it)."""
  command = train.parse_command_line(['train.py', *argv])
  assert not isinstance(command, str), command
  os.makedirs(workdir)
  workdir_lib.write_config(workdir, command.config)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'))
  ckpt.save(2, {'w': jnp.arange(4.0)}, {'step': 2, **(meta or {})})
  ckpt.close()
  return snapshot(workdir)


def _files(directory, pattern):
  return sorted(os.path.join(root, n) for root, _, names in os.walk(directory)
                for n in names if pattern in n)


def test_truncated_token_stream(tmp_path, capsys):
  texts, data_dir = _prepared_corpus(tmp_path)
  argv = (*INPROC, f'--workdir={tmp_path / "run"}', f'--config.data.name={texts}',
          f'--config.data.data_dir={data_dir}')
  before = _run_dir_with_checkpoint(str(tmp_path / 'run'), argv)
  (stream,) = [p for p in _files(data_dir, '.npy') if '.train.' in p]
  with open(stream, 'r+b') as f:
    f.truncate(os.path.getsize(stream) - 100)
  code, _, err = _main(argv, capsys)
  assert code == 2
  assert_one_error_line(err, stream, 'truncated or corrupt', 'delete it')
  assert snapshot(str(tmp_path / 'run')) == before


@pytest.mark.parametrize('cut', ['block boundary', 'mid-chunk'])
def test_truncated_arrayrecord_file(cut, tmp_path, capsys):
  """Cut at a block boundary, ArrayRecord reads records without text; cut
  elsewhere, it raises: both are one line, never a silently short corpus."""
  texts, data_dir = _prepared_corpus(tmp_path)
  argv = (*INPROC, f'--workdir={tmp_path / "run"}', f'--config.data.name={texts}',
          f'--config.data.data_dir={data_dir}')
  before = _run_dir_with_checkpoint(str(tmp_path / 'run'), argv)
  shutil.rmtree(os.path.join(data_dir, 'poet_jax_streams'))  # read it again
  (records,) = _files(data_dir, 'train.array_record')
  size = os.path.getsize(records)
  with open(records, 'r+b') as f:
    f.truncate(65536 if cut == 'block boundary' else size - 1000)
  assert os.path.getsize(records) < size
  code, _, err = _main(argv, capsys)
  assert code == 2
  assert_one_error_line(err, 'truncated or corrupt', 'delete that directory')
  assert snapshot(str(tmp_path / 'run')) == before


def _sentencepiece(root, name, vocab_size):
  import sentencepiece  # pylint: disable=g-import-not-at-top
  sentencepiece.SentencePieceTrainer.train(
      input=str(root / 'texts' / 'doc00.txt'), model_prefix=str(root / name),
      vocab_size=vocab_size, hard_vocab_limit=False, minloglevel=2)
  return str(root / f'{name}.model')


@pytest.fixture(scope='module')
def sentencepiece_models(tmp_path_factory):
  """Two different small SentencePiece models."""
  root = tmp_path_factory.mktemp('sp')
  _write_corpus(str(root / 'texts'))
  return _sentencepiece(root, 'a', 40), _sentencepiece(root, 'b', 30)


@pytest.mark.parametrize('damage', ['overwritten', 'truncated', 'empty',
                                    'replaced'])
def test_corrupted_tokenizer_file(damage, sentencepiece_models, tmp_path,
                                  capsys):
  texts, data_dir = _prepared_corpus(tmp_path)
  model = str(tmp_path / 'tok.model')
  shutil.copy(sentencepiece_models[0], model)
  argv = (*INPROC, f'--workdir={tmp_path / "run"}', f'--config.data.name={texts}',
          f'--config.data.data_dir={data_dir}', f'--config.data.tokenizer={model}')
  identity = tokenizer_lib.load_tokenizer(model).identity
  before = _run_dir_with_checkpoint(str(tmp_path / 'run'), argv,
                                    meta={'tokenizer': identity})
  expected = {'overwritten': 'is not a SentencePiece model',
              'truncated': 'is not a SentencePiece model',
              'empty': 'is empty',
              # Another valid model: only the identity the checkpoint
              # recorded tells it from the one the run was trained with.
              'replaced': 'the tokenizer differs from the one checkpoint'}
  if damage == 'replaced':
    shutil.copy(sentencepiece_models[1], model)
  else:
    with open(model, 'r+b') as f:
      if damage == 'overwritten':
        f.write(b'\xff' * 64)
      else:
        f.truncate(os.path.getsize(model) // 2 if damage == 'truncated' else 0)
  code, _, err = _main(argv, capsys)
  assert code == 2
  assert_one_error_line(err, model if damage != 'replaced' else '',
                        expected[damage])
  assert snapshot(str(tmp_path / 'run')) == before


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_moved_tokenizer_file_is_the_same_tokenizer(sentencepiece_models,
                                                      tmp_path, capsys):
  """A tokenizer is its contents: moved, the run's config names another
  path, yet the checkpoint's record of it matches, and start-up goes on (to
  the stand-in checkpoint, which is what refuses here), changing nothing."""
  texts, data_dir = _prepared_corpus(tmp_path)
  model, moved = str(tmp_path / 'tok.model'), str(tmp_path / 'moved.model')
  shutil.copy(sentencepiece_models[0], model)
  argv = (*INPROC, f'--workdir={tmp_path / "run"}', f'--config.data.name={texts}',
          f'--config.data.data_dir={data_dir}')
  before = _run_dir_with_checkpoint(
      str(tmp_path / 'run'), (*argv, f'--config.data.tokenizer={model}'),
      meta={'tokenizer': tokenizer_lib.load_tokenizer(model).identity})
  os.rename(model, moved)
  code, _, err = _main((*argv, f'--config.data.tokenizer={moved}'), capsys)
  assert code == 2
  assert_one_error_line(err, 'checkpoints/2 cannot be read')
  assert snapshot(str(tmp_path / 'run')) == before
