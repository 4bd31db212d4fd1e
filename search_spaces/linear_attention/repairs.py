"""Rule-based repair of linear-attention genomes that fail the Engineer's static checks.

Only the parameter budget has an obvious fix: a smaller model of the same design. Failures of
the other checks (shapes, causality, sub-quadratic cost) say the design itself is wrong, which
no rule can mend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from evolve_jax.search_space import CheckFailure
from search_spaces.linear_attention import genome

# The genes a budget repair may lower: size only, never the design.
SHAPE_GENES = ("d_model", "num_layers", "mlp_ratio", "expand_v", "num_heads", "head_dim")


def _one_notch_down(candidate: genome.Genome) -> list[genome.Genome]:
    """Every valid genome one choice below ``candidate`` in a single shape gene."""
    smaller = []
    for name in SHAPE_GENES:
        choices = genome.GENE_BY_NAME[name].choices
        i = choices.index(candidate[name])
        if i == 0:
            continue
        child = genome.validate({**candidate, name: choices[i - 1]})
        if child != candidate:  # an inactive gene (mlp_ratio without an MLP) changes nothing
            smaller.append(child)
    return smaller


def shrink_to_budget(
    candidate: genome.Genome, count: Callable[[genome.Genome], int], budget: int
) -> genome.Genome | None:
    """The nearby smaller genome within ``budget`` parameters, or None when there is none.

    Greedy, one notch at a time: if a single step fits, the fitting step that keeps the most
    parameters; otherwise the step that removes the most, and go on. Ties go to the first gene
    in SHAPE_GENES, so the result is deterministic.
    """
    current = genome.validate(candidate)
    while count(current) > budget:
        steps = [(count(g), g) for g in _one_notch_down(current)]
        if not steps:
            return None  # every shape gene is at its smallest
        fitting = [(n, g) for n, g in steps if n <= budget]
        if fitting:
            return max(fitting, key=lambda step: step[0])[1]
        current = min(steps, key=lambda step: step[0])[1]
    return current


def repair(
    candidate: genome.Genome,
    failures: Sequence[CheckFailure],
    count: Callable[[genome.Genome], int],
    budget: int,
) -> genome.Genome | None:
    """A genome that fixes ``failures``, or None when they are not all budget failures."""
    if not failures or any(f.check != "param_budget" for f in failures):
        return None
    start = genome.validate(candidate)
    repaired = shrink_to_budget(start, count, budget)
    return None if repaired is None or repaired == start else repaired
