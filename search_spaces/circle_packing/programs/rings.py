"""A construction program for circle packing (code mode).

Place n circles in the unit square, without overlap, to maximise the sum of their radii. The
program defines one function:

    def construct_packing(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]: ...

It returns ``(centers, radii)``: centers an (n, 2) array of circle centres, radii an (n,) array
of radii. The harness calls it once per evaluation seed in a sandboxed worker, then checks the
packing itself: the right shapes, finite values, radii > 0, no circle crossing a wall and no two
circles overlapping by more than 1e-9; it recomputes the sum of radii. Nothing the program
prints or writes counts. A program that takes longer than the sandbox's time limit is killed.

Available: numpy, scipy, and two helpers of the project's optimiser: ``lp_radii(centers)``, the
largest radii for fixed centres (a linear program, lowered until exactly feasible), and
``polish(centers, radii, maxiter)``, a local SLSQP step on centres and radii together.
"""

# ruff: noqa: F401
# The frame imports everything a program may need; each program uses a part of it.

import math

import numpy as np
import scipy

from search_spaces.circle_packing.optimize import lp_radii, polish


# EVOLVE-BLOCK-START
def construct_packing(n, seed):
    """Concentric rings: one circle at the centre, then rings of 8 and 16 (and the rest on an
    outer ring), each ring turned by a seed-dependent phase; radii by linear programming."""
    rng = np.random.default_rng(seed)
    centers = [(0.5, 0.5)]
    for count, rho in ((8, 0.22), (n - 9, 0.42)):
        phase = rng.uniform(0, 2 * math.pi / max(count, 1))
        for k in range(count):
            angle = phase + 2 * math.pi * k / count
            centers.append((0.5 + rho * math.cos(angle), 0.5 + rho * math.sin(angle)))
    centers = np.clip(np.asarray(centers[:n]), 0.02, 0.98)
    return centers, lp_radii(centers)


# EVOLVE-BLOCK-END
