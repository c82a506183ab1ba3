"""Compiling for a device this machine does not have (poet_jax.train.plan.targets), and
what the compile of a target reports (planner, hlo_cost)."""
import functools
import importlib.util

import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache
import pytest

from poet_jax import platform
from poet_jax.models import attention
from poet_jax.train import cli
from poet_jax.train import config as config_lib
from poet_jax.train import sharding as sharding_lib
from poet_jax.train import state as train_state
from poet_jax.train import steps as steps_lib
from poet_jax.train.plan import hlo_cost
from poet_jax.train.plan import planner
from poet_jax.train.plan import targets


# The GPU compiles need JAX's CUDA plugin, the `plan` extra (CI installs
# it): without it they are skipped, and said so.
@pytest.fixture(autouse=True, scope='module')
def no_persistent_compilation_cache():
  """An earlier cli.main in this process may have turned JAX's persistent
  cache on; a compile-only device's executable cannot be read back from it."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  compilation_cache.reset_cache()
  yield
  jax.config.update('jax_enable_compilation_cache', enabled)
  compilation_cache.reset_cache()


needs_plugin = pytest.mark.skipif(
    not targets.plugin_installed(),
    reason=f"JAX's CUDA plugin is not installed: {targets.PLAN_EXTRA}")


def _cudnn_installed() -> bool:
  """Whether cuDNN's Python package, which JAX's CUDA plugin loads, is
  installed (the `plan` extra installs none): JAX reads cuDNN's version
  while tracing cuDNN's attention."""
  try:
    return importlib.util.find_spec('nvidia.cudnn') is not None
  except ModuleNotFoundError:  # no nvidia package at all
    return False


needs_cudnn = pytest.mark.skipif(
    not (targets.plugin_installed() and _cudnn_installed()),
    reason='no cuDNN library here (pip install nvidia-cudnn-cu13)')


def tiny(**model):
  c = config_lib.base_config()
  c.model.update(dim=32, num_layers=2, num_heads=2, ffn_dim=64,
                 vocab_size=64, **model)
  c.poet.block_size, c.poet.merge_every = 8.0, 2
  c.train.batch_size, c.train.seq_len = 2, 16
  c.mesh.data = 1
  return c


def compile_train(c, target):
  """The compiled train step of config c for `target`."""
  with platform.compiling_for(target):
    mesh = sharding_lib.make_mesh(c.mesh, planner.target_devices(c, target))
    setup, abstract = train_state.abstract_state(c, c.model.vocab_size)
    steps = steps_lib.compile_steps(setup, abstract, mesh)
    return steps_lib.trace_train(c, steps, abstract).lower().compile()


@needs_plugin
def test_a_tiny_model_compiles_for_an_h100_into_gpu_code():
  compiled = compile_train(tiny(dtype='bfloat16', w0_dtype='bfloat16'),
                           'h100')
  text = compiled.as_text()
  # XLA:GPU's matrix products: Triton gemm fusions or cuBLAS calls, which
  # XLA:CPU never emits; and the devices are the H100 described.
  assert 'gemm_fusion' in text or '__cublas$gemm' in text
  device = jax.tree.leaves(compiled.input_shardings)[0].mesh.devices.flat[0]
  assert device.platform == 'gpu'
  assert device.device_kind == targets.GPU_SPECS['h100'].device_kind
  host = compile_train(tiny(dtype='bfloat16', w0_dtype='bfloat16'), 'cpu')
  assert 'gemm_fusion' not in host.as_text()


def test_an_option_the_user_set_in_xla_flags_is_left_to_it(monkeypatch):
  """The steps pass no option that XLA_FLAGS sets (jax.jit's would
  override the environment's); the others stay."""
  c = tiny(dtype='bfloat16')
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                     '--xla_gpu_enable_latency_hiding_scheduler=false '
                     '--xla_gpu_all_reduce_combine_threshold_bytes=1024 '
                     '--xla_disable_hlo_passes')
  with platform.compiling_for('h100'):
    gpu = steps_lib.compiler_options(c)
  ours = steps_lib.gpu_compiler_options(c)
  assert set(ours) - set(gpu) == {
      'xla_gpu_enable_latency_hiding_scheduler',
      'xla_gpu_all_reduce_combine_threshold_bytes'}
  assert gpu['xla_gpu_pipeline_all_gather'] == ours[
      'xla_gpu_pipeline_all_gather']
  with platform.compiling_for('cpu'):
    assert steps_lib.compiler_options(c) == {}


def test_collectives_combine_up_to_one_layer():
  """The combine thresholds are one block's seven linear weights in
  float32: q and o (dim x dim), k and v (dim x kv), three of dim x ffn."""
  c = tiny(num_kv_heads=1)  # dim 32, 2 heads of 16, ffn 64
  layer = 4 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64)
  options = steps_lib.gpu_compiler_options(c)
  for collective in ('all_gather', 'reduce_scatter', 'all_reduce'):
    assert options[f'xla_gpu_{collective}_combine_threshold_bytes'] == layer


def test_the_compile_platform_follows_the_target():
  c = tiny(dtype='bfloat16')
  q = jnp.ones((1, 8, 2, 4))
  # A fresh function each time: the platform is read while tracing, and
  # JAX would reuse a trace of the same function.
  jaxpr = lambda: str(jax.make_jaxpr(
      lambda *a: attention.causal_attention(*a))(q, q, q))
  with platform.compiling_for('h100'):
    assert platform.platform() == 'gpu'
    assert steps_lib.compiler_options(c) == steps_lib.gpu_compiler_options(c)
    assert steps_lib.compiler_options(c)[
        'xla_gpu_enable_latency_hiding_scheduler'] is True
    gpu_attention = jaxpr()
  with platform.compiling_for('cpu'):
    assert platform.platform() == 'cpu'
    assert steps_lib.compiler_options(c) == {
        'xla_disable_hlo_passes': 'while-loop-invariant-code-motion'}
    cpu_attention = jaxpr()
  # The CPU core is the hand-written head-major one (a custom VJP); a GPU
  # gets jax.nn.dot_product_attention.
  assert 'custom_vjp_call' in cpu_attention
  assert 'custom_vjp_call' not in gpu_attention
  assert platform.platform() == jax.default_backend()


@needs_plugin
def test_a_step_that_does_not_merge_moves_no_w0():
  """On the H100 compile, the merge step of a step that does not merge (its
  loop runs zero times) reads and writes a few bytes of flags, where a
  lax.cond's untaken branch copied W0 or the blocks; and the update step
  holds no merge."""
  c = tiny(dtype='bfloat16', w0_dtype='bfloat16')
  with platform.compiling_for('h100'):
    mesh = sharding_lib.make_mesh(c.mesh, targets.compile_devices('h100'))
    setup, abstract = train_state.abstract_state(c, c.model.vocab_size)
    steps = steps_lib.compile_steps(setup, abstract, mesh)
    merge = steps_lib.trace_merge(steps, abstract).lower().compile()
  blocks_bytes = 2 * 2 * 8 * (4 * 64 + 3 * 96)  # layers x bf16 x b(m + n)
  assert hlo_cost.step_cost(merge).bytes_accessed < 0.1 * blocks_bytes
  assert ' while(' in merge.as_text()  # the merge is there, in a loop


@needs_cudnn
def test_a_gpu_run_of_a_bf16_model_lowers_to_cudnn_fused_attention(
    monkeypatch):
  """The update step lowered as a run on an H100 lowers it (the device
  present), bfloat16: cuDNN's fused attention forward and backward; float32:
  none. Lowered, not compiled: cuDNN builds its kernels with the GPU."""
  monkeypatch.setattr(attention, 'implementation', functools.partial(
      attention.implementation, on_device=True))

  def lowered_text(c):
    with platform.compiling_for('h100'):
      mesh = sharding_lib.make_mesh(c.mesh, targets.compile_devices('h100'))
      setup, abstract = train_state.abstract_state(c, c.model.vocab_size)
      steps = steps_lib.compile_steps(setup, abstract, mesh)
      return steps_lib.trace_train(c, steps, abstract).lower().as_text()

  text = lowered_text(tiny(dtype='bfloat16', w0_dtype='bfloat16'))
  assert '__cudnn$fmhaSoftmax' in text
  assert '__cudnn$fmhaSoftmaxBackward' in text
  assert '__cudnn$fmha' not in lowered_text(tiny())


@needs_plugin
def test_an_h100_plan_reports_split_cost_and_roofline():
  """Also: the steps compile with every XLA:GPU option of
  steps.gpu_compiler_options (an unknown name fails the compile), and the
  report names the attention core: XLA's form, compiled without the GPU,
  and cuDNN's for a run on it."""
  c = tiny(dtype='bfloat16', w0_dtype='bfloat16')
  report = planner.plan(c, target='h100')
  assert report['attention'] == 'xla'
  assert report['attention_in_a_run'] == 'cudnn'
  assert report['target'] == 'h100'
  assert report['device_kind'] == 'NVIDIA H100 80GB HBM3'
  split = report['peak_split_gib']
  assert sum(split.values()) == pytest.approx(report['peak_gib'])
  assert split['frozen'] > 0 and split['optimizer_state'] > 0
  spec = targets.GPU_SPECS['h100']
  assert report['roofline_ms'] == pytest.approx(1e3 * max(
      report['hlo_flops_per_device'] / spec.bf16_flops,
      report['hlo_bytes_per_device'] / spec.memory_bandwidth))
  assert planner.plan(c, target='cpu')['roofline_ms'] is None


def test_target_descriptions_hold_the_published_figures():
  text = targets.target_config('a100')
  assert 'core_count: 108' in text
  assert 'cuda_compute_capability { major: 8 minor: 0 }' in text
  assert 'device_description_str: "NVIDIA A100-SXM4-80GB"' in text
  assert 'memory_bandwidth: 2039000000000' in text


def test_a_gpu_target_without_the_plugin_is_one_line(monkeypatch, tmp_path,
                                                     capsys):
  monkeypatch.setattr(targets, 'plugin_installed', lambda: False)
  code = cli.main(['train.py', '--dry_run', '--target=h100',
                   f'--workdir={tmp_path / "run"}'])
  err = capsys.readouterr().err
  assert code == 2
  assert err.count('\n') == 1 and "pip install -e '.[plan]'" in err
  assert not (tmp_path / 'run').exists()


def test_a_target_without_dry_run_is_refused(tmp_path, capsys):
  code = cli.main(['train.py', '--target=h100', f'--workdir={tmp_path}'])
  assert code == 2
  assert '--dry_run' in capsys.readouterr().err


def test_a_dry_run_for_a_gpu_leaves_the_persistent_cache_off(monkeypatch,
                                                             tmp_path):
  monkeypatch.setattr(targets, 'plugin_installed', lambda: False)
  cli.main(['train.py', '--dry_run', '--target=h100',
            f'--compilation_cache={tmp_path / "cache"}',
            f'--workdir={tmp_path / "run"}'])
  assert not jax.config.jax_enable_compilation_cache
