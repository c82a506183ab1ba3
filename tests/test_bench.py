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
