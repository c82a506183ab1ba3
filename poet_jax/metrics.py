"""metrics.jsonl (and TensorBoard events), POET diagnostics, the loss plot."""
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from poet_jax import merge
from poet_jax import orthogonal


class MetricsLog:
  """Append-only JSON lines, one object per logged step.

  Opened for a run that resumes from the checkpoint of `resume_step`, it
  first drops the entries of later steps (written after that checkpoint, by
  a run that was then killed) and a line cut by the kill; opened for a fresh
  start (resume_step 0: there is no checkpoint of step 0) it drops them all,
  step 0's evaluation included. Either way the file ends with no duplicated
  and no missing steps. The rewrite is atomic (a temporary file renamed).
  Each entry is flushed as it is written. A failed write raises OSError with
  the file's path.

  With tensorboard_dir, every entry is also written there as TensorBoard
  scalars (tensorboardX), one tag per key, at its step; events of steps
  after resume_step, left by a killed run, are purged the same way.
  """

  def __init__(self, path: str, resume_step: int = 0,
               tensorboard_dir: str | None = None):
    self.path = path
    self._tensorboard = None
    if tensorboard_dir:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      # TensorBoard hides the events at and after purge_step written
      # before this point: those the checkpoint does not cover.
      # File names hold the time in seconds: the suffix keeps a restart
      # within the same second from overwriting the earlier file.
      self._tensorboard = SummaryWriter(
          tensorboard_dir, purge_step=resume_step + 1 if resume_step else 0,
          filename_suffix=f'.{os.getpid()}.from{resume_step}')
    if os.path.exists(path):
      kept = [line for line in self.read(path)
              if resume_step and line.get('step', 0) <= resume_step]
      tmp = path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(json.dumps(e) + '\n' for e in kept)
      os.replace(tmp, path)
    self._file = open(path, 'a')

  def write(self, entry: dict) -> None:
    try:
      self._file.write(json.dumps(entry) + '\n')
      self._file.flush()
    except OSError as e:
      raise OSError(e.errno, e.strerror, self.path) from None
    if self._tensorboard is not None:
      for key, value in entry.items():
        if key != 'step' and isinstance(value, (int, float)):
          self._tensorboard.add_scalar(key, value, entry['step'])
      self._tensorboard.flush()

  def close(self) -> None:
    try:
      self._file.close()
      if self._tensorboard is not None:
        self._tensorboard.close()
    except OSError:
      pass  # a write already failed and was reported

  @staticmethod
  def read(path: str) -> list[dict]:
    entries = []
    with open(path) as f:
      for line in f:
        line = line.strip()
        if line:
          try:
            entries.append(json.loads(line))
          except json.JSONDecodeError:
            break  # a line cut by a crash: it and anything after are dropped
    return entries


def poet_diagnostics(model: nnx.Module) -> dict:
  """Largest orthogonality error and generator norm over all POET layers,
  and, for the first one, the largest relative change of its singular values
  against W0 (zero up to the orthogonality error, by construction)."""
  layers = merge.poet_layers(model)
  if not layers:
    return {}
  orth, qnorm = [], []
  for _, layer in layers:
    for g in layer.orthogonal_blocks():
      orth.append(orthogonal.orthogonality_error(g).max())
    for u in (layer.q_in[...], layer.q_out[...]):
      qnorm.append(jnp.sqrt(2.0) * jnp.linalg.norm(u, axis=-1).max())
  first = layers[0][1]
  first_of_stack = lambda w: w.reshape((-1,) + w.shape[-2:])[0]
  w = first_of_stack(first.effective_weight())
  w0 = first_of_stack(first.base_weight())
  s = jnp.linalg.svd(w, compute_uv=False)
  s0 = jnp.linalg.svd(w0, compute_uv=False)
  return {'orth_error_max': jnp.max(jnp.stack(orth)),
          'q_norm_max': jnp.max(jnp.stack(qnorm)),
          'sv_rel_change_max': jnp.max(jnp.abs(s - s0) / s0.max())}


def plot_losses(metrics_path: str, png_path: str) -> None:
  """The run's loss curves (poet_jax.plot.plot_run) from its work directory."""
  from poet_jax import plot  # pylint: disable=g-import-not-at-top
  plot.plot_run(os.path.dirname(metrics_path) or '.', png_path)
