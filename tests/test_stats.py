"""Effects, intervals and rules: checked against formulas written out here, not against scipy's helpers alone."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from legointerp.stats import Effect, Rule, difference, half_width, mean, seeds_needed, share


def test_difference_is_welchs_interval_written_out():
    a, b = [0.61, 0.70, 0.46, 0.66, 0.58, 0.52], [0.49, 0.49, 0.50, 0.48, 0.51, 0.50]
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    half = scipy_stats.t.ppf(0.975, dof) * math.sqrt(va + vb)
    effect = difference(a, b)
    assert effect.estimate == pytest.approx(np.mean(a) - np.mean(b))
    assert (effect.low, effect.high) == pytest.approx((effect.estimate - half, effect.estimate + half))
    assert effect.n == (6, 6)


def test_constant_samples_give_a_point_and_too_few_values_are_refused():
    assert difference([1.0, 1.0], [0.5, 0.5]) == Effect(0.5, 0.5, 0.5, (2, 2), "Welch t")
    with pytest.raises(ValueError, match="2 or more"):
        difference([1.0], [0.5, 0.6])
    assert mean([2.0, 2.0, 2.0]).low == 2.0


def test_share_is_the_exact_binomial_interval():
    effect = share(6, 6)
    assert effect.estimate == 1.0 and effect.high == 1.0
    assert effect.low == pytest.approx(0.025 ** (1 / 6))  # Clopper-Pearson at k = n: (alpha / 2) ** (1 / n)


@pytest.mark.parametrize("low, high, decision", [
    (0.05, 0.20, "holds"), (0.01, 0.08, "smaller"), (-0.05, 0.08, "fails"), (-0.05, 0.15, "undecided"),
])
def test_rule_decides_from_the_interval_alone(low, high, decision):
    assert Rule(0.1).decide(Effect((low + high) / 2, low, high, (6, 6), "test")) == decision


def test_rule_text_carries_its_parameters():
    text = Rule(0.3, null=0.5, unit="of runs").text()
    assert "above 0.5 of runs" in text and "reaches 0.8 of runs" in text


@pytest.mark.parametrize("sd, margin", [(0.062, 0.1), (0.1, 0.05), (0.02, 0.1)])
def test_seeds_needed_is_the_fewest_with_a_half_width_below_the_margin(sd, margin):
    n = seeds_needed(sd, margin)
    assert half_width(sd, n) < margin and (n == 2 or half_width(sd, n - 1) >= margin)
