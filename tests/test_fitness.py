import math

import pytest

from evolve_jax.fitness import Fitness, paired_difference, sigmoid_normalise
from evolve_jax.search_space import Metric


def test_sigmoid_normalise_centres_on_baseline_and_respects_direction():
    assert sigmoid_normalise(2.0, 2.0, "max") == pytest.approx(0.5)
    assert sigmoid_normalise(2.2, 2.0, "max") == pytest.approx(1 / (1 + math.exp(-6)))
    assert sigmoid_normalise(2.2, 2.0, "min") == pytest.approx(1 / (1 + math.exp(6)))
    # Clipped at 10% of the baseline either way.
    assert sigmoid_normalise(100.0, 2.0, "max") == sigmoid_normalise(2.2, 2.0, "max")


def test_paired_difference_is_signed_better_is_positive():
    stats = paired_difference([1.0, 2.0, 3.0], [2.0, 3.0, 4.5], "min")
    assert stats["mean_diff"] == pytest.approx(7 / 6)
    low, high = stats["ci95"]
    assert low < stats["mean_diff"] < high and stats["n"] == 3


@pytest.mark.parametrize("direction", ["max", "min"])
def test_nan_and_missing_metrics_score_worst_for_direction(direction):
    fitness = Fitness((Metric("m", direction),))
    worst = -math.inf if direction == "max" else math.inf
    assert fitness.score({0: {"m": float("nan")}})[0] == worst
    assert fitness.score({0: {}})[0] == worst
    assert fitness.score({})[0] == worst
    assert fitness.score({0: {"m": 0.0}})[0] == 0.0  # a real 0 is a real score


def test_raw_score_is_seed_mean_of_primary_metric():
    fitness = Fitness((Metric("loss", "min"),))
    assert fitness.direction == "min"
    assert fitness.score({0: {"loss": 1.0}, 1: {"loss": 3.0}})[0] == 2.0


def test_normalised_score_is_higher_is_better_with_paired_stats():
    metrics = (Metric("loss", "min"), Metric("acc", "max"))
    base = {0: {"loss": 2.0, "acc": 0.5}, 1: {"loss": 2.2, "acc": 0.6}}
    fitness = Fitness(metrics, baseline=base)
    assert fitness.direction == "max"
    assert fitness.score(base)[0] == pytest.approx(0.5)
    better, stats = fitness.score({0: {"loss": 1.9, "acc": 0.6}, 1: {"loss": 2.0, "acc": 0.7}})
    assert better > 0.5
    assert stats["vs_baseline"]["loss"]["mean_diff"] == pytest.approx(0.15)
    assert stats["vs_baseline"]["acc"]["n"] == 2
    worse, _ = fitness.score({0: {"loss": 3.0, "acc": 0.1}, 1: {"loss": 3.0, "acc": 0.1}})
    assert worse < 0.5
