import jax
import numpy as np
import pytest

from evolve_jax.agents import available_backends, make_agents
from evolve_jax.agents.analyzer import OfflineAnalyzer
from evolve_jax.agents.base import AgentEnv
from evolve_jax.agents.engineer import INFRASTRUCTURE_RETRIES, InfrastructureFailure, RuleEngineer
from evolve_jax.agents.researcher import OperatorBandit
from evolve_jax.config import RunConfig
from evolve_jax.loop import ResearchLoop
from evolve_jax.memory.cognition import Cognition
from evolve_jax.memory.history import History, Node
from evolve_jax.search_space import EvalResult, fingerprint
from tests.toy_space import ToySpace


def _node(i, score, operator=None, parents=(), name=None, status="ok", step=1):
    return Node(
        id=i, parents=list(parents), search_space="toy", name=name or f"origin+{operator}",
        motivation="", candidate={}, status=status, reason=None, metrics={}, score=score,
        stats={}, analysis="", timings={}, island=0, created=0.0, operator=operator,
        origin={"run": "main", "step": step, "slot": i},
    )  # fmt: skip


def test_bandit_prefers_the_operator_with_measured_gains():
    view = [_node(0, 1.0, name="origin", step=0)]
    view += [_node(1 + i, 2.0, "good", [0]) for i in range(6)]
    view += [_node(7 + i, 0.5, "bad", [0]) for i in range(6)]
    bandit = OperatorBandit(["bad", "good", "untried"])
    bandit.rebuild(view, "max")
    assert (bandit.pulls["good"], bandit.wins["good"], bandit.wins["bad"]) == (6, 6, 0)
    rng = np.random.default_rng(0)
    assert bandit.choose(rng, ["bad", "good", "untried"]) == "untried"  # untried first
    choices = [bandit.choose(rng, ["bad", "good"]) for _ in range(20)]
    assert choices.count("good") > choices.count("bad")


def test_bandit_counts_failures_as_losses_in_min_direction():
    view = [_node(0, 1.0, name="origin", step=0), _node(1, 0.5, "op", [0])]
    view.append(_node(2, float("inf"), "op", [0], status="failed"))
    bandit = OperatorBandit(["op"])
    bandit.rebuild(view, "min")
    assert (bandit.pulls["op"], bandit.wins["op"]) == (2, 1)


def _engineer(max_repairs=2):
    return RuleEngineer(ToySpace(), jax.devices(), concurrency=2, max_repairs=max_repairs)


def test_engineer_records_each_failure_with_its_reason():
    good = {"x": [1.0, -2.0, 0.5, 1.0], "shape": "bowl"}
    outcomes = _engineer().run(
        [
            good,
            {"x": [0.0, 0.0, 0.0, 0.0], "shape": "bowl", "colour": 1},
            {"x": [0.0, 0.0, 0.0, 0.0], "shape": "broken"},
            {"x": [9.0, 0.0, 0.0, 0.0], "shape": "bowl"},
            {"x": [1.0, 1.0, 1.0, 1.0], "shape": "bowl"},
        ],
        known={fingerprint({"x": [1.0, 1.0, 1.0, 1.0], "shape": "bowl"}): 7},
        stage=0,
        seeds=[0, 1],
    )
    statuses = [(o.status, o.reason) for o in outcomes]
    assert statuses[0] == ("ok", None) and set(outcomes[0].metrics) == {"0", "1"}
    assert statuses[1][0] == "invalid" and "unknown field(s) ['colour']" in statuses[1][1]
    assert statuses[2][0] == "failed" and "non-finite metric 'reward'" in statuses[2][1]
    assert statuses[3] == ("ok", None)  # repaired by clipping into the box
    assert outcomes[3].repairs == 1 and outcomes[3].candidate["x"][0] == 5.0
    assert statuses[4] == ("invalid", "novelty: duplicate of node 7")


def test_engineer_without_repairs_marks_check_failures_invalid():
    outcome = _engineer(max_repairs=0).run(
        [{"x": [9.0, 0.0, 0.0, 0.0], "shape": "bowl"}], {}, 0, [0]
    )[0]
    assert (outcome.status, outcome.reason) == ("invalid", "bounds: |x| exceeds 5.0")


def test_engineer_turns_a_crashing_evaluation_into_failed_outcomes():
    class Crashing(ToySpace):
        def evaluate(self, genomes, stage, seeds, devices):
            raise RuntimeError("out of memory")

    engineer = RuleEngineer(Crashing(), jax.devices())
    outcome = engineer.run([{"x": [0.0] * 4, "shape": "bowl"}], {}, 0, [0])[0]
    assert (outcome.status, outcome.reason) == ("failed", "RuntimeError: out of memory")


def test_analyzer_writes_quantitative_lessons_with_provenance(tmp_path):
    history = History(str(tmp_path / "run"))
    history.initialise("toy", "max")
    cognition = Cognition(history=history)
    view = [_node(0, 1.0, name="origin", step=0)]
    view += [_node(1 + i, 1.0 + 0.1 * (i + 1), "gauss", [0]) for i in range(3)]
    lessons = OfflineAnalyzer(cognition, "max").write_lessons(view, step=1)
    assert len(lessons) == 1
    lesson = lessons[0]
    assert lesson.title == "gauss on origin parents"
    assert "mean change in score +0.2 ±" in lesson.content
    assert "3 beat their parent" in lesson.content
    assert lesson.provenance["nodes"] == [1, 2, 3]
    assert [k for k, _ in history.records("lessons")] == [lesson.id]


def test_lessons_are_written_when_a_group_crosses_a_size_threshold(tmp_path):
    """Groups that grow 2 -> 4 -> 7 -> 13 reach 3, 6 and 12 without ever equalling them."""
    history = History(str(tmp_path / "run"))
    history.initialise("toy", "max")
    cognition = Cognition(history=history)
    analyzer = OfflineAnalyzer(cognition, "max")
    view = [_node(0, 1.0, name="origin", step=0)]
    sizes = []
    for step, size in enumerate((2, 4, 7, 13, 13), start=1):
        view += [
            _node(len(view) + i, 1.5, "gauss", [0], step=step) for i in range(size - len(view) + 1)
        ]
        lessons = analyzer.write_lessons(view, step)
        sizes.append([len(lesson.provenance["nodes"]) for lesson in lessons])
    assert sizes == [[], [4], [7], [13], []]
    # A resumed run reads the stored lessons and does not restate them.
    again = OfflineAnalyzer(Cognition(history=history), "max").write_lessons(view, 5)
    assert again == []
    assert len(history.records("lessons")) == 3


def test_backend_registry_has_offline_and_refuses_unknown(tmp_path):
    history = History(str(tmp_path / "run"))
    history.initialise("toy", "max")
    env = AgentEnv(ToySpace(), history, Cognition(), "max", jax.devices())
    trio = make_agents("offline", env)
    assert {"offline", "gemini"} <= set(available_backends()) and trio.engineer.space is env.space
    with pytest.raises(ValueError, match="unknown agent backend 'oracle'"):
        make_agents("oracle", env)


class _Unstartable(ToySpace):
    """Its first ``failures`` evaluations come back as the harness reports a sandbox that would
    not start (an infrastructure failure), then it evaluates."""

    def __init__(self, failures):
        super().__init__()
        self.failures, self.calls = failures, 0

    def evaluate(self, genomes, stage, seeds, devices):
        self.calls += 1
        if self.calls <= self.failures:
            why = "infrastructure: no sandbox started in 3 attempts: fork failed"
            return [EvalResult(error=why, extra={"infrastructure": True}) for _ in genomes]
        return super().evaluate(genomes, stage, seeds, devices)


def test_an_infrastructure_failure_is_run_again_not_recorded_as_the_candidates():
    space = _Unstartable(failures=INFRASTRUCTURE_RETRIES - 1)
    outcome = RuleEngineer(space, jax.devices()).run(
        [{"x": [0.0] * 4, "shape": "bowl"}], {}, 0, [0]
    )
    assert (outcome[0].status, outcome[0].reason) == ("ok", None)
    assert space.calls == INFRASTRUCTURE_RETRIES


def test_an_infrastructure_that_keeps_failing_stops_the_run_with_nothing_recorded(tmp_path):
    workdir = str(tmp_path / "run")
    config = RunConfig(search_space="toy", workdir=workdir, steps=1)
    with pytest.raises(InfrastructureFailure, match="no sandbox started in 3 attempts"):
        ResearchLoop(config, _Unstartable(failures=10**6)).run()
    assert History(workdir).nodes() == []
