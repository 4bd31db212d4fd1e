"""A tiny search space for the engine's tests: fit a 4-vector to a hidden target, in seconds.

Genome: {"x": 4 floats, "shape": "bowl" | "ridge" | "broken"}. The reward is the negative
distance to the target (a squared "bowl" or an absolute "ridge"); "broken" evaluates to NaN, so
the failure path is exercised. Stage 0 is noisy; the costlier stages are exact and measure
against a target moved a little further per stage, so the stages rank candidates similarly but
not identically. Options (strings, as given by --space_opt) choose the metric's direction, the
baseline, the number of stages, and delays for kill-and-resume tests: ``delay`` seconds per
evaluated candidate, ``record_delay`` seconds before each node is committed (the loop asks for
its descriptor then), so a kill can land between two commits. ``exit_in_process=P`` ends
process P of a multi-process job abruptly (as the kernel's OOM killer would) at its first
evaluation.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from evolve_jax.evaluation.population import evaluate_population
from evolve_jax.search_space import (
    CheckFailure,
    DescriptorAxis,
    EvalResult,
    GenomeError,
    Metric,
    Operator,
    SearchSpace,
    Stage,
    TaskDescription,
)

TARGET = np.array([1.5, -2.0, 0.5, 1.0], np.float32)
SHAPES = ("bowl", "ridge", "broken")
BOUND = 5.0
STAGES = (Stage("cheap", "noisy"), Stage("full", "exact"), Stage("final", "exact, moved"))


def _gauss(rng, parents):
    x = list(parents[0]["x"])
    i = int(rng.integers(4))
    x[i] = float(x[i] + rng.normal(0, 1.5))  # may leave the box: the Engineer repairs it
    return {"x": x, "shape": parents[0]["shape"]}


def _shape(rng, parents):
    return {"x": list(parents[0]["x"]), "shape": SHAPES[int(rng.integers(len(SHAPES)))]}


def _blend(rng, parents):
    a, b = (np.asarray(p["x"]) for p in parents)
    w = rng.random()
    return {"x": [float(v) for v in w * a + (1 - w) * b], "shape": parents[0]["shape"]}


def _reward(candidate, target, noise_scale):
    x, shape, key_data = candidate
    noise_key = jax.random.wrap_key_data(key_data)
    gap = x - target
    value = jnp.where(shape == 0, -jnp.sum(gap**2), -jnp.sum(jnp.abs(gap)))
    value = jnp.where(shape == 2, jnp.nan, value)
    return value + noise_scale * jax.random.normal(noise_key)


class ToySpace(SearchSpace):
    name = "toy"

    def __init__(
        self,
        direction: str = "max",
        baseline: str = "none",
        delay: str = "0",
        record_delay: str = "0",
        stages: str = "2",
        exit_in_process: str = "-1",
    ):
        self.direction = direction
        self.exit_in_process = int(exit_in_process)
        self._baseline = None if baseline == "none" else baseline
        self.delay = float(delay)
        self.record_delay = float(record_delay)
        self.num_stages = int(stages)
        if not 1 <= self.num_stages <= len(STAGES):
            raise ValueError(f"toy option stages must be 1 to {len(STAGES)}, got {stages}")
        self.metric = "reward" if direction == "max" else "loss"

    def describe(self):
        return TaskDescription(
            title="Toy: fit a 4-vector",
            text="Find x close to a hidden target.",
            metrics=(Metric(self.metric, self.direction),),
            stages=STAGES[: self.num_stages],
        )

    def seeds(self):
        return {
            "origin": {"x": [0.0, 0.0, 0.0, 0.0], "shape": "bowl"},
            "corner": {"x": [3.0, 3.0, 3.0, 3.0], "shape": "bowl"},
            "ridge": {"x": [1.0, -1.0, 1.0, -1.0], "shape": "ridge"},
        }

    def baseline(self):
        return self._baseline

    def genome_schema(self):
        return {
            "type": "object",
            "properties": {
                "x": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
                "shape": {"enum": list(SHAPES)},
            },
            "required": ["x", "shape"],
            "additionalProperties": False,
        }

    def validate(self, genome):
        unknown = set(genome) - {"x", "shape"}
        if unknown:
            raise GenomeError(f"unknown field(s) {sorted(unknown)}")
        if genome.get("shape") not in SHAPES:
            raise GenomeError(f"shape {genome.get('shape')!r} is not one of {SHAPES}")
        x = genome.get("x")
        if not isinstance(x, list) or len(x) != 4:
            raise GenomeError("x must be a list of 4 numbers")
        return {"x": [float(v) for v in x], "shape": genome["shape"]}

    def operators(self):
        return {
            "gauss": Operator("gauss", 1, _gauss, "perturb one coordinate"),
            "shape": Operator("shape", 1, _shape, "change the distance shape"),
            "blend": Operator("blend", 2, _blend, "interpolate two parents"),
        }

    def check(self, genome):
        if max(abs(v) for v in genome["x"]) > BOUND:
            return [CheckFailure("bounds", f"|x| exceeds {BOUND}")]
        return []

    def repair(self, genome, failures):
        return {
            "x": [float(np.clip(v, -BOUND, BOUND)) for v in genome["x"]],
            "shape": genome["shape"],
        }

    def evaluate(self, genomes, stage, seeds, devices):
        if jax.process_index() == self.exit_in_process:
            os._exit(137)
        if self.delay:
            time.sleep(self.delay * len(genomes))
        # One run per (genome, seed), genome-major: a candidate's seeds sit side by side.
        xs = np.asarray([g["x"] for g in genomes for _ in seeds], np.float32)
        shapes = np.asarray([SHAPES.index(g["shape"]) for g in genomes for _ in seeds], np.int32)
        keys = np.stack([np.asarray(jax.random.key_data(jax.random.key(s))) for s in seeds])
        keys = np.tile(keys, (len(genomes), 1))
        target = TARGET + np.float32(0.25 * stage)
        rewards = evaluate_population(
            _reward, (xs, shapes, keys), devices, target, 0.05 if stage == 0 else 0.0
        ).reshape(len(genomes), len(seeds))
        sign = 1.0 if self.direction == "max" else -1.0
        return [
            EvalResult(
                metrics={s: {self.metric: sign * float(r)} for s, r in zip(seeds, row, strict=True)}
            )
            for row in rewards
        ]

    def descriptors(self):
        return (DescriptorAxis("x0", -BOUND, BOUND, 4), DescriptorAxis("x1", -BOUND, BOUND, 4))

    def describe_genome(self, genome):
        if self.record_delay:
            time.sleep(self.record_delay)
        return (genome["x"][0], genome["x"][1])

    def cognition_seed(self):
        return os.path.join(os.path.dirname(__file__), "toy_cognition.jsonl")


def make(**options) -> ToySpace:
    return ToySpace(**options)
