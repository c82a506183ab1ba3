"""FLOPs and bytes of a compiled step, from XLA's HLO cost analysis.

`compiled.cost_analysis()` is None for executables compiled for
compile-only devices (a GPU target without the GPU), and XLA's HloCostAnalysis
counts a while loop's body once whatever its trip count: the layer scan
would count as one layer. `step_cost` runs that analysis on the optimized
module the compiler produced, then on each loop body as a module of its own,
and counts every body as many times as its loop runs (the trip count XLA
proved and wrote into the loop's backend config).

A loop whose trip count XLA cannot prove counts zero times. In the train
step that is the merge's (merge.merge_if_due), which runs once at a merging
step and not at all otherwise: the figures are those of a step that does
not merge, the step a run takes merge_every - 1 times in merge_every.

One correction to XLA's bytes: it counts an in-place dynamic-update-slice
(a scan writing one layer's slice of a stacked buffer: saved activations,
gradients) as writing the whole buffer, every layer; it writes the slice.
"""
import dataclasses
import json
import re

from jax._src import xla_bridge
from jax._src.lib import _jax
from jaxlib import _hlo

_COMPUTATION = re.compile(r'^(ENTRY )?%([^\s(]+) \(', re.M)
_WHILE = re.compile(r'\swhile\(.*?body=%([^\s,]+).*?(backend_config=(\{.*\}))?$')
_DEFINITION = re.compile(r'^\s*(?:ROOT )?%([^\s=]+) = (.*?) ([\w-]+)\((.*)$')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2,
          'u16': 2, 'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8,
          'u64': 8}


@dataclasses.dataclass(frozen=True)
class Cost:
  """What one execution of a program does, all loops unrolled.

  flops: floating-point operations (a multiply-add counts 2), every op.
  bytes_accessed: bytes read and written by its kernels (a fusion reads its
    operands and writes its output once), XLA's estimate of memory traffic.
  """
  flops: float
  bytes_accessed: float


def _as_entry(text: str, name: str) -> str:
  """The module text with computation `name` as its entry. The module's
  header goes: its entry layout and input/output aliases are the old
  entry's."""
  out = []
  for line in text.splitlines():
    if line.startswith('HloModule '):
      line = 'HloModule ' + line.split()[1].rstrip(',')
    if line.startswith('ENTRY '):
      line = line[len('ENTRY '):]
    if line.startswith(f'%{name} ('):
      line = 'ENTRY ' + line
    out.append(line)
  return '\n'.join(out)


def _computations(text: str) -> tuple[str, dict[str, list[str]]]:
  """(the entry's name, {computation: its instruction lines})."""
  entry, lines, current = None, {}, None
  for line in text.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      current = head.group(2)
      entry = current if head.group(1) else entry
      lines[current] = []
    elif current is not None and line.startswith('  '):
      lines[current].append(line)
  return entry, lines


def _loops(body_lines: list[str]) -> list[tuple[str, int]]:
  """[(loop body, trip count), ...] of the loops a computation runs."""
  loops = []
  for line in body_lines:
    found = _WHILE.search(line) if ' while(' in line else None
    if found:
      config = json.loads(found.group(3)) if found.group(3) else {}
      loops.append((found.group(1),
                    int(config.get('known_trip_count', {}).get('n', 0))))
  return loops


def _nbytes(shape: str) -> int:
  """Bytes of an HLO shape such as bf16[32,1024]{1,0} (a tuple: its parts)."""
  total = 0
  for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', shape):
    size = _BYTES.get(dtype, 0)
    for d in filter(None, dims.split(',')):
      size *= int(d)
    total += size
  return total


def _update_overcount(lines: list[str], computations) -> int:
  """Bytes XLA's analysis counts beyond what the in-place dynamic-update-
  slices among `lines` (or inside the fusions they call) write: each is
  counted as its whole output, where it writes its update."""
  shapes = {}
  over = 0
  for line in lines:
    found = _DEFINITION.match(line)
    if not found:
      continue
    name, shape, op, rest = found.groups()
    shapes[name] = shape
    if op == 'dynamic-update-slice':
      update = re.findall(r'%([^\s,)]+)', rest)[1]
      over += _nbytes(shape) - _nbytes(shapes.get(update, shape))
    elif op in ('fusion', 'fusion-start'):
      called = re.search(r'calls=%([^\s,]+)', rest)
      if called and called.group(1) in computations:
        over += _update_overcount(computations[called.group(1)], {})
  return over


def module_cost(text: str) -> Cost:
  """Cost of one run of the HLO module `text` (the compiled module's
  as_text()), loops counted by their trip counts."""
  cpu = xla_bridge.get_backend('cpu')
  entry, computations = _computations(text)
  analysed = {}

  def analysis(name):
    # XLA's analysis of a computation, each loop body in it counted once.
    if name not in analysed:
      module = _hlo.hlo_module_from_text(_as_entry(text, name))
      found = _jax.hlo_module_cost_analysis(cpu, module)
      analysed[name] = (found.get('flops', 0.0),
                        found.get('bytes accessed', 0.0))
    return analysed[name]

  def full(name):
    # The computation's own instructions, then each loop body times its
    # trip count, with the body's own loops unrolled in turn.
    loops = _loops(computations[name])
    flops, bytes_ = analysis(name)
    bytes_ -= _update_overcount(computations[name], computations)
    for body, trips in loops:
      once, whole = analysis(body), full(body)
      flops += trips * whole[0] - once[0]
      bytes_ += trips * whole[1] - once[1]
    return flops, bytes_

  return Cost(*full(entry))


def step_cost(compiled) -> Cost:
  """module_cost of a compiled (jax.stages.Compiled) program."""
  return module_cost(compiled.as_text())
