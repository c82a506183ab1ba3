"""Plots of training runs from their work directories (matplotlib).

  python -m poet_jax.plot RUN [RUN ...] --out=FILE     (or poet-jax-plot)

overlays the runs: training and evaluation loss, learning rate, the POET
diagnostics of the runs that have them, and the papers' weight diagnostics
(SVD entropy, hyperspherical energy, vector probing). `plot_run` draws the
loss.png a training run leaves in its work directory.
"""
import argparse
import json
import math
import os
import sys

import numpy as np

from poet_jax.train import metrics as metrics_lib
from poet_jax.train import workdir as workdir_lib

PANELS = (('loss', 'loss (nats/token)', 'linear'),
          ('learning_rate', 'learning rate', 'linear'),
          ('orth_error_max', 'max ‖GGᵀ−I‖/‖I‖ (POET; 0 after a merge)',
           'linear'),
          ('q_norm_max', 'max ‖Q‖_F (POET)', 'linear'),
          # The papers' weight diagnostics, logged at evaluations.
          ('svd_entropy', 'SVD entropy of the weights (normalized, mean '
           'over layers)', 'linear'),
          ('hyperspherical_energy', 'hyperspherical energy of the neurons '
           '(mean over layers)', 'linear'),
          ('vector_probe_r', 'vᵀRv, fixed random unit v (POET; R since the '
           'last merge)', 'linear'),
          ('vector_probe_p', 'vᵀPv (POET; P since the last merge)', 'linear'))


# Past this loss (nats) the right axis would read exp(loss) > 5e21.
PERPLEXITY_AXIS_MAX_LOSS = 50.0


class PlotError(ValueError):
  """A work directory that cannot be plotted; one line for the user."""


def read_run(workdir: str) -> tuple[list[dict], dict]:
  """(metrics.jsonl entries, config.json as a dict or {}) of a work directory.

  Raises PlotError when it has no metrics.jsonl, or one without entries.
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise PlotError(f'{workdir} has no metrics.jsonl; give work directories '
                    'of training runs')
  config = {}
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      config = json.load(f)
  except (OSError, ValueError):
    pass  # the plot then goes without the run's settings
  entries = metrics_lib.MetricsLog.read(path)
  if not entries:
    raise PlotError(f'{workdir} has logged no step yet (its metrics.jsonl is '
                    'empty); plot it after its first log step')
  return entries, config


def describe(workdir: str, config: dict) -> str:
  """'llama_tiny_poet: POET-BS b=32, 128x4 Llama, 300 steps' from config.json."""
  name = os.path.basename(os.path.normpath(workdir))
  if not config:
    return name
  method = config['optimizer']['name']
  if method == 'poet':
    poet = config['poet']
    b = poet['block_size']
    b = int(b) if float(b).is_integer() else b
    method = (f"POET-{'BS' if poet['variant'] == 'block' else 'FS'} b={b}, "
              f"merge every {poet['merge_every']}")
  else:
    method = {'adamw': 'AdamW', 'galore': 'GaLore', 'muon': 'Muon'}.get(
        method, method)
  model = config['model']
  return (f"{name}: {method}; Llama {model['dim']}x{model['num_layers']}, "
          f"{config['train']['steps']} steps of {config['train']['batch_size']}"
          f"x{config['train']['seq_len']}, {config['data']['name']}")


def series(entries: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the entries that have key."""
  points = [(e['step'], e[key]) for e in entries
            if key in e and e[key] is not None]
  if not points:
    return np.zeros(0), np.zeros(0)
  steps, values = zip(*points)
  return np.asarray(steps), np.asarray(values, float)


def loss_range(runs: list[list[dict]]) -> tuple[float, float] | None:
  """A y-range that shows training: from the lowest loss to the highest
  after the first tenth of the steps, so the step-0 evaluation and the
  untrained model's first losses (about log vocab) do not squeeze it."""
  low, high = [], []
  for entries in runs:
    for key in ('train_loss', 'eval_loss'):
      steps, values = series(entries, key)
      keep = np.isfinite(values) & (steps > 0)
      steps, values = steps[keep], values[keep]
      if not len(values):
        continue
      low.append(values.min())
      later = values[steps >= 0.1 * steps.max()]
      high.append((later if len(later) else values).max())
  if not low:
    return None
  lo, hi = min(low), max(high)
  pad = 0.06 * (hi - lo) if hi > lo else 0.1
  return lo - pad, hi + pad


def _mark_off_scale(ax, steps, values, top, color):
  """Points above the range: per stretch of consecutive ones, an arrow at
  the top edge with the stretch's highest value (a diverged train loss
  would otherwise stack a label per logged step)."""
  above = np.append(values > top, False)
  start = None
  for i, off in enumerate(above):
    if off and start is None:
      start = i
    elif not off and start is not None:
      peak = start + int(np.argmax(values[start:i]))
      ax.annotate(f'{values[peak]:.3g} ↑', (steps[peak], top),
                  textcoords='offset points', xytext=(2, -10), fontsize=7,
                  color=color)
      start = None


def _draw_losses(ax, entries, colors, yrange, labelled=True):
  """Train loss (solid) and eval loss (dashed, dots) in colors (two); the
  points above yrange marked with their value."""
  steps, values = series(entries, 'train_loss')
  ax.plot(steps, values, color=colors[0], lw=1.2,
          **({'label': 'train loss'} if labelled else {}))
  if yrange:
    _mark_off_scale(ax, steps, values, yrange[1], colors[0])
  steps, values = series(entries, 'eval_loss')
  if len(values):
    ppl = metrics_lib.perplexity_text(final_perplexity(entries))
    ax.plot(steps, values, color=colors[1], ls='--', marker='o', ms=4,
            **({'label': f'eval loss (final perplexity {ppl})'}
               if labelled else {}))
    if yrange:
      _mark_off_scale(ax, steps, values, yrange[1], colors[1])


def final_perplexity(entries: list[dict]) -> float:
  """exp of the last evaluation's loss; nan without one."""
  _, values = series(entries, 'eval_loss')
  return metrics_lib.perplexity(values[-1]) if len(values) else math.nan


def _loss_axes(ax, yrange):
  if yrange:
    ax.set_ylim(*yrange)
  ax.set_xlabel('step')
  ax.set_ylabel('loss (nats/token)')
  ax.grid(alpha=0.3)
  if yrange and yrange[1] > PERPLEXITY_AXIS_MAX_LOSS:
    return  # a diverged run: its perplexity reads as nothing
  # Perplexity is exp(loss): the same curves, read on the right.
  right = ax.secondary_yaxis('right', functions=(
      lambda x: np.exp(np.clip(x, -50, 50)), lambda p: np.log(
          np.maximum(p, 1e-12))))
  right.set_ylabel('perplexity')


def plot_run(workdir: str, png_path: str) -> None:
  """One run's loss curves, titled with its method, model and steps."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  entries, config = read_run(workdir)
  fig, ax = plt.subplots(figsize=(8, 4.5))
  yrange = loss_range([entries])
  _draw_losses(ax, entries, ('C0', 'C1'), yrange)
  _loss_axes(ax, yrange)
  last = max((e['step'] for e in entries), default=0)
  ax.set_title(f'{describe(workdir, config)}\n(logged up to step {last})',
               fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)


def plot_runs(workdirs: list[str], out: str) -> None:
  """Several runs overlaid, one panel per entry of PANELS; raises
  PlotError."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  runs = [read_run(w) for w in workdirs]
  rows = math.ceil(len(PANELS) / 2)
  height = 4 * rows + 0.3 * len(workdirs)
  fig, axes = plt.subplots(rows, 2, figsize=(13, height))
  yrange = loss_range([entries for entries, _ in runs])
  for i, (workdir, (entries, config)) in enumerate(zip(workdirs, runs)):
    color = f'C{i % 10}'
    name = describe(workdir, config)
    _draw_losses(axes[0, 0], entries, (color, color), yrange,
                 labelled=False)
    for ax, (key, _, _) in zip(axes.flat[1:], PANELS[1:]):
      steps, values = series(entries, key)
      if len(values):  # evaluation-step series are sparse: mark the points
        ax.plot(steps, values, color=color,
                marker='o' if len(values) < 40 else None, ms=3)
    ppl = final_perplexity(entries)
    axes[0, 0].plot([], [], color=color, lw=4, label=name + (
        f'; eval perplexity {metrics_lib.perplexity_text(ppl)}'
        if math.isfinite(ppl) else ''))
  _loss_axes(axes[0, 0], yrange)
  # Below the panels: run descriptions are long.
  fig.legend(*axes[0, 0].get_legend_handles_labels(), loc='lower center',
             fontsize=8, frameon=False)
  axes[0, 0].set_title('train (solid) and eval (dashed) loss', fontsize=9)
  for ax, (key, label, scale) in zip(axes.flat[1:], PANELS[1:]):
    ax.set_title(label, fontsize=9)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.set_yscale(scale)
    else:
      ax.text(0.5, 0.5, f'no run logged {key}', ha='center',
              transform=ax.transAxes, color='gray')
  fig.tight_layout(rect=(0, (0.3 * len(runs) + 0.1) / height, 1, 1))
  fig.savefig(out, dpi=100)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m poet_jax.plot', description=(
          'Overlay the metrics of training runs: train and eval loss, '
          'learning rate, and the POET diagnostics where present.'))
  parser.add_argument('runs', nargs='+', metavar='RUN',
                      help='work directories (each with metrics.jsonl)')
  parser.add_argument('--out', default='runs.png',
                      help='image file to write (default: runs.png; .png is '
                      'added to a name without a suffix; .pdf, .svg work too)')
  args = parser.parse_args(argv)
  # A shell leaves the ~ of --out=~/x.png as it is.
  args.runs = [os.path.expanduser(r) for r in args.runs]
  args.out = os.path.expanduser(args.out)
  try:
    out = output_path(args.out)
    plot_runs(args.runs, out)
  except PlotError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except OSError as e:
    print(f'error: could not write {args.out} ({e.strerror or e}); choose '
          'another --out', file=sys.stderr)
    return 2
  print(f'wrote {out}')
  return 0


def output_path(out: str) -> str:
  """The file --out names: .png added to a name without a suffix. Raises
  PlotError when it cannot be written (no such directory, a suffix
  matplotlib cannot write, a training run's file), before anything is
  drawn."""
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  if os.path.isdir(out):
    raise PlotError(f'--out={out} is a directory; give a file name such as '
                    f'{os.path.join(out, "runs.png")}')
  if not os.path.splitext(out)[1]:
    out += '.png'
  kind = os.path.splitext(out)[1][1:].lower()
  if kind not in figure.Figure().canvas.get_supported_filetypes():
    raise PlotError(f'--out={out}: matplotlib cannot write .{kind} files; '
                    'end the name in .png (or .pdf, .svg)')
  directory = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(directory):
    raise PlotError(f'--out={out}: directory {directory} does not exist; '
                    'create it or choose another --out')
  problem = workdir_lib.unwritable(directory)
  if problem:
    raise PlotError(f'--out={out}: {problem[0]} cannot be written '
                    f'({problem[1]}); choose another --out')
  try:
    workdir_lib.check_outside_runs(out, '--out')
  except workdir_lib.WorkdirError as e:
    raise PlotError(str(e)) from None
  return out


if __name__ == '__main__':
  sys.exit(main())
