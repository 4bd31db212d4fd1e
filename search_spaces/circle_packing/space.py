"""Circle packing: n circles in the unit square, maximise the sum of their radii (n = 26).

Code mode (``mode=code``): a candidate is a program defining ``construct_packing(n, seed)``
(``programs/template.py``), written by a model and run in a sandboxed worker
(``code_mode.py``); the packings it returns go through the same strict check here.

Genome mode: a candidate is a parametric genome (``genome.py``: an initial arrangement and the
optimiser's settings); ``evaluate`` runs the optimiser (``optimize.py``) once per evaluation
seed and puts every packing it returns through the harness's strict check
(``validate.score_packing``), so a reported sum is always that of a valid packing. The
optimiser is deterministic given (genome, n, seed): the packing behind a node can be recomputed
with ``CirclePackingSpace.packing``. It runs in worker processes with single-threaded BLAS
(``workers`` >= 1, the default); with ``workers=0`` it runs in this process, whose BLAS may be
multi-threaded, and SLSQP's results can then differ in the last bits. Raw sums are scored (no
baseline). The engine does not record ``EvalResult.extra``, so no packing is stored in the
history; ``packing`` recomputes it.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from evolve_jax import programs
from evolve_jax.evaluation import harness, sandbox, workers
from evolve_jax.search_space import (
    CheckFailure,
    CodeSpec,
    DescriptorAxis,
    EvalResult,
    Metric,
    SearchSpace,
    Stage,
    TaskDescription,
    fingerprint,
    parse_options,
)
from search_spaces.circle_packing import code_mode, genome, optimize, validate

MODES = ("genome", "code")
BORDER_TOL = 1e-6  # a circle within this of a wall counts as touching it (descriptor)

_TEXT = """\
Pack {n} circles into the unit square, without overlap and inside the walls, so that the sum of
their radii is as large as possible. A candidate chooses an initial arrangement (concentric
rings with a count per ring, hexagonal or square rows with a count per row, or uniform random
centres; perturbed by a jitter) and the optimiser's settings: a batch of starts descended
jointly on centres and radii with a growing overlap penalty (Adam; steps, step size and its
decay, first and last penalty weight, initial radii), SLSQP polish of the best few with the exact
constraints, and optional rounds of iterated local search that kick the best packing and descend
again. The radii are finally the exact LP optimum for the centres. Every packing is checked
in float64 with tolerance {tol:g}; the metric is the sum of radii (best known for n = 26:
about 2.6359830)."""


_CODE_TEXT = """\
Pack {n} circles into the unit square, without overlap and inside the walls, so that the sum of
their radii is as large as possible. A candidate is a Python program whose construct_packing
returns the packing: any construction or optimisation it likes, with numpy, scipy and the
project's helpers (the exact LP radii for fixed centres, an SLSQP polish), within the sandbox's
time limit. Every packing is checked in float64 with tolerance {tol:g}; the metric is the sum of
radii (best known for n = 26: about 2.6359830)."""

_INTERFACE = """\
Define construct_packing(n, seed) -> (centers, radii) as the template's docstring says: centers
an (n, 2) array, radii an (n,) array, every circle inside the unit square, no two overlapping.
The harness checks the packing (tolerance {tol:g}) and sums the radii itself."""


@dataclasses.dataclass(frozen=True)
class Options:
    """Search-space options (``--space_opt=key=value``), validated at construction."""

    n: int = 26  # circles
    tol: float = 1e-9  # the strict check's overlap and wall tolerance
    budget_s: float = 3.0  # estimated one-core seconds per candidate and seed (check, repair)
    # Processes evaluating (candidate, seed) pairs in parallel; 0: in this process.
    workers: int = 1
    mode: str = "genome"
    # Code mode: limits of the sandboxed worker that runs a program for every seed.
    sandbox_timeout_s: float = 60.0
    sandbox_memory_gb: float = 4.0

    @classmethod
    def parse(cls, **raw: Any) -> Options:
        options = parse_options(cls, raw, "circle_packing")
        options.validate()
        return options

    def validate(self) -> None:
        """Raises ValueError naming the first option with a bad value."""
        if self.mode not in MODES:
            raise ValueError(
                f"circle_packing option mode={self.mode!r} is not supported "
                f"(supported: {', '.join(MODES)})"
            )
        if not (self.sandbox_timeout_s > 0 and self.sandbox_memory_gb > 0):
            raise ValueError("circle_packing options sandbox_timeout_s, sandbox_memory_gb: > 0")
        if not 1 <= self.n <= 200:
            raise ValueError(f"circle_packing option n must be in [1, 200], got {self.n}")
        if not (math.isfinite(self.tol) and 0 <= self.tol <= 1e-3):
            raise ValueError(f"circle_packing option tol must be in [0, 1e-3], got {self.tol}")
        cheapest = genome.estimated_seconds(_cheapest(self.n), self.n)
        if not (math.isfinite(self.budget_s) and self.budget_s >= cheapest):
            raise ValueError(
                f"circle_packing option budget_s must be >= {cheapest:.2g} (the cheapest "
                f"genome's estimate for n={self.n}), got {self.budget_s}"
            )
        most = 4 * (os.cpu_count() or 1)
        if not 0 <= self.workers <= most:
            raise ValueError(
                f"circle_packing option workers must be in [0, {most}], got {self.workers}"
            )


def _cheapest(n: int) -> genome.Genome:
    return genome.validate(
        {
            g.name: g.choices[0]
            for g in genome.GENES
            if g.name in ("starts", "steps", "polish", "rounds")
        },
        n,
    )


def border_circles(centers: np.ndarray, radii: np.ndarray) -> int:
    """How many circles touch a wall (within BORDER_TOL)."""
    gap_N = np.minimum(centers, 1.0 - centers).min(axis=1) - radii
    return int(np.sum(gap_N <= BORDER_TOL))


def _optimise(job: tuple[genome.Genome, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One (genome, n, seed) run, in this process or a worker; returns (centres, radii)."""
    candidate, n, seed = job
    packing = optimize.run(genome.layout(candidate), genome.schedule(candidate), n, seed)
    return packing.centers, packing.radii


class CirclePackingSpace(SearchSpace):
    name = "circle_packing"

    def __init__(self, **options: Any):
        self.options = Options.parse(**options)
        self._operators = genome.make_operators(self.options.n)
        self._border: dict[str, float] = {}  # fingerprint -> border circles of the best seed
        self._pool = None  # multiprocessing.Pool, started on first use
        self._finalizer: weakref.finalize | None = None
        self._lock = threading.Lock()
        self._code: CodeSpec | None = None
        if self.options.mode == "code":
            with open(code_mode.TEMPLATE, encoding="utf-8") as f:
                interface = _INTERFACE.format(tol=self.options.tol)
                self._code = CodeSpec(f.read(), code_mode.TEMPLATE, interface)
            programs.load_template(self._code)  # a template without markers fails here
            limits = sandbox.Limits(
                timeout_s=self.options.sandbox_timeout_s,
                memory_bytes=int(self.options.sandbox_memory_gb * (1 << 30)),
            )
            slots = workers.Slots.cpu()  # the programs use numpy and scipy, not JAX
            self._programs = harness.Programs(code_mode.TARGET, limits, lambda: slots)

    # -------------------------------------------------------------------- contract

    def describe(self) -> TaskDescription:
        o = self.options
        return TaskDescription(
            title=f"Circle packing: maximise the sum of radii of {o.n} circles in a unit square",
            text=(_CODE_TEXT if self._code else _TEXT).format(n=o.n, tol=o.tol),
            metrics=(Metric("sum_radii", "max"),),
            stages=(Stage("packing", "the optimiser run once per evaluation seed"),),
        )

    def seeds(self) -> dict[str, genome.Genome]:
        if self._code is not None:
            sources = {}
            for name in code_mode.SEED_PROGRAMS:
                with open(os.path.join(code_mode.PROGRAMS, f"{name}.py"), encoding="utf-8") as f:
                    sources[name] = {"source": f.read()}
            return sources
        return genome.seeds(self.options.n)

    def code_spec(self) -> CodeSpec | None:
        return self._code

    def baseline(self) -> None:
        return None

    def genome_schema(self) -> dict[str, Any]:
        return programs.source_schema() if self._code else genome.json_schema()

    def validate(self, candidate: genome.Genome) -> genome.Genome:
        if self._code is not None:
            return programs.validate_source(self._code, candidate)
        return genome.validate(candidate, self.options.n)

    def operators(self):
        return {} if self._code else self._operators

    def check(self, candidate: genome.Genome) -> list[CheckFailure]:
        if self._code is not None:  # import and interface, in a sandboxed worker
            return self._programs.check(candidate["source"], {})
        cost = genome.estimated_seconds(candidate, self.options.n)
        if cost > self.options.budget_s:
            return [
                CheckFailure(
                    "budget",
                    f"estimated {cost:.2f} s per seed exceeds budget_s={self.options.budget_s:g} "
                    f"(rounds={candidate['rounds']}, starts={candidate['starts']}, "
                    f"steps={candidate['steps']}, polish={candidate['polish']})",
                )
            ]
        return []

    def repair(
        self, candidate: genome.Genome, failures: Sequence[CheckFailure]
    ) -> genome.Genome | None:
        """Lowers rounds, starts, steps, polish one notch at a time until within the budget."""
        if self._code is not None or any(f.check != "budget" for f in failures):
            return None
        return genome.shrink_to_budget(candidate, self.options.n, self.options.budget_s)

    def evaluate(
        self, candidates: Sequence[genome.Genome], stage: int, seeds: Sequence[int], devices
    ) -> list[EvalResult]:
        del stage, devices  # one stage; numpy and scipy on the CPU
        n, tol = self.options.n, self.options.tol
        if self._code is not None:
            return harness.per_candidate(
                lambda c: code_mode.run_program(self._programs, c["source"], n, tol, seeds),
                candidates,
            )
        jobs = [(c, n, int(s)) for c in candidates for s in seeds]
        outputs = self._map(jobs)
        results = []
        for i, candidate in enumerate(candidates):
            metrics, error, best = {}, None, None
            for k, seed in enumerate(seeds):
                out = outputs[i * len(seeds) + k]
                if isinstance(out, BaseException):
                    error = f"seed {seed}: optimiser raised {type(out).__name__}: {out}"
                    break
                centers, radii = out
                total, reason = validate.score_packing(centers, radii, n, tol)
                if total is None:
                    error = f"seed {seed}: invalid packing: {reason}"
                    break
                border = border_circles(np.asarray(centers, float), np.asarray(radii, float))
                metrics[seed] = {"sum_radii": total, "border_circles": float(border)}
                if best is None or total > best[0]:
                    best = (total, border)
            if error is not None:
                results.append(EvalResult(error=error))
                continue
            self._border[fingerprint(candidate)] = float(best[1])
            results.append(EvalResult(metrics=metrics))
        return results

    def descriptors(self) -> tuple[DescriptorAxis, ...]:
        if self._code is not None:
            return ()  # a program's behaviour is not read off genes
        n = self.options.n
        return (
            DescriptorAxis("family", 0, len(genome.FAMILIES), len(genome.FAMILIES)),
            DescriptorAxis("border_circles", 0, n + 1, min(n + 1, 9)),
        )

    def describe_genome(self, candidate: genome.Genome) -> tuple[float, ...]:
        """(family, circles touching a wall in its best packing); known once it was evaluated
        by this process (the loop asks right after evaluating)."""
        if self._code is not None:
            return ()
        border = self._border.get(fingerprint(candidate))
        if border is None:
            raise KeyError("the genome was not evaluated by this process")
        return (genome.FAMILIES.index(candidate["family"]) + 0.5, border)

    def cognition_seed(self) -> str:
        return os.path.join(os.path.dirname(__file__), "cognition.jsonl")

    # -------------------------------------------------------------------- helpers

    def packing(self, candidate: genome.Genome, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Recomputes the (centres, radii) that ``evaluate`` scored for ``candidate`` and seed,
        where ``evaluate`` computes them (a worker process when workers >= 1)."""
        (out,) = self._map([(self.validate(candidate), self.options.n, int(seed))])
        if isinstance(out, BaseException):
            raise out
        return out

    def _map(self, jobs: list) -> list:
        """Each job's (centres, radii), or the exception (TimeoutError: no result) it raised."""
        if self.options.workers == 0:
            out = []
            for job in jobs:
                try:
                    out.append(_optimise(job))
                except Exception as e:
                    out.append(e)
            return out
        pool = self._get_pool()
        pending = [pool.apply_async(_optimise, (job,)) for job in jobs]
        # A worker that dies loses its job silently: bound the wait instead of hanging.
        rounds = -(-len(jobs) // self.options.workers)
        limit = 60.0 + (rounds + 1) * _TIMEOUT_FACTOR * self.options.budget_s
        deadline = time.monotonic() + limit
        out, broken = [], False
        for result in pending:
            try:
                out.append(result.get(timeout=max(deadline - time.monotonic(), 0.0)))
            except multiprocessing.TimeoutError:
                out.append(TimeoutError(f"no result within {limit:.0f} s (worker died or hung)"))
                broken = True
            except Exception as e:
                out.append(e)
        if broken:
            self.close()
        return out

    def _get_pool(self):
        with self._lock:
            if self._pool is None:
                self._pool = _start_pool(self.options.workers)
                # At collection the idle workers are told to exit, not signalled by pid: a
                # pid can be reused once its worker is gone (pids wrap at 32768 on Linux).
                self._finalizer = weakref.finalize(self, _shut_down, self._pool)
            return self._pool

    def close(self) -> None:
        """Stops the worker processes, if any."""
        with self._lock:
            if self._pool is not None:
                self._finalizer.detach()
                self._pool.terminate()
                self._pool.join()
                self._pool = None


def _shut_down(pool) -> None:
    pool.close()
    pool.join()


_ENV_LOCK = threading.Lock()
_TIMEOUT_FACTOR = 30  # seconds of waiting allowed per budgeted second of a job


def _start_pool(workers: int):
    """``workers`` spawned processes with single-threaded BLAS.

    The optimiser's problems are small: multi-threaded BLAS (SLSQP's) only contends for the
    cores, up to 10x slower on a loaded machine. BLAS reads its thread count when it loads,
    so the variables are set while the workers start (multiprocessing.Pool starts them all
    at once) and restored. Spawned, not forked: the parent runs JAX's threads.
    """
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in names}
        os.environ.update({k: "1" for k in names})
        try:
            return multiprocessing.get_context("spawn").Pool(workers)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def make(**options: Any) -> CirclePackingSpace:
    return CirclePackingSpace(**options)
