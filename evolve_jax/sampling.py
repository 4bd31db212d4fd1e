"""Parent samplers: greedy, random, UCB1, islands (ring migration), MAP-Elites.

Every sampler's state is a function of the experiment history, so a resumed run samples exactly
as an uninterrupted one would: UCB1 visit counts are the number of recorded children of each
node (plus the selections made earlier in the current step), island membership is on the nodes,
and migrations are write-once records in the store.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
from absl import logging

from evolve_jax.memory.history import History, Node
from evolve_jax.search_space import DescriptorAxis


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    name: str = "ucb1"
    num_references: int = 2
    ucb_c: float = 1.414
    num_islands: int = 5
    migration_interval: int = 10
    migration_rate: float = 0.1
    exploration: float = 0.2
    exploitation: float = 0.6

    def __post_init__(self):
        if self.name not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.name!r} (known: {', '.join(SAMPLERS)})")
        if self.num_islands < 1 or self.migration_interval < 1 or self.num_references < 0:
            raise ValueError("num_islands and migration_interval must be >= 1, references >= 0")
        if not (0 <= self.migration_rate <= 1 and 0 <= self.exploration + self.exploitation <= 1):
            raise ValueError("migration_rate, exploration + exploitation must lie in [0, 1]")


def awaiting_remeasure(node: Node) -> bool:
    """Whether ``node`` was flagged implausibly good when recorded (``stats["implausible"]``,
    loop.py) and has no successful result at stage 1 yet: the loop keeps such a node out of
    parent and reference selection, and out of "best", until that costlier, independent
    evaluation succeeds."""
    return "implausible" in node.stats and (node.stages.get(1) or {}).get("status") != "ok"


def sampleable(node: Node) -> bool:
    """Whether ``node`` may be a parent or reference: it succeeded and is not awaiting
    re-measurement (``awaiting_remeasure``)."""
    return node.ok and not awaiting_remeasure(node)


@dataclasses.dataclass(frozen=True)
class Selection:
    parent: Node
    references: tuple[Node, ...]
    island: int


class Sampler(abc.ABC):
    """Chooses a parent (and reference nodes) from the pool of successful nodes."""

    def __init__(
        self,
        config: SamplerConfig,
        direction: str,
        axes: Sequence[DescriptorAxis] = (),
        run: str = "main",
    ):
        self.config = config
        self.direction = direction
        self.axes = tuple(axes)
        self.run = run  # names this run's records in a history that several runs share
        # (pool, its length, its ranking): holding the pool keeps its identity unique.
        self._ranked_of: tuple[Sequence[Node], int, list[Node]] | None = None

    def rank_key(self, node: Node) -> float:
        """Larger is better, whatever the score's direction."""
        return node.score if self.direction == "max" else -node.score

    def ranked(self, pool: Sequence[Node]) -> list[Node]:
        """``pool`` best first; the last ranking is reused while the same pool is passed in."""
        held = self._ranked_of
        if held is None or held[0] is not pool or held[1] != len(pool):
            ranking = sorted(pool, key=lambda n: (-self.rank_key(n), n.id))
            self._ranked_of = (pool, len(pool), ranking)
        return self._ranked_of[2]

    def sync(self, history: History, view: Sequence[Node], step: int) -> None:
        """Rebuilds the sampler's state from the nodes visible at the start of ``step``."""
        del history, view, step  # stateless by default

    def references(self, pool: Sequence[Node], parent: Node) -> tuple[Node, ...]:
        others = [n for n in self.ranked(pool) if n.id != parent.id]
        return tuple(others[: self.config.num_references])

    @abc.abstractmethod
    def select(self, pool: Sequence[Node], rng: np.random.Generator, slot: int) -> Selection: ...


class Greedy(Sampler):
    """Always the best node."""

    def select(self, pool, rng, slot):
        parent = self.ranked(pool)[0]
        return Selection(parent, self.references(pool, parent), parent.island)


class Random(Sampler):
    """A uniformly random node."""

    def select(self, pool, rng, slot):
        parent = pool[int(rng.integers(len(pool)))]
        refs = [pool[i] for i in rng.permutation(len(pool)) if pool[i].id != parent.id]
        return Selection(parent, tuple(refs[: self.config.num_references]), parent.island)


class UCB1(Sampler):
    """Min-max-normalised score + c * sqrt(ln N / n_i); unvisited nodes first.

    Every selection, the cold start included, increments the chosen node's visit count (the
    reference implementation's cold path never does, so it samples at random forever).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.visits: Counter[int] = Counter()
        self._cache: tuple[Sequence[Node], int, np.ndarray, np.ndarray] | None = None

    def sync(self, history, view, step):
        self.visits = Counter(p for n in view for p in n.parents[:1])
        self._cache = None

    def _arrays(self, pool: Sequence[Node]) -> tuple[np.ndarray, np.ndarray]:
        """Normalised scores and visit counts of ``pool``, built once per pool."""
        if self._cache is None or self._cache[0] is not pool or self._cache[1] != len(pool):
            keys = np.fromiter((self.rank_key(n) for n in pool), float, len(pool))
            low, high = keys.min(), keys.max()
            norm = (keys - low) / (high - low) if high > low else np.zeros_like(keys)
            visits = np.fromiter((self.visits[n.id] for n in pool), float, len(pool))
            self._cache = (pool, len(pool), norm, visits)
        return self._cache[2], self._cache[3]

    def select(self, pool, rng, slot):
        norm, visits = self._arrays(pool)
        total = visits.sum() + 1
        with np.errstate(divide="ignore"):
            bonus = np.where(
                visits > 0,
                self.config.ucb_c * np.sqrt(np.log(total) / np.maximum(visits, 1)),
                np.inf,
            )
        value = norm + bonus
        best = np.flatnonzero(value == value.max())
        index = int(rng.choice(best))
        parent = pool[index]
        self.visits[parent.id] += 1
        visits[index] += 1
        return Selection(parent, self.references(pool, parent), parent.island)


class Islands(Sampler):
    """Island model: each slot works on one island; the best nodes migrate around a ring.

    Every ``migration_interval`` steps the top ``migration_rate`` of each island is copied to the
    next island; migrations are write-once records keyed by run and step, so every process and
    every resume of a run agrees, and runs sharing a workdir keep their own migrations.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.migrants: dict[int, set[int]] = {}

    def members(self, pool: Sequence[Node], island: int) -> list[Node]:
        extra = self.migrants.get(island, set())
        return [n for n in pool if n.island == island or n.id in extra]

    def sync(self, history, view, step):
        ok = [n for n in view if sampleable(n)]  # a node awaiting re-measurement stays put
        interval = self.config.migration_interval
        if step > 0 and step % interval == 0 and ok:
            self.migrants = self._load(history)
            moves = []
            for island in range(self.config.num_islands):
                members = self.ranked(self.members(ok, island))
                k = math.ceil(self.config.migration_rate * len(members))
                dest = (island + 1) % self.config.num_islands
                moves += [[n.id, dest] for n in members[:k]]
            history.write_record(
                f"migrations/{self.run}", f"{step:08d}", {"step": step, "moves": moves}
            )
            logging.info("islands: migration at step %d moves %d node(s)", step, len(moves))
        self.migrants = self._load(history, before=step + 1)

    def _load(self, history: History, before: int | None = None) -> dict[int, set[int]]:
        migrants: dict[int, set[int]] = {}
        for _, record in history.records(f"migrations/{self.run}"):
            if before is None or record["step"] < before:
                for node_id, dest in record["moves"]:
                    migrants.setdefault(dest, set()).add(node_id)
        return migrants

    def select(self, pool, rng, slot):
        island = slot % self.config.num_islands
        members = self.members(pool, island) or list(pool)
        ranked = self.ranked(members)
        draw = rng.random()
        if draw < self.config.exploitation:
            parent = ranked[0]
        elif draw < self.config.exploitation + self.config.exploration:
            parent = members[int(rng.integers(len(members)))]
        else:  # rank-weighted: better nodes more often, every node possible
            weights = 1.0 / np.arange(1, len(ranked) + 1)
            parent = ranked[int(rng.choice(len(ranked), p=weights / weights.sum()))]
        return Selection(parent, self.references(members, parent), island)


class MapElites(Sampler):
    """MAP-Elites: the best node of each cell of the search space's descriptor grid.

    The archive holds at most one node per cell, so it never outgrows the grid; parents are
    drawn uniformly over occupied cells.
    """

    def cell(self, node: Node) -> tuple[int, ...]:
        if len(node.descriptor) != len(self.axes):
            return (0,) * len(self.axes)
        return tuple(
            int(np.clip((v - a.low) / (a.high - a.low) * a.bins, 0, a.bins - 1))
            for v, a in zip(node.descriptor, self.axes, strict=True)
        )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.axes:  # one cell: the archive would hold the best node only (greedy)
            raise ValueError(
                "--sampler=map_elites needs behaviour descriptors, and this search space has "
                "none (code mode reads none off a program); choose another sampler"
            )
        self._elites: dict[tuple[int, ...], Node] = {}
        self._seen: set[int] = set()

    def sync(self, history, view, step):
        del history, view, step
        self._elites, self._seen = {}, set()  # rebuilt from the step's pool on first select

    def archive(self, pool: Sequence[Node]) -> dict[tuple[int, ...], Node]:
        """The best node per cell, updated incrementally with nodes not seen before."""
        for node in pool:
            if node.id in self._seen:
                continue
            self._seen.add(node.id)
            cell = self.cell(node)
            held = self._elites.get(cell)
            if held is None or (self.rank_key(node), -node.id) > (self.rank_key(held), -held.id):
                self._elites[cell] = node
        return self._elites

    def select(self, pool, rng, slot):
        elites = list(self.archive(pool).values())
        parent = elites[int(rng.integers(len(elites)))]
        return Selection(parent, self.references(elites, parent), parent.island)


SAMPLERS: dict[str, type[Sampler]] = {
    "greedy": Greedy,
    "random": Random,
    "ucb1": UCB1,
    "islands": Islands,
    "map_elites": MapElites,
}


def make_sampler(
    config: SamplerConfig, direction: str, axes: Sequence[DescriptorAxis] = (), run: str = "main"
) -> Sampler:
    return SAMPLERS[config.name](config, direction, axes, run)
