"""The sections of the reproduction page (poet_jax.experiments): a table and
a PNG plot per study, with mean ± std over seeds, the papers' numbers
beside ours, and the papers' claims (findings.Claim) the study tests.

Every report takes the study's runner (`workdir(overrides)` and
`config(overrides)` of a run), a setting's runs over seeds (lists of
results, seed 0 first) and the plot directory, and returns (Markdown,
claims).
"""
import dataclasses
import math
import os

import jax
import numpy as np
from flax import nnx
from matplotlib import figure

from poet_jax import layers
from poet_jax.data import tokenizer as tokenizer_lib
from poet_jax.experiments.findings import Claim, fmt
from poet_jax.train import checkpoint as checkpoint_lib
from poet_jax.train import metrics as metrics_lib
from poet_jax.train import state as train_state

# The POET papers' numbers (spec sections 2, 5, 6, 9): validation perplexity
# on C4. Table 2 at 60M / 130M, POET-BS b = 256.
PAPER_COMPARE = {'adamw': {'60M': 26.68, '130M': 20.82},
                 'poet': {'60M': 25.29, '130M': 19.88}}
# Llama-130M, POET-FS b = 1/2; k = 0 diverges.
PAPER_NEUMANN = {0: 'diverges', 1: 22.56, 2: 21.54, 3: 20.22, 4: 20.19}
# Llama-60M, POET-FS b = 1/2.
PAPER_MERGE = {5: 30.29, 25: 27.27, 50: 25.99, 200: 25.37, 400: 25.31,
               1600: 25.58}
PAPER_INIT = {'standard': 26.22, 'xavier': 25.79, 'uniform_spectrum': 27.29,
              'normalized': 25.37}
# Spec section 10: v^T R v settles around 0.6 to 0.65.
PAPER_PROBE = (0.6, 0.65)


def table(headers, rows) -> str:
  lines = ['| ' + ' | '.join(headers) + ' |',
           '|' + '---|' * len(headers)]
  lines += ['| ' + ' | '.join(map(str, row)) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def ppl(results: list[dict]) -> list[float]:
  return [r['eval_ppl'] for r in results]


def per_seed(values, spec: str = '.3f') -> str:
  return ', '.join('inf' if not math.isfinite(v) else f'{v:{spec}}'
                   for v in values)


def metrics(run, result: dict) -> list[dict]:
  return metrics_lib.MetricsLog.read(os.path.join(
      run.workdir(result['overrides']), 'metrics.jsonl'))


def evals(run, result: dict, key: str) -> list[tuple[int, float]]:
  """(step, value) of `key` at the run's evaluations (step 0 first)."""
  return [(e['step'], e[key]) for e in metrics(run, result) if key in e]


def figure_axes(panels: int = 1):
  """A matplotlib figure (no pyplot, no global state) and its axes."""
  fig = figure.Figure(figsize=(5.5 * panels, 3.8))
  axes = fig.subplots(1, panels, squeeze=False)
  return fig, list(axes[0])


@dataclasses.dataclass
class Plots:
  """Where the PNGs go (directory) and that directory as the page links it
  (link: relative to the page)."""
  directory: str
  link: str

  def save(self, fig, name: str) -> str:
    """Writes the figure as directory/name; returns the page's link."""
    for ax in fig.axes:
      ax.grid(alpha=0.3)
      if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(self.directory, name), dpi=80)
    return f'{self.link}/{name}' if self.link else name


def mean_curve(run, results: list[dict], key: str):
  """(steps, mean, std) of `key` over a setting's seeds, at the steps
  every seed logged."""
  series = [dict((e['step'], e[key]) for e in metrics(run, r) if key in e)
            for r in results]
  steps = sorted(set.intersection(*(set(s) for s in series)))
  values = np.array([[s[t] for t in steps] for s in series], np.float64)
  std = values.std(0, ddof=1) if len(series) > 1 else 0 * values[0]
  return np.array(steps), values.mean(0), std


def draw_mean(ax, run, settings, labels, key: str, skip_first=False):
  """Mean over seeds (line) ± std (band) of `key` for each setting."""
  tail = []
  for results, label in zip(settings, labels):
    steps, mean, std = mean_curve(run, results, key)
    if skip_first:  # the untrained model's loss squeezes the range
      steps, mean, std = steps[steps > 0], mean[steps > 0], std[steps > 0]
    line, = ax.plot(steps, mean, label=label, marker='o', markersize=3)
    ax.fill_between(steps, mean - std, mean + std, alpha=0.2,
                    color=line.get_color())
    tail += list(mean[steps >= steps.max() / 4])
  if skip_first and tail and all(map(math.isfinite, tail)):
    pad = 0.1 * (max(tail) - min(tail) + 1e-3)
    ax.set_ylim(min(tail) - pad, max(tail) + pad)
  ax.set_xlabel('step')
  ax.set_ylabel(key.replace('_', ' '))


def _setting(r: dict) -> str:
  o = r['overrides']
  if o['optimizer.name'] == 'adamw':
    return f"AdamW, lr {o['train.lr']:g}"
  return f"POET-BS, lr {o['train.lr']:g}, poet.lr {o['poet.lr']:g}"


def report_compare(run, res: dict, out: Plots):
  """The learning-rate sweeps and the best settings over more seeds."""
  rows = [('AdamW', f"{s[0]['overrides']['train.lr']:g}", '-',
           fmt(ppl(s)), per_seed(ppl(s))) for s in res['adamw']]
  rows += [('POET-BS', f"{s[0]['overrides']['train.lr']:g}",
            f"{s[0]['overrides']['poet.lr']:g}", fmt(ppl(s)),
            per_seed(ppl(s))) for s in res['poet']]
  a, p = res['best_adamw'], res['best_poet']
  ratios = [x / y for x, y in zip(ppl(p), ppl(a))]
  best_rows = [(_setting(a[0]), per_seed(ppl(a)), fmt(ppl(a))),
               (_setting(p[0]), per_seed(ppl(p)), fmt(ppl(p)))]
  paper = [('here, per seed', per_seed(ratios)),
           ('here, of the means', f'{np.mean(ppl(p)) / np.mean(ppl(a)):.3f}')]
  paper += [(f'paper, {size}', f"{PAPER_COMPARE['poet'][size] / PAPER_COMPARE['adamw'][size]:.3f} "
             f"({PAPER_COMPARE['poet'][size]} / {PAPER_COMPARE['adamw'][size]})")
            for size in ('60M', '130M')]
  edges = [name for name, sweep, key in (
      ('AdamW', res['adamw'], 'train.lr'), ('POET-BS', res['poet'], 'poet.lr'))
      if _at_edge(sweep, key)]
  fig, (left, right) = figure_axes(2)
  for method, sweep, key in (('AdamW', res['adamw'], 'train.lr'),
                             ('POET-BS', res['poet'], 'poet.lr')):
    points = sorted((s[0]['overrides'][key], np.mean(ppl(s)), np.std(
        ppl(s), ddof=1) if len(s) > 1 else 0) for s in _line(sweep, key))
    x, y, e = zip(*points)
    left.errorbar(x, y, yerr=e, marker='o', capsize=3,
                  label=f'{method} ({key})')
  # Log: one diverged rate would squash the other points of a linear axis.
  left.set(xscale='log', yscale='log')
  left.set_xlabel('learning rate')
  left.set_ylabel('final eval perplexity (mean ± std)')
  draw_mean(right, run, [a, p], ['AdamW (best lr)', 'POET-BS (best lr)'],
            'eval_loss', skip_first=True)
  png = out.save(fig, 'compare.png')
  claim = Claim('POET-BS reaches a lower perplexity than AdamW at equal '
                'steps, each at its best learning rate',
                '25.29 vs 26.68 (60M), 19.88 vs 20.82 (130M)', ppl(p), ppl(a),
                ('POET-BS', 'AdamW'))
  sweep_seeds = len(res['adamw'][0])
  text = (
      '## POET-BS vs AdamW at equal steps\n\nLearning-rate sweep, final '
      f'eval perplexity over {sweep_seeds} seed(s). AdamW sweeps `train.lr`; '
      'POET sweeps `poet.lr` at the base group\'s first `train.lr`, then '
      'tries the other base rates at the best `poet.lr`. The best setting '
      'of each is the one with the lowest mean eval loss.\n\n' +
      table(('method', 'train.lr', 'poet.lr', 'eval ppl', 'per seed'), rows) +
      (f'\nThe best learning rate lies at the edge of the grid for '
       f'{" and ".join(edges)}: the optimum may lie outside it.\n'
       if edges else '\nBoth optima lie inside their grids.\n') +
      f'\nThe best settings at {len(a)} seeds (the same seed gives both '
      'methods the same batches):\n\n' +
      table(('setting', 'eval ppl per seed', 'mean ± std'), best_rows) +
      '\nPOET-BS / AdamW perplexity, beside the papers (C4, Table 2):\n\n' +
      table(('', 'POET / AdamW'), paper) +
      f'\n![learning-rate sweep and eval loss of the best settings]'
      f'({png})\n')
  return text, [claim]


def _line(sweep, key) -> list:
  """The settings of a sweep along `key`: every one for train.lr; for
  poet.lr, those at the base group's first train.lr."""
  if key == 'train.lr':
    return sweep
  base_lr = sweep[0][0]['overrides']['train.lr']
  return [s for s in sweep if s[0]['overrides']['train.lr'] == base_lr]


def _at_edge(sweep, key) -> bool:
  """The best of a sweep over `key` is its smallest or largest value (always
  so for a grid of one or two values)."""
  line = _line(sweep, key)
  values = [s[0]['overrides'][key] for s in line]
  chosen = min(line, key=lambda s: np.mean([r['eval_loss'] for r in s]))
  return chosen[0]['overrides'][key] in (min(values), max(values))


def _orth_peaks(run, result: dict) -> list[float]:
  """Largest orthogonality error of each merge cycle, before its merge
  (cycles with no logged step between merges are left out)."""
  period = result['overrides']['poet.merge_every']
  entries = [e for e in metrics(run, result) if 'orth_error_max' in e]
  steps = entries[-1]['step'] if entries else 0
  cycles = [[e['orth_error_max'] for e in entries
             if start < e['step'] < start + period]
            for start in range(0, steps, period)]
  return [max(cycle) for cycle in cycles if cycle]


ABLATIONS = {  # config key: title, label, the paper's numbers, its model
    'poet.neumann_terms': ('Neumann terms k', 'k', PAPER_NEUMANN,
                           'Llama-130M, POET-FS b = 1/2'),
    'poet.merge_every': ('Merge interval T_m', 'T_m', PAPER_MERGE,
                         'Llama-60M, POET-FS b = 1/2'),
    'poet.init': ('W0 initialization', 'init', PAPER_INIT,
                  'Llama-60M, POET-FS b = 1/2')}


def report_ablation(run, study: dict, out: Plots, key: str):
  """One setting varied over `study` = {value: runs over seeds}."""
  title, label, paper, model = ABLATIONS[key]
  rows = []
  for value, results in study.items():
    peaks = [max(_orth_peaks(run, r) or [math.nan]) for r in results]
    rows.append((value, per_seed(ppl(results)), fmt(ppl(results)),
                 f'{np.mean(peaks):.2e}' if np.isfinite(peaks).all()
                 else '-', paper.get(value, '-')))
  name = key.split('.')[-1]
  fig, (left, right) = figure_axes(2)
  labels = [f'{label} = {v}' for v in study]
  draw_mean(left, run, list(study.values()), labels, 'train_loss',
            skip_first=True)
  draw_mean(right, run, list(study.values()), labels, 'eval_loss',
            skip_first=True)
  png = out.save(fig, f'{name}.png')
  seeds = len(next(iter(study.values())))
  text = (f'## {title}\n\nFinal eval perplexity over {seeds} seeds; '
          '"max orth. error" is the largest ‖GGᵀ − I‖/‖I‖ over all '
          'blocks at the logged steps between merges (mean over seeds; -: '
          'no logged step falls between merges). The '
          f'papers: {model}.\n\n' +
          table((label, 'eval ppl per seed', 'mean ± std',
                 'max orth. error', 'paper ppl'), rows) +
          f'\n![{title}: train and eval loss, mean ± std over seeds]'
          f'({png})\n')
  return text, ablation_claims(key, study)


def ablation_claims(key: str, study: dict) -> list[Claim]:
  """The papers' claims about one ablation, on this study's values."""
  p = {v: ppl(r) for v, r in study.items()}
  name = lambda v: f'T_m = {v}' if key == 'poet.merge_every' else (
      f'k = {v}' if key == 'poet.neumann_terms' else str(v))
  claim = lambda finding, paper, a, b, kind='lower': Claim(
      finding, paper, p[a], p[b], (name(a), name(b)), kind)
  if key == 'poet.neumann_terms':
    return [claim('k = 0 (G = I + Q) worse than k = 3', 'diverges', 3, 0),
            claim('k = 1 worse than k = 3', '22.56 vs 20.22', 3, 1),
            claim('k = 2 worse than k = 3', '21.54 vs 20.22', 3, 2),
            claim('k = 4 close to k = 3', '20.19 vs 20.22', 4, 3, 'close')]
  if key == 'poet.init':
    return [claim('normalized Gaussian better than Xavier', '25.37 vs 25.79',
                  'normalized', 'xavier'),
            claim('Xavier better than standard Gaussian', '25.79 vs 26.22',
                  'xavier', 'standard'),
            claim('standard better than uniform spectrum', '26.22 vs 27.29',
                  'standard', 'uniform_spectrum')]
  values = list(study)
  default, ordered = values[0], sorted(values)
  smaller = [v for v in ordered if v < default]
  claims = [claim('a very small T_m worse than the default',
                  '30.29 (T_m = 5) vs 25.99 (50) and 25.37 (200)', default,
                  ordered[0])] if smaller else []
  for low, high in zip(smaller, smaller[1:] + [default]):
    claims.append(claim(f'T_m = {high} better than T_m = {low}',
                        'falls from T_m = 5 to 400', high, low))
  if ordered[-1] > default:
    claims.append(claim('a much larger T_m worse than the default',
                        '25.58 (1600) vs 25.31 (400)', default, ordered[-1]))
  return claims


def _kernel(layer, index: int = 0):
  """Layer `index` of a stacked (L, in, out) dense or POET kernel."""
  if isinstance(layer, layers.POETLinear):
    return layer.effective_weight()[index]
  return layer.kernel[...][index]


def layer_spectra(run, result: dict):
  """Singular values of block 0's attention.q kernel at the start and end.

  The start is rebuilt from the seed (init_state is deterministic); the end
  is the run's last checkpoint. Returns two float64 numpy vectors.
  """
  c = run.config(result['overrides'])
  vocab = (c.model.vocab_size or
           tokenizer_lib.load_tokenizer(c.data.tokenizer).vocab_size)
  setup, start = train_state.init_state(c, vocab)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      train_state.abstract_state(c, vocab)[1])
  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(run.workdir(result['overrides']), 'checkpoints'))
  try:
    end, _ = ckpt.restore(ckpt.latest_step(), target)
  finally:
    ckpt.abandon()
  spectra = []
  for state in (start, end):
    model = nnx.merge(setup.graphdef, state['params'], state['frozen'])
    w = np.asarray(_kernel(model.blocks.attention.q), np.float64)
    spectra.append(np.linalg.svd(w, compute_uv=False))
  return spectra


def report_spectrum(run, res: dict, out: Plots, seeds: int):
  """Block 0's attention.q spectrum at the start and end, first `seeds`
  seeds of the best settings."""
  fig, axes = figure_axes(2)
  rows, change = [], {}
  for ax, (method, results) in zip(axes, (('POET-BS', res['best_poet']),
                                          ('AdamW', res['best_adamw']))):
    change[method] = []
    for i, result in enumerate(results[:seeds]):
      s0, s1 = layer_spectra(run, result)
      change[method].append(float(max(abs(s1 - s0)) / max(s0)))
      if i == 0:
        rows.append((method, f'{s0.max():.4f} / {s0.min():.4f}',
                     f'{s1.max():.4f} / {s1.min():.4f}'))
        ax.plot(s0, label='start (W0 for POET)', linewidth=3, alpha=0.5)
        ax.plot(s1, '--', label='end of training')
    ax.set_title(f'{method}: block 0 attention.q (seed 0)')
    ax.set_xlabel('index')
    ax.set_ylabel('singular value')
  rows = [r + (per_seed(change[r[0]], '.4f'), fmt(change[r[0]], '.4f'))
          for r in rows]
  png = out.save(fig, 'spectrum.png')
  claim = Claim('POET keeps the singular values of W0; AdamW changes them',
                'preserved exactly (R, P orthogonal)', change['POET-BS'],
                change['AdamW'], ('POET-BS', 'AdamW'), spec='.4f')
  return ('## Singular values of one layer over training\n\nBlock 0\'s '
          'attention.q of the best POET and AdamW settings; POET\'s end is '
          'the effective weight R W0 P from the last checkpoint. The change '
          'is the largest change of a singular value relative to the largest '
          'at the start.\n\n' +
          table(('method', 'start max / min (seed 0)', 'end max / min '
                 '(seed 0)', 'change per seed', 'mean ± std'), rows) +
          f'\n![spectra]({png})\n'), [claim]


def report_orthogonality(run, results: list[dict], out: Plots):
  """The saw-tooth of the orthogonality error over the best POET setting's
  seeds."""
  period = results[0]['overrides']['poet.merge_every']
  fig, (ax,) = figure_axes()
  peaks, after = [], []
  for i, result in enumerate(results):
    entries = [e for e in metrics(run, result) if 'orth_error_max' in e]
    ax.plot([e['step'] for e in entries],
            [max(e['orth_error_max'], 1e-9) for e in entries],
            marker='.' if i == 0 else None, alpha=1 if i == 0 else 0.4,
            label=f'seed {i}' if i < 3 else None)
    peaks.append(_orth_peaks(run, result))
    after.append(max([e['orth_error_max'] for e in entries
                      if e['step'] % period == 0] or [0.0]))
  steps = max(e['step'] for e in metrics(run, results[0]))
  for merge in range(period, steps + 1, period):
    ax.axvline(merge, color='gray', linestyle=':', linewidth=1)
  ax.set_yscale('log')
  ax.set_xlabel('step (dotted: merges)')
  ax.set_ylabel('max ||G G^T - I|| / ||I||')
  png = out.save(fig, 'orthogonality.png')
  cycles = np.array(peaks)
  rows = [(f'{k * period + 1}-{(k + 1) * period}',
           fmt(cycles[:, k], '.2e'), f'{max(after):.1e}')
          for k in range(cycles.shape[1])]
  claim = Claim('the orthogonality error drops to 0 at each merge and '
                'grows between merges', 'saw-tooth (figure)', after,
                [float(p.min()) for p in cycles],
                ('right after merges (largest)', 'before merges (smallest '
                 'cycle peak)'), spec='.2e')
  return ('## Orthogonality error over steps\n\nLargest ‖GGᵀ − I‖/‖I‖ over '
          f'all blocks of the best POET setting (T_m = {period}), per merge '
          f'cycle, over {len(results)} seeds (a zero is drawn at 1e-9):\n\n' +
          table(('steps', 'largest before the merge (mean ± std)',
                 'right after it (largest)'), rows) +
          f'\n![orthogonality error over steps, merges dotted]'
          f'({png})\n'), [claim]
