"""The parametric genome of a circle packing run (genome mode), its seeds and operators.

A genome is a flat JSON object: an initial arrangement (``family``, ``counts`` per ring or row,
``ring_shape``, ``jitter``, ``layout_seed``) and the optimiser's settings (``starts``, ``steps``,
``lr``, ``lr_decay``, ``mu_start``, ``mu_end``, ``radius_init``, ``polish``, ``polish_iters``,
``rounds``, ``kick``); see ``optimize.py`` for what each does. Numeric genes take values from
short ordered lists, so mutation steps to a neighbouring value. ``validate`` fills defaults,
refuses unknown fields and out-of-range values (naming them) and resets the genes a genome does
not use (``counts`` and ``jitter`` of a random layout, ``ring_shape`` of rows, ``kick`` without
rounds) to their defaults, so equal programs fingerprint equal. Operators only ever produce
genomes that validate. ``counts`` must sum to the space's n, so validation takes n.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from evolve_jax.search_space import GenomeError, Operator
from search_spaces.circle_packing.optimize import Layout, Schedule

Genome = dict[str, Any]

FAMILIES = ("rings", "hex", "grid", "random")
STRUCTURED = ("rings", "hex", "grid")
MAX_LAYOUT_SEED = 2**31 - 1
MAX_GROUPS = 12  # rings or rows


@dataclasses.dataclass(frozen=True)
class Gene:
    """A gene with a list of allowed values (ordered for numeric genes)."""

    name: str
    choices: tuple[Any, ...]
    default: Any
    group: str
    description: str
    active: Callable[[Genome], bool] | None = None
    ordered: bool = False  # numeric: mutation steps to a neighbouring value

    def is_active(self, genome: Genome) -> bool:
        return self.active is None or self.active(genome)


def _structured(g: Genome) -> bool:
    return g["family"] in STRUCTURED


def _ordered(name: str, choices: tuple, default: Any, group: str, description: str, **kw) -> Gene:
    return Gene(name, choices, default, group, description, ordered=True, **kw)


# ``counts`` and ``layout_seed`` are not in GENES: their ranges are not short lists.
GENES: tuple[Gene, ...] = (
    Gene("family", FAMILIES, "rings", "layout", "initial arrangement"),
    Gene(
        "ring_shape",
        ("circle", "square"),
        "circle",
        "layout",
        "rings on circles or on squares about the centre",
        active=lambda g: g["family"] == "rings",
    ),
    _ordered(
        "jitter",
        (0.005, 0.01, 0.02, 0.04, 0.08),
        0.02,
        "layout",
        "std of the Gaussian perturbation of each start's centres",
        active=_structured,
    ),
    _ordered("starts", (4, 8, 12, 16, 24, 32), 16, "descent", "arrangements per batch"),
    _ordered("steps", (300, 500, 800, 1200, 2000), 800, "descent", "Adam steps of the descent"),
    _ordered("lr", (0.0025, 0.005, 0.01, 0.02, 0.04), 0.01, "descent", "first step size"),
    _ordered("lr_decay", (0.1, 0.03, 0.01, 0.003, 0.001), 0.01, "descent", "last / first step"),
    _ordered("mu_start", (1.0, 3.0, 10.0, 30.0, 100.0), 10.0, "descent", "first penalty weight"),
    _ordered("mu_end", (1e4, 3e4, 1e5, 3e5, 1e6), 1e5, "descent", "last penalty weight"),
    _ordered(
        "radius_init", (0.1, 0.25, 0.5, 0.75, 1.0), 0.5, "descent", "initial radii / free room"
    ),
    _ordered("polish", (1, 2, 3, 4), 2, "polish", "best results polished by SLSQP"),
    _ordered("polish_iters", (100, 200, 400), 200, "polish", "SLSQP iterations"),
    _ordered("rounds", (0, 1, 2, 3, 4, 6), 0, "search", "kicks of the best packing (ILS)"),
    _ordered(
        "kick",
        (0.01, 0.02, 0.05, 0.1, 0.2),
        0.05,
        "search",
        "std of a kick's perturbation of the centres",
        active=lambda g: g["rounds"] > 0,
    ),
)
GENE_BY_NAME = {g.name: g for g in GENES}
FIELDS = (
    "family",
    "counts",
    "ring_shape",
    "jitter",
    "layout_seed",
    *(g.name for g in GENES if g.group != "layout"),
)


# ---------------------------------------------------------------------------- counts


def default_counts(family: str, n: int) -> list[int]:
    """Rings: one circle at the centre, the rest shared by rings in proportion to their
    circumference; rows: about sqrt(n) rows, the extra circles in the middle rows."""
    if family == "random":
        return []
    if family == "rings":
        if n == 1:
            return [1]
        rings = max(2, round(0.5 + math.sqrt(n) / 2))
        weights = np.arange(1, rings, dtype=float)
        share = (n - 1) * weights / weights.sum()
        counts = np.floor(share).astype(int)
        for k in np.argsort(-(share - counts), kind="stable")[: n - 1 - counts.sum()]:
            counts[k] += 1
        return [1, *(int(c) for c in counts if c > 0)]
    rows = max(1, round(math.sqrt(n)))
    base, extra = divmod(n, rows)
    middle = sorted(range(rows), key=lambda j: (abs(j - (rows - 1) / 2), j))[:extra]
    return [base + (j in middle) for j in range(rows)]


def _check_counts(value: Any, n: int) -> list[int]:
    if not isinstance(value, list | tuple) or not value:
        raise GenomeError(f"genome field 'counts' = {value!r} must be a non-empty list of ints")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in value):
        raise GenomeError(f"genome field 'counts' = {value!r} must hold integers >= 1")
    if len(value) > MAX_GROUPS:
        raise GenomeError(f"genome field 'counts' has {len(value)} groups (at most {MAX_GROUPS})")
    if sum(value) != n:
        raise GenomeError(f"genome field 'counts' = {list(value)} sums to {sum(value)}, not n={n}")
    return [int(c) for c in value]


# ---------------------------------------------------------------------------- validation


def validate(genome: Genome, n: int) -> Genome:
    """The canonical genome for ``n`` circles; raises GenomeError naming a bad field."""
    if not isinstance(genome, dict):
        raise GenomeError(f"a genome is a JSON object, not {type(genome).__name__}")
    unknown = sorted(set(genome) - set(FIELDS))
    if unknown:
        raise GenomeError(f"unknown genome field(s) {unknown} (known: {', '.join(FIELDS)})")
    full: Genome = {}
    for gene in GENES:
        value = genome.get(gene.name, gene.default)
        # An int is accepted for a float gene (JSON writes 10.0 as 10); a bool never.
        if isinstance(gene.default, float) and type(value) is int:
            value = float(value)
        same_type = any(type(value) is type(c) for c in gene.choices)
        if not same_type or value not in gene.choices:
            raise GenomeError(
                f"genome field {gene.name!r} = {value!r} is out of range "
                f"(allowed: {list(gene.choices)})"
            )
        full[gene.name] = value
    seed = genome.get("layout_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_LAYOUT_SEED:
        raise GenomeError(
            f"genome field 'layout_seed' = {seed!r} must be an integer in [0, {MAX_LAYOUT_SEED}]"
        )
    full["layout_seed"] = seed
    if _structured(full):
        full["counts"] = _check_counts(genome.get("counts", default_counts(full["family"], n)), n)
    else:
        if genome.get("counts"):  # checked, then dropped: a random layout has no counts
            _check_counts(genome["counts"], n)
        full["counts"] = []
    for gene in GENES:
        if not gene.is_active(full):
            full[gene.name] = gene.default
    return {name: full[name] for name in FIELDS}


def json_schema() -> dict[str, Any]:
    """A JSON schema of the genome, for structured LLM output."""
    properties: dict[str, Any] = {
        g.name: {"enum": list(g.choices), "description": g.description} for g in GENES
    }
    properties["counts"] = {
        "type": "array",
        "items": {"type": "integer", "minimum": 1},
        "maxItems": MAX_GROUPS,
        "description": "circles per ring (inner first) or per row (bottom first); sums to n; "
        "empty for family=random",
    }
    properties["layout_seed"] = {
        "type": "integer",
        "minimum": 0,
        "maximum": MAX_LAYOUT_SEED,
        "description": "seed of the random draws (with the evaluation seed)",
    }
    return {
        "type": "object",
        "properties": {name: properties[name] for name in FIELDS},
        "additionalProperties": False,
    }


def layout(genome: Genome) -> Layout:
    return Layout(
        family=genome["family"],
        counts=tuple(genome["counts"]),
        ring_shape=genome["ring_shape"],
        jitter=genome["jitter"],
        layout_seed=genome["layout_seed"],
    )


def schedule(genome: Genome) -> Schedule:
    return Schedule(**{f.name: genome[f.name] for f in dataclasses.fields(Schedule)})


def seeds(n: int) -> dict[str, Genome]:
    """Named starting candidates: each family with the default (single-batch) optimiser."""
    named = {
        "rings": {"family": "rings"},
        "hex": {"family": "hex"},
        "grid": {"family": "grid"},
        "random": {"family": "random"},
    }
    return {name: validate(g, n) for name, g in named.items()}


# ---------------------------------------------------------------------------- cost

# One-core seconds of a candidate per evaluation seed, fitted by least squares on 30 random
# genomes timed in a worker process (n = 26, 2-core machine, rounds <= 2):
# (1 + rounds) * (steps * (a + b * starts) + starts * lp + polish * p), the pair terms
# scaled by (n / 26)^2.
_STEP_S, _START_STEP_S, _LP_S, _POLISH_S = 1.2e-4, 4.5e-6, 1.2e-2, 0.1


def estimated_seconds(genome: Genome, n: int) -> float:
    """A deterministic estimate of one evaluation's cost (one seed, one core)."""
    g = genome
    scale = (n / 26) ** 2
    descend = g["steps"] * (_STEP_S + _START_STEP_S * g["starts"] * scale)
    per_round = descend + (g["starts"] * _LP_S + g["polish"] * _POLISH_S) * scale
    return (1 + g["rounds"]) * per_round


# The order in which repair gives up work: search rounds first, then batch, steps, polish.
_SHRINK_ORDER = ("rounds", "starts", "steps", "polish")


def shrink_to_budget(genome: Genome, n: int, budget_s: float) -> Genome | None:
    """The genome with its costliest settings lowered one notch at a time until it fits."""
    g = dict(genome)
    while estimated_seconds(g, n) > budget_s:
        for name in _SHRINK_ORDER:
            choices = GENE_BY_NAME[name].choices
            i = choices.index(g[name])
            if i > 0:
                g[name] = choices[i - 1]
                break
        else:
            return None
    return validate(g, n)


# ---------------------------------------------------------------------------- operators


def _step(gene: Gene, value: Any, rng: np.random.Generator) -> Any:
    """Another value of ``gene``: a neighbour for ordered genes, any other choice otherwise."""
    choices = gene.choices
    if gene.ordered:
        i = choices.index(value)
        options = [j for j in (i - 1, i + 1) if 0 <= j < len(choices)]
        return choices[options[int(rng.integers(len(options)))]]
    others = [c for c in choices if c != value]
    return others[int(rng.integers(len(others)))]


def _with_family(genome: Genome, family: str, n: int) -> Genome:
    child = dict(genome, family=family)
    rings_now, rings_before = family == "rings", genome["family"] == "rings"
    if family == "random":
        child["counts"] = []
    elif rings_now != rings_before or not genome["counts"]:
        child["counts"] = default_counts(family, n)  # ring counts are not row counts
    return child


def _move_circles(counts: list[int], rng: np.random.Generator) -> list[int]:
    """Moves one circle between two groups, splits a group or merges two neighbours."""
    counts = list(counts)
    moves = []
    if len(counts) >= 2 and any(c > 1 for c in counts):
        moves.append("move")
    if len(counts) < MAX_GROUPS and any(c > 1 for c in counts):
        moves.append("split")
    if len(counts) >= 2:
        moves.append("merge")
    move = moves[int(rng.integers(len(moves)))]
    if move == "move":
        donors = [i for i, c in enumerate(counts) if c > 1]
        i = donors[int(rng.integers(len(donors)))]
        j = int(rng.choice([k for k in range(len(counts)) if k != i]))
        counts[i] -= 1
        counts[j] += 1
    elif move == "split":
        big = [i for i, c in enumerate(counts) if c > 1]
        i = big[int(rng.integers(len(big)))]
        first = int(rng.integers(1, counts[i]))
        counts[i : i + 1] = [first, counts[i] - first]
    else:
        i = int(rng.integers(len(counts) - 1))
        counts[i : i + 2] = [counts[i] + counts[i + 1]]
    return counts


def make_operators(n: int) -> dict[str, Operator]:
    """The typed mutation and crossover operators for genomes of ``n`` circles."""

    def mutate_group(group: str):
        genes = [g for g in GENES if g.group == group]

        def mutate(rng: np.random.Generator, parents: Sequence[Genome]) -> Genome:
            child = dict(parents[0])
            live = [g for g in genes if g.is_active(child)]
            gene = live[int(rng.integers(len(live)))]
            if gene.name == "family":
                child = _with_family(child, _step(gene, child["family"], rng), n)
            else:
                child[gene.name] = _step(gene, child[gene.name], rng)
            return validate(child, n)

        return mutate

    def mutate_counts(rng: np.random.Generator, parents: Sequence[Genome]) -> Genome:
        parent = parents[0]
        if parent["family"] == "random":  # no counts to change: take a structured family
            family = STRUCTURED[int(rng.integers(len(STRUCTURED)))]
            return validate(_with_family(parent, family, n), n)
        counts = parent["counts"]
        if n == 1:
            return reseed(rng, parents)
        child = dict(parent, counts=_move_circles(counts, rng))
        return validate(child, n)

    def reseed(rng: np.random.Generator, parents: Sequence[Genome]) -> Genome:
        parent = parents[0]
        seed = parent["layout_seed"]
        while seed == parent["layout_seed"]:
            seed = int(rng.integers(MAX_LAYOUT_SEED + 1))
        return validate(dict(parent, layout_seed=seed), n)

    def crossover_uniform(rng: np.random.Generator, parents: Sequence[Genome]) -> Genome:
        a, b = parents[0], parents[1]
        child = {}
        # The arrangement (family, counts, shape) comes whole from one parent.
        source = a if rng.random() < 0.5 else b
        for name in ("family", "counts", "ring_shape"):
            child[name] = source[name]
        for name in FIELDS:
            if name not in child:
                child[name] = (a if rng.random() < 0.5 else b)[name]
        return validate(child, n)

    def crossover_layout(rng: np.random.Generator, parents: Sequence[Genome]) -> Genome:
        del rng
        a, b = parents[0], parents[1]
        taken = ("family", "counts", "ring_shape", "jitter", "layout_seed")
        return validate({name: (b if name in taken else a)[name] for name in FIELDS}, n)

    groups = {
        "layout": "family, ring_shape or jitter",
        "descent": "starts, steps, lr, lr_decay, mu_start, mu_end or radius_init",
        "polish": "polish or polish_iters",
        "search": "rounds or kick",
    }
    ops = {
        f"mutate_{group}": Operator(
            f"mutate_{group}", 1, mutate_group(group), f"change one of {what} to a neighbour"
        )
        for group, what in groups.items()
    }
    ops["mutate_counts"] = Operator(
        "mutate_counts",
        1,
        mutate_counts,
        "move a circle between rings/rows, split one or merge two (random: take a structure)",
    )
    ops["reseed"] = Operator("reseed", 1, reseed, "new layout_seed: fresh random draws")
    ops["crossover_uniform"] = Operator(
        "crossover_uniform", 2, crossover_uniform, "each gene from either parent"
    )
    ops["crossover_layout"] = Operator(
        "crossover_layout", 2, crossover_layout, "the reference's arrangement, own optimiser"
    )
    return ops
