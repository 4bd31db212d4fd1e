"""A search space whose evaluation only sleeps: the work queue and the loop under real processes
without loading the CPU (``benchmarks/scheduler_sim.py --real``).

    python -m evolve_jax.main --search_space=benchmarks.sleep_space:make --space_opt=scale=0.08 ...

A genome is four numbers. Evaluating it sleeps for a time drawn from a lognormal, the same for a
genome whatever process takes it: ``scale * exp(mu + sigma * z)`` at stage 0 with ``z`` a
standard normal drawn from the genome's fingerprint and the option ``seed``, ``ratio`` times
that at stage 1. The defaults are ``scheduler_sim.py``'s fit to measured linear-attention
candidates (mu 3.2488, sigma 0.3764; stage 1 6.30 times stage 0). The metric, ``loss``
(lower is better), is also drawn from the fingerprint (plus a little noise per evaluation
seed), so the search cannot improve: the top-k ranking that decides promotions is of i.i.d.
draws, as in the simulation. Six named seeds, like the linear-attention space.
"""

from __future__ import annotations

import hashlib
import math
import time

import numpy as np

from evolve_jax.search_space import (
    EvalResult,
    GenomeError,
    Metric,
    Operator,
    SearchSpace,
    Stage,
    TaskDescription,
    fingerprint,
)


def _gauss(rng, parents):
    x = list(parents[0]["x"])
    i = int(rng.integers(len(x)))
    x[i] = float(x[i] + rng.normal(0.0, 1.0))
    return {"x": x}


def _blend(rng, parents):
    a, b = (np.asarray(p["x"]) for p in parents)
    w = rng.random()
    return {"x": [float(v) for v in w * a + (1 - w) * b]}


def _draws(genome, seed: int) -> np.random.Generator:
    h = int(hashlib.sha256(fingerprint(genome).encode()).hexdigest()[:12], 16)
    return np.random.default_rng([h, seed])


class SleepSpace(SearchSpace):
    name = "sleep"

    def __init__(
        self,
        mu: str = "3.2488",
        sigma: str = "0.3764",
        ratio: str = "6.30",
        scale: str = "1.0",
        seed: str = "0",
    ):
        self.mu, self.sigma, self.ratio = float(mu), float(sigma), float(ratio)
        self.scale, self.seed = float(scale), int(seed)
        if self.sigma < 0 or self.ratio <= 0 or self.scale < 0:
            raise ValueError("sleep space: sigma and scale must be >= 0, ratio > 0")

    def describe(self):
        return TaskDescription(
            title="Sleep: evaluations that take time and nothing else",
            text="Each evaluation sleeps for a time drawn from the genome; the loss is random.",
            metrics=(Metric("loss", "min"),),
            stages=(Stage("short", "sleeps"), Stage("long", f"sleeps {self.ratio:g} times longer")),
        )

    def seeds(self):
        return {f"s{i}": {"x": [float(i), -float(i), 0.5 * i, 1.0]} for i in range(6)}

    def genome_schema(self):
        return {
            "type": "object",
            "properties": {
                "x": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4}
            },
            "required": ["x"],
            "additionalProperties": False,
        }

    def validate(self, genome):
        x = genome.get("x")
        if set(genome) != {"x"} or not isinstance(x, list) or len(x) != 4:
            raise GenomeError("a genome is {'x': four numbers}")
        return {"x": [float(v) for v in x]}

    def operators(self):
        return {
            "gauss": Operator("gauss", 1, _gauss, "perturb one number"),
            "blend": Operator("blend", 2, _blend, "interpolate two parents"),
        }

    def seconds(self, genome, stage: int) -> float:
        """How long evaluating ``genome`` at ``stage`` sleeps."""
        z = _draws(genome, self.seed).standard_normal()
        t = self.scale * math.exp(self.mu + self.sigma * z)
        return t * (self.ratio if stage else 1.0)

    def evaluate(self, genomes, stage, seeds, devices):
        del devices  # nothing runs on them
        out = []
        for genome in genomes:
            time.sleep(self.seconds(genome, stage))
            rng = _draws(genome, self.seed)
            rng.standard_normal()  # the time's draw
            loss = float(rng.standard_normal())
            noise = rng.normal(0.0, 0.01, len(seeds))
            metrics = {s: {"loss": loss + float(n)} for s, n in zip(seeds, noise, strict=True)}
            out.append(EvalResult(metrics=metrics))
        return out


def make(**options) -> SleepSpace:
    return SleepSpace(**options)
