"""Circle packing by a batched penalty descent, SLSQP polish and an exact LP for the radii.

From ``starts`` initial arrangements (the genome's family, perturbed with draws from the
genome's layout seed and the evaluation seed), centres and radii descend jointly on
``-sum(r) + mu/2 * (sum of squared pair overlaps and wall crossings)`` with Adam, all starts
at once as one numpy batch; ``mu`` grows and the step size shrinks geometrically. The best
``polish`` results are polished by SLSQP with the exact pair and wall constraints. Optional
rounds of iterated local search kick the best packing so far and descend again. Finally, for
the chosen centres the radii solve the LP ``max sum r s.t. r_i + r_j <= d_ij, r_i <= wall
distance, r >= 0`` (HiGHS), and are lowered by the LP's residual violation plus a margin of
1e-12 so that the packing passes the strict check with tol = 0. Deterministic given
(genome, n, seed). numpy and scipy only: no JAX on this path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.optimize

MARGIN = 1e-12  # how far below the LP's radii the final radii stay
NEAR = 0.05  # constraints further than this from binding are left out of the SLSQP polish


@dataclasses.dataclass(frozen=True)
class Layout:
    """How initial arrangements are drawn (see ``initial_centres``)."""

    family: str = "rings"  # rings | hex | grid | random
    counts: tuple[int, ...] = ()  # circles per ring (inner first) or per row (bottom first)
    ring_shape: str = "circle"  # circle | square (rings only)
    jitter: float = 0.02  # std of the Gaussian perturbation of structured layouts
    layout_seed: int = 0


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The optimiser's settings."""

    starts: int = 16  # arrangements descended at once
    steps: int = 800  # Adam steps of the penalty descent
    lr: float = 0.01  # first step size (decays to lr * lr_decay)
    lr_decay: float = 0.01
    mu_start: float = 10.0  # penalty weight at the first step (grows to mu_end)
    mu_end: float = 1e5
    radius_init: float = 0.5  # initial radius, as a share of the half nearest-neighbour gap
    polish: int = 2  # best results polished by SLSQP
    polish_iters: int = 200
    rounds: int = 0  # iterated local search: kicks of the best packing, each then descended
    kick: float = 0.05  # std of a kick's perturbation of the centres


@dataclasses.dataclass(frozen=True)
class Packing:
    """The optimiser's result; the harness checks it again (``validate.score_packing``)."""

    centers: np.ndarray  # (n, 2)
    radii: np.ndarray  # (n,)
    info: dict[str, Any]

    @property
    def total(self) -> float:
        return math.fsum(self.radii.tolist())


# ------------------------------------------------------------------------ initial arrangements


def _ring_points(count: int, rho: float, phase: float, shape: str) -> np.ndarray:
    theta_K = phase + 2 * np.pi * np.arange(count) / count
    u_K2 = np.stack([np.cos(theta_K), np.sin(theta_K)], axis=1)
    if shape == "square":  # radial projection onto the square of half-side rho
        u_K2 = u_K2 / np.abs(u_K2).max(axis=1, keepdims=True)
    return 0.5 + rho * u_K2


def structured_centres(layout: Layout, n: int) -> np.ndarray:
    """The unperturbed (n, 2) centres of a rings, hex or grid layout."""
    counts = layout.counts
    if sum(counts) != n:
        raise ValueError(f"counts {list(counts)} do not sum to n = {n}")
    outer = 0.5 - 0.45 / math.sqrt(n)  # the outer ring/rows sit about one radius from the walls
    parts = []
    if layout.family == "rings":
        centre = counts[0] == 1
        k_rings = len(counts)
        offset = 0.0 if centre else 0.5
        for k, count in enumerate(counts):
            rho = outer * (k + offset) / max(k_rings - 1 + offset, 1e-9)
            parts.append(_ring_points(count, rho, np.pi * k / count, layout.ring_shape))
    elif layout.family in ("hex", "grid"):
        rows = len(counts)
        for j, count in enumerate(counts):
            y = 0.5 + 2 * outer * ((j + 0.5) / rows - 0.5)
            shift = 0.25 * (-1) ** j if layout.family == "hex" else 0.0
            x_K = 0.5 + 2 * outer * ((np.arange(count) + 0.5 + shift) / count - 0.5)
            parts.append(np.stack([x_K, np.full(count, y)], axis=1))
    else:
        raise ValueError(f"family {layout.family!r} has no structured layout")
    return np.concatenate(parts)


def initial_centres(layout: Layout, n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` initial arrangements, (count, n, 2): the layout perturbed, or uniform draws."""
    if layout.family == "random":
        return rng.uniform(0.05, 0.95, size=(count, n, 2))
    base_N2 = structured_centres(layout, n)
    noise_BN2 = layout.jitter * rng.standard_normal((count, n, 2))
    return np.clip(base_N2 + noise_BN2, 0.01, 0.99)


def initial_radii(c_BN2: np.ndarray, share: float) -> np.ndarray:
    """``share`` of each circle's largest radius free of walls and of half its nearest gap."""
    diff = c_BN2[:, :, None, :] - c_BN2[:, None, :, :]
    d_BNN = np.sqrt((diff * diff).sum(-1))
    n = c_BN2.shape[1]
    d_BNN[:, np.arange(n), np.arange(n)] = np.inf
    wall_BN = np.minimum(c_BN2, 1 - c_BN2).min(-1)
    return share * np.minimum(d_BNN.min(-1) / 2, wall_BN)


# ------------------------------------------------------------------------ penalty descent


class _Pairs:
    """Index arrays of the n(n-1)/2 pairs and the scatter matrices that sum over them."""

    def __init__(self, n: int):
        self.n = n
        self.i_P, self.j_P = np.triu_indices(n, 1)
        p = np.arange(self.i_P.size)
        self.incidence_PN = np.zeros((p.size, n))
        self.incidence_PN[p, self.i_P] = 1.0
        self.incidence_PN[p, self.j_P] = 1.0
        self.sign_PN = np.zeros((p.size, n))
        self.sign_PN[p, self.i_P] = 1.0
        self.sign_PN[p, self.j_P] = -1.0


def _penalty_grad(x_BN, y_BN, r_BN, mu: float, pairs: _Pairs):
    """Gradients of -sum(r) + mu/2 * (overlaps^2 + crossings^2) for every start of the batch."""
    i_P, j_P = pairs.i_P, pairs.j_P
    dx_BP = x_BN[:, i_P] - x_BN[:, j_P]
    dy_BP = y_BN[:, i_P] - y_BN[:, j_P]
    d_BP = np.sqrt(dx_BP * dx_BP + dy_BP * dy_BP + 1e-18)
    overlap_BP = np.maximum(r_BN[:, i_P] + r_BN[:, j_P] - d_BP, 0.0)
    left, right = np.maximum(r_BN - x_BN, 0.0), np.maximum(x_BN + r_BN - 1.0, 0.0)
    low, high = np.maximum(r_BN - y_BN, 0.0), np.maximum(y_BN + r_BN - 1.0, 0.0)
    pull_BP = overlap_BP / d_BP
    g_r = -1.0 + mu * (left + right + low + high + overlap_BP @ pairs.incidence_PN)
    g_x = mu * (right - left - (pull_BP * dx_BP) @ pairs.sign_PN)
    g_y = mu * (high - low - (pull_BP * dy_BP) @ pairs.sign_PN)
    return g_x, g_y, g_r


def descend(c_BN2: np.ndarray, r_BN: np.ndarray, schedule: Schedule, mu_start: float | None = None):
    """Adam on the penalty for every start at once; returns the final (centres, radii)."""
    n = c_BN2.shape[1]
    pairs = _Pairs(n)
    params = [c_BN2[..., 0].copy(), c_BN2[..., 1].copy(), r_BN.copy()]
    upper = (1.0, 1.0, 0.5)
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    b1, b2 = 0.9, 0.999
    steps = schedule.steps
    mu0 = schedule.mu_start if mu_start is None else mu_start
    for t in range(1, steps + 1):
        frac = (t - 1) / max(steps - 1, 1)
        lr = schedule.lr * schedule.lr_decay**frac
        mu = mu0 * (schedule.mu_end / mu0) ** frac
        grads = _penalty_grad(*params, mu, pairs)
        c1, c2 = 1 - b1**t, 1 - b2**t
        for k in range(3):
            g = grads[k]
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            step = lr * (m[k] / c1) / (np.sqrt(v[k] / c2) + 1e-12)
            params[k] = np.clip(params[k] - step, 0.0, upper[k])
    x_BN, y_BN, r_BN = params
    return np.stack([x_BN, y_BN], axis=-1), r_BN


# ------------------------------------------------------------------------ polish and radii


def polish(
    c_N2: np.ndarray, r_N: np.ndarray, maxiter: int, near: float = NEAR
) -> tuple[np.ndarray, np.ndarray]:
    """SLSQP on (centres, radii) with the exact pair and wall constraints that are within
    ``near`` of binding (the others cannot bind in a polish; the final LP checks all)."""
    n = c_N2.shape[0]
    pairs = _Pairs(n)
    i_all, j_all = pairs.i_P, pairs.j_P
    gap_P = np.hypot(*(c_N2[i_all] - c_N2[j_all]).T) - r_N[i_all] - r_N[j_all]
    keep = gap_P < near
    i_P, j_P = i_all[keep], j_all[keep]
    # Wall constraints x - r >= 0, 1 - x - r >= 0, y - r >= 0, 1 - y - r >= 0, also filtered.
    room_N4 = np.stack([c_N2[:, 0], 1 - c_N2[:, 0], c_N2[:, 1], 1 - c_N2[:, 1]], 1) - r_N[:, None]
    wall_i, wall_w = np.nonzero(room_N4 < near)
    axis_W, sign_W = wall_w // 2, np.where(wall_w % 2 == 0, 1.0, -1.0)
    offset_W = np.where(wall_w % 2 == 0, 0.0, 1.0)
    m, w = i_P.size, wall_i.size
    p, q = np.arange(m), np.arange(w)

    def constraints(z):
        x, y, r = z[:n], z[n : 2 * n], z[2 * n :]
        d = np.hypot(x[i_P] - x[j_P], y[i_P] - y[j_P])
        xy = np.where(axis_W == 0, x[wall_i], y[wall_i])
        return np.concatenate([d - r[i_P] - r[j_P], offset_W + sign_W * xy - r[wall_i]])

    jac = np.zeros((m + w, 3 * n))
    jac[p, 2 * n + i_P] = -1.0
    jac[p, 2 * n + j_P] = -1.0
    jac[m + q, axis_W * n + wall_i] = sign_W
    jac[m + q, 2 * n + wall_i] = -1.0

    def constraints_jac(z):
        x, y = z[:n], z[n : 2 * n]
        dx, dy = x[i_P] - x[j_P], y[i_P] - y[j_P]
        d = np.maximum(np.hypot(dx, dy), 1e-12)
        jac[p, i_P], jac[p, j_P] = dx / d, -dx / d
        jac[p, n + i_P], jac[p, n + j_P] = dy / d, -dy / d
        return jac

    grad = np.concatenate([np.zeros(2 * n), -np.ones(n)])
    z0 = np.concatenate([c_N2[:, 0], c_N2[:, 1], r_N])
    result = scipy.optimize.minimize(
        lambda z: (-z[2 * n :].sum(), grad),
        z0,
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * (2 * n) + [(0.0, 0.5)] * n,
        constraints=[{"type": "ineq", "fun": constraints, "jac": constraints_jac}],
        options={"maxiter": maxiter, "ftol": 1e-15},
    )
    z = result.x if np.all(np.isfinite(result.x)) else z0
    return np.stack([z[:n], z[n : 2 * n]], axis=1), z[2 * n :]


def lp_radii(c_N2: np.ndarray) -> np.ndarray:
    """The radii maximising their sum for fixed centres, lowered until exactly feasible."""
    n = c_N2.shape[0]
    c_N2 = np.clip(c_N2, 0.0, 1.0)
    pairs = _Pairs(n)
    i_P, j_P = pairs.i_P, pairs.j_P
    d_P = np.hypot(c_N2[i_P, 0] - c_N2[j_P, 0], c_N2[i_P, 1] - c_N2[j_P, 1])
    wall_N = np.minimum(c_N2, 1.0 - c_N2).min(axis=1)
    result = scipy.optimize.linprog(
        -np.ones(n),
        A_ub=pairs.incidence_PN,
        b_ub=d_P,
        bounds=np.stack([np.zeros(n), wall_N], axis=1),
        method="highs",
        options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10},
    )
    r_N = result.x if result.x is not None else np.zeros(n)
    return make_feasible(c_N2, r_N)


def make_feasible(c_N2: np.ndarray, r_N: np.ndarray) -> np.ndarray:
    """Radii lowered by the worst residual violation plus MARGIN (clipped at 0)."""
    pairs = _Pairs(c_N2.shape[0])
    i_P, j_P = pairs.i_P, pairs.j_P
    d_P = np.hypot(c_N2[i_P, 0] - c_N2[j_P, 0], c_N2[i_P, 1] - c_N2[j_P, 1])
    wall_N = np.minimum(c_N2, 1.0 - c_N2).min(axis=1)
    excess = max(
        float(np.max(r_N - wall_N, initial=0.0)),
        float(np.max(r_N[i_P] + r_N[j_P] - d_P, initial=0.0)) / 2,
    )
    return np.maximum(r_N - excess - MARGIN, 0.0)


# ------------------------------------------------------------------------ the whole optimiser


def _best_polished(c_BN2, r_BN, schedule: Schedule) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Polishes the ``schedule.polish`` best of a batch; returns the best (centres, LP radii)."""
    # Rank by the LP sum of each descended arrangement: exact for its centres, and cheap.
    lp_radii_B = [lp_radii(c) for c in c_BN2]
    order = np.argsort([-r.sum() for r in lp_radii_B], kind="stable")[: schedule.polish]
    best, sums = None, []
    for b in order:
        c_N2, _ = polish(c_BN2[b], r_BN[b], schedule.polish_iters)
        c_N2 = np.clip(c_N2, 0.0, 1.0)
        r_N = lp_radii(c_N2)
        if r_N.sum() < lp_radii_B[b].sum():  # SLSQP can fail (e.g. collapse): keep the input
            c_N2, r_N = np.clip(c_BN2[b], 0.0, 1.0), lp_radii_B[b]
        sums.append(float(r_N.sum()))
        if best is None or sums[-1] > best[1].sum():
            best = (c_N2, r_N)
    return best[0], best[1], sums


def run(layout: Layout, schedule: Schedule, n: int, seed: int) -> Packing:
    """Optimises a packing of ``n`` circles from ``layout`` with ``schedule``; deterministic."""
    rng = np.random.default_rng([layout.layout_seed, int(seed) % 2**64])  # any int seed
    c_BN2 = initial_centres(layout, n, schedule.starts, rng)
    r_BN = initial_radii(c_BN2, schedule.radius_init)
    c_BN2, r_BN = descend(c_BN2, r_BN, schedule)
    best_c, best_r, sums = _best_polished(c_BN2, r_BN, schedule)
    history = [max(sums)]
    for _ in range(schedule.rounds):
        kicked = np.clip(best_c + schedule.kick * rng.standard_normal(c_BN2.shape), 0.01, 0.99)
        r_BN = initial_radii(kicked, schedule.radius_init)
        # A kicked packing is near a good one: start with a stiffer penalty.
        c_BN2, r_BN = descend(kicked, r_BN, schedule, mu_start=schedule.mu_start * 10)
        c_N2, r_N, sums = _best_polished(c_BN2, r_BN, schedule)
        history.append(max(sums))
        if r_N.sum() > best_r.sum():
            best_c, best_r = c_N2, r_N
    return Packing(best_c, best_r, {"round_best": history})


def run_many(jobs: Sequence[tuple[Layout, Schedule, int, int]]) -> list[Packing]:
    return [run(*job) for job in jobs]
