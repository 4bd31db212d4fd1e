"""Rule-based repair in the linear-attention space: shrink a model over the parameter budget."""

import jax

from evolve_jax.agents.engineer import RuleEngineer
from evolve_jax.search_space import CheckFailure
from search_spaces.linear_attention import genome, model, repairs
from search_spaces.linear_attention.space import LinearAttentionSpace
from tests.test_linear_attention import TINY_OPTIONS

BUDGET = 50_000
BIG = genome.validate({**genome.SEEDS["deltanet"], "num_layers": 3})  # ~130k parameters


def _space(budget=BUDGET):
    return LinearAttentionSpace(**TINY_OPTIONS, param_budget=str(budget))


def _count(space, g):
    return model.param_count(space.model_config(g))


def test_over_budget_genome_is_shrunk_with_shape_genes_only():
    space = _space()
    [failure] = space.check(BIG)
    assert failure.check == "param_budget"
    repaired = space.repair(BIG, [failure])
    assert repaired is not None and genome.validate(repaired) == repaired
    assert _count(space, repaired) <= BUDGET < _count(space, BIG)
    changed = {name for name in BIG if BIG[name] != repaired[name]}
    assert changed and changed <= set(repairs.SHAPE_GENES)
    assert _space().repair(BIG, [failure]) == repaired  # deterministic


def test_greedy_prefers_the_smallest_change():
    def count(g):  # d_model and depth only, so every step's effect is known
        return g["d_model"] * g["num_layers"] * 100

    big = genome.validate({"d_model": 128, "num_layers": 4})  # 51,200
    # Both d_model -> 64 (25,600) and num_layers -> 3 (38,400) fit: keep the larger model.
    smaller = repairs.shrink_to_budget(big, count, 40_000)
    assert (smaller["d_model"], smaller["num_layers"]) == (128, 3)
    # No single step fits 10,000: the largest cuts first (d_model twice), then depth fits.
    smaller = repairs.shrink_to_budget(big, count, 10_000)
    assert (smaller["d_model"], smaller["num_layers"]) == (32, 3)
    assert repairs.shrink_to_budget(big, count, 100) is None


def test_engineer_repairs_within_max_repairs():
    space = _space()
    repaired, reason, attempts = RuleEngineer(space, jax.devices(), max_repairs=1).prepare(BIG, {})
    assert reason is None and [a["by"] for a in attempts] == ["rule"]
    assert attempts[0]["reason"].startswith("param_budget")
    assert _count(space, repaired) <= BUDGET
    unrepaired, reason, attempts = RuleEngineer(space, jax.devices(), max_repairs=0).prepare(
        BIG, {}
    )
    assert unrepaired == BIG and attempts == []
    assert reason.startswith("param_budget")


def test_unreachable_budget_is_not_repaired():
    space = _space(budget=1_000)  # the embedding alone has 64 x 32 parameters
    [failure] = space.check(BIG)
    assert space.repair(BIG, [failure]) is None
    _, reason, attempts = RuleEngineer(space, jax.devices(), max_repairs=2).prepare(BIG, {})
    assert reason.startswith("param_budget") and attempts == []


def test_other_failures_are_not_repaired():
    space = _space()
    budget = CheckFailure("param_budget", "too big")
    for check in ("shapes", "causality", "subquadratic"):
        other = CheckFailure(check, "broken")
        assert space.repair(BIG, [other]) is None
        assert space.repair(BIG, [budget, other]) is None
