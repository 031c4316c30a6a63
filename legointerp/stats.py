"""Effects with 95% intervals, the decision a rule takes on them, and how many seeds a decision needs.

A replication compares arms over seeds.  Each comparison is an :class:`Effect` (an estimate and its interval: Welch's
t for a difference of means, Clopper-Pearson for a share of runs) and a :class:`Rule` decides it from the interval
alone, so the rule's text and its check read the same parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Effect:
    """An estimate with its ``CONFIDENCE`` interval; ``n``: the runs (or models) behind each side."""

    estimate: float
    low: float
    high: float
    n: tuple[int, ...]
    method: str

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.estimate:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def difference(a: list[float], b: list[float]) -> Effect:
    """mean(a) - mean(b) with Welch's interval (no equal-variance assumption).  Two constant samples (every seed at
    1.00, say) have no spread to estimate: their interval is the point."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a difference of means needs 2 or more values a side, got {len(a)} and {len(b)}")
    estimate = float(a.mean() - b.mean())
    if a.std() == 0 and b.std() == 0:
        return Effect(estimate, estimate, estimate, (len(a), len(b)), "Welch t")
    interval = stats.ttest_ind(a, b, equal_var=False).confidence_interval(CONFIDENCE)
    return Effect(estimate, float(interval.low), float(interval.high), (len(a), len(b)), "Welch t")


def mean(values: list[float]) -> Effect:
    """The mean with Student's t interval."""
    values = np.asarray(values, float)
    if len(values) < 2:
        raise ValueError(f"a mean's interval needs 2 or more values, got {len(values)}")
    estimate = float(values.mean())
    if values.std() == 0:
        return Effect(estimate, estimate, estimate, (len(values),), "Student t")
    interval = stats.ttest_1samp(values, 0.0).confidence_interval(CONFIDENCE)
    return Effect(estimate, float(interval.low), float(interval.high), (len(values),), "Student t")


def share(hits: int, total: int) -> Effect:
    """The share ``hits / total`` with its exact (Clopper-Pearson) interval."""
    interval = stats.binomtest(hits, total).proportion_ci(CONFIDENCE)
    return Effect(hits / total, float(interval.low), float(interval.high), (total,), "Clopper-Pearson")


@dataclass(frozen=True)
class Rule:
    """Decides one comparison from its interval.  ``null``: the effect when the paper is wrong; ``margin``: the
    smallest effect the claim means, above ``null``.

    holds: the interval lies above ``null`` and reaches ``null + margin`` (a real effect, as large as claimed or
    possibly so); smaller: above ``null`` but below ``null + margin`` (real, smaller than claimed); fails: not above
    ``null`` and below ``null + margin`` (no effect of the claimed size); undecided: the interval covers both (too
    few seeds for the spread)."""

    margin: float
    null: float = 0.0
    unit: str = ""

    def decide(self, effect: Effect) -> str:
        above, reaches = effect.low > self.null, effect.high >= self.null + self.margin
        return {(True, True): "holds", (True, False): "smaller", (False, False): "fails",
                (False, True): "undecided"}[above, reaches]

    def text(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return (f"holds when the {CONFIDENCE:.0%} interval lies above {self.null:g}{unit} and reaches "
                f"{self.null + self.margin:g}{unit}; fails when it lies below {self.null + self.margin:g}{unit} "
                f"without excluding {self.null:g}")


def half_width(sd: float, seeds: int) -> float:
    """The 95% half-width of a difference of two arms' means, ``seeds`` runs each, the larger arm's spread ``sd``.
    Conservative: Welch's degrees of freedom fall to seeds - 1 when one arm barely varies (a model stuck at chance),
    which is the case at hand, so t is taken there."""
    return float(stats.t.ppf((1 + CONFIDENCE) / 2, seeds - 1) * sd * np.sqrt(2 / seeds))


def seeds_needed(sd: float, margin: float, most: int = 100) -> int:
    """The fewest seeds per arm whose interval's half-width is below ``margin`` for spread ``sd``."""
    return next((n for n in range(2, most + 1) if half_width(sd, n) < margin), most)
