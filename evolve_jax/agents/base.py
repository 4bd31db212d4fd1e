"""Interfaces of the three roles, and the backend registry (name -> factory of a trio).

Backends register like search spaces: through the ``evolve_jax.agent_backends`` entry-point
group (installed packages), or named as ``package.module:factory`` on the command line.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import importlib.metadata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from evolve_jax.memory.cognition import Cognition, Item
from evolve_jax.memory.history import History, Node
from evolve_jax.sampling import Selection
from evolve_jax.search_space import Genome, SearchSpace


@dataclasses.dataclass(frozen=True)
class Proposal:
    """The Researcher's child: what it is, why, and where it came from."""

    name: str
    motivation: str
    candidate: Genome
    operator: str | None
    parents: tuple[int, ...]
    island: int
    cognition_ids: tuple[str, ...] = ()
    # Set when no runnable candidate came out of design: (status, reason), recorded as is.
    failure: tuple[str, str] | None = None
    # What design went through (re-asks, novelty checks), stored in the node's stats.
    notes: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DesignContext:
    """Everything the Researcher sees for one slot of one step."""

    step: int
    slot: int
    selection: Selection
    lessons: tuple[Item, ...]
    siblings: tuple[Proposal, ...]  # earlier proposals of the same step
    known: frozenset[str]  # fingerprints of every candidate already in the history
    rng: np.random.Generator


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The Engineer's record of one proposal at one stage."""

    status: str  # ok / invalid / failed / timeout
    reason: str | None
    metrics: dict[str, dict[str, float | None]]  # seed -> metric -> value
    candidate: Genome  # after repairs
    repairs: int = 0
    seconds: float = 0.0
    # Every repair attempt: {"reason": why it was needed, "by": "rule" | "model", ...}.
    attempts: tuple[Mapping[str, Any], ...] = ()
    # A sandboxed program's stdout and stderr (tails), for the Analyzer; empty for genomes.
    output: Mapping[str, str] = dataclasses.field(default_factory=dict)


class Researcher(abc.ABC):
    # Slots designed at once: each sees the proposals of the earlier batches of its step.
    batch_size: int = 1

    def sync(self, view: Sequence[Node]) -> None:
        """Rebuilds learned statistics from the nodes visible at the start of a step."""
        del view

    @abc.abstractmethod
    def propose(self, context: DesignContext) -> Proposal: ...

    def propose_batch(self, contexts: Sequence[DesignContext]) -> list[Proposal]:
        """One proposal per context, in order (a backend may design them concurrently)."""
        return [self.propose(c) for c in contexts]


class Engineer(abc.ABC):
    @abc.abstractmethod
    def run(
        self,
        candidates: Sequence[Genome],
        known: dict[str, int],
        stage: int,
        seeds: Sequence[int],
        labels: Sequence[str] | None = None,
    ) -> list[Outcome]:
        """Checks, repairs and evaluates candidates; one outcome each, in order.

        ``labels`` name each candidate's slot, so that a model's cost can be charged to it.
        """

    def take_usage(self) -> dict[str, Any]:
        """Device usage of the ``run`` calls since the last take (empty if not measured)."""
        return {}


class Analyzer(abc.ABC):
    @abc.abstractmethod
    def analyze(
        self,
        proposal: Proposal,
        outcome: Outcome,
        score: float,
        parents: Sequence[Node],
        siblings: Sequence[tuple[Proposal, float]],
        label: str = "",
    ) -> str:
        """The node's analysis: its outcome against its parent and siblings."""

    @abc.abstractmethod
    def write_lessons(self, view: Sequence[Node], step: int) -> list[Item]:
        """Writes the lessons that ``step``'s children support into cognition; returns them."""

    def judge(
        self, proposal: Proposal, outcome: Outcome, parents: Sequence[Node], label: str = ""
    ) -> dict | None:
        """An optional judgement blended into the fitness: {"normalised": [0, 1], "weight", ...}."""
        del proposal, outcome, parents, label
        return None


class CostMeter(abc.ABC):
    """What a model-backed trio spent, by slot and by step (token counts and USD)."""

    @abc.abstractmethod
    def take_slot(self, step: int, slot: int) -> dict[str, Any]:
        """The usage charged to one slot since it was last taken (JSON)."""

    @abc.abstractmethod
    def take_step(self, step: int) -> dict[str, Any]:
        """The usage of ``step`` not charged to a slot (lessons, embeddings), since last taken."""


@dataclasses.dataclass(frozen=True)
class AgentTrio:
    researcher: Researcher
    engineer: Engineer
    analyzer: Analyzer
    cost: CostMeter | None = None  # None: the backend makes no paid calls


@dataclasses.dataclass(frozen=True)
class AgentEnv:
    """What a backend builds its agents from."""

    space: SearchSpace
    history: History
    cognition: Cognition
    direction: str
    devices: Sequence[Any]
    concurrency: int = 1
    max_repairs: int = 2
    workdir: str = ""
    run_name: str = "main"
    llm: Any = None  # evolve_jax.config.LLMConfig, read by model-backed backends
    eval_timeout_s: float = float("inf")  # deadline of one evaluation (evaluation/scheduler.py)


def available_backends() -> list[str]:
    """Names of the installed agent backends."""
    return sorted(
        ep.name for ep in importlib.metadata.entry_points(group="evolve_jax.agent_backends")
    )


def backend_factory(spec: str) -> Callable[[AgentEnv], AgentTrio]:
    """The factory of an installed backend name or a ``module:factory`` spec."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"agent backend {spec!r} cannot be imported: {e}") from e
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="evolve_jax.agent_backends")}
    if spec not in eps:
        known = ", ".join(sorted(eps)) or "none installed"
        raise ValueError(f"unknown agent backend {spec!r} (known: {known})")
    return eps[spec].load()


def make_agents(name: str, env: AgentEnv) -> AgentTrio:
    trio = backend_factory(name)(env)
    if not isinstance(trio, AgentTrio):
        raise ValueError(f"agent backend {name!r} did not build an AgentTrio")
    return trio
