"""The runs of the reproduction study: each trained once in its own work
directory (train.loop.train), resumed when unfinished, and its figures
(result.json) read back."""
import contextlib
import json
import math
import os
import time

from poet_jax.experiments import scales
from poet_jax.train import loop as train_lib
from poet_jax.train import metrics as metrics_lib


class Runner:
  """Trains runs in <root>/<name>, each once; collects their results."""

  def __init__(self, root: str, scale: dict, log=print, commit='unknown'):
    """root: parent of the work directories; scale: one of SCALES; commit:
    the code's, recorded in the result of every run trained here."""
    self.root, self.scale, self.log, self.commit = root, scale, log, commit
    self.results = {}
    self.trained = []  # names of the runs this invocation trained

  def workdir(self, overrides: dict) -> str:
    return os.path.join(self.root, scales.run_name(overrides))

  def config(self, overrides: dict):
    return scales.make_config(self.scale['base'], overrides)

  def __call__(self, overrides: dict) -> dict:
    """The result of a run (see _summarize), training it if unfinished."""
    name = scales.run_name(overrides)
    if name in self.results:
      return self.results[name]
    workdir = self.workdir(overrides)
    path = os.path.join(workdir, 'result.json')
    if os.path.exists(path):
      with open(path) as f:
        result = json.load(f)
      self.log(f'{name}: finished earlier, skipped (eval perplexity '
               f"{result['eval_ppl']:.3f})")
    else:
      result = self._train(name, overrides, workdir)
      self.trained.append(name)
    self.results[name] = result
    return result

  def seeds(self, overrides: dict, seeds) -> list[dict]:
    """The results of a setting at each of `seeds`, in that order."""
    return [self(scales.at_seed(overrides, s)) for s in seeds]

  def _train(self, name: str, overrides: dict, workdir: str) -> dict:
    c = self.config(overrides)
    self.log(f'{name}: training in {workdir}')
    start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'train.log'), 'a') as out, \
        contextlib.redirect_stdout(out):
      code = train_lib.train(c, workdir, progress=False)
    if code:
      raise SystemExit(code)
    result = _summarize(name, overrides, workdir,
                        time.perf_counter() - start)
    result['commit'] = self.commit
    tmp = os.path.join(workdir, 'result.json.tmp')
    with open(tmp, 'w') as f:
      json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(workdir, 'result.json'))
    self.log(f"{name}: eval perplexity {result['eval_ppl']:.3f} "
             f"({result['wall_s']:.0f} s)")
    return result


def _summarize(name: str, overrides: dict, workdir: str, wall: float):
  """A finished run's figures from its metrics.jsonl.

  diverged: the final evaluation is not finite, no better than the first,
  or some update was dropped as non-finite. wall_s: the time of the
  invocation that finished the run (of its last part, if it was resumed).
  """
  entries = metrics_lib.MetricsLog.read(os.path.join(workdir,
                                                     'metrics.jsonl'))
  evals = [e for e in entries if 'eval_loss' in e]
  first, last = evals[0]['eval_loss'], evals[-1]['eval_loss']
  nonfinite = max([e.get('nonfinite_steps', 0) for e in entries] + [0])
  return {'name': name, 'overrides': overrides, 'eval_loss': last,
          'eval_ppl': math.exp(min(last, 700)) if math.isfinite(last)
                      else float('inf'),
          'first_eval_ppl': math.exp(min(first, 700)),
          'nonfinite_steps': nonfinite, 'wall_s': wall,
          'diverged': not math.isfinite(last) or last >= first or
                      nonfinite > 0}


def mean_loss(results: list[dict]) -> float:
  """Mean final eval loss of a setting's runs (a non-finite one: inf)."""
  losses = [r['eval_loss'] if math.isfinite(r['eval_loss']) else math.inf
            for r in results]
  return sum(losses) / len(losses)


def best(settings: list[list[dict]]) -> list[dict]:
  """The setting (its runs over seeds) with the lowest mean eval loss."""
  return min(settings, key=mean_loss)
