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
    """A square grid, as near square as n allows, its cells filled in an order the seed
    shuffles; radii by linear programming."""
    rng = np.random.default_rng(seed)
    side = math.ceil(math.sqrt(n))
    cells = [((i + 0.5) / side, (j + 0.5) / side) for i in range(side) for j in range(side)]
    chosen = rng.permutation(len(cells))[:n]
    centers = np.asarray(cells)[np.sort(chosen)]
    return centers, lp_radii(centers)


# EVOLVE-BLOCK-END
