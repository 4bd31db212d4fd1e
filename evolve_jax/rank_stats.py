"""Rank agreement between two scorings of the same items, with bootstrap confidence intervals.

Used where a cheap stage is judged by how well it orders candidates the way a costly stage does:
the run report and ``benchmarks/proxy_fidelity.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import scipy.stats

# Below this many items a rank correlation says little whatever its value: with 5 items, two
# unrelated scorings still give Spearman values from about -0.2 to 0.9 (REFERENCE section 10).
MIN_MEANINGFUL = 10
# Below this many items resamples are mostly ties or repeats, and a bootstrap CI means nothing.
MIN_FOR_CI = 5


@dataclasses.dataclass(frozen=True)
class Agreement:
    """A rank correlation, its bootstrap 95% CI (NaN when undefined) and the number of items."""

    value: float
    low: float
    high: float
    n: int

    def text(self) -> str:
        if self.n < 3 or not math.isfinite(self.value):
            return f"undefined over {self.n} nodes"
        if math.isfinite(self.low):
            ci = f"95% CI [{self.low:+.2f}, {self.high:+.2f}]"
        else:
            ci = f"no CI below {MIN_FOR_CI} nodes" if self.n < MIN_FOR_CI else "no CI"
        line = f"{self.value:+.3f} ({ci}) over {self.n} nodes"
        if self.n < MIN_MEANINGFUL:
            line += f": too few nodes for it to mean anything (fewer than {MIN_MEANINGFUL})"
        return line


def _statistic(kind: str, x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan  # a constant scoring has no ranks to compare
    if kind == "spearman":
        return float(scipy.stats.spearmanr(x, y).statistic)
    if kind == "kendall":
        return float(scipy.stats.kendalltau(x, y).statistic)
    raise ValueError(f"unknown rank correlation {kind!r} (spearman, kendall)")


def spearman_rows(x_RN: np.ndarray, y_RN: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair at once (Pearson's r of average ranks, as
    ``scipy.stats.spearmanr``); NaN for a row that is constant in x or y."""
    rx, ry = (scipy.stats.rankdata(a, axis=1) for a in (x_RN, y_RN))
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    norm = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (rx * ry).sum(axis=1) / norm, math.nan)


def agreement(
    x: Sequence[float],
    y: Sequence[float],
    kind: str = "spearman",
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> Agreement:
    """Rank correlation of paired scores ``x``, ``y`` with a percentile bootstrap over items.

    Items are resampled with replacement; resamples whose ranks are undefined (all ties) are
    dropped. Fewer than 3 items give NaN throughout; fewer than ``MIN_FOR_CI``, no CI.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(
            f"paired scores must be two 1-D arrays of one length: {x.shape}, {y.shape}"
        )
    n = len(x)
    if n < 3:
        return Agreement(math.nan, math.nan, math.nan, n)
    value = _statistic(kind, x, y)
    if n < MIN_FOR_CI:
        return Agreement(value, math.nan, math.nan, n)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    if kind == "spearman":  # every resample in one vectorised pass (the report's hot spot)
        boot = spearman_rows(x[draws], y[draws])
    else:
        boot = np.array([_statistic(kind, x[d], y[d]) for d in draws])
    boot = boot[np.isfinite(boot)]
    if len(boot) < resamples // 2:
        return Agreement(value, math.nan, math.nan, n)
    low, high = np.percentile(boot, [2.5, 97.5])
    return Agreement(value, float(low), float(high), n)
