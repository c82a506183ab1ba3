"""Smoke test of `python -m poet_jax.bench`: every section at a tiny size."""
import json
import math

from poet_jax import bench


def _numbers(row):
  return [v for v in row.values()
          if isinstance(v, (int, float)) and not isinstance(v, bool)]


def test_every_section_runs_and_every_row_has_finite_numbers(tmp_path,
                                                             capsys):
  path = tmp_path / 'bench.json'
  # Two methods keep the compiles (the test's cost) few; every section runs.
  assert bench.main(['--tiny', '--reps=3', f'--json={path}',
                     '--methods=adamw,poet-auto']) == 0
  report = json.loads(path.read_text())
  rows = report['rows']
  assert {r['section'] for r in rows} == set(bench.SECTIONS)
  for row in rows:
    assert 'error' not in row, row
    numbers = _numbers(row)
    assert numbers, row
    assert all(math.isfinite(v) for v in numbers), row
  layer = [r for r in rows if r['section'] == 'layer']
  assert {r['path'] for r in layer} == set(bench.LAYER_PATHS)
  dense = [r for r in layer if r['path'] == 'dense']
  assert all(r['ratio_to_dense'] == 1.0 for r in dense)
  step = [r for r in rows if r['section'] == 'step']
  assert {r['method'] for r in step} == {'adamw', 'poet-auto', 'poet merge'}
  auto = [r for r in step if r['method'] == 'poet-auto'][0]
  assert set(auto['auto_choices'].values()) <= {'fast', 'materialize'}
  assert auto['ratio_to_adamw'] > 0 and auto['flops_per_step'] > 0
  machine = report['machine']
  assert machine['cores'] >= 1 and machine['cpu'] and machine['date']
  out = capsys.readouterr().out
  assert 'machine:' in out and 'command: python -m poet_jax.bench' in out
  assert '| 64 x 160 | 64 | auto |' in out


def test_matmul_flops_counts_a_scan_body_times_its_length():
  import jax
  import jax.numpy as jnp

  def layers(w, x):  # 3 layers of (5 x 4) @ (4 x 4) in a scan
    return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, w)[0]

  args = (jnp.ones((3, 4, 4)), jnp.ones((5, 4)))
  one = 2 * 5 * 4 * 4
  assert bench.matmul_flops(jax.jit(layers).trace(*args).jaxpr) == 3 * one
  # Forward, then the input and the weight gradients: 3 products per layer.
  grad = jax.jit(jax.grad(lambda w, x: layers(w, x).sum()))
  assert bench.matmul_flops(grad.trace(*args).jaxpr) == 3 * 3 * one


def test_reference_section_without_the_official_code_is_one_skip_row(
    tmp_path, capsys):
  path = tmp_path / 'bench.json'
  assert bench.main(['--only=reference', f'--json={path}']) == 0
  rows = json.loads(path.read_text())['rows']
  assert len(rows) == 1 and rows[0]['section'] == 'reference'
  assert '--reference_python' in rows[0]['skipped']
  assert 'reference skipped: the official code is not set up' in (
      capsys.readouterr().out)


def test_reference_skip_reason_names_what_is_missing(tmp_path):
  import sys
  from poet_jax.bench import reference
  # An executable that is there, a source tree that is not the official one.
  reason = reference.skip_reason(reference.Args(sys.executable,
                                                str(tmp_path)))
  assert 'poet_torch/__init__.py' in reason
  reason = reference.skip_reason(reference.Args(str(tmp_path / 'nope'),
                                                str(tmp_path)))
  assert 'is not an executable' in reason


def test_reference_replies_parse_and_errors_raise():
  import pytest
  from poet_jax.bench import reference
  assert reference.parse_reply('{"seconds": [1.5, 2.0]}\n') == {
      'seconds': [1.5, 2.0]}
  with pytest.raises(RuntimeError, match='driver failed: ImportError: x'):
    reference.parse_reply('{"error": "ImportError: x"}')
  with pytest.raises(RuntimeError, match='not a JSON line'):
    reference.parse_reply('Traceback (most recent call last):')


def test_time_rounds_reverses_the_second_round_and_warms_up_once():
  from poet_jax.bench import steps
  calls = []

  def runner(name):
    def timed(count, warmup):
      calls.append((name, count, warmup))
      return [float(len(calls))] * count
    return timed

  times = steps.time_rounds({n: runner(n) for n in 'abc'}, reps=4)
  assert calls == [('a', 2, True), ('b', 2, True), ('c', 2, True),
                   ('c', 2, False), ('b', 2, False), ('a', 2, False)]
  assert times['a'] == [1.0, 1.0, 6.0, 6.0]


def test_profile_op_times_sum_ops_per_call_and_skip_their_containers(
    tmp_path):
  import gzip
  from poet_jax.bench import op_profile as profile
  events = [{'ph': 'X', 'name': 'ynn_fusion.3', 'dur': 4000},
            {'ph': 'X', 'name': 'ynn_fusion.3', 'dur': 2000},
            {'ph': 'X', 'name': 'transpose_copy_fusion', 'dur': 1000},
            {'ph': 'X', 'name': 'while.1', 'dur': 9000},  # holds the others
            {'ph': 'X', 'name': 'ThunkExecutor::Execute', 'dur': 9000},
            {'ph': 'i', 'name': 'marker'}]
  (tmp_path / 'run').mkdir()
  with gzip.open(tmp_path / 'run' / 'host.trace.json.gz', 'wt') as f:
    json.dump({'traceEvents': events}, f)
  # Two calls traced: ms per call.
  assert profile.op_times(str(tmp_path), calls=2) == {
      'ynn_fusion.3': 3.0, 'transpose_copy_fusion': 0.5}


# ------------------------------------------------- --only=device, --tiny


def test_device_check_runs_every_part_at_tiny_size(tmp_path, capsys):
  path = tmp_path / 'device.json'
  # Two methods keep the step compiles few; every part runs.
  assert bench.main(['--only=device', '--tiny', f'--json={path}',
                     '--methods=adamw,poet-auto']) == 0
  rows = json.loads(path.read_text())['rows']
  assert {r['section'] for r in rows} == {'device'}
  by = lambda part: [r for r in rows if r['part'] == part]
  env, = by('environment')
  assert env['platform'] == 'cpu' and env['device_kind'] == 'cpu'
  assert 'jax:' in env['environment']
  from poet_jax.bench import device_numerics
  numerics = by('numerics')
  assert {(r['layer'], r['path'], r['dtype']) for r in numerics} == {
      (kind[0], path, dtype) for kind in device_numerics.KINDS
      for path in device_numerics.PATHS for dtype in device_numerics.DTYPES}
  for r in numerics:
    assert r['passed'] and 0 < r['error_over_bound'] <= 1, r
    assert set(r['arrays']) == {'y', 'dx', 'd_in_blocks', 'd_out_blocks'}
  training, = by('training')
  assert training['passed'] and training['lowered'], training
  assert training['last_loss'] < training['first_loss']
  assert training['resumed_bit_exact'] and training['killed_exit_code'] == -9
  # Killed between checkpoints: the resume cut steps off metrics.jsonl.
  assert training['logged_at_kill'] > max(training['checkpoints_at_kill'])
  table = by('layer_table')
  assert [r['path'] for r in table] == ['dense', 'materialize', 'fast', 'mem']
  assert all(r['ms'] > 0 for r in table)
  assert [r['paper_h100_ms'] for r in table] == [1.11, 10.59, 1.38, 1.89]
  steps = by('steps')
  assert [r['method'] for r in steps] == ['adamw', 'poet-auto']
  for r in steps:
    assert r['ms_per_step'] > 0 and r['predicted_peak_gib'] > 0, r
    assert r['measured_peak_gib'] is None  # the CPU reports no peak
  assert all(r['part_seconds'] >= 0 for r in rows[1:])
  out = capsys.readouterr().out
  assert '## device check on cpu (cpu)' in out
  assert 'killed after step 9 and resumed: bit-exact' in out


def test_device_check_skips_the_parts_the_budget_has_no_time_for(capsys):
  from poet_jax.bench import device
  rows = device.bench_device(True, budget_s=0)
  assert [r['part'] for r in rows] == ['environment', 'numerics', 'training',
                                      'layer_table', 'steps']
  assert all('skipped' in r for r in rows[1:]) and not device.failures(rows)
  device.print_report(rows)
  assert 'training: skipped, 0 s of the budget left' in (
      capsys.readouterr().out)


def test_device_numerics_catch_a_path_off_by_a_tenth_of_a_percent(
    monkeypatch):
  from poet_jax import layers
  from poet_jax.bench import device_numerics
  call = layers.POETLinear.__call__

  def off(self, x):  # 'fast' 0.1% off: its output and every gradient
    return call(self, x) * (1.001 if self.compute == 'fast' else 1.0)

  monkeypatch.setattr(layers.POETLinear, '__call__', off)
  rows = device_numerics.check_layers(32, 48, 16, 16, 16, log=lambda *a: 0,
                                      kinds=device_numerics.KINDS[:1])
  failed = {(r['path'], r['dtype']) for r in rows if not r['passed']}
  # float32's bound is far below 0.1%; bfloat16's (8 roundings of 2^-7)
  # is above it.
  assert failed == {('fast', 'float32')}, failed


def test_a_failed_device_check_exits_with_1_after_writing_the_report(
    tmp_path, monkeypatch):
  from poet_jax.bench import device
  row = {'section': 'device', 'part': 'numerics', 'layer': 'poet-bs',
         'path': 'fast', 'dtype': 'float32', 'passed': False,
         'error_over_bound': 3.0}
  monkeypatch.setattr(device, 'bench_device', lambda tiny, methods: [row])
  path = tmp_path / 'device.json'
  assert bench.main(['--only=device', '--tiny', f'--json={path}']) == 1
  assert json.loads(path.read_text())['rows'] == [row]
  assert device.failures([row]) == ['numerics poet-bs fast float32']
