"""The offline Analyzer: a quantitative analysis per node and lessons written back to cognition.

A lesson is a measured effect: "operator X on parents of family Y changed the score by
+a ± b (95% CI) over n children, k beating their parent". It is restated (same key, newer
provenance) each time its sample doubles, so lessons sharpen as evidence accumulates.
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

_LESSON_SIZES = (3, 6, 12, 24, 48, 96, 192, 384, 768)


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

    def analyze(self, proposal, outcome: Outcome, score, parents, siblings):
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
        by_id = {n.id: n for n in view}
        groups: dict[tuple[str, str], list[Node]] = defaultdict(list)
        for node in view:
            if node.operator and node.parents and node.parents[0] in by_id:
                groups[(node.operator, family(by_id[node.parents[0]].name))].append(node)
        step_ops = {
            (n.operator, family(by_id[n.parents[0]].name))
            for n in view
            if n.origin.get("step") == step and n.operator and n.parents and n.parents[0] in by_id
        }
        written = []
        for (op, fam), children in sorted(groups.items()):
            n = len(children)
            if (op, fam) not in step_ops or n not in _LESSON_SIZES:
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
                    key=f"operator:{op}|family:{fam}",
                )
            )
        return written
