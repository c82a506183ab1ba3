"""A short training run on the device: its loss goes down, and the same run
killed with SIGKILL after a checkpoint resumes to the same metrics, bit for
bit.

Three trainer processes (`poet-jax-train`, through this module's `main`,
which can pause a run after a step): one uninterrupted run; one paused after
step `kill_after` once every checkpoint it started is committed, then
killed from here with SIGKILL; the same command again, which resumes from
the last committed checkpoint. The two work directories' metrics.jsonl
must then agree in every field but the wall-clock ones.

On a GPU the three runs use XLA's deterministic GPU ops
(--xla_gpu_deterministic_ops): otherwise scatter-adds (the embedding's
gradient) sum in an order that varies between runs, and even two
uninterrupted runs would differ in their last bits. The runs share one
persistent compilation cache, so all three execute the same programs.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

from poet_jax.train import hooks

PAUSED = 'paused after step {} with its checkpoints committed'
WALL_CLOCK = ('step_time_s', 'tokens_per_s')
DETERMINISTIC_GPU = '--xla_gpu_deterministic_ops=true'


@dataclasses.dataclass(frozen=True)
class Run:
  """The trained run: a config and its --config.* overrides."""
  config: str
  overrides: tuple
  steps: int
  kill_after: int  # after a checkpoint, before the next one


def train_args(run: Run, workdir: str, cache: str) -> list[str]:
  return [f'--config={run.config}', f'--workdir={workdir}',
          f'--config.train.steps={run.steps}', '--config.log_every=1',
          f'--config.eval_every={run.steps}', '--config.eval_at_start=never',
          '--config.mesh.data=1', *run.overrides, '--no_progress',
          f'--compilation_cache={cache}']


def _env(platform: str) -> dict:
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  if platform == 'gpu':
    env['XLA_FLAGS'] = f"{env.get('XLA_FLAGS', '')} {DETERMINISTIC_GPU}"
  return env


# main() in another Python (not `-m`: this module is imported with the
# package first).
_CHILD = ('import sys; from poet_jax.bench import device_train; '
          'sys.exit(device_train.main())')


def _launch(args, pause_after, env, log_path, timeout):
  """Starts a trainer; returns (process, its stdout lines as read so far).

  With pause_after, reads its stdout until it says it paused (or ends) and
  kills it with SIGKILL; else waits for it. A timer kills it at timeout.
  """
  with open(log_path, 'ab') as log:
    proc = subprocess.Popen(
        [sys.executable, '-c', _CHILD, f'--pause_after={pause_after}',
         *args],
        stdout=subprocess.PIPE, stderr=log, env=env, text=True)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    lines = []
    try:
      for line in proc.stdout:
        lines.append(line.rstrip('\n'))
        if pause_after and line.startswith(PAUSED.format(pause_after)):
          proc.send_signal(signal.SIGKILL)
          break
      proc.wait()
    finally:
      timer.cancel()
      proc.stdout.close()
  return proc, lines


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def _committed(workdir: str) -> list[int]:
  """Steps with a committed checkpoint (orbax renames a step's directory
  when it is complete)."""
  return sorted(int(n) for n in os.listdir(os.path.join(workdir,
                                                         'checkpoints'))
                if n.isdigit())


def first_difference(a: list[dict], b: list[dict]) -> str | None:
  """Where two metrics logs differ outside WALL_CLOCK; None: nowhere."""
  if [e['step'] for e in a] != [e['step'] for e in b]:
    return f"steps differ: {[e['step'] for e in a][-5:]} vs " + str(
        [e['step'] for e in b][-5:])
  for x, y in zip(a, b):
    keys = (set(x) | set(y)) - set(WALL_CLOCK)
    bad = sorted(k for k in keys if x.get(k) != y.get(k))
    if bad:
      return (f"step {x['step']}: " + ', '.join(
          f'{k} {x.get(k)!r} vs {y.get(k)!r}' for k in bad[:3]))
  return None


def loss_drop(metrics: list[dict]) -> dict:
  """Mean train loss over the first and the last tenth of the steps."""
  losses = [e['train_loss'] for e in metrics if 'train_loss' in e]
  tenth = max(1, len(losses) // 10)
  first = sum(losses[:tenth]) / tenth
  last = sum(losses[-tenth:]) / tenth
  return {'first_loss': first, 'last_loss': last, 'lowered': last < first}


def check_training(run: Run, directory: str, platform: str,
                   deadline: float, log=print) -> dict:
  """The three runs (module doc) under `directory`; the result as a row.

  deadline: time.monotonic() by which every run must have ended (a run
  still going then is killed and the row says so).
  """
  cache = os.path.join(directory, 'xla_cache')
  env = _env(platform)
  logs = os.path.join(directory, 'trainer.log')
  row = {'config': run.config, 'overrides': list(run.overrides),
         'steps': run.steps, 'kill_after': run.kill_after,
         'xla_flags': env.get('XLA_FLAGS', '')}
  runs = (('uninterrupted', 'whole', 0), ('killed', 'resumed',
                                          run.kill_after),
          ('resumed', 'resumed', 0))
  for name, workdir, pause in runs:
    start = time.monotonic()
    proc, lines = _launch(train_args(run, os.path.join(directory, workdir),
                                     cache), pause, env, logs,
                          max(1.0, deadline - start))
    row[f'{name}_s'] = time.monotonic() - start
    row[f'{name}_exit_code'] = proc.returncode
    log(f'  {name} run: exit code {proc.returncode}, '
        f'{row[f"{name}_s"]:.1f} s')
    if proc.returncode != (-signal.SIGKILL if pause else 0):
      with open(logs) as f:
        row['error'] = f'{name} run failed: ' + ' | '.join(
            (lines + f.read().splitlines())[-8:])
      row['passed'] = False
      return row
    if pause:
      row['checkpoints_at_kill'] = _committed(
          os.path.join(directory, workdir))
      row['logged_at_kill'] = read_metrics(
          os.path.join(directory, workdir))[-1]['step']
  whole = read_metrics(os.path.join(directory, 'whole'))
  resumed = read_metrics(os.path.join(directory, 'resumed'))
  row.update(loss_drop(whole))
  row['first_difference'] = first_difference(whole, resumed)
  row['resumed_bit_exact'] = row['first_difference'] is None
  row['passed'] = row['lowered'] and row['resumed_bit_exact']
  return row


class _PauseAfter(hooks.Hooks):
  """Pauses the run after `step`, once its checkpoints are committed."""

  def __init__(self, step: int):
    self.step = step

  def saved(self, step: int, ckpt) -> None:
    if step == self.step:
      ckpt.wait()
      print(PAUSED.format(step), flush=True)
      time.sleep(3600)  # until the SIGKILL


def main(argv=None) -> int:
  """The trainer's command line (poet_jax.train.cli) from argv = [--pause_after=N,
  *TRAIN_ARGS], paused after step N (0: not)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  pause = int(argv.pop(0).split('=', 1)[1])
  if pause:
    hooks.current = _PauseAfter(pause)
  from poet_jax.train import cli  # pylint: disable=g-import-not-at-top
  return cli.main(['poet-jax-train'] + argv)

