"""A child implausibly better than the best known node (--implausible_gain): flagged with the
numbers, kept out of parent and reference selection until re-measured ok at stage 1, shown in
the reports; the same committed history gives the same decisions, resumed or not.

Step 1's children are chosen here (the Researcher's proposals for some slots are replaced), so
the toy space's seeds, whose best stage-0 reward is the ridge's (about -3.92), are the only
nodes a step-1 child is measured against.
"""

import dataclasses
import math

import numpy as np
import pytest

from evolve_jax.config import RunConfig
from evolve_jax.loop import ResearchLoop, same_history
from evolve_jax.memory.history import History
from evolve_jax.report import data
from evolve_jax.sampling import SAMPLERS, SamplerConfig
from evolve_jax.search_space import EvalResult
from tests.conftest import TOY, Crash, crash_at_append
from tests.toy_space import ToySpace

# Stage 0 says -0.01 (a gain near 1 over the ridge's -3.92); the costlier stage, an independent
# measurement, exposes it (see Exploitable).
EXPLOIT = {"x": [4.0, 4.0, 4.0, 4.0], "shape": "bowl"}
# Genuinely good: the stage-1 target itself (stage 0: about -0.25, a gain of about 0.94).
TOO_GOOD = {"x": [1.75, -1.75, 0.75, 1.25], "shape": "bowl"}
# Better than the ridge by about 0.11 of its magnitude: under the default threshold of 0.25.
PLAIN = {"x": [1.5, -1.0, 1.0, -1.0], "shape": "ridge"}
# About -2.8: a gain of about 0.29 over the ridge, but of about 0.2 over PLAIN.
STEP = {"x": [1.5 + math.sqrt(2.8), -2.0, 0.5, 1.0], "shape": "bowl"}


class Exploitable(ToySpace):
    """The toy, with a harness hole: EXPLOIT scores -0.01 at stage 0 and fails at the costlier
    stages, which measure it independently."""

    def evaluate(self, genomes, stage, seeds, devices):
        results = super().evaluate(genomes, stage, seeds, devices)
        for i, genome in enumerate(genomes):
            if genome["x"] == EXPLOIT["x"]:
                results[i] = (
                    EvalResult(metrics={s: {self.metric: -0.01} for s in seeds})
                    if stage == 0
                    else EvalResult(error="the hole is not there at this stage")
                )
        return results


def _config(workdir, **overrides):
    values = dict(
        search_space=TOY,
        workdir=str(workdir),
        steps=3,
        samples_per_step=2,
        seed=0,
        sampler=SamplerConfig(name="greedy"),
    )
    values.update(overrides)
    return RunConfig(**values)


def _loop(config, space, injected):
    """A loop whose step-1 proposals for the slots in ``injected`` carry those genomes; the
    rest of the search is the offline Researcher's. Every selection made is kept in
    ``loop.selections`` as (step, slot, parent id, reference ids)."""
    loop = ResearchLoop(config, space)
    researcher, sampler = loop.agents.researcher, loop.sampler
    propose_batch, select = researcher.propose_batch, sampler.select
    loop.selections = []

    def injecting(contexts):
        proposals = propose_batch(contexts)
        return [
            dataclasses.replace(p, candidate=injected[c.slot], name=f"injected{c.slot}")
            if c.step == 1 and c.slot in injected
            else p
            for c, p in zip(contexts, proposals, strict=True)
        ]

    def recording(pool, rng, slot):
        selection = select(pool, rng, slot)
        refs = [r.id for r in selection.references]
        loop.selections.append((len(loop.selections) // config.samples_per_step + 1, slot,
                                selection.parent.id, refs))  # fmt: skip
        return selection

    researcher.propose_batch = injecting
    sampler.select = recording
    return loop


def _slot(nodes, step, slot):
    [node] = [n for n in nodes if n.origin["step"] == step and n.origin["slot"] == slot]
    return node


def _mean_reward(node):
    return float(np.mean([m["reward"] for m in node.metrics["cheap"].values()]))


def _report_row(report, node):
    return next(line for line in report.splitlines() if line[4:].split()[:1] == [str(node.id)])


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_an_implausible_child_is_flagged_and_no_sampler_selects_it_until_re_measured_ok(
    tmp_path, sampler
):
    sampling = SamplerConfig(name=sampler, num_islands=2, migration_interval=2, migration_rate=1)
    config = _config(tmp_path, sampler=sampling, promote_top_k=1)
    loop = _loop(config, Exploitable(), {0: EXPLOIT, 1: PLAIN})
    summary = loop.run()
    nodes = summary.nodes
    exploit, plain = _slot(nodes, 1, 0), _slot(nodes, 1, 1)
    ridge = next(n for n in nodes if n.name == "ridge")
    assert exploit.ok and exploit.candidate == EXPLOIT
    flag = exploit.stats["implausible"]
    best = _mean_reward(ridge)
    assert best == max(_mean_reward(n) for n in nodes[:3])  # the best seed
    assert flag == {
        "metric": "reward",
        "value": pytest.approx(-0.01),
        "best": pytest.approx(best),
        "best_node": ridge.id,
        "gain": pytest.approx((-0.01 - best) / abs(best)),
        "threshold": 0.25,
    }
    assert "implausible" not in plain.stats
    assert _mean_reward(plain) > best  # a plain good child: better, plausibly so
    # Promoted at the next promotion, in addition to the top 1 (the ridge after step 0, the
    # plain child after step 1); the costlier stage fails it.
    assert exploit.stages[1]["status"] == "failed"
    assert {n.id for n in nodes if 1 in n.stages if n.origin["step"] < 2} == {
        ridge.id,
        exploit.id,
        plain.id,
    }
    # No sampler picks it as parent or reference in the later steps, nor migrates it.
    later = [s for s in loop.selections if s[0] > 1]
    assert len(later) == 4
    assert all(exploit.id != parent and exploit.id not in refs for _, _, parent, refs in later)
    assert all(exploit.id not in n.parents for n in nodes if n.origin["step"] > 1)
    moves = [m for _, r in loop.history.records("migrations/main") for m in r["moves"]]
    assert (sampler == "islands") == bool(moves)
    assert exploit.id not in {node_id for node_id, _ in moves}
    if sampler == "greedy":  # the best trusted node, the plain good child, is the parent
        assert [parent for _, _, parent, _ in later[:2]] == [plain.id, plain.id]
    assert summary.best.id != exploit.id
    row = _report_row(summary.report, exploit)
    assert "[implausible: reward -0.01 against the best" in row and "failed at stage 1" in row
    held = "not re-measured ok at stage 1 (kept out of parent selection and of the best)"
    assert f"{held}: node(s) {exploit.id}" in summary.report


@pytest.mark.parametrize("stages,promote_top_k", [("1", 1), ("2", 0)])
def test_without_a_costlier_stage_or_promotion_a_flagged_node_stays_out_and_the_html_says_why(
    tmp_path, stages, promote_top_k
):
    config = _config(tmp_path, promote_top_k=promote_top_k)
    loop = _loop(config, Exploitable(stages=stages), {0: EXPLOIT, 1: PLAIN})
    summary = loop.run()
    exploit, plain = _slot(summary.nodes, 1, 0), _slot(summary.nodes, 1, 1)
    assert "implausible" in exploit.stats and not exploit.stages
    assert not any(n.stages for n in summary.nodes)  # nothing to re-measure it with
    assert {parent for step, _, parent, _ in loop.selections if step > 1} == {plain.id}
    assert (
        summary.best.id
        == max((n for n in summary.nodes if n.ok and n.id != exploit.id), key=lambda n: n.score).id
    )
    assert "not re-measured yet" in _report_row(summary.report, exploit)
    assert ("this space has one stage, so they stay out" in summary.report) == (stages == "1")
    payload = data.collect(str(tmp_path), live=False)
    reasons = dict(zip(payload["nodes"]["id"], payload["nodes"]["reason"], strict=True))
    assert reasons[exploit.id].startswith("implausible: reward -0.01 against the best")
    assert reasons[plain.id] is None


def test_a_flagged_node_re_measured_ok_at_stage_1_may_be_a_parent(tmp_path):
    config = _config(tmp_path, promote_top_k=1)
    loop = _loop(config, ToySpace(), {0: TOO_GOOD, 1: PLAIN})
    summary = loop.run()
    good, plain = _slot(summary.nodes, 1, 0), _slot(summary.nodes, 1, 1)
    assert good.stats["implausible"]["gain"] > 0.9
    # Promoted in addition to the top k: the best trusted node kept its place.
    assert good.stages[1]["status"] == "ok" and plain.stages[1]["status"] == "ok"
    # From the next step on, greedy takes it: its stage-0 reward is the best.
    assert [parent for step, _, parent, _ in loop.selections if step == 2] == [good.id, good.id]
    assert summary.best.id == good.id
    assert "re-measured ok at stage 1" in _report_row(summary.report, good)
    assert "Flagged implausibly good" not in summary.report


def test_implausible_gain_inf_flags_nothing(tmp_path):
    config = _config(tmp_path, implausible_gain=math.inf)
    loop = _loop(config, Exploitable(), {0: EXPLOIT, 1: PLAIN})
    summary = loop.run()
    exploit = _slot(summary.nodes, 1, 0)
    assert not any("implausible" in n.stats for n in summary.nodes)
    assert not any(n.stages for n in summary.nodes)  # nothing promoted (--promote_top_k=0)
    assert [parent for step, _, parent, _ in loop.selections if step == 2] == [exploit.id] * 2
    assert "[implausible:" not in summary.report and "Flagged" not in summary.report


def test_earlier_slots_of_the_same_step_count_as_known(tmp_path):
    """STEP beats the ridge by more than 0.25 of its magnitude, PLAIN by less: flagged when
    it comes first in its step, not when PLAIN was recorded before it."""
    first = _loop(_config(tmp_path / "a", steps=1), ToySpace(), {0: STEP, 1: PLAIN}).run()
    second = _loop(_config(tmp_path / "b", steps=1), ToySpace(), {0: PLAIN, 1: STEP}).run()
    flag = _slot(first.nodes, 1, 0).stats["implausible"]
    assert flag["best_node"] == 2 and 0.25 < flag["gain"] < 0.35
    after_plain = _slot(second.nodes, 1, 1)
    assert after_plain.candidate == STEP and "implausible" not in after_plain.stats


@pytest.mark.parametrize("crash_after", [3, 6])
def test_a_resumed_run_makes_the_same_decisions(tmp_path, crash_after):
    """A crash after the k-th committed node (the flagged one among them, or not) resumes to
    the uninterrupted run's history, flags and stage results included."""
    injected = {0: EXPLOIT, 1: PLAIN}
    sampling = SamplerConfig(name="ucb1")
    config = _config(tmp_path / "crashed", sampler=sampling)
    loop = _loop(config, Exploitable(), injected)
    crash_at_append(loop, crash_after)
    with pytest.raises(Crash):
        loop.run()
    resumed = _loop(config, Exploitable(), injected).run()
    expected = _loop(_config(tmp_path / "ref", sampler=sampling), Exploitable(), injected).run()
    assert same_history(resumed.nodes, expected.nodes)
    assert any("implausible" in n.stats for n in expected.nodes)

    def stages(workdir):
        return {
            (n.id, s): r["status"] for n in History(workdir).nodes() for s, r in n.stages.items()
        }

    assert stages(config.workdir) == stages(str(tmp_path / "ref"))
