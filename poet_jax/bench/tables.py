"""The report as Markdown tables, one per section (the JSON has every field)."""
import math
import sys


def _fmt(x, spec='.2f'):
  if isinstance(x, float):
    return format(x, spec) if math.isfinite(x) else str(x)
  return '' if x is None else str(x)


def _table(out, title: str, columns: str) -> None:
  """A Markdown table's title (if any), header and rule."""
  names = columns.split(', ')
  if title:
    print(f'\n## {title}', file=out)
  print('| ' + ' | '.join(names) + ' |', file=out)
  print('|' + '---|' * len(names), file=out)


def _print_layer(rows, out) -> None:
  _table(out, 'one layer, forward + backward (median ms; ratio to dense; '
         'FLOP ratio with the orthogonal maps)',
         'shape, tokens, path, ms, x dense, FLOPs x dense, note')
  for r in rows:
    note = ''
    if r['path'] == 'auto':
      note = (f"picked {r['auto_choice']}; "
              f"{r['ratio_to_best_of_fast_materialize']:.2f}x the better")
    if r['path'] == 'mem':
      note = f"{r['ratio_to_fast']:.2f}x fast"
    print(f"| {r['shape'][0]} x {r['shape'][1]} | {r['tokens']} | "
          f"{r['path']} | {_fmt(r['ms'])} | {_fmt(r['ratio_to_dense'])} | "
          f"{_fmt(r['flop_ratio_to_dense'])} | {note} |", file=out)


def _print_steps(rows, out) -> None:
  first = rows[0]
  _table(out, f"train step, {first['model']} ({first.get('layers')} "
         f"layers), batch {first['batch'][0]} x {first['batch'][1]}",
         'method, ms/step, tokens/s, x AdamW, GFLOP/s, of matmul rate, '
         'peak GiB, peak x AdamW')
  for r in rows:
    if r['method'] == 'poet merge':
      continue
    if 'error' in r:
      print(f"| {r['method']} | failed: {r['error'][:100]} |", file=out)
      continue
    print(f"| {r['method']} | {_fmt(r['ms_per_step'], '.0f')} | "
          f"{_fmt(r['tokens_per_s'], '.0f')} | "
          f"{_fmt(r.get('ratio_to_adamw'))} | "
          f"{_fmt(r['gflops_per_s'], '.1f')} | "
          f"{_fmt(r.get('fraction_of_matmul_rate'))} | "
          f"{_fmt(r['peak_gib'])} | {_fmt(r.get('peak_ratio_to_adamw'))} |",
          file=out)
  for r in rows:
    if r['method'] == 'poet merge':
      print(f"one merge of the whole model: {r['ms']:.1f} ms", file=out)
    if r.get('profile'):
      kinds = r['profile']['ms_by_kind']
      total = sum(kinds.values())
      print(f"{r['method']}, XLA op time by kind (profile): " + ', '.join(
          f'{k} {ms:.0f} ms ({ms / total:.0%})' for k, ms in kinds.items()),
            file=out)
    if r.get('auto_choices'):
      picks = ', '.join(f'{k.split(".")[-1]}: {v}'
                        for k, v in r['auto_choices'].items())
      print(f'auto picked: {picks}', file=out)


def _print_breakdown(rows, out) -> None:
  whole = rows[-1]
  m, n = whole['shape']
  _table(out, f"'fast' {m} x {n}, N={whole['tokens']}, in pieces timed "
         f"alone (ms per forward + backward; fraction of the whole)",
         'piece, counts as, ms, of whole')
  for r in rows[:-1]:
    times = f" (x{r['times']})" if r['times'] > 1 else ''
    print(f"| {r['piece']}{times} | {r['group']} | {r['ms']:.1f} | "
          f"{r['fraction_of_whole']:.2f} |", file=out)
  groups = {}
  for r in rows[:-1]:
    groups[r['group']] = groups.get(r['group'], 0.0) + r['ms']
  for group, ms in groups.items():
    print(f"| **{group}** | | {ms:.1f} | {ms / whole['ms']:.2f} |", file=out)
  print(f"| sum of the pieces | | {whole['sum_of_pieces_ms']:.1f} | "
        f"{whole['sum_of_pieces_ms'] / whole['ms']:.2f} |", file=out)
  print(f"| whole layer, measured | | {whole['ms']:.1f} | 1.00 |", file=out)


def _print_blocks(rows, out) -> None:
  first = rows[0]
  _table(out, f"the {first['layers']} blocks of {first['model']} "
         f"(features: embedding, blocks, norm), batch {first['batch'][0]} x "
         f"{first['batch'][1]}",
         'method, part, ms, x forward, GFLOP, GFLOP/s, of matmul rate')
  for r in rows:
    print(f"| {r['method']} | {r['part']} | {_fmt(r['ms'], '.1f')} | "
          f"{_fmt(r['ratio_to_forward'])} | {_fmt(r['flops'] / 1e9, '.1f')} | "
          f"{_fmt(r['gflops_per_s'], '.1f')} | "
          f"{_fmt(r.get('fraction_of_matmul_rate'))} |", file=out)


def _print_memory(rows, out) -> None:
  device = next((r['device_kind'] for r in rows if 'device_kind' in r), '')
  _table(out, f"dry-run peak memory per device, batch 1, {rows[0]['dtype']},"
         f' compiled for {device} (paper: H100)',
         'model, seq, method, W0, peak GiB, peak GB, x AdamW, '
         '- POET-X mem GiB, roofline ms, paper GB')
  for r in rows:
    if 'error' in r:
      print(f"| {r['model']} | {r['seq_len']} | {r['method']} | | failed: "
            f"{r['error'][:100]} | | | | | |", file=out)
      continue
    print(f"| {r['model']} | {r['seq_len']} | {r['method']} | "
          f"{r['w0_dtype'] or ''} | {_fmt(r['peak_gib'])} | "
          f"{_fmt(r['peak_gb'])} | {_fmt(r['ratio_to_adamw'])} | "
          f"{_fmt(r['minus_mem_gib'])} | {_fmt(r.get('roofline_ms'), '.0f')} "
          f"| {r['paper_gb']} |", file=out)


def _print_reference(rows, out) -> None:
  print('\n## against the official PyTorch code (eager), same model, batch '
        'and threads', file=out)
  for r in rows:
    if r.get('skipped'):
      print(f"reference skipped: {r['skipped']}", file=out)
      return
  _table(out, '', 'step, official ms (quartiles), poet_jax ms (quartiles), '
         'poet_jax / official')
  for r in rows:
    if 'error' in r:
      print(f"| {r['method']} | failed: {r['error'][:100]} | | |", file=out)
      continue
    spread = lambda t: (f"{1e3 * t['median_s']:.0f} ({1e3 * t['p25_s']:.0f}"
                        f"-{1e3 * t['p75_s']:.0f})")
    print(f"| {r['method']} | {spread(r['official'])} | {spread(r['ours'])} | "
          f"{_fmt(r['ratio_to_official'])} |", file=out)


def print_tables(report: dict, out=None) -> None:
  """Every section of `report` (bench.run's) as Markdown on `out` (stdout)."""
  out = out or sys.stdout  # looked up now, not at import
  m = report['machine']
  print(f"# poet_jax benchmarks, {m['date']}", file=out)
  print(f"machine: {m['cpu']}, {m['cores']} cores, {m['backend']}; jax "
        f"{m['jax']}; load average at start {m['load_average']}", file=out)
  print(f"command: {m['command']}", file=out)
  rows = report['rows']
  by = lambda s: [r for r in rows if r['section'] == s]
  for r in by('matmul'):
    print(f"\nmatmul {r['n']}^3 float32: {r['median_s'] * 1e3:.1f} ms, "
          f"{r['gflops_per_s']:.1f} GFLOP/s", file=out)
  printers = [('layer', _print_layer)] + [
      (s, _print_steps) for s in ('step', 'ref', 'wide')] + [
          ('breakdown', _print_breakdown), ('blocks', _print_blocks),
          ('memory', _print_memory),
          ('reference', _print_reference)]
  for section, printer in printers:
    if by(section):
      printer(by(section), out)
