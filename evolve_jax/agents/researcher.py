"""The offline Researcher: typed mutation and crossover, operators chosen by measured gains.

Operator choice is a UCB1 bandit whose reward is "the child beat its parent"; its statistics
are rebuilt from the history at every step, so a resumed run chooses as the original would.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from evolve_jax.agents.base import DesignContext, Proposal, Researcher
from evolve_jax.memory.history import Node
from evolve_jax.search_space import SearchSpace, fingerprint

_NOVELTY_ATTEMPTS = 8


def family(name: str) -> str:
    """The seed lineage a node's name starts with ("deltanet+mutate.s3n1" -> "deltanet")."""
    return name.split("+", 1)[0]


def better(child: float, parent: float, direction: str) -> bool:
    return child > parent if direction == "max" else child < parent


class OperatorBandit:
    """UCB1 over operators; reward 1 when a child beats its parent, else 0."""

    def __init__(self, names: Sequence[str], c: float = 1.0):
        self.names = list(names)
        self.c = c
        self.pulls: dict[str, int] = defaultdict(int)
        self.wins: dict[str, int] = defaultdict(int)

    def rebuild(self, view: Sequence[Node], direction: str) -> None:
        self.pulls.clear()
        self.wins.clear()
        by_id = {n.id: n for n in view}
        for node in view:
            if node.operator not in self.names or not node.parents:
                continue
            parent = by_id.get(node.parents[0])
            if parent is None:
                continue
            self.pulls[node.operator] += 1
            self.wins[node.operator] += int(node.ok and better(node.score, parent.score, direction))

    def choose(
        self, rng: np.random.Generator, allowed: Sequence[str], pending: Counter | None = None
    ) -> str:
        """The operator to pull; ``pending`` counts pulls whose children are not in the view
        yet (a step's earlier proposals), so that they spread over the operators."""
        pending = pending or Counter()
        total = sum(self.pulls[n] + pending[n] for n in allowed) + 1
        values = []
        for name in allowed:
            n = self.pulls[name] + pending[name]
            values.append(
                math.inf
                if n == 0
                else self.wins[name] / n + self.c * math.sqrt(math.log(total) / n)
            )
        best = [name for name, v in zip(allowed, values, strict=True) if v == max(values)]
        return best[int(rng.integers(len(best)))]


class OfflineResearcher(Researcher):
    def __init__(self, space: SearchSpace, direction: str):
        self.space = space
        self.direction = direction
        self.operators = space.operators()
        self.bandit = OperatorBandit(sorted(self.operators))

    def sync(self, view):
        self.bandit.rebuild(view, self.direction)

    def propose(self, context: DesignContext) -> Proposal:
        sel = context.selection
        rng = context.rng
        allowed = [
            name
            for name, op in sorted(self.operators.items())
            if op.arity <= 1 + len(sel.references)
        ]
        taken = set(context.known) | {fingerprint(p.candidate) for p in context.siblings}
        # The proposal depends on the context alone (no state kept between calls): an async
        # run designs a child again from its record.
        pending = Counter(p.operator for p in context.siblings if p.operator)
        op_name = self.bandit.choose(rng, allowed, pending)
        op = self.operators[op_name]
        parents = [sel.parent, *sel.references[: op.arity - 1]]
        genomes = [p.candidate for p in parents]
        child = op.fn(rng, genomes)
        for _ in range(_NOVELTY_ATTEMPTS):  # re-draw rather than propose a known candidate
            if fingerprint(child) not in taken:
                break
            child = op.fn(rng, genomes)
        lesson = context.lessons[0] if context.lessons else None
        motivation = (
            f"Apply {op_name} ({op.description or 'a typed operator'}) to {sel.parent.name} "
            f"(node {sel.parent.id}, score {sel.parent.score:.4g})"
            + (f" with {', '.join(p.name for p in parents[1:])}" if len(parents) > 1 else "")
            + f"; {op_name} has beaten its parent {self.bandit.wins[op_name]} of "
            f"{self.bandit.pulls[op_name] + pending[op_name]} times so far."
            + (f" Relevant lesson: {lesson.title}." if lesson else "")
        )
        return Proposal(
            name=f"{family(sel.parent.name)}+{op_name}.s{context.step}n{context.slot}",
            motivation=motivation,
            candidate=child,
            operator=op_name,
            parents=tuple(p.id for p in parents),
            island=sel.island,
            cognition_ids=tuple(item.id for item in context.lessons),
        )
