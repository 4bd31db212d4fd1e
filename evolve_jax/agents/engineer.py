"""The Engineer: static checks and rule-based repair before running, evaluation, failure records.

Cheap checks run first (schema, the search space's checks, novelty) so that an invalid
candidate costs seconds, not a training run. Evaluation groups run on ``concurrency`` threads
(JAX releases the GIL while a compiled program runs); results keep their input order.
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from collections.abc import Sequence
from typing import Any

from evolve_jax.agents.base import Engineer, Outcome
from evolve_jax.search_space import EvalResult, Genome, GenomeError, SearchSpace, fingerprint


def _metrics_json(result: EvalResult) -> dict[str, dict[str, float | None]]:
    return {
        str(seed): {k: (float(v) if v is not None else None) for k, v in m.items()}
        for seed, m in result.metrics.items()
    }


def _non_finite(metrics: dict[str, dict[str, float | None]]) -> str | None:
    for seed, values in metrics.items():
        for name, value in values.items():
            if value is None or not math.isfinite(value):
                return f"non-finite metric {name!r} (seed {seed}): {value}"
    return None


class RuleEngineer(Engineer):
    def __init__(
        self, space: SearchSpace, devices: Sequence[Any], concurrency: int = 1, max_repairs: int = 2
    ):
        self.space = space
        self.devices = list(devices)
        self.concurrency = max(1, concurrency)
        self.max_repairs = max_repairs

    def prepare(self, genome: Genome, known: dict[str, int]) -> tuple[Genome, str | None, int]:
        """Validates, checks and repairs; returns (genome, reason it may not run, repairs)."""
        repairs = 0
        while True:
            try:
                genome = self.space.validate(genome)
            except GenomeError as e:
                return genome, f"schema: {e}", repairs
            failures = self.space.check(genome)
            if not failures:
                break
            repaired = self.space.repair(genome, failures) if repairs < self.max_repairs else None
            if repaired is None:
                return genome, "; ".join(f"{f.check}: {f.reason}" for f in failures), repairs
            genome, repairs = repaired, repairs + 1
        duplicate = known.get(fingerprint(genome))
        if duplicate is not None:
            return genome, f"novelty: duplicate of node {duplicate}", repairs
        return genome, None, repairs

    def _evaluate(self, genomes, stage, seeds) -> tuple[list[EvalResult], float]:
        start = time.perf_counter()
        try:
            results = self.space.evaluate(genomes, stage, seeds, self.devices)
            if len(results) != len(genomes):
                raise RuntimeError(f"evaluate returned {len(results)} results for {len(genomes)}")
        except Exception as e:
            results = [EvalResult(error=f"{type(e).__name__}: {e}") for _ in genomes]
        return results, time.perf_counter() - start

    def run(self, candidates, known, stage, seeds):
        prepared = [self.prepare(g, known) for g in candidates]
        runnable = [i for i, (_, reason, _) in enumerate(prepared) if reason is None]
        groups = [runnable[k :: self.concurrency] for k in range(self.concurrency)]
        groups = [g for g in groups if g]
        results: dict[int, tuple[EvalResult, float]] = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(groups) or 1) as pool:
            futures = {
                pool.submit(self._evaluate, [prepared[i][0] for i in g], stage, seeds): g
                for g in groups
            }
            for future, group in futures.items():
                group_results, seconds = future.result()
                for i, r in zip(group, group_results, strict=True):
                    results[i] = (r, seconds / len(group))

        outcomes = []
        for i, (genome, reason, repairs) in enumerate(prepared):
            if reason is not None:
                outcomes.append(Outcome("invalid", reason, {}, genome, repairs))
                continue
            result, seconds = results[i]
            metrics = _metrics_json(result)
            if result.timed_out:
                status, why = "timeout", result.error or "evaluation timed out"
            elif result.error:
                status, why = "failed", result.error
            elif (bad := _non_finite(metrics)) is not None:
                status, why = "failed", bad
            elif not metrics:
                status, why = "failed", "evaluation returned no metrics"
            else:
                status, why = "ok", None
            outcomes.append(Outcome(status, why, metrics, genome, repairs, seconds))
        return outcomes
