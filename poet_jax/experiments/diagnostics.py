"""The papers' weight diagnostics in the reproduction study (spec section
10): SVD entropy and hyperspherical energy of POET against AdamW, and
vector probing of POET's rotations, from the values the runs logged at
their evaluations (metrics.weight_diagnostics)."""
from poet_jax.experiments.findings import Claim, fmt
from poet_jax.experiments.report import (PAPER_PROBE, draw_mean, evals,
                                         figure_axes, mean_curve, per_seed,
                                         table)

# The papers plot these diagnostics without stating a figure: the claims
# are what W = R W0 P implies (spec section 10 names the diagnostics).
EXPECTED = 'implied by the method, no figure (spec section 10)'


def _first_last(run, results, key):
  """Per seed: the value at the first (step 0) and at the last evaluation."""
  series = [evals(run, r, key) for r in results]
  return [s[0][1] for s in series], [s[-1][1] for s in series]


def _probe_before_end(run, results, key):
  """Per seed: the value at the last evaluation before the final step (the
  run's last merge, at its last step, resets R and P to I)."""
  out = []
  for r in results:
    points = evals(run, r, key)
    last = points[-1][0]
    out.append([v for s, v in points if s < last][-1])
  return out


def _mid_cycle(run, results, key):
  """Per seed: the smallest value over the evaluations between merges."""
  out = []
  for r in results:
    period = r['overrides']['poet.merge_every']
    out.append(min([v for s, v in evals(run, r, key) if s % period] or
                   [1.0]))
  return out


def report_diagnostics(run, res: dict, out, no_merge=None):
  """res: the compare study's results; no_merge: a POET setting's runs
  whose T_m is the run length (its R and P accumulate the whole run), or
  None."""
  poet, adamw = res['best_poet'], res['best_adamw']
  rows, claims, change = [], [], {}
  for key, label in (('svd_entropy', 'SVD entropy'),
                     ('hyperspherical_energy', 'hyperspherical energy')):
    for method, results in (('POET-BS', poet), ('AdamW', adamw)):
      start, end = _first_last(run, results, key)
      change[method, key] = [abs(b - a) for a, b in zip(start, end)]
      rows.append((label, method, fmt(start, '.4f'), fmt(end, '.4f'),
                   fmt(change[method, key], '.2e')))
    if key == 'svd_entropy':
      claims.append(Claim(
          'AdamW lowers the SVD entropy (spectral diversity) of the weights; '
          'POET keeps W0\'s', EXPECTED,
          _first_last(run, adamw, key)[1], _first_last(run, poet, key)[1],
          ('AdamW at the end', 'POET-BS at the end'), spec='.4f'))
    else:
      claims.append(Claim(
          'POET changes the hyperspherical energy of the neurons less than '
          'AdamW', EXPECTED, change['POET-BS', key],
          change['AdamW', key], ('POET-BS |change|', 'AdamW |change|'),
          spec='.2e'))
  probe_rows = []
  for side, key in (('R', 'vector_probe_r'), ('P', 'vector_probe_p')):
    mid = _mid_cycle(run, poet, key)
    probe_rows.append((f'vᵀ{side}v', 'best setting, smallest between '
                       'merges', per_seed(mid, '.4f'), fmt(mid, '.4f')))
    if no_merge:
      whole = _probe_before_end(run, no_merge, key)
      probe_rows.append((f'vᵀ{side}v', f'T_m = run length, before the '
                         'end', per_seed(whole, '.4f'), fmt(whole, '.4f')))
  probed = (_probe_before_end(run, no_merge, 'vector_probe_r') if no_merge
            else _mid_cycle(run, poet, 'vector_probe_r'))
  claims.append(Claim(
      'vᵀRv settles around 0.6 to 0.65', '0.6 to 0.65 (figure)', probed,
      PAPER_PROBE, ('T_m = run length' if no_merge else 'best setting',
                    'papers'), 'within', '.4f'))
  png = _plot(run, poet, adamw, no_merge, out)
  return ('## The papers\' weight diagnostics\n\nLogged at every evaluation '
          '(`svd_entropy`, `hyperspherical_energy`, `vector_probe_r`, '
          '`vector_probe_p` in metrics.jsonl; [training.md, '
          '"Metrics"](training.md#metrics)), as means over the block '
          'linears (for POET the effective kernels R W0 P), over '
          f'{len(poet)} seeds of the best '
          'POET and AdamW settings. At the start both methods\' weights are '
          'Gaussian, so their figures start alike.\n\n' +
          table(('diagnostic', 'method', 'at step 0', 'at the end',
                 '|change|'), rows) +
          '\nVector probing: vᵀRv and vᵀPv for a fixed random unit v per '
          'layer and side (1 while R = I). The model keeps only the '
          'rotations since the last merge (earlier ones are folded into '
          'W0), so the best setting shows the rotation of part of one merge '
          'cycle; the papers\' curve is of the whole run\'s rotation, which '
          'only a run without merges (T_m = its length, from the merge '
          'study) shows here.\n\n' +
          table(('probe', 'run', 'per seed', 'mean ± std'), probe_rows) +
          f'\n![weight diagnostics over steps]({png})\n'), claims


def _plot(run, poet, adamw, no_merge, out) -> str:
  fig, axes = figure_axes(3)
  for ax, key in zip(axes, ('svd_entropy', 'hyperspherical_energy')):
    draw_mean(ax, run, [poet, adamw], ['POET-BS', 'AdamW'], key)
  probes = [poet, poet]
  labels = ['vᵀRv, best', 'vᵀPv, best']
  keys = ['vector_probe_r', 'vector_probe_p']
  if no_merge:
    probes += [no_merge, no_merge]
    labels += ['vᵀRv, no merge', 'vᵀPv, no merge']
    keys += keys
  for results, label, key in zip(probes, labels, keys):
    steps, mean, _ = mean_curve(run, results, key)
    axes[2].plot(steps, mean, marker='o', markersize=3, label=label)
  axes[2].set_xlabel('step')
  axes[2].set_ylabel('vector probe (mean over seeds)')
  return out.save(fig, 'diagnostics.png')

