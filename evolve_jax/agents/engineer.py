"""The Engineer: static checks and rule-based repair before running, evaluation, failure records.

Cheap checks run first (schema, the search space's checks, novelty) so that an invalid
candidate costs seconds, not a training run. Every repair attempt is recorded with its reason;
a backend with a model overrides ``fix`` to repair what the rules cannot, failed runs included.
Candidates are laid out over disjoint device groups (``evaluation/layout.py``), each group
evaluating its share on ``concurrency`` threads (JAX releases the GIL while a compiled program
runs); results keep their input order. ``usage`` keeps, per ``run`` call, the layout and the
busy device-seconds against the device-seconds the call had. In a job of several processes the
leader's Engineer deals the candidates over the processes first (``evaluation/cluster.py``);
each process lays its share out over its own devices.
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from collections.abc import Sequence
from typing import Any

from evolve_jax.agents.base import Engineer, Outcome
from evolve_jax.evaluation import cluster
from evolve_jax.evaluation.layout import plan
from evolve_jax.search_space import (
    CheckFailure,
    EvalResult,
    Genome,
    GenomeError,
    SearchSpace,
    fingerprint,
)


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
        self.usage: dict[str, Any] = {}
        self.cluster = cluster.current()

    def fix(
        self,
        genome: Genome,
        reason: str,
        failures: Sequence[CheckFailure],
        attempts: list[dict],
        label: str,
    ) -> Genome | None:
        """A repaired genome for ``reason`` (appending its attempt record), or None.

        Rule-based: only failed static checks are repaired, by the search space's ``repair``.
        ``failures`` is empty when the candidate's schema or its run failed.
        """
        del label
        repaired = self.space.repair(genome, failures) if failures else None
        if repaired is not None:
            attempts.append({"reason": reason, "by": "rule"})
        return repaired

    def prepare(
        self, genome: Genome, known: dict[str, int], label: str = "", attempts=None
    ) -> tuple[Genome, str | None, list[dict]]:
        """Validates, checks and repairs; returns (genome, reason it may not run, attempts)."""
        attempts = [] if attempts is None else attempts
        while True:
            failures: list[CheckFailure] = []
            try:
                genome = self.space.validate(genome)
                failures = self.space.check(genome)
                reason = "; ".join(f"{f.check}: {f.reason}" for f in failures) or None
            except GenomeError as e:
                reason = f"schema: {e}"
            if reason is None:
                break
            repaired = None
            if len(attempts) < self.max_repairs:
                repaired = self.fix(genome, reason, failures, attempts, label)
            if repaired is None:
                return genome, reason, attempts
            genome = repaired
        duplicate = known.get(fingerprint(genome))
        if duplicate is not None:
            return genome, f"novelty: duplicate of node {duplicate}", attempts
        return genome, None, attempts

    def _evaluate(self, genomes, stage, seeds, devices) -> tuple[list[EvalResult], float, tuple]:
        start = time.perf_counter()
        try:
            results = self.space.evaluate(genomes, stage, seeds, devices)
            if len(results) != len(genomes):
                raise RuntimeError(f"evaluate returned {len(results)} results for {len(genomes)}")
        except Exception as e:
            results = [EvalResult(error=f"{type(e).__name__}: {e}") for _ in genomes]
        end = time.perf_counter()
        return results, end - start, (start, end)

    def _evaluate_groups(self, genomes, stage, seeds) -> list[tuple[EvalResult, float]]:
        """(result, seconds) per genome, in order: on this process's devices, or dealt over
        the job's processes when there are several."""
        workers = self.cluster.live_workers() if self.cluster.leader else []
        if not workers:
            return self.evaluate_here(genomes, stage, seeds)
        shares = cluster.deal(len(genomes), [0, *workers])
        round_ = self.cluster.send({
            p: {"stage": stage, "seeds": list(seeds), "candidates": [genomes[i] for i in share]}
            for p, share in shares.items() if p
        })  # fmt: skip
        here = self.evaluate_here([genomes[i] for i in shares[0]], stage, seeds)
        results = dict(zip(shares[0], here, strict=True))
        for p in workers:
            answer = self.cluster.receive(round_, p)
            if answer is None:
                reason = f"process {p} gave no answer within {self.cluster.answer_timeout_s:g} s"
                results.update({i: (EvalResult(error=reason), 0.0) for i in shares[p]})
                continue
            for i, record in zip(shares[p], answer["results"], strict=True):
                results[i] = cluster.result_from_json(record)
            for key in ("busy_device_seconds", "available_device_seconds"):
                self.usage[key] = self.usage.get(key, 0.0) + answer["usage"].get(key, 0.0)
            layouts = [{**layout, "process": p} for layout in answer["usage"].get("layouts", [])]
            self.usage.setdefault("layouts", []).extend(layouts)
        return [results[i] for i in range(len(genomes))]

    def evaluate_here(self, genomes, stage, seeds) -> list[tuple[EvalResult, float]]:
        """(result, seconds) per genome, in order, on this process's devices."""
        if not genomes:
            return []
        layout = plan(self.devices, self.space.runs_per_candidate(stage, seeds), len(genomes))
        jobs = []  # (group index, candidate indices): each group's share over its threads
        for k, share in enumerate(layout.assignment()):
            parts = [share[t :: self.concurrency] for t in range(self.concurrency)]
            jobs += [(k, part) for part in parts if part]
        results: dict[int, tuple[EvalResult, float]] = {}
        busy: dict[int, list[tuple[float, float]]] = {}
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs) or 1) as pool:
            futures = {
                pool.submit(
                    self._evaluate, [genomes[i] for i in part], stage, seeds, layout.groups[k]
                ): (k, part)
                for k, part in jobs
            }
            for future, (k, part) in futures.items():
                part_results, seconds, interval = future.result()
                busy.setdefault(k, []).append(interval)
                for i, r in zip(part, part_results, strict=True):
                    results[i] = (r, seconds / len(part))
        self._account(layout, busy, time.perf_counter() - start)
        return [results[i] for i in range(len(genomes))]

    def serve(self) -> int:
        """A worker's loop: evaluates the leader's jobs until told to stop; returns how many
        candidates it evaluated."""
        evaluated = 0
        while True:
            round_, job = self.cluster.next_job()
            if job.get("stop"):
                return evaluated
            pairs = self.evaluate_here(job["candidates"], job["stage"], job["seeds"])
            evaluated += len(pairs)
            self.cluster.answer(round_, {
                "results": [cluster.result_to_json(r, seconds) for r, seconds in pairs],
                "usage": self.take_usage(),
            })  # fmt: skip

    def _account(self, layout, busy: dict[int, list[tuple[float, float]]], wall: float) -> None:
        """Adds one evaluation round to ``usage``: a group is busy while any of its threads
        evaluates, at the fraction of its run slots that hold real runs (not padding)."""
        size = layout.group_size
        slot_fill = layout.runs / (layout.runs + layout.padding)
        busy_seconds = sum(_union(intervals) for intervals in busy.values()) * size * slot_fill
        usage = self.usage
        usage["busy_device_seconds"] = usage.get("busy_device_seconds", 0.0) + busy_seconds
        available = wall * size * len(layout.groups)
        usage["available_device_seconds"] = usage.get("available_device_seconds", 0.0) + available
        usage.setdefault("layouts", []).append(layout.describe())

    def take_usage(self) -> dict[str, Any]:
        """The usage since the last call, with its utilisation (busy over available)."""
        usage, self.usage = self.usage, {}
        if usage.get("available_device_seconds"):
            usage["utilisation"] = usage["busy_device_seconds"] / usage["available_device_seconds"]
        return usage

    def run(self, candidates, known, stage, seeds, labels=None):
        labels = list(labels) if labels is not None else [""] * len(candidates)
        prepared = [
            self.prepare(g, known, label) for g, label in zip(candidates, labels, strict=True)
        ]
        outcomes: list[Outcome | None] = [None] * len(candidates)
        seconds = [0.0] * len(candidates)
        for i, (genome, reason, attempts) in enumerate(prepared):
            if reason is not None:
                outcomes[i] = Outcome(
                    "invalid", reason, {}, genome, len(attempts), 0.0, tuple(attempts)
                )
        pending = [i for i, o in enumerate(outcomes) if o is None]
        while pending:  # a failed run goes back for repair while the repair budget lasts
            results = self._evaluate_groups([prepared[i][0] for i in pending], stage, seeds)
            retry = []
            for i, (result, secs) in zip(pending, results, strict=True):
                genome, _, attempts = prepared[i]
                seconds[i] += secs
                status, why, metrics = _classify(result)
                if status == "failed" and stage == 0 and len(attempts) < self.max_repairs:
                    repaired = self.fix(genome, f"run: {why}", (), attempts, labels[i])
                    if repaired is not None:
                        prepared[i] = self.prepare(repaired, known, labels[i], attempts)
                        if prepared[i][1] is None:
                            retry.append(i)
                            continue
                        status, why, metrics, genome = "invalid", prepared[i][1], {}, prepared[i][0]
                outcomes[i] = Outcome(
                    status, why, metrics, genome, len(attempts), seconds[i], tuple(attempts),
                    dict(result.extra.get("output", {})),
                )  # fmt: skip
            pending = retry
        return outcomes


def _union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping intervals."""
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _classify(result: EvalResult) -> tuple[str, str | None, dict]:
    metrics = _metrics_json(result)
    if result.timed_out:
        return "timeout", result.error or "evaluation timed out", metrics
    if result.error:
        return "failed", result.error, metrics
    if (bad := _non_finite(metrics)) is not None:
        return "failed", bad, metrics
    if not metrics:
        return "failed", "evaluation returned no metrics", metrics
    return "ok", None, metrics
