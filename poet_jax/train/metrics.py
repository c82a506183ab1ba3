"""metrics.jsonl (and TensorBoard events) and the POET diagnostics logged."""
import fnmatch
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from poet_jax import layers
from poet_jax import merge
from poet_jax import orthogonal
from poet_jax import spo
from poet_jax.layers import BLOCK_NAMES
from poet_jax.poetize import DEFAULT_EXCLUDE


def perplexity(loss: float) -> float:
  """exp(loss) (nats/token), capped at exp(700), float64's range, so that a
  diverged run's metrics stay finite JSON."""
  return math.exp(min(loss, 700))


def perplexity_text(ppl: float) -> str:
  """A perplexity for a printed line or a legend: two decimals, or three
  significant digits past 1e6 (exp(700) would print 305 digits)."""
  return f'{ppl:.2f}' if ppl < 1e6 else f'{ppl:.3g}'


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


def _q_norms(generators, path) -> list:
  """||Q||_F = sqrt(2)||u|| of each block of the layer at `path`, per side:
  [(..., k_in), (..., k_out)], from reparameterize's generator tree."""
  for key in path:
    generators = generators[key]
  return [jnp.sqrt(2.0) * jnp.linalg.norm(generators[name], axis=-1)
          for name in BLOCK_NAMES]


def poet_diagnostics(model: nnx.Module, generators) -> dict:
  """Largest orthogonality error and generator norm over all POET layers,
  and, for the first one, the largest relative change of its singular values
  against W0 (zero up to the orthogonality error, by construction).

  `generators`: the generator tree of the model's optimizer
  (`poet_jax.reparameterize`'s state, ReparameterizeState.generators).
  """
  layers = merge.poet_layers(model)
  if not layers:
    return {}
  orth, qnorm = [], []
  for path, layer in layers:
    for g in layer.orthogonal_blocks():
      orth.append(orthogonal.orthogonality_error(g).max())
    qnorm += [q.max() for q in _q_norms(generators, path)]
  first = layers[0][1]
  first_of_stack = lambda w: w.reshape((-1,) + w.shape[-2:])[0]
  w = first_of_stack(first.effective_weight())
  w0 = first_of_stack(first.base_weight())
  s = jnp.linalg.svd(w, compute_uv=False)
  s0 = jnp.linalg.svd(w0, compute_uv=False)
  return {'orth_error_max': jnp.max(jnp.stack(orth)),
          'q_norm_max': jnp.max(jnp.stack(qnorm)),
          'sv_rel_change_max': jnp.max(jnp.abs(s - s0) / s0.max())}


# Thresholds of the warnings (docs/reliability.md). The Cayley–Neumann
# series converges while ||Q||_2 < 1; ||Q||_F bounds ||Q||_2. Under the
# default guard ||Q||_F <= 0.9 the 3-term series' orthogonality error is at
# most sqrt(2/b) (1 - (1 - s^4)^2) with s = 0.9/sqrt(2) (all of the norm in
# one rotation plane): 0.21 at b = 4, 0.15 at b = 8, 0.075 at b = 32
# (measured: 0.127 and 0.058). Above 0.25 no block of 4 or more is in range.
Q_NORM_LIMIT = 1.0
ORTH_ERROR_LIMIT = 0.25


def poet_layer_names(model: nnx.Module) -> list[str]:
  """One name per POET layer, in poet_layer_health's order: the module
  path, with the index in a stack of layers ('blocks.mlp.up[3]')."""
  names = []
  for path, layer in merge.poet_layers(model):
    lead = layer.in_blocks.get_value().shape[:-3]
    base = '.'.join(map(str, path))
    names += ([f'{base}[{i}]' for i in range(int(np.prod(lead)))] if lead
              else [base])
  return names


def poet_layer_health(model: nnx.Module, generators) -> dict:
  """Per POET layer (poet_layer_names' order), the largest ||Q||_F and the
  largest orthogonality error of its blocks: {'q_norm', 'orth_error'},
  each (num_layers,) float32. `generators` as for poet_diagnostics.
  Jittable."""
  q_norm, orth = [], []
  for path, layer in merge.poet_layers(model):
    lead = layer.in_blocks.get_value().shape[:-3]
    per_layer = lambda x: x.reshape(lead + (-1,)).max(-1).reshape(-1)
    q_norm.append(jnp.maximum(*[
        per_layer(q) for q in _q_norms(generators, path)]))
    orth.append(jnp.maximum(*[
        per_layer(orthogonal.orthogonality_error(g))
        for g in layer.orthogonal_blocks()]))
  return {'q_norm': jnp.concatenate(q_norm),
          'orth_error': jnp.concatenate(orth)}


def numerical_warnings(step: int, names: list[str], health: dict,
                       warned: set) -> list[str]:
  """Warnings for blocks past Q_NORM_LIMIT or ORTH_ERROR_LIMIT, each kind
  once (kinds already in `warned` are skipped; new ones are added)."""
  kinds = {
      'q_norm': (Q_NORM_LIMIT, '||Q||_F', 'passed 1, beyond which the '
                 'Cayley-Neumann series may diverge'),
      'orth_error': (ORTH_ERROR_LIMIT, 'orthogonality error',
                     f'passed {ORTH_ERROR_LIMIT}: R and P are no longer '
                     "orthogonal and the weights' spectrum drifts from W0's"),
  }
  out = []
  for key, (limit, what, why) in kinds.items():
    values = np.asarray(health[key], np.float64)
    bad = np.flatnonzero(~(values <= limit))  # NaN counts as bad
    if key in warned or not bad.size:
      continue
    warned.add(key)
    worst = bad[np.argmax(np.nan_to_num(values[bad], nan=np.inf))]
    out.append(
        f'warning: at step {step} a block of {names[worst]} has {what} '
        f'{values[worst]:.3g} ({bad.size} layer(s) past {limit}); it {why}. '
        'Lower poet.lr, or keep poet.max_q_norm below 1 (default 0.9); see '
        'docs/reliability.md (warned once)')
  return out


# ------------------------------------------- the papers' weight diagnostics
# Spec section 10; logged at evaluation steps (steps.weight_diagnostics).


def svd_entropy(w: jax.Array) -> jax.Array:
  """Normalized SVD entropy of (..., m, n) matrices: (...,) float32.

  With p_i = s_i^2 / sum_j s_j^2 over the r = min(m, n) singular values,
  -sum_i p_i log p_i / log r (Alter, Brown & Botstein 2000): 1 when every
  singular value is equal, 0 for rank one. Invariant to scale and to
  orthogonal factors on either side, so POET keeps W0's (spec section 1).
  """
  s = jnp.linalg.svd(w.astype(jnp.float32), compute_uv=False)
  p = s * s / jnp.sum(s * s, axis=-1, keepdims=True)
  plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
  return -jnp.sum(plogp, axis=-1) / jnp.log(float(s.shape[-1]))


def hyperspherical_energy(kernel: jax.Array) -> jax.Array:
  """Hyperspherical energy of a layer's neurons: (..., in, out) -> (...,).

  The neurons are the kernel's columns (each output unit's input weights),
  normalized to unit length; the energy is the mean over pairs i != j of
  1 / ||w_i - w_j|| (Liu et al. 2018, power s = 1), about 1/sqrt(2) for
  random directions in many dimensions, larger when neurons crowd. An
  orthogonal map on the input side (POET's P) leaves it unchanged; one on
  the output side (R) mixes the neurons and changes it.
  """
  w = kernel.astype(jnp.float32)
  w = w / jnp.maximum(jnp.linalg.norm(w, axis=-2, keepdims=True), 1e-30)
  cos = jnp.swapaxes(w, -1, -2) @ w
  n = cos.shape[-1]
  dist = jnp.sqrt(jnp.maximum(2.0 - 2.0 * cos, 1e-12))
  off = 1.0 - jnp.eye(n, dtype=jnp.float32)
  return jnp.sum(off / dist, axis=(-2, -1)) / (n * (n - 1))


def vector_probe(blocks: jax.Array, gather: jax.Array, v: jax.Array,
                 variant: str = 'block') -> jax.Array:
  """v^T G v of one side's orthogonal matrix G for a unit vector v: ().

  blocks: that side's (k, b, b) blocks as a POETLinear holds them; v (n,)
  in the layer's coordinates; gather: the indices that take v to the
  blocks' frame, u = v[gather]: for variant 'block' the input side's
  in_place and the inverse of the output side's out_place (spo's frames),
  for 'full' the side's index set (b,). 1 while G = I; the cosine between v
  and G v (the papers' vector probing, spec section 10). G is the rotation
  since the last merge: earlier ones are folded into W0.
  """
  u = v[gather]
  if variant == 'full':
    return v @ v + u @ (blocks[0] - jnp.eye(u.shape[0], dtype=u.dtype)) @ u
  u = u.reshape(blocks.shape[0], 1, -1)
  return jnp.sum(u @ blocks.astype(v.dtype) @ jnp.swapaxes(u, -1, -2))


def reparameterized_layers(model: nnx.Module) -> list:
  """(path, layer) of the layers POET trains: every POETLinear, else every
  nnx.Linear that poetize selects by default (the embedding and head
  stay dense), in graph order."""
  poet = merge.poet_layers(model)
  if poet:
    return poet
  return [(path, node) for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Linear) and not any(
              fnmatch.fnmatch('.'.join(map(str, path)), p)
              for p in DEFAULT_EXCLUDE)]


def _one_layer(layer, index: jax.Array, key: jax.Array) -> dict:
  """The diagnostics of one (unstacked) layer; see weight_diagnostics."""
  poet = isinstance(layer, layers.POETLinear)
  w = layer.effective_weight() if poet else layer.kernel[...]
  out = {'svd_entropy': svd_entropy(w),
         'hyperspherical_energy': hyperspherical_energy(w)}
  if not poet:
    return out
  g_in, g_out = layer.orthogonal_blocks()
  out_gather = layer.out_place[...]
  if layer.variant == 'block':
    out_gather = spo.inverse_permutation(out_gather)
  sides = (('vector_probe_p', g_in, layer.in_place[...], layer.in_features),
           ('vector_probe_r', g_out, out_gather, layer.out_features))
  keys = jax.random.split(jax.random.fold_in(key, index))
  for side_key, (name, blocks, place, size) in zip(keys, sides):
    v = jax.random.normal(side_key, (size,), jnp.float32)
    out[name] = vector_probe(blocks, place, v / jnp.linalg.norm(v),
                             layer.variant)
  return out


def _lead(layer) -> int:
  """Number of stacking axes in front of a layer's 2-D kernel."""
  if isinstance(layer, layers.POETLinear):
    return layer.w0.get_value().ndim - 2
  return layer.kernel.get_value().ndim - 2


def weight_diagnostics(model: nnx.Module, seed: int = 0) -> dict:
  """The papers' diagnostics of the trained weights (spec section 10), each
  the mean over every layer of reparameterized_layers (every layer of a
  stack counts): 'svd_entropy' and 'hyperspherical_energy' of the effective
  kernel (dense models too) and, for POET, 'vector_probe_r' and
  'vector_probe_p': v^T R v and v^T P v for a fixed random unit v per layer
  and side (drawn from `seed`, the same at every call). float32 scalars;
  jittable. A stack is taken one layer at a time (lax.map), so that one
  layer's dense kernel exists at a time.
  """
  per_layer = []
  for number, (_, layer) in enumerate(reparameterized_layers(model)):
    graphdef, state = nnx.split(layer)
    lead = _lead(layer)
    key = jax.random.fold_in(jax.random.key(seed), number)
    if not lead:
      per_layer.append(jax.tree.map(
          lambda x: x[None], _one_layer(layer, jnp.int32(0), key)))
      continue
    flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[lead:]), state)
    size = jax.tree.leaves(flat)[0].shape[0]
    per_layer.append(jax.lax.map(
        lambda args: _one_layer(nnx.merge(graphdef, args[0]), args[1], key),
        (flat, jnp.arange(size, dtype=jnp.int32))))
  if not per_layer:
    return {}
  return {name: jnp.mean(jnp.concatenate([d[name] for d in per_layer]))
          for name in per_layer[0]}
