"""Misuse a newcomer tries: each ends in what was meant or in one line with
the fix, and nothing of a run is lost (docs/reliability.md)."""
import json
import os
import shutil
import signal

import pytest

from poet_jax.data import pipeline as data
from poet_jax.tools import evaluate
from poet_jax.tools import export
from poet_jax.train import cli as train
from poet_jax.train import plot
from poet_jax.train import stopping
from train_util import assert_one_error_line

pytestmark = pytest.mark.filterwarnings(
    'ignore:the load_module:DeprecationWarning')  # ml_collections


def test_a_tilde_the_shell_left_is_the_home_directory(reference, tmp_path,
                                                      monkeypatch, capsys):
  """bash expands ~ only at the start of a word: --out=~/x reaches the tool
  as is, and a directory named '~' appeared where the command ran."""
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  monkeypatch.chdir(tmp_path)
  assert export.main(['export', f'--workdir={reference}',
                      '--out=~/hf']) == 0
  assert os.path.isfile(tmp_path / 'home' / 'hf' / 'config.json')
  assert plot.main([reference, '--out=~/runs.png']) == 0
  assert os.path.isfile(tmp_path / 'home' / 'runs.png')
  command = train.parse_command_line(['train.py', '--workdir=~/run'])
  assert command.workdir == str(tmp_path / 'home' / 'run')
  assert not os.path.exists(tmp_path / '~')
  capsys.readouterr()


def test_an_unreadable_corpus_file_is_named(tmp_path):
  texts = tmp_path / 'texts'
  texts.mkdir()
  for i in range(3):
    (texts / f'doc{i}.txt').write_text('some words ' * 50)
  os.symlink(tmp_path / 'gone.txt', texts / 'broken.txt')
  with pytest.raises(data.DataError) as e:
    data.open_documents(str(texts), 'train', str(tmp_path / 'tfds'))
  assert str(e.value) == (f'corpus file {texts / "broken.txt"} cannot be read '
                          '(No such file or directory); fix or remove it')


def test_plotting_a_run_that_logged_nothing_says_so(tmp_path, capsys):
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'config.json').write_text('{}')
  (run / 'metrics.jsonl').write_text('')
  assert plot.main([str(run), f'--out={tmp_path / "x.png"}']) == 2
  assert_one_error_line(capsys.readouterr().err, 'has logged no step yet')
  assert not os.path.exists(tmp_path / 'x.png')


def test_a_signal_in_start_up_is_not_taken_for_an_error():
  """Raised from the handler inside library code that catches Exception
  (JAX's compilation cache did, and start-up went on), Interrupted still
  ends start-up."""
  stop = stopping.StopSignal()
  try:
    with pytest.raises(stopping.Interrupted):
      try:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between these
          pass
      except Exception:  # pylint: disable=broad-except
        pass  # what such library code does
  finally:
    stop.restore()


def test_evaluate_names_its_own_flag_for_undecodable_files(reference,
                                                           tmp_path, capsys):
  """The refusal names a flag evaluate has (not train.py's --config.*)."""
  run = str(tmp_path / 'run')
  shutil.copytree(reference, run)
  with open(os.path.join(run, 'config.json')) as f:
    config = json.load(f)
  config['data']['data_dir'] = str(tmp_path / 'tfds')
  config['mesh']['data'] = 1  # its batch of 4 on this process's 8 devices
  with open(os.path.join(run, 'config.json'), 'w') as f:
    json.dump(config, f)
  texts = tmp_path / 'texts'
  texts.mkdir()
  for i in range(3):
    (texts / f'doc{i}.txt').write_bytes(b'caf\xe9 ' * 400)
  argv = ['evaluate', f'--workdir={run}', f'--data={texts}']
  capsys.readouterr()
  assert evaluate.main(argv) == 2
  line = assert_one_error_line(capsys.readouterr().err, 'not UTF-8 text',
                               'evaluate: --decode_errors=replace')
  flag = line.split('evaluate: ')[1].rstrip(')')
  # The flag it names is evaluate's own: accepted, the run then stops at
  # its mesh, before any work (4 rows do not split over 8 devices).
  config['mesh']['data'] = 8
  with open(os.path.join(run, 'config.json'), 'w') as f:
    json.dump(config, f)
  assert evaluate.main([*argv, flag]) == 2
  assert 'not divisible by mesh data' in capsys.readouterr().err
