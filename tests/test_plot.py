"""loss.png and `python -m poet_jax.plot`, on work directories written here."""
import contextlib
import io
import json
import math
import os

import matplotlib.image
import pytest

from poet_jax import config as config_lib
from poet_jax import plot


def make_run(directory, method='poet', steps=100, start=4.0, end=2.5):
  """A work directory as a run leaves it: config.json and metrics.jsonl,
  with a step-0 evaluation far above the training losses."""
  os.makedirs(directory, exist_ok=True)
  c = config_lib.base_config()
  c.optimizer.name = method
  c.train.steps = steps
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    f.write(c.to_json())
  entries = [{'step': 0, 'eval_loss': 5.58, 'eval_ppl': math.exp(5.58)}]
  for step in range(10, steps + 1, 10):
    loss = end + (start - end) * (1 - step / steps)
    e = {'step': step, 'train_loss': loss, 'learning_rate': 1e-2 / step}
    if method == 'poet':
      e.update(orth_error_max=1e-6 * (step % 30), q_norm_max=0.01 * step)
    if step % 50 == 0:
      e.update(eval_loss=loss + 0.1, eval_ppl=math.exp(loss + 0.1))
    entries.append(e)
  with open(os.path.join(directory, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(e) + '\n' for e in entries)
  return str(directory)


def test_loss_range_shows_training_not_the_step_0_evaluation(tmp_path):
  entries, _ = plot.read_run(make_run(tmp_path / 'a'))
  low, high = plot.loss_range([entries])
  train = [e['train_loss'] for e in entries if 'train_loss' in e]
  assert low < min(train) and high < 5.58
  # The highest loss after the first tenth of training is in range.
  assert high >= max(e['train_loss'] for e in entries
                     if e['step'] >= 10 and 'train_loss' in e)


def test_description_names_method_model_and_steps(tmp_path):
  workdir = make_run(tmp_path / 'llama_tiny_poet')
  _, config = plot.read_run(workdir)
  text = plot.describe(workdir, config)
  assert text.startswith('llama_tiny_poet: POET-BS b=32, merge every 100')
  assert 'Llama 128x4' in text and '100 steps' in text
  workdir = make_run(tmp_path / 'x', method='adamw')
  assert 'AdamW' in plot.describe(workdir, plot.read_run(workdir)[1])


def test_plot_run_writes_a_png(tmp_path):
  workdir = make_run(tmp_path / 'a')
  plot.plot_run(workdir, str(tmp_path / 'loss.png'))
  image = matplotlib.image.imread(str(tmp_path / 'loss.png'))
  assert image.shape[0] > 300 and image.shape[1] > 600


def test_command_overlays_runs(tmp_path):
  runs = [make_run(tmp_path / 'poet'), make_run(tmp_path / 'adamw',
                                                method='adamw')]
  out = str(tmp_path / 'compare.png')
  with contextlib.redirect_stdout(io.StringIO()):
    assert plot.main([*runs, f'--out={out}']) == 0
  assert matplotlib.image.imread(out).shape[1] > 1000


def test_command_refuses_a_directory_without_metrics(tmp_path):
  err = io.StringIO()
  out = str(tmp_path / 'compare.png')
  with contextlib.redirect_stderr(err):
    code = plot.main([make_run(tmp_path / 'a'), str(tmp_path / 'nothing'),
                      f'--out={out}'])
  assert code == 2 and not os.path.exists(out)
  assert err.getvalue().count('\n') == 1
  assert 'has no metrics.jsonl' in err.getvalue()
