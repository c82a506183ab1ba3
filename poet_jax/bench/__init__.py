"""Benchmarks of POET against a dense layer, AdamW and the baselines.

  python -m poet_jax.bench --json=bench.json              # everything
  python -m poet_jax.bench --only=layer,step --reps=30    # some sections
  python -m poet_jax.bench --tiny                         # seconds: smoke test
  python -m poet_jax.bench --only=reference \
      --reference_python=/tmp/refvenv/bin/python --reference_src=/tmp/poet_ref

Everything is measured in this one process, on this machine, and every ratio
is against a baseline measured in the same run. Sections:

  matmul  the machine's float32 matmul rate through jax (the limit)
  layer   one layer, forward + backward (gradients of the blocks or the
          kernel, and of the input), N tokens: dense, materialize, fast, mem,
          auto as ratios to the dense layer
  breakdown  the 'fast' path of the widest layer shape cut into its pieces
          (W0 products, block products, Cayley–Neumann maps, gathers,
          layout copies), each timed alone, against the whole: where the
          time over the FLOP floor goes
  blocks  the model's blocks (in its scan) at the ref batch, forward and
          forward + backward: ms, the backward's cost over the forward,
          GFLOP/s (matmul_flops) against the matmul rate
  step    the jitted train step of llama_60m at batch 32 x 256: AdamW, GaLore,
          Muon, POET with each compute path; ms per step, tokens/s, ratio to
          AdamW, achieved FLOP rate (the step's matrix-product FLOPs counted
          from its jaxpr, a scan's body times its length: matmul_flops),
          compiled peak memory; and one merge of the whole model
  ref     the same model at the reference's setting, batch 8 x 256
  wide    the llama_1b width with 2 layers, batch 4 x 256
  memory  the dry-run planner's peak per device for llama_1b/3b/8b/13b at
          batch 1 and sequence 512/1024/2048, next to the POET-X paper;
          POET-XQ (poetxq-mem: W0 in 8 bits, model.w0_dtype=int8) next to
          POET-X mem with a bfloat16 W0
  reference  (only when asked for) the official PyTorch code's own training
          update, eager, in a separate Python, against our steps at the same
          settings: AdamW and POET-X, ratios poet_jax / official
  device  (only when asked for) a check of one accelerator in ten minutes:
          every layer path against float64, a run killed and resumed, the
          paper's layer table, whole steps with their measured peak memory

Timings are medians of many runs after warm-up, with the compared variants
interleaved (round-robin, the order rotated each round) so that load from
other processes falls on all of them alike, and inputs rotated over several
arrays. Progress goes to stderr; the tables to stdout.

One module per section (layer, breakdown, blocks, steps, memory, reference,
device with device_numerics and device_train), the
shared timing in common, FLOP counting in flops, the op time of a profile
in op_profile, the Markdown in tables and the command line in cli.
"""
from poet_jax.bench.blocks import bench_blocks
from poet_jax.bench.breakdown import bench_breakdown
from poet_jax.bench.cli import (ALL_SECTIONS, METHODS, POET_PATHS, SECTIONS,
                                main, run)
from poet_jax.bench.common import (FULL, GIB, TINY, Sizes, interleaved, log,
                                   machine)
from poet_jax.bench.flops import bench_matmul
from poet_jax.bench.layer import LAYER_PATHS, bench_layer, make_layer
from poet_jax.bench.memory import PAPER_MEMORY_GB, bench_memory
from poet_jax.bench.reference import bench_reference
from poet_jax.bench.steps import bench_steps, step_config
from poet_jax.bench.tables import print_tables
from poet_jax.train.plan.flops import matmul_flops
