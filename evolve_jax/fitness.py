"""Fitness: metrics normalised against a baseline (ASI-Arch), with paired multi-seed statistics.

Per metric, ``s(x) = sigmoid(6 * clip(d / (0.1 * |x_base|), -1, 1))`` where ``d`` is the
improvement over the baseline in the metric's direction, so 0.5 means "as good as the baseline"
and the score is higher-is-better whatever each metric's direction. Without a baseline the
score is the primary metric itself, in its own direction. A failure, or any non-finite metric,
scores the worst value for the score's direction.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats

from evolve_jax.search_space import Metric

MetricsBySeed = Mapping[int | str, Mapping[str, float | None]]


def sigmoid_normalise(x: float, base: float, direction: str) -> float:
    """Maps ``x`` to (0, 1) around the baseline: 0.5 equal, ~1 at 10% better, ~0 at 10% worse."""
    scale = 0.1 * abs(base) if base != 0 else 0.1
    gain = (x - base) if direction == "max" else (base - x)
    return float(1.0 / (1.0 + math.exp(-6.0 * float(np.clip(gain / scale, -1.0, 1.0)))))


def paired_difference(
    candidate: Sequence[float], baseline: Sequence[float], direction: str
) -> dict[str, Any]:
    """Mean improvement over the baseline on paired seeds, with a 95% t confidence interval."""
    sign = 1.0 if direction == "max" else -1.0
    diffs = sign * (np.asarray(candidate, float) - np.asarray(baseline, float))
    n = int(diffs.size)
    mean = float(diffs.mean()) if n else math.nan
    if n < 2:
        return {"mean_diff": mean, "ci95": [math.nan, math.nan], "n": n}
    half = float(scipy.stats.t.ppf(0.975, n - 1) * diffs.std(ddof=1) / math.sqrt(n))
    return {"mean_diff": mean, "ci95": [mean - half, mean + half], "n": n}


def _is_finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclasses.dataclass(frozen=True)
class Fitness:
    """Turns per-seed metrics into one score; see the module docstring."""

    metrics: tuple[Metric, ...]
    baseline: MetricsBySeed | None = None

    @property
    def direction(self) -> str:
        return "max" if self.baseline is not None else self.metrics[0].direction

    @property
    def worst(self) -> float:
        return -math.inf if self.direction == "max" else math.inf

    def score(self, by_seed: MetricsBySeed) -> tuple[float, dict[str, Any]]:
        """Returns ``(score, stats)``; stats holds per-metric means and paired comparisons."""
        seeds = sorted(by_seed, key=str)
        if not seeds:
            return self.worst, {"error": "no metrics"}
        means: dict[str, float] = {}
        for m in self.metrics:
            values = [by_seed[s].get(m.name) for s in seeds]
            if not all(_is_finite(v) for v in values):
                return self.worst, {"error": f"non-finite or missing metric {m.name!r}"}
            means[m.name] = float(np.mean(values))
        stats: dict[str, Any] = {"mean": means}
        if self.baseline is None:
            return means[self.metrics[0].name], stats

        parts, weights, paired = [], [], {}
        base_by_str = {str(b): v for b, v in self.baseline.items()}
        base_seeds = [s for s in seeds if str(s) in base_by_str]  # paired: seeds both ran
        for m in self.metrics:
            base_values = [base_by_str[str(s)][m.name] for s in base_seeds]
            if not base_values or not all(_is_finite(v) for v in base_values):
                return self.worst, {"error": f"baseline has no finite {m.name!r}"}
            parts.append(sigmoid_normalise(means[m.name], float(np.mean(base_values)), m.direction))
            weights.append(m.weight)
            paired[m.name] = paired_difference(
                [by_seed[s][m.name] for s in base_seeds], base_values, m.direction
            )
        stats["vs_baseline"] = paired
        return float(np.average(parts, weights=weights)), stats
