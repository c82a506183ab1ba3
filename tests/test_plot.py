"""loss.png and `python -m poet_jax.plot`, on work directories written here."""
import contextlib
import io
import json
import math
import os
import warnings

import matplotlib.image
import pytest

from poet_jax.train import config as config_lib
from poet_jax.train import plot


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


def _labels(entries):
  """The off-scale labels and the legend of one run's loss axes."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots()
  plot._draw_losses(ax, entries, ('C0', 'C1'), plot.loss_range([entries]))
  texts = [t.get_text() for t in ax.texts]
  legend = ax.get_legend_handles_labels()[1]
  plt.close(fig)
  return texts, legend


def test_off_scale_points_of_both_losses_are_labelled(tmp_path):
  """A spike of the train loss early on (steps 1-3, off the range that
  shows training) gets one label, its highest value; an evaluation off
  the range gets its own."""
  entries, _ = plot.read_run(make_run(tmp_path / 'a'))
  spike = [{'step': s, 'train_loss': v} for s, v in ((1, 60.0), (2, 80.0),
                                                     (3, 70.0))]
  entries = entries[:1] + spike + entries[1:]
  texts, _ = _labels(entries)
  assert sorted(texts) == ['5.58 ↑', '80 ↑']


def test_a_diverged_runs_perplexity_is_short(tmp_path):
  """exp(800) is capped at exp(700), and shown as 1.01e+304, not 305
  digits (the eval line, evaluate's line and the legends use it)."""
  from poet_jax.train import metrics  # pylint: disable=g-import-not-at-top
  assert metrics.perplexity_text(metrics.perplexity(800.0)) == '1.01e+304'
  assert metrics.perplexity_text(metrics.perplexity(2.0)) == '7.39'
  entries, _ = plot.read_run(make_run(tmp_path / 'a'))
  entries[-1]['eval_loss'] = 800.0
  _, legend = _labels(entries)
  assert 'eval loss (final perplexity 1.01e+304)' in legend
  # A run diverged to losses of 6e14 (train.lr=1000) plots without a
  # perplexity axis, whose exp would be constant, and so without warnings.
  diverged = make_run(tmp_path / 'b')
  with open(os.path.join(diverged, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps({'step': s, 'train_loss': 6.2e14 + s * 1e10,
                             'eval_loss': 6.3e14, 'eval_ppl': math.exp(700)})
                 + '\n' for s in (10, 20))
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    plot.plot_run(diverged, str(tmp_path / 'b.png'))


def test_command_out_is_checked_before_drawing(tmp_path, monkeypatch):
  """A missing directory, a directory, an unknown suffix: one line, exit 2.
  A name without a suffix is written, and named, with .png."""
  run = make_run(tmp_path / 'a')
  monkeypatch.chdir(tmp_path)
  for out, expected in [(str(tmp_path / 'no' / 'x.png'), 'does not exist'),
                        (str(tmp_path), 'is a directory'),
                        ('x.jpgx', 'cannot write .jpgx files')]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      assert plot.main([run, f'--out={out}']) == 2
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
  said = io.StringIO()
  with contextlib.redirect_stdout(said):
    assert plot.main([run, '--out=compare']) == 0
  assert said.getvalue() == 'wrote compare.png\n'
  assert sorted(os.listdir(tmp_path)) == ['a', 'compare.png']
