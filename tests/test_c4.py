"""README's C4 command, run on a small C4-shaped dataset built here.

The dataset is what `tfds build c4/en --file_format=array_record` leaves (a
'text' feature, train and validation splits, ArrayRecord files), written by
tfds' own writer; the SentencePiece model is trained here in seconds.
"""
import math
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import tensorflow_datasets as tfds

from poet_jax.data import pipeline as data
from poet_jax.data import tokenizer as tokenizer_lib
from poet_jax.train import config
from train_util import ROOT, TINY, read_metrics, train_env

TRAIN_DOCS, VALIDATION_DOCS = 3000, 200

_WORDS = ('the of and to in is was for on that with as by at from his it an '
          'were which are this be has or had first one their its new after '
          'who they two her she been other when there all during into '
          'school time may years more most only over city some world would '
          'where later up such used many can state about national out known '
          'university united then made').split()


def _document(i: int) -> str:
  rng = np.random.default_rng(i)
  sentences = [' '.join(rng.choice(_WORDS, int(rng.integers(4, 12))))
               for _ in range(int(rng.integers(1, 4)))]
  return f'Page {i}. ' + '. '.join(s.capitalize() for s in sentences) + '.'


def prepare_c4(data_dir: str, texts: dict[str, list[str]] | None = None,
               shuffled: bool = True) -> None:
  """'c4/en' 3.1.0 as ArrayRecord, unknown to this process's registry (tfds
  then reads it from its files alone, as it reads a real C4).

  texts: {split: documents}; None: TRAIN_DOCS and VALIDATION_DOCS of
  _document. shuffled: tfds orders documents by a hash of their keys, as in
  C4; False keeps the given order.
  """
  if texts is None:
    end = TRAIN_DOCS + VALIDATION_DOCS
    texts = {'train': [_document(i) for i in range(TRAIN_DOCS)],
             'validation': [_document(i) for i in range(TRAIN_DOCS, end)]}
  with tfds.core.registered.skip_registration():

    class C4(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version('3.1.0')
      BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='en')]
      code_path = None  # See data.TextCorpus.

      def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(
                {'text': tfds.features.Text(), 'url': tfds.features.Text(),
                 'timestamp': tfds.features.Text()}),
            disable_shuffling=not shuffled)

      def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, docs)
                for split, docs in texts.items()}

      def _generate_examples(self, split, docs):
        for i, text in enumerate(docs):
          yield i, {'text': text, 'url': f'https://example.com/{split}/{i}',
                    'timestamp': '2019-04-25T12:00:00Z'}

  C4(data_dir=data_dir, file_format='array_record').download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def train_sentencepiece(path_prefix: str) -> str:
  import sentencepiece  # pylint: disable=g-import-not-at-top
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter([_document(i) for i in range(500)]),
      model_prefix=path_prefix, vocab_size=200, minloglevel=2)
  return path_prefix + '.model'


def readme_c4_command() -> list[str]:
  """The command of README's C4 section, as argv."""
  with open(os.path.join(ROOT, 'README.md')) as f:
    section = f.read().split('### Training a paper config on C4')[1]
  block = re.search(r'\n((?:    .*\n)+)', section).group(1)
  return shlex.split(block.replace('\\\n', ' '))


def test_readme_c4_command_trains_on_a_c4_shaped_dataset(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  prepare_c4(data_dir)
  model = train_sentencepiece(str(tmp_path / 'spiece'))
  argv = readme_c4_command()
  assert argv[:2] == ['python', 'train.py']
  flags = dict(a.split('=', 1) for a in argv[2:])
  assert flags['--config'] == 'configs/llama_60m.py'
  # The cap README gives is the run's tokens.
  paper = config.paper_config('60m')
  assert int(flags['--config.data.max_tokens']) == (
      paper.train.steps * paper.train.batch_size * (paper.train.seq_len + 1))
  flags.update({'--workdir': str(tmp_path / 'run'),
                '--config.data.data_dir': data_dir,
                '--config.data.tokenizer': model})
  command = [sys.executable, os.path.join(ROOT, 'train.py'),
             *[f'{k}={v}' for k, v in flags.items()], *TINY,
             '--config.model.vocab_size=0', '--config.train.steps=2',
             '--config.eval_tokens=64']
  run = subprocess.run(command, capture_output=True, text=True,
                       env=train_env(), timeout=600, cwd=ROOT)
  assert run.returncode == 0, run.stderr[-3000:]
  evals = [m['eval_loss'] for m in read_metrics(str(tmp_path / 'run'))
           if 'eval_loss' in m]
  assert evals and all(math.isfinite(e) for e in evals)

  # The run cached the whole (small) train split: every document once, in
  # the dataset's order, tokenized as this process tokenizes it.
  streams = os.path.join(data_dir, 'poet_jax_streams')
  manifests = [f for d, _, fs in os.walk(streams) for f in fs
               if f.startswith('stream-')]
  assert manifests == ['stream-39475200000.json'] * 2  # train, validation
  tokenizer = tokenizer_lib.load_tokenizer(model)
  stream = data.open_token_stream(
      'c4/en', 'train', data_dir, tokenizer, 32,
      max_tokens=int(flags['--config.data.max_tokens']), progress=False)
  tokens = np.asarray(stream.tokens)
  assert (tokens == tokenizer.eos_id).sum() == TRAIN_DOCS
  first = tokens[:np.flatnonzero(tokens == tokenizer.eos_id)[0]]
  document = data.open_documents('c4/en', 'train', data_dir)[0]
  np.testing.assert_array_equal(first, tokenizer.encode(document))
