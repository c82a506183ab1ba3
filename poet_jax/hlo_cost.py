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
"""
import dataclasses
import json
import re

from jax._src import xla_bridge
from jax._src.lib import _jax
from jaxlib import _hlo

_COMPUTATION = re.compile(r'^(ENTRY )?%([^\s(]+) \(', re.M)
_WHILE = re.compile(r'\swhile\(.*?body=%([^\s,]+).*?(backend_config=(\{.*\}))?$')


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


def _bodies(text: str) -> dict[str, list[tuple[str, int]]]:
  """{computation: [(loop body, trip count), ...]} of the loops each
  computation runs directly."""
  loops, current = {}, None
  for line in text.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      current = head.group(2)
      loops[current] = []
      continue
    found = _WHILE.search(line) if ' while(' in line else None
    if found and current is not None:
      config = json.loads(found.group(3)) if found.group(3) else {}
      trips = int(config.get('known_trip_count', {}).get('n', 0))
      loops[current].append((found.group(1), trips))
  return loops


def _entry_name(text: str) -> str:
  return next(m.group(2) for m in _COMPUTATION.finditer(text) if m.group(1))


def module_cost(text: str) -> Cost:
  """Cost of one run of the HLO module `text` (the compiled module's
  as_text()), loops counted by their trip counts."""
  cpu = xla_bridge.get_backend('cpu')
  loops = _bodies(text)
  analysed = {}

  def analysis(name):
    if name not in analysed:
      module = _hlo.hlo_module_from_text(_as_entry(text, name))
      found = _jax.hlo_module_cost_analysis(cpu, module)
      analysed[name] = (found.get('flops', 0.0),
                        found.get('bytes accessed', 0.0))
    return analysed[name]

  def full(name):
    # analysis(name) holds each loop body once; each body runs `trips`
    # times, with its own loops unrolled in turn.
    flops, bytes_ = analysis(name)
    for body, trips in loops.get(name, []):
      once, whole = analysis(body), full(body)
      flops += trips * whole[0] - once[0]
      bytes_ += trips * whole[1] - once[1]
    return flops, bytes_

  return Cost(*full(_entry_name(text)))


def step_cost(compiled) -> Cost:
  """module_cost of a compiled (jax.stages.Compiled) program."""
  return module_cost(compiled.as_text())
