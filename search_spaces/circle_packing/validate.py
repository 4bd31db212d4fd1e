"""The harness's strict check of a circle packing in the unit square, whatever produced it.

Rules (float64, numpy; ``tol`` >= 0, 1e-9 by default):
- ``centers`` is an (n, 2) array and ``radii`` an (n,) array of real numbers (bool, complex,
  object and ragged inputs are refused); every value is finite;
- every radius is strictly positive: zero is refused as well as negative, since a circle of
  radius 0 is a point and would let a packing hold fewer than n circles;
- no circle crosses a wall by more than ``tol``: x - r >= -tol, x + r <= 1 + tol, same for y;
- no two circles overlap by more than ``tol``: d_ij >= r_i + r_j - tol, d_ij = hypot(dx, dy).

The sum of radii is recomputed here from the radii (``math.fsum``); nothing the producer says
about its packing is trusted. A refusal names the worst violation: which circle or pair and by
how much. Comparisons are written so that a NaN could never pass, though finiteness is
checked first.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_REAL_KINDS = "iuf"  # signed and unsigned integers, floats; not bool, complex or object


def _as_array(value: Any, name: str, shape: tuple[int, ...]) -> tuple[np.ndarray | None, str]:
    """A float64 copy of ``value`` with ``shape``, or None and why not."""
    try:
        raw = np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged nested lists, unconvertible objects
        return None, f"{name} is not an array of numbers ({type(e).__name__}: {e})"
    if raw.dtype.kind not in _REAL_KINDS:
        return None, f"{name} must hold real numbers, got dtype {raw.dtype}"
    if raw.shape != shape:
        return None, f"{name} must have shape {shape}, got {raw.shape}"
    # A copy: nothing the producer holds can change the values after they are checked.
    return np.array(raw, dtype=np.float64, copy=True), ""


def score_packing(
    centers: Any, radii: Any, n: int, tol: float = 1e-9
) -> tuple[float | None, str | None]:
    """Returns ``(sum of radii, None)`` for a valid packing, else ``(None, one-line reason)``."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(tol, bool) or not (
        isinstance(tol, int | float) and math.isfinite(tol) and tol >= 0
    ):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    n = int(n)
    c_N2, why = _as_array(centers, "centers", (n, 2))
    if c_N2 is None:
        return None, why
    r_N, why = _as_array(radii, "radii", (n,))
    if r_N is None:
        return None, why

    bad = np.flatnonzero(~np.isfinite(c_N2).all(axis=1))
    if bad.size:
        i = int(bad[0])
        return None, f"centre of circle {i} is not finite: {c_N2[i].tolist()}"
    bad = np.flatnonzero(~np.isfinite(r_N))
    if bad.size:
        i = int(bad[0])
        return None, f"radius of circle {i} is not finite: {r_N[i]}"
    bad = np.flatnonzero(~(r_N > 0))
    if bad.size:
        i = int(bad[np.argmin(r_N[bad])])
        return None, f"radius of circle {i} is {r_N[i]!r}: radii must be > 0 ({bad.size} such)"

    # How far each circle crosses each wall (positive = outside the square).
    x_N, y_N = c_N2[:, 0], c_N2[:, 1]
    walls = ("left (x = 0)", "right (x = 1)", "bottom (y = 0)", "top (y = 1)")
    crossing_N4 = np.stack([r_N - x_N, x_N + r_N - 1.0, r_N - y_N, y_N + r_N - 1.0], axis=1)
    # Pairwise overlaps, upper triangle only.
    i_P, j_P = np.triu_indices(n, 1)
    d_P = np.hypot(x_N[i_P] - x_N[j_P], y_N[i_P] - y_N[j_P])
    overlap_P = r_N[i_P] + r_N[j_P] - d_P

    wall_bad = ~(crossing_N4 <= tol)
    pair_bad = ~(overlap_P <= tol)
    count = int(wall_bad.sum() + pair_bad.sum())
    if count:
        worst_wall = float(crossing_N4.max()) if n else -math.inf
        worst_pair = float(overlap_P.max()) if overlap_P.size else -math.inf
        if worst_wall >= worst_pair:
            i, w = np.unravel_index(int(np.argmax(crossing_N4)), crossing_N4.shape)
            what = f"circle {int(i)} crosses the {walls[int(w)]} wall by {worst_wall:.3g}"
        else:
            k = int(np.argmax(overlap_P))
            what = (
                f"circles {int(i_P[k])} and {int(j_P[k])} overlap by {worst_pair:.3g} "
                f"(distance {d_P[k]:.17g} < r sum {r_N[i_P[k]] + r_N[j_P[k]]:.17g})"
            )
        return None, f"{what} (tol {tol:g}; {count} violation(s) in all)"
    return math.fsum(r_N.tolist()), None
