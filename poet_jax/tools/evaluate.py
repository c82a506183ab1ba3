"""Perplexity of a trained run's checkpoint, as the trainer evaluates it.

  python -m poet_jax.evaluate --workdir=runs/llama_tiny_poet [--step=N]
      [--data=NAME] [--split=validation] [--eval_tokens=N]

By default the run's own corpus, held-out split and number of tokens, in the
same batches and with the same jitted evaluation step (steps.eval_step)
on the run's mesh: the printed line equals the trainer's evaluation line of
that step. --data and --split evaluate on any corpus the trainer supports
(data.name), tokenized with the run's tokenizer.
"""
import sys

import jax
from absl import flags

from poet_jax.data import pipeline as data_lib
from poet_jax.tools import cli
from poet_jax.tools import restore
from poet_jax.train import config as config_lib
from poet_jax.train import metrics as metrics_lib
from poet_jax.train import sharding as sharding_lib
from poet_jax.train import state as train_state
from poet_jax.train import steps as steps_lib


def evaluate(run: restore.Run, steps: steps_lib.CompiledSteps, data_name: str,
             split: str, eval_tokens: int, progress: bool = False,
             decode_errors: str | None = None) -> float:
  """Mean next-token loss (nats) over the evaluation batches of a split.

  The batches are the trainer's: the split's first
  max(1, eval_tokens // seq_len) examples, in train.batch_size rows.
  decode_errors: as data.decode_errors; None: the run's.
  """
  c = run.config
  stream = data_lib.open_token_stream(
      data_name, split, c.data.data_dir or config_lib.default_data_dir(),
      run.tokenizer, c.train.seq_len, c.data.max_tokens or None,
      progress=progress, decode_errors=decode_errors or c.data.decode_errors)
  batches = stream.eval_batches(c.train.batch_size,
                                max(1, eval_tokens // c.train.seq_len),
                                jax.process_index(), jax.process_count())
  total, count = 0.0, 0.0
  for batch in batches:
    batch = jax.make_array_from_process_local_data(steps.batch_sharding,
                                                   batch)
    s, n = steps.eval(run.state, batch)
    total, count = total + float(s), count + float(n)
  return total / count


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'Work directory of a training run.',
                      flag_values=fv, required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step; default the latest.',
                       flag_values=fv)
  flags.DEFINE_string('data', None, "Corpus (as data.name); default the "
                      "run's.", flag_values=fv)
  flags.DEFINE_enum('split', 'validation', data_lib.SPLITS, 'Split.',
                    flag_values=fv)
  flags.DEFINE_integer('eval_tokens', None, "Tokens to evaluate; default "
                       "the run's eval_tokens.", flag_values=fv)
  flags.DEFINE_enum('decode_errors', None, config_lib.DECODE_ERRORS,
                    "A directory corpus's files that are not UTF-8 text "
                    "(as data.decode_errors); default the run's.",
                    flag_values=fv)


def _body(fv: flags.FlagValues) -> int:
  if fv.eval_tokens is not None and fv.eval_tokens < 1:
    raise cli.UsageError(f'--eval_tokens={fv.eval_tokens} must be positive')
  c = restore.read_config(fv.workdir)
  mesh = sharding_lib.make_mesh(c.mesh)
  sharding_lib.check_batch(mesh, c.train.batch_size)
  run = restore.load_run(
      fv.workdir, fv.step,
      shardings=lambda a: sharding_lib.state_shardings(mesh, a))
  _, abstract = train_state.abstract_state(c, run.model.cfg.vocab_size)
  steps = steps_lib.compile_steps(run.setup, abstract, mesh)
  loss = evaluate(run, steps, fv.data or c.data.name, fv.split,
                  fv.eval_tokens or c.eval_tokens,
                  decode_errors=fv.decode_errors)
  ppl = metrics_lib.perplexity(loss)
  print(f'step {run.step}: eval loss {loss:.4f}, perplexity '
        f'{metrics_lib.perplexity_text(ppl)}')
  return 0


def main(argv=None) -> int:
  """`python -m poet_jax.evaluate --help`; returns the exit code."""
  return cli.run(__doc__, _define, _body, argv,
                 user_errors=(restore.RunError, sharding_lib.MeshError))


if __name__ == '__main__':
  sys.exit(main())
