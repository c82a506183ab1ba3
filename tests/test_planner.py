"""The dry-run planner: abstract compile, memory and FLOPs."""
import json
import os

import jax
import jax.numpy as jnp
import pytest

from poet_jax.train import config as config_lib
from poet_jax.train import sharding
from poet_jax.train import state as train_state
from poet_jax.train import steps as steps_lib
from poet_jax.train.plan import planner


def one_device(c):
  c.mesh.data = c.mesh.fsdp = 1
  return c


def test_dry_run_of_a_tiny_config_matches_its_real_step(tmp_path):
  c = one_device(config_lib.base_config())
  c.model.vocab_size = 257
  report = planner.dry_run(c, str(tmp_path))
  with open(tmp_path / 'memory.json') as f:
    assert json.load(f) == report
  for key in ('argument_gib', 'output_gib', 'temp_gib', 'peak_gib',
              'trainable_params', 'frozen_params', 'flops_per_step',
              'num_devices'):
    assert key in report
  # The same step compiled from real (allocated) arrays.
  mesh = sharding.make_mesh(c.mesh)
  setup, abstract = train_state.abstract_state(c, 257)
  steps = steps_lib.compile_steps(setup, abstract, mesh)
  state = jax.jit(lambda: train_state.init_state(c, 257)[1],
                  out_shardings=steps.state_sharding)()
  batch = jnp.zeros((c.train.batch_size, c.train.seq_len + 1), jnp.int32)
  compiled = steps.update.lower(state, batch).compile()
  mem = compiled.memory_analysis()
  assert report['argument_gib'] * planner.GIB == mem.argument_size_in_bytes
  assert report['temp_gib'] * planner.GIB == mem.temp_size_in_bytes
  trainable, frozen = train_state.count_params(state)
  assert (report['trainable_params'], report['frozen_params']) == (trainable,
                                                                   frozen)
  actual_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  assert abs(mem.argument_size_in_bytes - actual_bytes - 4 * c.train.batch_size
             * (c.train.seq_len + 1)) < 1024
  assert report['flops_per_step'] > 0


def test_a_dry_run_writes_nothing_into_another_runs_directory(tmp_path):
  # A work directory holding a checkpoint of another config (as a fresh
  # user's --dry_run with a changed lr wrote memory.json into one).
  c = one_device(config_lib.base_config())
  c.model.vocab_size = 257
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints' / '2').mkdir(parents=True)
  (workdir / 'config.json').write_text(c.to_json(sort_keys=True, indent=1))
  before = sorted(p.name for p in workdir.rglob('*'))
  other = c.copy_and_resolve_references()
  other.train.lr = 0.5
  with pytest.raises(config_lib.ConfigError, match='different config'):
    planner.dry_run(other, str(workdir))
  assert sorted(p.name for p in workdir.rglob('*')) == before


def test_flops_count_every_layer_of_the_scan():
  # XLA's cost analysis counts the layer scan's body once, so its figure
  # would not grow with the depth; the step's products do, by one layer's,
  # and so does hlo_cost's count of the compiled step (each loop body times
  # its trip count). One layer is left out: XLA removes a loop of one.
  reports = []
  for layers in (2, 3, 4):
    c = one_device(config_lib.base_config())
    c.model.vocab_size, c.model.num_layers = 257, layers
    reports.append(planner.plan(c))
  for key, rel in (('flops_per_step', 1e-6), ('hlo_flops_per_device', 1e-3)):
    flops = [r[key] for r in reports]
    assert flops[1] - flops[0] == pytest.approx(flops[2] - flops[1],
                                                rel=rel), key
    assert flops[1] - flops[0] > 0.1 * flops[0], key


def test_dry_run_of_llama_13b_fits_the_planner_not_the_machine():
  c = one_device(config_lib.paper_config('13b'))
  c.train.batch_size, c.train.seq_len = 1, 1024
  c.poet.compute = 'mem'
  c.model.dtype = c.model.w0_dtype = 'bfloat16'
  report = planner.plan(c)
  # 12.7B frozen W0 values, 0.83B trainable generators + embeddings/head.
  assert 12e9 < report['frozen_params'] < 13.5e9
  assert report['trainable_params'] < 1.5e9
  assert report['argument_gib'] > 24  # far more than this machine holds
  assert report['peak_gib'] >= report['argument_gib']


def test_dry_run_reports_the_memory_of_one_micro_batch():
  """Batch 16 in 4 micro-batches keeps one micro-batch's activations:
  measured, 0.43x the temporaries of the whole batch at once (0.26x for a
  plain batch of 4; the rest is the accumulated gradients and the scan)."""
  reports = {}
  for accum in (1, 4):
    c = one_device(config_lib.base_config())
    c.model.vocab_size, c.model.num_layers = 257, 1
    c.train.batch_size, c.train.grad_accum_steps = 16, accum
    reports[accum] = planner.plan(c)
  assert reports[4]['micro_batch_size'] == 4
  assert reports[4]['grad_accum_steps'] == 4
  assert reports[4]['temp_gib'] < 0.5 * reports[1]['temp_gib']
