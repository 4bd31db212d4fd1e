"""The plain-text report printed at the end of a run (evolve_jax/report/__init__.py)."""

import re

from evolve_jax import rank_stats, report
from evolve_jax.memory.history import Node
from evolve_jax.search_space import Metric, Stage, TaskDescription

TASK = TaskDescription(
    title="Toy", text="", metrics=(Metric("reward"),), stages=(Stage("cheap"), Stage("full"))
)


def _node(id, cheap, full=None, score=None):
    """A node whose stage-0 reward is ``cheap`` (its score unless given), measured at stage 1
    with reward ``full`` when given."""
    return Node(
        id=id,
        parents=[],
        search_space="toy",
        name=f"n{id}",
        motivation="m",
        candidate={"x": [1]},
        status="ok",
        reason=None,
        metrics={"cheap": {"0": {"reward": cheap}}},
        score=cheap if score is None else score,
        stats={},
        analysis="",
        timings={},
        island=0,
        created=0.0,
        stages={} if full is None else {1: {"status": "ok", "metrics": {"0": {"reward": full}}}},
    )


def _spearman_lines(text):
    return [line for line in text.splitlines() if line.startswith("Spearman")]


def test_too_few_promoted_nodes_get_a_count_and_no_correlation_value():
    nodes = [_node(i, float(i), full=float(i)) for i in range(3)] + [_node(3, 9.0)]
    [line] = _spearman_lines(report.render(nodes, "max", TASK, k=5, workdir="w"))
    assert line == (
        "Spearman rank correlation, stage 0 (cheap) vs stage 1 (full): not shown, 3 promoted "
        f"node(s) measured at both stages and {rank_stats.MIN_MEANINGFUL} needed for it to mean "
        "anything"
    )
    assert not re.search(r"[+-]\d\.\d", line)  # no value (it would be +1.000 here)


def test_enough_promoted_nodes_get_the_correlation():
    n = rank_stats.MIN_MEANINGFUL
    nodes = [_node(i, float(i), full=float(i)) for i in range(n)]
    [line] = _spearman_lines(report.render(nodes, "max", TASK, k=5, workdir="w"))
    assert line.startswith(
        "Spearman rank correlation, stage 0 (cheap) vs stage 1 (full), over the promoted nodes: "
        "+1.000 (95% CI"
    )
    assert f"over {n} nodes" in line and "too few" not in line
    # None promoted: no line at all, as before.
    assert not _spearman_lines(report.render([_node(0, 1.0)], "max", TASK, k=5, workdir="w"))


def _table(text):
    """The header and the candidates' rows of the report's table."""
    lines = text.splitlines()
    return lines[1], [line for line in lines[2:] if line[:4].strip().isdigit()]


def _ends(line, columns=5):
    """Where each of the first ``columns`` (right-aligned) columns of a table line ends."""
    return [m.end() for m in re.finditer(r"\S+", line)][:columns]


def test_metrics_and_scores_print_enough_digits_to_tell_rows_apart():
    # Circle packing's sum of radii: candidates differ in the sixth decimal.
    values = [2.635831, 2.635829, 2.635826, 2.63]
    assert len({f"{v:.6g}" for v in values}) < len(values)  # 6 digits would tie two of them
    nodes = [_node(i, v, full=v + 1.0) for i, v in enumerate(values)]
    header, rows = _table(report.render(nodes, "max", TASK, k=10, workdir="w"))
    cells = {int(r.split()[1]): r.split() for r in rows}
    for i, v in enumerate(values):
        score, cheap, full = (float(x) for x in cells[i][2:5])
        assert score == cheap == v and full == v + 1.0
    assert cells[3][2:5] == ["2.63", "2.63", "3.63"]  # no padding zeros
    # Still aligned: every column ends where its header does.
    assert all(_ends(r) == _ends(header) for r in rows)


def test_well_separated_values_keep_four_digits():
    nodes = [_node(0, 1.23456), _node(1, 2.5)]
    header, rows = _table(report.render(nodes, "max", TASK, k=10, workdir="w"))
    assert [r.split()[2:4] for r in rows] == [["2.5", "2.5"], ["1.235", "1.235"]]
    assert all(_ends(r, 4) == _ends(header, 4) for r in rows)
    assert header.split()[:5] == ["rank", "id", "score", "s0:reward", "s1:reward"]


def test_column_digits_stop_at_ten():
    assert report.column_digits([1.0, 1.0 + 1e-13]) == 10
    assert report.column_digits([None, float("inf"), 3.0]) == 4
    assert report.column_digits([]) == 4


def test_columns_widen_for_long_values_and_stay_aligned():
    values = [-123456.78912, -123456.78913]  # 11 digits needed, 10 printed: 12 characters
    nodes = [_node(i, v, full=v, score=v) for i, v in enumerate(values)]
    header, rows = _table(report.render(nodes, "max", TASK, k=10, workdir="w"))
    assert [r.split()[2] for r in rows] == ["-123456.7891"] * 2
    assert all(_ends(r) == _ends(header) for r in rows)
