"""The Engineer: static checks and rule-based repair before running, evaluation, failure records.

Cheap checks run first so that an invalid candidate costs seconds, not a training run: schema
and novelty on process 0, the search space's static checks on the process that evaluates the
candidate, just before its run (they compile; on process 0 they would hold up every design).
Every repair attempt is recorded with its reason; a backend with a model overrides ``fix`` to
repair what the rules cannot, failed runs included.
Runs go through the work queue (``evaluation/scheduler.py``): each candidate takes the first
free device group of this process or, on process 0 of a job, of any process
(``evaluation/cluster.py``). ``run`` evaluates a batch and returns its outcomes in order; the
asynchronous loop uses its parts (``start``, ``submit``, ``finish``) one candidate at a time.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

from evolve_jax.agents.base import Engineer, Outcome
from evolve_jax.evaluation import cluster
from evolve_jax.evaluation.layout import queue_group_size
from evolve_jax.evaluation.scheduler import Evaluation, LocalExecutor, Scheduler
from evolve_jax.search_space import (
    CheckFailure,
    EvalResult,
    Genome,
    GenomeError,
    SearchSpace,
    fingerprint,
)

# Runs of one candidate the infrastructure may fail before the run stops (then nothing is
# recorded for the candidate: an infrastructure failure is not the candidate's).
INFRASTRUCTURE_RETRIES = 3


class InfrastructureFailure(RuntimeError):
    """The infrastructure failed one candidate's run again and again; the run stops."""


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
        self,
        space: SearchSpace,
        devices: Sequence[Any],
        concurrency: int = 1,
        max_repairs: int = 2,
        eval_timeout_s: float = math.inf,
    ):
        self.space = space
        self.devices = list(devices)
        self.concurrency = max(1, concurrency)
        self.max_repairs = max_repairs
        self.eval_timeout_s = eval_timeout_s
        self.cluster = cluster.current()
        self._scheduler: Scheduler | None = None
        self._usage_taken: dict[str, Any] = {}

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
        self,
        genome: Genome,
        known: dict[str, int],
        label: str = "",
        attempts=None,
        checks: bool = True,
    ) -> tuple[Genome, str | None, list[dict]]:
        """Validates, checks (unless ``checks`` is False) and repairs; returns (genome, reason
        it may not run, attempts)."""
        attempts = [] if attempts is None else attempts
        while True:
            failures: list[CheckFailure] = []
            try:
                genome = self.space.validate(genome)
                failures = self.space.check(genome) if checks else []
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

    # ------------------------------------------------------------------ evaluation

    @property
    def scheduler(self) -> Scheduler:
        """The work queue over this process's devices and, on process 0 of a job, every
        worker's (built at first use: the workers say hello by then)."""
        if self._scheduler is None:
            local = LocalExecutor(self.evaluate_one, len(self.devices), self.concurrency)
            remote = self.cluster.executors() if self.cluster.leader else []
            self._scheduler = Scheduler(
                [local, *remote], queue_group_size, eval_timeout_s=self.eval_timeout_s
            )
            self._usage_taken = self._scheduler.usage()
        return self._scheduler

    def evaluate_one(self, genome, stage, seeds, block) -> tuple[EvalResult, float]:
        """Evaluates one candidate on the local devices numbered ``block`` (an executor's
        evaluate function, here and on workers); a failure is its result."""
        start = time.perf_counter()
        try:
            # The static checks run here, on the process that evaluates (they cost seconds of
            # compiling; on process 0 they would hold up every other design).
            failures = self.space.check(genome)
            if failures:
                reason = "; ".join(f"{f.check}: {f.reason}" for f in failures)
                found = [[f.check, f.reason] for f in failures]
                return EvalResult(error=reason, extra={"check_failures": found}), (
                    time.perf_counter() - start
                )
            devices = [self.devices[i] for i in block]
            results = self.space.evaluate([genome], stage, list(seeds), devices)
            if len(results) != 1:
                raise RuntimeError(f"evaluate returned {len(results)} results for 1")
            result = results[0]
        except GenomeError as e:  # a check that found the genome malformed
            result = EvalResult(error=f"schema: {e}", extra={"check_failures": []})
        except Exception as e:
            result = EvalResult(error=f"{type(e).__name__}: {e}")
        return result, time.perf_counter() - start

    def start(
        self, genome: Genome, known: dict[str, int], stage: int, seeds: Sequence[int], label=""
    ) -> Outcome | Attempt:
        """Validates a candidate (schema, novelty; its static checks run with its evaluation,
        ``evaluate_one``): the Outcome of one that may not run, else its Attempt, to
        ``submit``."""
        genome, reason, attempts = self.prepare(genome, known, label, checks=False)
        if reason is not None:
            return Outcome("invalid", reason, {}, genome, len(attempts), 0.0, tuple(attempts))
        return Attempt(genome, known, stage, tuple(seeds), label, attempts)

    def submit(self, attempt: Attempt, tag: Any = None) -> Evaluation:
        """Queues ``attempt``'s run; ``scheduler.wait`` returns it with ``tag``."""
        runs = self.space.runs_per_candidate(attempt.stage, list(attempt.seeds))
        evaluation = Evaluation(attempt.genome, attempt.stage, attempt.seeds, runs, tag)
        return self.scheduler.submit(evaluation)

    def finish(self, attempt: Attempt, result: EvalResult, seconds: float) -> Outcome | Attempt:
        """The Outcome of a finished run, or the next Attempt to submit: the same candidate
        after an infrastructure failure, or the repaired one after failed checks or a failed
        stage-0 run the repair budget still covers."""
        attempt.seconds += seconds
        if result.extra.get("infrastructure"):  # not the candidate's doing: run it again
            attempt.infrastructure += 1
            if attempt.infrastructure < INFRASTRUCTURE_RETRIES:
                return attempt
            raise InfrastructureFailure(
                f"{result.error} ({attempt.infrastructure} times for candidate "
                f"{attempt.label or fingerprint(attempt.genome)}; nothing is recorded for it, "
                "and the same command resumes the run)"
            )
        if "check_failures" in result.extra:  # failed its static checks: repair, or invalid
            failures = [CheckFailure(c, r) for c, r in result.extra["check_failures"]]
            reason = result.error or "check failed"
            retry = self._repair(attempt, reason, failures)
            if isinstance(retry, Attempt):
                return retry
            status, why, metrics = "invalid", retry or reason, {}
        else:
            status, why, metrics = _classify(result)
            if status == "failed" and attempt.stage == 0:
                retry = self._repair(attempt, f"run: {why}", ())
                if isinstance(retry, Attempt):
                    return retry
                if retry is not None:
                    status, why, metrics = "invalid", retry, {}
        return Outcome(
            status, why, metrics, attempt.genome, len(attempt.attempts), attempt.seconds,
            tuple(attempt.attempts), dict(result.extra.get("output", {})),
        )  # fmt: skip

    def _repair(
        self, attempt: Attempt, reason: str, failures: Sequence[CheckFailure]
    ) -> Attempt | str | None:
        """Repairs ``attempt``'s candidate for ``reason`` while the repair budget lasts: the
        Attempt to run again, the reason the repaired candidate may not run, or None when
        there is no repair."""
        if len(attempt.attempts) >= self.max_repairs:
            return None
        repaired = self.fix(attempt.genome, reason, failures, attempt.attempts, attempt.label)
        if repaired is None:
            return None
        attempt.genome, why, _ = self.prepare(
            repaired, attempt.known, attempt.label, attempt.attempts, checks=False
        )
        return attempt if why is None else why

    def run(self, candidates, known, stage, seeds, labels=None):
        labels = list(labels) if labels is not None else [""] * len(candidates)
        outcomes: list[Outcome | None] = [None] * len(candidates)
        attempts: dict[int, Attempt] = {}
        for i, (genome, label) in enumerate(zip(candidates, labels, strict=True)):
            started = self.start(genome, known, stage, seeds, label)
            if isinstance(started, Outcome):
                outcomes[i] = started
            else:
                attempts[i] = started
                self.submit(started, tag=i)
        while attempts:  # a failed run goes back for repair while the repair budget lasts
            for done in self.scheduler.wait():
                i = done.evaluation.tag
                finished = self.finish(attempts[i], done.result, done.seconds)
                if isinstance(finished, Outcome):
                    outcomes[i] = finished
                    del attempts[i]
                else:
                    self.submit(finished, tag=i)
        return outcomes

    def take_usage(self) -> dict[str, Any]:
        """Device usage since the last call (per process and in all), with its utilisation;
        empty before the first evaluation."""
        if self._scheduler is None:
            return {}
        now = self._scheduler.usage()
        before, self._usage_taken = self._usage_taken, now
        return _usage_since(before, now)

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.stop()


@dataclasses.dataclass
class Attempt:
    """A checked candidate on its way through the Engineer: its run is queued or due."""

    genome: Genome
    known: dict[str, int]
    stage: int
    seeds: tuple[int, ...]
    label: str
    attempts: list[dict]  # repair attempts so far
    seconds: float = 0.0  # run time so far (earlier runs before repairs included)
    infrastructure: int = 0  # runs the infrastructure failed (a worker that would not start)


_COUNTERS = ("busy_device_seconds", "available_device_seconds", "evaluations")


def _usage_since(before: dict, now: dict) -> dict[str, Any]:
    def delta(a: dict, b: dict) -> dict:
        out = {k: b[k] - a.get(k, 0) for k in _COUNTERS}
        available = out["available_device_seconds"]
        out["utilisation"] = out["busy_device_seconds"] / available if available else 0.0
        return out

    usage = delta(before, now)
    usage["processes"] = {
        p: delta(before.get("processes", {}).get(p, {}), u) for p, u in now["processes"].items()
    }
    return usage


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
