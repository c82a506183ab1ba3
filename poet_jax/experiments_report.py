"""Tables and PNG plots of the reproduction study (poet_jax.experiments).

Every report takes the study's runner (`workdir(overrides)` and
`config(overrides)` of a run) and the runs' results, writes its plot into
`out` and returns its Markdown section, with the papers' numbers beside ours.
"""
import math
import os

import jax
import numpy as np
from flax import nnx
from matplotlib import figure

from poet_jax import checkpoint as checkpoint_lib
from poet_jax import layers
from poet_jax import metrics as metrics_lib
from poet_jax import tokenizer as tokenizer_lib
from poet_jax import train_state

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
ABLATIONS = {  # config key: title, label, the paper's numbers
    'poet.neumann_terms': ('Neumann terms k', 'k', PAPER_NEUMANN),
    'poet.merge_every': ('Merge interval T_m', 'T_m', PAPER_MERGE),
    'poet.init': ('W0 initialization', 'init', PAPER_INIT)}


def _table(headers, rows) -> str:
  lines = ['| ' + ' | '.join(headers) + ' |',
           '|' + '---|' * len(headers)]
  lines += ['| ' + ' | '.join(map(str, row)) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def _ppl(result: dict) -> str:
  text = f"{result['eval_ppl']:.3f}" if math.isfinite(
      result['eval_ppl']) else 'inf'
  return text + (' (diverged)' if result['diverged'] else '')


def _metrics(run, result: dict) -> list[dict]:
  return metrics_lib.MetricsLog.read(os.path.join(
      run.workdir(result['overrides']), 'metrics.jsonl'))


def _figure(panels: int = 1):
  """A matplotlib figure (no pyplot, no global state) and its axes; _save
  writes it."""
  fig = figure.Figure(figsize=(5.5 * panels, 3.8))
  axes = fig.subplots(1, panels, squeeze=False)
  return fig, list(axes[0])


def _save(fig, out: str, name: str) -> str:
  """Writes out/name (PNG) and returns name, for a Markdown link."""
  for ax in fig.axes:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, name), dpi=80)
  return name


def _curves(ax, run, results: list[dict], labels: list[str],
            key: str = 'train_loss'):
  """Curves of `key` against steps; the y range leaves out the first
  quarter of the run, so that the differences at the end show."""
  tail = []
  for result, label in zip(results, labels):
    points = [(e['step'], e[key]) for e in _metrics(run, result) if key in e]
    ax.plot(*zip(*points), label=label,
            marker='o' if key == 'eval_loss' else None, markersize=3)
    tail += [y for x, y in points if x >= points[-1][0] / 4 and
             math.isfinite(y)]
  if tail:
    pad = 0.05 * (max(tail) - min(tail) + 1e-3)
    ax.set_ylim(min(tail) - pad, max(tail) + pad)
  ax.set_xlabel('step')
  ax.set_ylabel(key.replace('_', ' ') + ' (nats/token)')


def report_compare(run, res: dict, out: str) -> str:
  rows = [('AdamW', f"{r['overrides']['train.lr']:g}", '-', _ppl(r))
          for r in res['adamw']]
  rows += [('POET-BS', f"{r['overrides']['train.lr']:g}",
            f"{r['overrides']['poet.lr']:g}", _ppl(r)) for r in res['poet']]
  a, p = res['best_adamw'], res['best_poet']
  ratio = p['eval_ppl'] / a['eval_ppl']
  paper = lambda m: PAPER_COMPARE[m]
  summary = [
      ('AdamW', a['name'], _ppl(a), '1', paper('adamw')['60M'],
       paper('adamw')['130M']),
      ('POET-BS', p['name'], _ppl(p), f'{ratio:.3f}', paper('poet')['60M'],
       paper('poet')['130M'])]
  fig, (left, right) = _figure(2)
  for method, results, key in (('AdamW', res['adamw'], 'train.lr'),
                               ('POET-BS', res['poet'], 'poet.lr')):
    base_lr = results[0]['overrides']['train.lr']
    points = sorted((r['overrides'][key], r['eval_ppl']) for r in results
                    if r['overrides']['train.lr'] == base_lr or
                    method == 'AdamW')
    left.plot(*zip(*points), marker='o', label=f'{method} ({key})')
  left.set_xscale('log')
  left.set_xlabel('learning rate')
  left.set_ylabel('final eval perplexity')
  _curves(right, run, [a, p], ['AdamW (best lr)', 'POET-BS (best lr)'],
          'eval_loss')
  png = _save(fig, out, 'compare.png')
  return ('## POET-BS vs AdamW at equal steps\n\nLearning-rate sweep (final '
          'eval perplexity):\n\n' +
          _table(('method', 'train.lr', 'poet.lr', 'eval ppl'), rows) +
          '\nEach at its best learning rate, with the paper (Table 2, C4):'
          '\n\n' + _table(('method', 'run', 'eval ppl', 'ratio to AdamW',
                           'paper 60M', 'paper 130M'), summary) +
          f'\n![sweep and curves]({png})\n')


def report_seeds(groups: dict, against: dict) -> str:
  """Runs repeated at other seeds: the noise of one figure.

  groups: {label: [results at seed 0, 1, ...]}; against: {label: label of
  the group it is compared with, seed by seed (the same seed gives the same
  batches)}.
  """
  rows = []
  for label, results in groups.items():
    ppl = [r['eval_ppl'] for r in results]
    mean = sum(ppl) / len(ppl)
    std = math.sqrt(sum((p - mean) ** 2 for p in ppl) / max(len(ppl) - 1, 1))
    ratios = '-'
    if label in against:
      ratios = ', '.join(f"{r['eval_ppl'] / a['eval_ppl']:.3f}" for r, a in
                         zip(results, groups[against[label]]))
      ratios += f' (to {against[label]})'
    rows.append((label, results[0]['name'],
                 ', '.join(f'{p:.3f}' for p in ppl), f'{mean:.3f}',
                 f'{std:.3f}', ratios))
  return ('## Seed noise\n\nRuns repeated with other seeds (model init, data '
          'order, permutations); seed 0 first:\n\n' +
          _table(('method', 'run (seed 0)', 'eval ppl by seed', 'mean', 'std',
                  'ratio at the same seed'), rows))


def report_ablation(run, results: list[dict], out: str, key: str) -> str:
  """Table (ours beside the paper's) and plot of a one-setting ablation."""
  title, label, paper = ABLATIONS[key]
  rows = []
  for r in sorted(results, key=lambda r: r['overrides'][key]):
    value = r['overrides'][key]
    period = r['overrides']['poet.merge_every']
    # Logged right after a merge the error is 0: leave those steps out.
    orth = [e['orth_error_max'] for e in _metrics(run, r)
            if 'orth_error_max' in e and e['step'] % period]
    rows.append((value, _ppl(r), f'{max(orth):.2e}' if orth else '-',
                 paper.get(value, '-')))
  name = key.split('.')[-1]
  fig, (left, right) = _figure(2)
  ordered = sorted(results, key=lambda r: r['overrides'][key])
  labels = [f'{label} = {r["overrides"][key]}' for r in ordered]
  _curves(left, run, ordered, labels)
  _curves(right, run, ordered, labels, 'eval_loss')
  png = _save(fig, out, f'{name}.png')
  return (f'## {title}\n\n' +
          _table((label, 'eval ppl', 'max orth. error (between merges)',
                  'paper ppl'), rows) +
          f'\n![{title}]({png})\n')


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


def report_spectrum(run, res: dict, out: str) -> str:
  fig, axes = _figure(2)
  rows = []
  for ax, (method, result) in zip(axes, (('POET-BS', res['best_poet']),
                                         ('AdamW', res['best_adamw']))):
    s0, s1 = layer_spectra(run, result)
    change = float(max(abs(s1 - s0)) / max(s0))
    rows.append((method, f'{s0.max():.4f} / {s0.min():.4f}',
                 f'{s1.max():.4f} / {s1.min():.4f}', f'{change:.2e}'))
    ax.plot(s0, label='start (W0 for POET)', linewidth=3, alpha=0.5)
    ax.plot(s1, '--', label='end of training')
    ax.set_title(f'{method}: block 0 attention.q')
    ax.set_xlabel('index')
    ax.set_ylabel('singular value')
  png = _save(fig, out, 'spectrum.png')
  sv = [(e['step'], e['sv_rel_change_max']) for e in
        _metrics(run, res['best_poet']) if 'sv_rel_change_max' in e]
  return ('## Singular values of one layer over training\n\nBlock 0\'s '
          'attention.q of the best POET and AdamW runs; POET\'s end is the '
          'effective weight R W0 P. Largest change of a singular value '
          'relative to the largest:\n\n' +
          _table(('method', 'start max / min', 'end max / min',
                  'max abs change / max'), rows) +
          f'\nPOET during training (metrics.jsonl sv_rel_change_max, '
          'against the current W0): largest '
          f'{max(v for _, v in sv):.2e} over {len(sv)} logged steps.\n\n'
          f'![spectra]({png})\n')


def report_orthogonality(run, result: dict, out: str) -> str:
  entries = [e for e in _metrics(run, result) if 'orth_error_max' in e]
  period = result['overrides']['poet.merge_every']
  fig, (ax,) = _figure()
  ax.plot([e['step'] for e in entries],
          [max(e['orth_error_max'], 1e-9) for e in entries], marker='.')
  steps = entries[-1]['step']
  for merge in range(period, steps + 1, period):
    ax.axvline(merge, color='gray', linestyle=':', linewidth=1)
  ax.set_yscale('log')
  ax.set_xlabel('step (dotted: merges)')
  ax.set_ylabel('max ||G G^T - I|| / ||I||')
  png = _save(fig, out, 'orthogonality.png')
  rows = []
  for start in range(0, steps, period):
    cycle = [e['orth_error_max'] for e in entries
             if start < e['step'] <= start + period]
    before = [e['orth_error_max'] for e in entries
              if start < e['step'] < start + period]
    after = [e['orth_error_max'] for e in entries
             if e['step'] == start + period]
    rows.append((f'{start + 1}-{start + period}',
                 f'{max(before or cycle):.2e}',
                 f'{after[0]:.1e}' if after else '-'))
  return ('## Orthogonality error over steps\n\nLargest error over all '
          f'blocks of the best POET run (T_m = {period}), logged every '
          f'{entries[1]["step"] - entries[0]["step"]} steps:\n\n' +
          _table(('steps', 'largest before the merge', 'right after it'),
                 rows) + f'\n![orthogonality]({png})\n')
