"""Interfaces of the three roles, and the backend registry (name -> factory of a trio)."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
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


class Researcher(abc.ABC):
    def sync(self, view: Sequence[Node]) -> None:
        """Rebuilds learned statistics from the nodes visible at the start of a step."""
        del view

    @abc.abstractmethod
    def propose(self, context: DesignContext) -> Proposal: ...


class Engineer(abc.ABC):
    @abc.abstractmethod
    def run(
        self, candidates: Sequence[Genome], known: dict[str, int], stage: int, seeds: Sequence[int]
    ) -> list[Outcome]:
        """Checks, repairs and evaluates candidates; one outcome each, in order."""


class Analyzer(abc.ABC):
    @abc.abstractmethod
    def analyze(
        self,
        proposal: Proposal,
        outcome: Outcome,
        score: float,
        parents: Sequence[Node],
        siblings: Sequence[tuple[Proposal, float]],
    ) -> str:
        """The node's analysis: its outcome against its parent and siblings."""

    @abc.abstractmethod
    def write_lessons(self, view: Sequence[Node], step: int) -> list[Item]:
        """Writes the lessons that ``step``'s children support into cognition; returns them."""


@dataclasses.dataclass(frozen=True)
class AgentTrio:
    researcher: Researcher
    engineer: Engineer
    analyzer: Analyzer


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


AGENT_BACKENDS: dict[str, Callable[[AgentEnv], AgentTrio]] = {}


def register_backend(name: str):
    def wrap(factory):
        AGENT_BACKENDS[name] = factory
        return factory

    return wrap


def make_agents(name: str, env: AgentEnv) -> AgentTrio:
    from evolve_jax.agents import offline  # noqa: F401  (registers the built-in backend)

    if name not in AGENT_BACKENDS:
        raise ValueError(f"unknown agent backend {name!r} (known: {', '.join(AGENT_BACKENDS)})")
    return AGENT_BACKENDS[name](env)
