"""Rank agreement with bootstrap CIs (evolve_jax.rank_stats)."""

import math

import numpy as np
import pytest
import scipy.stats

from evolve_jax import rank_stats


def test_value_is_scipys_and_the_ci_brackets_it():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(30)
    y = x + 0.8 * rng.standard_normal(30)
    for kind, fn in (("spearman", scipy.stats.spearmanr), ("kendall", scipy.stats.kendalltau)):
        a = rank_stats.agreement(x, y, kind)
        assert a.value == pytest.approx(fn(x, y).statistic)
        assert a.low < a.value < a.high and a.n == 30
        assert a.high - a.low < 0.8  # 30 items pin it down to a useful width


def test_rowwise_spearman_is_scipys_on_resamples_with_ties_and_constant_rows():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 4, size=(50, 9)).astype(float)  # ties everywhere, as in resamples
    y = x + rng.integers(0, 3, size=(50, 9))
    x[0] = 1.0  # a constant row has no ranks
    got = rank_stats.spearman_rows(x, y)
    want = [
        scipy.stats.spearmanr(a, b).statistic if np.ptp(a) and np.ptp(b) else math.nan
        for a, b in zip(x, y, strict=True)
    ]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert math.isnan(got[0])


def test_perfect_and_reversed_orders():
    x = np.arange(12.0)
    assert rank_stats.agreement(x, x**3).value == pytest.approx(1.0)
    assert rank_stats.agreement(x, -x).value == pytest.approx(-1.0)


def test_unrelated_scores_give_a_ci_that_spans_zero():
    rng = np.random.default_rng(1)
    a = rank_stats.agreement(rng.standard_normal(15), rng.standard_normal(15))
    assert a.low < 0 < a.high


def test_few_nodes_are_flagged_and_fewer_than_three_are_undefined():
    five = rank_stats.agreement([1, 2, 3, 4, 5], [2, 1, 3, 5, 4])
    assert "too few nodes" in five.text() and "over 5 nodes" in five.text()
    four = rank_stats.agreement([1, 2, 3, 4], [2, 1, 3, 4])
    assert math.isfinite(four.value) and math.isnan(four.low)
    assert "no CI below 5 nodes" in four.text()
    ten = rank_stats.agreement(np.arange(10), np.arange(10))
    assert "too few" not in ten.text()
    two = rank_stats.agreement([1, 2], [2, 1])
    assert math.isnan(two.value) and two.text() == "undefined over 2 nodes"


def test_constant_scores_have_no_rank_correlation():
    a = rank_stats.agreement([1.0] * 6, [1, 2, 3, 4, 5, 6])
    assert math.isnan(a.value) and "undefined" in a.text()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="paired scores"):
        rank_stats.agreement([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="unknown rank correlation"):
        rank_stats.agreement([1, 2, 3], [1, 2, 3], "pearson")
