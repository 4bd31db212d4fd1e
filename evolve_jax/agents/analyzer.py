"""The offline Analyzer: a quantitative analysis per node and lessons written back to cognition.

A lesson is a measured effect: "operator X on parents of family Y changed the score by
+a ± b (95% CI) over n children, k beating their parent". It is first written once a group has
3 children and restated (same key, newer provenance) each time the group has grown past the
next doubling (6, 12, 24, ...) since its last statement, however many children a step adds, so
lessons sharpen as evidence accumulates.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import scipy.stats

from evolve_jax.agents.base import Analyzer, Outcome
from evolve_jax.agents.researcher import better, family
from evolve_jax.memory.cognition import Cognition, Item
from evolve_jax.memory.history import Node

_FIRST_LESSON = 3  # children before a group's first lesson; restated at 6, 12, 24, ...


def evidence_level(n: int) -> int:
    """How many of the sizes 3, 6, 12, 24, ... a group of ``n`` children has reached."""
    return 0 if n < _FIRST_LESSON else int(math.log2(n / _FIRST_LESSON)) + 1


def _mean_ci(values: Sequence[float]) -> tuple[float, float]:
    values = np.asarray(values, float)
    if values.size < 2:
        return float(values.mean()), math.nan
    half = scipy.stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / math.sqrt(values.size)
    return float(values.mean()), float(half)


class OfflineAnalyzer(Analyzer):
    def __init__(self, cognition: Cognition, direction: str):
        self.cognition = cognition
        self.direction = direction

    def analyze(self, proposal, outcome: Outcome, score, parents, siblings, label=""):
        del label  # no model calls to charge
        if outcome.status != "ok":
            return (
                f"{outcome.status}: {outcome.reason}. Produced by {proposal.operator} from "
                + ", ".join(p.name for p in parents)
                + "."
            )
        means = {
            name: float(np.mean([m[name] for m in outcome.metrics.values()]))
            for name in next(iter(outcome.metrics.values()))
        }
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(means.items()))
        text = f"score {score:.4g} ({metrics})"
        if parents:
            parent = parents[0]
            delta = score - parent.score if parent.ok else math.nan
            verdict = "beats" if better(score, parent.score, self.direction) else "does not beat"
            text += (
                f"; {verdict} its parent {parent.name} (score {parent.score:.4g}, "
                f"change {delta:+.4g}) via {proposal.operator}"
            )
        ok_siblings = [s for _, s in siblings if math.isfinite(s)]
        if ok_siblings:
            rank = 1 + sum(better(s, score, self.direction) for s in ok_siblings)
            text += f"; rank {rank} of {len(ok_siblings) + 1} in its step"
        if outcome.repairs:
            text += f"; needed {outcome.repairs} repair(s)"
        return text + "."

    def write_lessons(self, view: Sequence[Node], step: int) -> list[Item]:
        del step  # which groups grew since their last lesson is read from cognition itself
        by_id = {n.id: n for n in view}
        groups: dict[tuple[str, str], list[Node]] = defaultdict(list)
        for node in view:
            if node.operator and node.parents and node.parents[0] in by_id:
                groups[(node.operator, family(by_id[node.parents[0]].name))].append(node)
        written = []
        for (op, fam), children in sorted(groups.items()):
            n = len(children)
            key = f"operator:{op}|family:{fam}"
            if evidence_level(n) <= evidence_level(self.cognition.evidence(key)):
                continue
            gains, wins, failures = [], 0, 0
            for child in children:
                parent = by_id[child.parents[0]]
                if not child.ok:
                    failures += 1
                    continue
                sign = 1.0 if self.direction == "max" else -1.0
                gains.append(sign * (child.score - parent.score))
                wins += better(child.score, parent.score, self.direction)
            if gains:
                mean, half = _mean_ci(gains)
                effect = f"mean change in score {mean:+.4g} ± {half:.3g} (95% CI)"
            else:
                effect = "no successful child"
            title = f"{op} on {fam} parents"
            content = (
                f"Operator {op} applied to parents of the {fam} family: {effect} over "
                f"{len(gains)} successful children ({n} proposed, {failures} failed or invalid); "
                f"{wins} beat their parent."
            )
            written.append(
                self.cognition.add_lesson(
                    title,
                    content,
                    nodes=[c.id for c in children],
                    tags=("lesson", "operator", op, fam),
                    key=key,
                )
            )
        return written
