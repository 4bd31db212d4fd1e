"""The search-space contract and the registry that lets the engine find search spaces by name.

The engine never imports a search space by name. A search space registers itself either through
the ``evolve_jax.search_spaces`` entry-point group (installed packages) or by being named as
``package.module:factory`` on the command line (anything importable, e.g. a test fixture).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import importlib
import importlib.metadata
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

Genome = dict[str, Any]
Direction = Literal["max", "min"]


class SearchSpaceError(ValueError):
    """A search space name or spec that cannot be resolved."""


class GenomeError(ValueError):
    """A genome that does not satisfy its search space's schema."""


@dataclasses.dataclass(frozen=True)
class Metric:
    """One reported number; ``weight`` is its share of the fitness."""

    name: str
    direction: Direction = "max"
    weight: float = 1.0

    def __post_init__(self):
        if self.direction not in ("max", "min"):
            raise ValueError(f"metric {self.name!r}: direction must be 'max' or 'min'")

    def worst(self) -> float:
        """The worst possible value in this metric's direction (what a failure scores)."""
        return -math.inf if self.direction == "max" else math.inf


@dataclasses.dataclass(frozen=True)
class Stage:
    """An evaluation budget. Stage 0 runs for every candidate; later ones only for promoted ones."""

    name: str
    description: str = ""
    # What this stage's fitness is made of; empty means the task's metrics.
    metrics: tuple[Metric, ...] = ()


@dataclasses.dataclass(frozen=True)
class TaskDescription:
    """What the prompts say about the task, and how its outcome is measured."""

    title: str
    text: str
    metrics: tuple[Metric, ...]
    stages: tuple[Stage, ...] = (Stage("cheap"),)

    @property
    def primary(self) -> Metric:
        return self.metrics[0]

    def stage_metrics(self, stage: int) -> tuple[Metric, ...]:
        return self.stages[stage].metrics or self.metrics


@dataclasses.dataclass(frozen=True)
class Operator:
    """A typed variation operator: ``fn(rng, parents) -> child genome``, always valid."""

    name: str
    arity: int
    fn: Callable[[np.random.Generator, Sequence[Genome]], Genome]
    description: str = ""


@dataclasses.dataclass(frozen=True)
class CheckFailure:
    """A static check that failed, with its named reason."""

    check: str
    reason: str


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Metrics for one candidate at one stage: ``metrics[seed][metric_name]``, or an error."""

    metrics: Mapping[int, Mapping[str, float]] = dataclasses.field(default_factory=dict)
    error: str | None = None
    timed_out: bool = False
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class CodeSpec:
    """Code mode: candidates are programs ``{"source": text}`` built on a template.

    ``template`` is the program text whose EVOLVE-BLOCKs may change (``evolve_jax.programs``);
    ``interface`` says, for the prompts, what the blocks must implement.
    """

    template: str
    path: str
    interface: str
    language: str = "python"


@dataclasses.dataclass(frozen=True)
class DescriptorAxis:
    """One behaviour-descriptor axis of the MAP-Elites grid."""

    name: str
    low: float
    high: float
    bins: int = 10


class SearchSpace(abc.ABC):
    """One object per search space; see DESIGN.md, "The search-space contract"."""

    name: str = ""

    @abc.abstractmethod
    def describe(self) -> TaskDescription: ...

    @abc.abstractmethod
    def seeds(self) -> dict[str, Genome]:
        """Named starting candidates, in a stable order."""

    def baseline(self) -> str | None:
        """The seed whose metrics normalise fitness, or None to score raw metrics."""
        return None

    @abc.abstractmethod
    def genome_schema(self) -> dict[str, Any]:
        """A JSON schema of the genome (used for structured LLM output)."""

    @abc.abstractmethod
    def validate(self, genome: Genome) -> Genome:
        """Returns the genome with defaults filled in; raises GenomeError naming what is wrong."""

    @abc.abstractmethod
    def operators(self) -> dict[str, Operator]: ...

    def code_spec(self) -> CodeSpec | None:
        """The template of code mode, or None when candidates are genomes."""
        return None

    def check(self, genome: Genome) -> list[CheckFailure]:
        """Cheap static checks; an empty list means the candidate may run."""
        return []

    def repair(self, genome: Genome, failures: Sequence[CheckFailure]) -> Genome | None:
        """A rule-based fix for failed checks, or None when there is none."""
        del genome, failures
        return None

    @abc.abstractmethod
    def evaluate(
        self, genomes: Sequence[Genome], stage: int, seeds: Sequence[int], devices: Sequence[Any]
    ) -> list[EvalResult]:
        """Evaluates a population at ``stage`` for every seed; one result per genome, in order."""

    def runs_per_candidate(self, stage: int, seeds: Sequence[int]) -> int:
        """Independent training runs one candidate's evaluation holds (its population size);
        the Engineer sizes device groups by it. One per seed unless the space stacks more."""
        del stage
        return len(seeds)

    def descriptors(self) -> tuple[DescriptorAxis, ...]:
        return ()

    def describe_genome(self, genome: Genome) -> tuple[float, ...]:
        """Behaviour descriptor values of a genome, one per ``descriptors()`` axis."""
        return ()

    def bind(self, workdir: str) -> None:
        """Tells the search space the run's workdir (for checkpoints and caches)."""
        del workdir

    def cognition_seed(self) -> str | None:
        """Path of the JSON-lines file of prior-knowledge items, or None."""
        return None


def parse_options(cls: type, raw: Mapping[str, Any], space: str) -> Any:
    """The options dataclass ``cls`` from ``--space_opt`` strings, typed by its defaults.

    Tuples are comma-separated and booleans are true/false, yes/no, on/off or 1/0; a ValueError
    names the unknown option or the value that does not convert.
    """
    known = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise ValueError(f"unknown {space} option {key!r} (known: {', '.join(known)})")
        default = getattr(cls, key)
        kind = type(default)
        try:
            if kind is tuple:
                # Elements are typed by the default's first element (strings if it is empty).
                element = type(default[0]) if default else str
                parts = value if isinstance(value, tuple | list) else str(value).split(",")
                values[key] = tuple(element(p) for p in parts if str(p).strip())
            elif kind is bool:
                values[key] = _boolean(value)
            else:
                values[key] = kind(value)
        except ValueError as e:
            raise ValueError(f"{space} option {key}={value!r}: {e}") from e
    return cls(**values)


def _boolean(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def fingerprint(candidate: Genome | str) -> str:
    """A stable hash of a candidate (genome or source), for novelty checks and file names."""
    text = candidate if isinstance(candidate, str) else json.dumps(candidate, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group="evolve_jax.search_spaces")}


def available() -> list[str]:
    """Names of the installed search spaces."""
    return sorted(_entry_points())


def load(spec: str, **kwargs) -> SearchSpace:
    """Builds a search space from an installed name or a ``module:factory`` spec."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise SearchSpaceError(f"search space {spec!r} cannot be imported: {e}") from e
    else:
        eps = _entry_points()
        if spec not in eps:
            known = ", ".join(sorted(eps)) or "none installed"
            raise SearchSpaceError(f"unknown search space {spec!r} (known: {known})")
        factory = eps[spec].load()
    space = factory(**kwargs)
    if not isinstance(space, SearchSpace):
        raise SearchSpaceError(f"search space {spec!r} did not build a SearchSpace")
    return space
