"""When a difference between two settings of the reproduction study is a
finding: the rule the page states, applied to per-seed figures.

A setting is run at several seeds (the seed sets the model's
initialization, the data order and POET's permutations). For the papers'
claim that setting A gives a lower figure than setting B, with means m_A,
m_B and sample standard deviations s_A, s_B over the seeds:

  reproduced                 m_B - m_A >  max(s_A, s_B)
  not reproduced             m_A - m_B >  max(s_A, s_B)  (the opposite)
  not separable from noise   |m_A - m_B| <= max(s_A, s_B)

For a claim that A and B are close, it is reproduced when
|m_A - m_B| <= max(s_A, s_B) and not reproduced otherwise (a closeness the
noise hides is not told apart from one that holds). For a claim that A lies
in the papers' range [low, high], it is reproduced when [m_A - s_A,
m_A + s_A] meets the range and not reproduced otherwise.
"""
import dataclasses
import math

REPRODUCED = 'reproduced'
OPPOSITE = 'not reproduced'
NOISE = 'not separable from noise at this size'

RULE = ('A difference is called a finding only where the difference of the '
        'means exceeds the spread: the larger of the two sample standard '
        'deviations over seeds. For a claim that A is lower than B, '
        '**reproduced** means mean(B) − mean(A) > spread, **not reproduced** '
        'means mean(A) − mean(B) > spread (the opposite holds), and '
        '**not separable from noise at this size** means |mean(A) − '
        'mean(B)| ≤ spread. For a claim that A and B are close, it is '
        'reproduced when |mean(A) − mean(B)| ≤ spread and not reproduced '
        'otherwise (weak evidence: a wide spread makes any two settings '
        'close); for a claim that A lies in a range, it is reproduced '
        'when mean(A) ± std(A) meets the range. Runs that share a seed '
        'share their batches, so the '
        'per-seed ratios are shown as well, but the rule uses the means and '
        'spreads alone.')


def mean_std(values) -> tuple[float, float]:
  """(mean, sample standard deviation with n - 1; 0 for one value)."""
  values = [float(v) for v in values]
  if not values:
    raise ValueError('mean_std of no values')
  mean = sum(values) / len(values)
  if len(values) == 1:
    return mean, 0.0
  var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
  return mean, math.sqrt(var)


def fmt(values, spec: str = '.3f') -> str:
  """'mean ± std' of per-seed values, e.g. '8.873 ± 0.278' (spec: the
  format of each number)."""
  mean, std = mean_std(values)
  if not math.isfinite(mean):
    return 'inf'
  return f'{mean:{spec}} ± {std:{spec}}'


@dataclasses.dataclass
class Claim:
  """One of the papers' findings as a comparison of per-seed values.

  finding: the claim in words ('POET-BS below AdamW'); paper: the papers'
  figures; a, b: per-seed values of the two settings (lower: the claim is
  a < b; close: a ~ b; within: b is the range (low, high), not values);
  names: labels of a and b.
  """
  finding: str
  paper: str
  a: list
  b: list
  names: tuple
  kind: str = 'lower'
  spec: str = '.3f'  # format of the page's numbers

  def verdict(self) -> str:
    if self.kind == 'within':
      m, s = mean_std(self.a)
      low, high = self.b
      return REPRODUCED if m - s <= high and m + s >= low else OPPOSITE
    (ma, sa), (mb, sb) = mean_std(self.a), mean_std(self.b)
    if not (math.isfinite(ma) and math.isfinite(mb)):
      # A diverged setting is worse than any finite one.
      d = (math.inf if math.isfinite(ma) else -math.inf) if ma != mb else 0.0
      spread = 0.0
    else:
      d, spread = mb - ma, max(sa, sb)
    if self.kind == 'close':
      return REPRODUCED if abs(d) <= spread else OPPOSITE
    if d > spread:
      return REPRODUCED
    return OPPOSITE if -d > spread else NOISE

  def row(self) -> tuple:
    """(finding, papers, here: 'A: m ± s vs B: m ± s', verdict)."""
    here = f'{self.names[0]}: {fmt(self.a, self.spec)}'
    if self.kind != 'within':
      here += f' vs {self.names[1]}: {fmt(self.b, self.spec)}'
    return (self.finding, self.paper, here, f'**{self.verdict()}**')
