"""The circle packing space: the strict validator and its attacks, the genome, the optimiser,
the options, and a tiny end-to-end search."""

import json
import math

import numpy as np
import pytest

from evolve_jax.config import RunConfig
from evolve_jax.loop import run
from evolve_jax.memory.cognition import load_seed_file
from evolve_jax.search_space import GenomeError, fingerprint, load
from search_spaces.circle_packing import genome, optimize, space
from search_spaces.circle_packing.validate import score_packing

N = 26


def _four():
    """Four circles of radius 1/4 in the quarters of the square: touching, exactly valid."""
    centers = np.array([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    return centers, np.full(4, 0.25)


def _spaced():
    """The same centres with radius 0.24: gaps of 0.02 between circles, 0.01 to the walls."""
    return _four()[0], np.full(4, 0.24)


@pytest.fixture(scope="module")
def packing26():
    """A packing of 26 circles from the optimiser (small budget)."""
    g = genome.validate({"family": "hex", "starts": 8, "steps": 500, "polish": 1}, N)
    return optimize.run(genome.layout(g), genome.schedule(g), N, seed=0)


# ---------------------------------------------------------------------------- validator


def test_validator_accepts_valid_packings_and_recomputes_the_sum(packing26):
    centers, radii = _four()
    assert score_packing(centers, radii, 4, tol=0.0) == (1.0, None)  # touching is allowed
    total, why = score_packing(packing26.centers, packing26.radii, N)
    assert why is None and total == math.fsum(packing26.radii.tolist())
    # Lists are arrays too; the sum is of the radii given, never of anything else.
    assert score_packing(centers.tolist(), [0.25, 0.25, 0.25, 0.2], 4) == (0.95, None)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_validator_refuses_non_finite_centres_and_radii(value):
    centers, radii = _four()
    bad = centers.copy()
    bad[2, 1] = value
    total, why = score_packing(bad, radii, 4)
    assert total is None and "centre of circle 2 is not finite" in why
    bad = radii.copy()
    bad[1] = value
    total, why = score_packing(centers, bad, 4)
    assert total is None and "radius of circle 1 is not finite" in why


def test_validator_refuses_the_nan_centre_attack():
    # A NaN centre makes every distance to it NaN, and "overlap > tol" is False for NaN: a
    # validator written that way accepts a circle of any radius there.
    centers, radii = _four()
    centers = np.vstack([centers, [math.nan, math.nan]])
    radii = np.append(radii, 0.4)
    total, why = score_packing(centers, radii, 5)
    assert total is None and "centre of circle 4 is not finite" in why


@pytest.mark.parametrize(
    "centers, radii, needle",
    [
        (np.zeros((4, 3)), np.full(4, 0.1), "centers must have shape (4, 2)"),
        (np.zeros((3, 2)), np.full(4, 0.1), "centers must have shape (4, 2)"),
        (np.zeros((4, 2)), np.full((4, 1), 0.1), "radii must have shape (4,)"),
        (np.zeros(8), np.full(4, 0.1), "centers must have shape (4, 2)"),
        ([[0.1, 0.1], [0.2]], np.full(4, 0.1), "centers is not an array of numbers"),
        (np.full((4, 2), "0.5"), np.full(4, 0.1), "must hold real numbers"),
        (np.full((4, 2), 0.5 + 0j), np.full(4, 0.1), "must hold real numbers"),
        (np.full((4, 2), True), np.full(4, 0.1), "must hold real numbers"),
        ([[None, 0.5]] * 4, np.full(4, 0.1), "must hold real numbers"),
        (None, np.full(4, 0.1), "must hold real numbers"),
    ],
)
def test_validator_refuses_wrong_types_and_shapes(centers, radii, needle):
    total, why = score_packing(centers, radii, 4)
    assert total is None and needle in why


@pytest.mark.parametrize("radius", [-0.1, -1e-300, 0.0, -0.0])
def test_validator_refuses_non_positive_radii(radius):
    centers, radii = _four()
    radii[3] = radius
    total, why = score_packing(centers, radii, 4)
    assert total is None and "radius of circle 3" in why and "must be > 0" in why


def test_validator_refuses_an_overlap_just_above_tol():
    centers, radii = _spaced()
    centers[1, 0] -= 0.02 + 2e-9  # circles 0 and 1 overlap by 2e-9, nothing else is wrong
    total, why = score_packing(centers, radii, 4, tol=1e-9)
    assert total is None and why.startswith("circles 0 and 1 overlap by 2e-09")
    assert "1 violation(s)" in why
    centers[1, 0] += 1.5e-9  # 5e-10: within tol
    assert score_packing(centers, radii, 4, tol=1e-9)[1] is None


@pytest.mark.parametrize(
    "circle, axis, shift, wall",
    [(0, 0, -1, "left"), (1, 0, 1, "right"), (0, 1, -1, "bottom"), (2, 1, 1, "top")],
)
def test_validator_refuses_a_wall_crossing_just_above_tol(circle, axis, shift, wall):
    centers, radii = _spaced()
    centers[circle, axis] += shift * (0.01 + 2e-9)  # crosses by 2e-9, away from the others
    total, why = score_packing(centers, radii, 4, tol=1e-9)
    assert total is None and why.startswith(f"circle {circle} crosses the {wall} (")
    assert "wall by 2e-09" in why
    centers[circle, axis] -= shift * 1.5e-9
    assert score_packing(centers, radii, 4, tol=1e-9)[1] is None


def test_validator_refuses_1e7_overlaps_that_a_1e6_tolerance_passes(packing26):
    # The peers' exploit: every radius inflated so that each contact overlaps by about 1e-7.
    radii = packing26.radii + 5e-8
    assert score_packing(packing26.centers, radii, N, tol=1e-6)[1] is None  # the loose check
    total, why = score_packing(packing26.centers, radii, N, tol=1e-9)
    assert total is None and "overlap by 1e-07" in why


def test_validator_names_the_worst_violation():
    centers, radii = _spaced()
    centers[3, 0] -= 0.02 + 1.5e-8  # circles 2 and 3 overlap by 1.5e-8
    centers[0, 0] -= 0.01 + 3e-9  # circle 0 crosses the left wall by 3e-9
    total, why = score_packing(centers, radii, 4, tol=1e-9)
    assert total is None and why.startswith("circles 2 and 3 overlap by 1.5e-08")
    assert why.endswith("(tol 1e-09; 2 violation(s) in all)")
    centers[0, 0] -= 3e-8  # now the wall crossing (3.3e-8) is the worst
    total, why = score_packing(centers, radii, 4, tol=1e-9)
    assert why.startswith("circle 0 crosses the left (x = 0) wall by 3.3e-08")


def test_validator_refuses_duplicated_circles():
    centers, radii = _four()
    centers[1] = centers[0]
    total, why = score_packing(centers, radii, 4)
    assert total is None and "circles 0 and 1 overlap by 0.5" in why


def test_validator_refuses_a_bad_tolerance_or_n():
    centers, radii = _four()
    for tol in (-1e-9, math.nan, math.inf, "1e-9", True):
        with pytest.raises(ValueError, match="tol"):
            score_packing(centers, radii, 4, tol=tol)
    with pytest.raises(ValueError, match="n must be"):
        score_packing(centers, radii, True)


# ---------------------------------------------------------------------------- genome


def test_validate_fills_defaults_and_is_canonical():
    full = genome.validate({}, N)
    assert full["family"] == "rings" and sum(full["counts"]) == N and full["rounds"] == 0
    assert list(full) == list(genome.FIELDS)
    # Genes a genome does not use are reset: equal programs fingerprint equal.
    a = genome.validate({"family": "random", "jitter": 0.08, "ring_shape": "square"}, N)
    b = genome.validate({"family": "random"}, N)
    assert fingerprint(a) == fingerprint(b) and a["counts"] == []
    assert genome.validate({"kick": 0.2}, N) == genome.validate({}, N)
    assert genome.validate({"rounds": 1, "kick": 0.2}, N) != genome.validate({"rounds": 1}, N)
    assert genome.validate({"mu_start": 10}, N) == genome.validate({"mu_start": 10.0}, N)
    assert genome.validate(json.loads(json.dumps(full)), N) == full


@pytest.mark.parametrize(
    "bad, needle",
    [
        ({"colour": "red"}, "unknown genome field(s) ['colour']"),
        ({"family": "spiral"}, "'family' = 'spiral' is out of range"),
        ({"jitter": 0.03}, "'jitter' = 0.03 is out of range"),
        ({"starts": True}, "'starts' = True is out of range"),
        ({"steps": 800.0}, "'steps' = 800.0 is out of range"),
        ({"counts": [1, 8, 16]}, "'counts' = [1, 8, 16] sums to 25, not n=26"),
        ({"counts": [1, 0, 25]}, "'counts' = [1, 0, 25] must hold integers >= 1"),
        ({"counts": "1,8,17"}, "'counts' = '1,8,17' must be a non-empty list"),
        ({"counts": [1] * 13 + [13]}, "'counts' has 14 groups"),
        ({"family": "random", "counts": [2.5]}, "'counts' = [2.5] must hold integers"),
        ({"layout_seed": -1}, "'layout_seed' = -1 must be an integer"),
        ({"layout_seed": 2**31}, "'layout_seed' = 2147483648 must be an integer"),
        ([1, 2], "a genome is a JSON object"),
    ],
)
def test_genome_errors_name_the_field(bad, needle):
    with pytest.raises(GenomeError) as e:
        genome.validate(bad, N)
    assert needle in str(e.value)


def _random_genome(rng, n=N):
    g = {x.name: x.choices[int(rng.integers(len(x.choices)))] for x in genome.GENES}
    g["layout_seed"] = int(rng.integers(100))
    if g["family"] != "random":
        g["counts"] = genome.default_counts(g["family"], n)
    return genome.validate(g, n)


@pytest.mark.parametrize("n", [1, 2, 7, N])
def test_operators_always_produce_valid_changed_genomes(n):
    rng = np.random.default_rng(n)
    ops = genome.make_operators(n)
    parents = [_random_genome(rng, n) for _ in range(30)] + list(genome.seeds(n).values())
    for name, op in ops.items():
        for parent in parents:
            others = [parents[int(rng.integers(len(parents)))] for _ in range(op.arity - 1)]
            child = op.fn(rng, [parent, *others])
            assert genome.validate(child, n) == child, (name, child)  # valid and canonical
            if op.arity == 1:
                assert child != parent, (name, parent)  # a mutation is never a no-op


def test_counts_mutations_move_split_and_merge():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        counts = genome._move_circles([1, 8, 17], rng)
        assert sum(counts) == N and min(counts) >= 1
        seen.add(len(counts))
    assert seen == {2, 3, 4}


def test_seeds_and_schema():
    seeds = genome.seeds(N)
    assert list(seeds) == ["rings", "hex", "grid", "random"]
    assert seeds["rings"]["counts"] == [1, 8, 17] and seeds["hex"]["counts"] == [5, 5, 6, 5, 5]
    schema = genome.json_schema()
    assert set(schema["properties"]) == set(genome.FIELDS)
    assert not schema["additionalProperties"]


# ---------------------------------------------------------------------------- optimiser


@pytest.mark.parametrize("family", ["rings", "hex"])
def test_optimiser_packing_passes_the_strict_check_above_the_floor(family):
    # Floor: on a small budget (8 starts, 500 steps, 1 polish) every family and seed we tried
    # (24 runs) reached 2.6048 or more; rings and hex 2.6108 or more.
    g = genome.validate({"family": family, "starts": 8, "steps": 500, "polish": 1}, N)
    for seed in (0, 1):
        packing = optimize.run(genome.layout(g), genome.schedule(g), N, seed)
        total, why = score_packing(packing.centers, packing.radii, N, tol=0.0)
        assert why is None and total > 2.6


def test_optimiser_is_deterministic_and_the_seed_matters():
    g = genome.validate({"family": "rings", "starts": 4, "steps": 300, "polish": 1}, N)
    a = optimize.run(genome.layout(g), genome.schedule(g), N, 3)
    b = optimize.run(genome.layout(g), genome.schedule(g), N, 3)
    c = optimize.run(genome.layout(g), genome.schedule(g), N, 4)
    np.testing.assert_array_equal(a.centers, b.centers)
    np.testing.assert_array_equal(a.radii, b.radii)
    assert not np.array_equal(a.centers, c.centers)


def test_lp_radii_are_optimal_and_exactly_feasible():
    centers, _ = _four()
    radii = optimize.lp_radii(centers)
    np.testing.assert_allclose(radii, 0.25, atol=1e-11)
    assert (radii < 0.25).all()  # the margin keeps the packing strictly inside
    assert score_packing(centers, radii, 4, tol=0.0)[1] is None
    # Centres from an unconverged descent: the LP alone makes the radii valid.
    rng = np.random.default_rng(0)
    c = rng.uniform(0.1, 0.9, (3, N, 2))
    c_BN2, r_BN = optimize.descend(c, optimize.initial_radii(c, 0.5), optimize.Schedule(steps=50))
    for c_N2, r_N in zip(c_BN2, r_BN, strict=True):
        assert score_packing(c_N2, r_N, N)[1] is not None  # the descent alone is not valid
        lp = optimize.lp_radii(c_N2)
        assert score_packing(c_N2, lp, N, tol=0.0)[1] is None and lp.sum() > 2.0


# ---------------------------------------------------------------------------- the space


def test_options_errors_are_clear():
    with pytest.raises(ValueError, match=r"unknown circle_packing option 'm' \(known: n, tol"):
        space.make(m="26")
    with pytest.raises(ValueError, match="circle_packing option n='x'"):
        space.make(n="x")
    with pytest.raises(ValueError, match=r"option n must be in \[1, 200\]"):
        space.make(n="0")
    with pytest.raises(ValueError, match="option tol must be in"):
        space.make(tol="-1e-9")
    with pytest.raises(ValueError, match="option budget_s must be >="):
        space.make(budget_s="0.01")
    with pytest.raises(ValueError, match="mode='program' is not supported"):
        space.make(mode="program")
    with pytest.raises(ValueError, match="sandbox_timeout_s, sandbox_memory_gb: > 0"):
        space.make(mode="code", sandbox_timeout_s="0")
    opts = space.make(n="10", tol="0", workers="0").options
    assert (opts.n, opts.tol, opts.workers, opts.mode) == (10, 0.0, 0, "genome")


def test_the_space_is_installed_and_describes_itself():
    s = load("circle_packing", n="8", workers="0")
    assert isinstance(s, space.CirclePackingSpace) and s.options.n == 8
    task = s.describe()
    assert task.primary.name == "sum_radii" and task.primary.direction == "max"
    assert len(task.stages) == 1 and s.baseline() is None
    assert all(sum(g["counts"]) == 8 for g in s.seeds().values() if g["family"] != "random")
    assert len(load_seed_file(s.cognition_seed())) >= 5


def test_evaluate_scores_valid_packings_and_refuses_invalid_ones(monkeypatch):
    s = space.make(n="6", workers="0")
    g = s.validate({"family": "hex", "starts": 4, "steps": 300, "polish": 1})
    (ok,) = s.evaluate([g], 0, [0, 1], [])
    assert ok.error is None and set(ok.metrics) == {0, 1}
    for seed in (0, 1):
        centers, radii = s.packing(g, seed)
        assert ok.metrics[seed]["sum_radii"] == score_packing(centers, radii, 6)[0]
    best = max(ok.metrics.values(), key=lambda m: m["sum_radii"])
    assert s.describe_genome(g) == (1.5, best["border_circles"])  # hex, its best packing

    # Whatever the optimiser returns goes through the strict check.
    honest = space._optimise

    def cheat(job):
        centers, radii = honest(job)
        return centers, radii + 1e-7

    monkeypatch.setattr(space, "_optimise", cheat)
    (bad,) = s.evaluate([g], 0, [0], [])
    assert not bad.metrics and bad.error.startswith("seed 0: invalid packing: ")
    assert "overlap by" in bad.error or "crosses" in bad.error

    def crash(job):
        raise FloatingPointError("boom")

    monkeypatch.setattr(space, "_optimise", crash)
    (bad,) = s.evaluate([g], 0, [0], [])
    assert bad.error == "seed 0: optimiser raised FloatingPointError: boom"


def test_budget_check_and_repair():
    s = space.make(budget_s="1.5", workers="0")
    big = s.validate({"rounds": 6, "starts": 32, "steps": 2000})
    (failure,) = s.check(big)
    assert failure.check == "budget" and "exceeds budget_s=1.5" in failure.reason
    fixed = s.repair(big, [failure])
    assert s.check(fixed) == [] and s.validate(fixed) == fixed
    assert genome.estimated_seconds(fixed, N) <= 1.5 < genome.estimated_seconds(big, N)
    assert all(s.check(g) == [] for g in s.seeds().values())


def test_worker_processes_give_the_in_process_sums():
    # One spawned worker (single-threaded BLAS) against this process: same packing sums.
    g = genome.validate({"family": "grid", "starts": 4, "steps": 300, "polish": 1}, 9)
    pooled = space.make(n="9", workers="1")
    try:
        (a,) = pooled.evaluate([g], 0, [5], [])
    finally:
        pooled.close()
    (b,) = space.make(n="9", workers="0").evaluate([g], 0, [5], [])
    assert a.error is None and a.metrics[5]["sum_radii"] == pytest.approx(
        b.metrics[5]["sum_radii"], abs=1e-9
    )


def test_tiny_search_end_to_end(tmp_path):
    s = space.make(n="7", workers="0", budget_s="0.6")
    config = RunConfig(
        search_space="circle_packing", workdir=str(tmp_path / "run"), steps=2, samples_per_step=3
    )
    summary = run(config, s)
    nodes = summary.nodes
    assert [n.name for n in nodes[:4]] == ["rings", "hex", "grid", "random"]
    assert len(nodes) == 4 + 2 * 3
    ok = [n for n in nodes if n.ok]
    assert len(ok) >= 4 + 3
    for node in ok:
        total = node.metrics["packing"][str(config.eval_seed_list[0])]["sum_radii"]
        assert math.isfinite(total) and node.score == total and 1.0 < total < 7 * 0.5
        assert len(node.descriptor) == 2
    assert summary.best.score >= max(n.score for n in nodes[:4])
