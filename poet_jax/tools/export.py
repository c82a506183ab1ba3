"""Export a run's merged model as a Hugging Face Llama checkpoint.

  python -m poet_jax.export --workdir=runs/llama_tiny_poet --out=hf/tiny

writes the model with every POET layer folded into its dense kernel
(W = P_in W0 R_out) as a `transformers` LlamaForCausalLM directory:
config.json and model.safetensors (float32), plus tokenizer.model when the
run used a SentencePiece model (the format: poet_jax.models.hf).
`--config.init_from=DIR` of train.py reads such a directory back
(poet_jax.train.init_from).
"""
import os
import sys

import jax
from absl import flags
from flax import nnx

from poet_jax.models import hf
from poet_jax.tools import cli
from poet_jax.tools import restore
from poet_jax.train import workdir as workdir_lib


def check_writable(out: str) -> None:
  """`out` is, or can be created as, a writable directory; else hf.HFError.

  Creates nothing (workdir.unwritable).
  """
  problem = workdir_lib.unwritable(out)
  if problem:
    where, why = problem
    raise hf.HFError(f'output directory {out} cannot be written ({where}: '
                  f'{why}); choose another --out')


def export_run(run: restore.Run, out: str) -> None:
  """Write a restored run's merged dense model to `out` (see module doc)."""
  model = run.model
  weights = jax.device_get(nnx.jit(restore.dense_weights)(model))
  tokenizer = run.config.data.tokenizer
  hf.write_checkpoint(out, model.cfg, weights, run.tokenizer.eos_id,
                      run.config.train.seq_len,
                      None if tokenizer == 'byte' else os.path.expanduser(
                          tokenizer))


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'Work directory of a training run.',
                      flag_values=fv, required=True)
  flags.DEFINE_string('out', None, 'Directory to write the Hugging Face '
                      'checkpoint to (created if needed).', flag_values=fv,
                      required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step; default the latest.',
                       flag_values=fv)


def _body(fv: flags.FlagValues) -> int:
  workdir_lib.check_outside_runs(fv.out, '--out')
  check_writable(fv.out)
  run = restore.load_run(fv.workdir, fv.step)
  try:
    export_run(run, fv.out)
  except OSError as e:
    raise hf.HFError(f'output directory {fv.out} cannot be written '
                  f'({e.strerror or e}); choose another --out') from None
  print(f'wrote step {run.step} of {fv.workdir} as a Hugging Face Llama to '
        f'{os.path.abspath(fv.out)}')
  return 0


def main(argv=None) -> int:
  """`python -m poet_jax.export --help`; returns the exit code."""
  return cli.run(__doc__, _define, _body, argv,
                 user_errors=(restore.RunError, hf.HFError))


if __name__ == '__main__':
  sys.exit(main())
