"""Process 0's work queue: every evaluation goes to the first free device group of any process.

An evaluation is one candidate at one stage on the run's seeds. It needs a *group* of devices
of one process: ``group_size`` of that process's device count and the candidate's runs, fixed
per (device count, runs) and never by how much work is queued, so a candidate is computed the
same way whichever process takes it (``layout.queue_group_size``). Each device takes up to
``lanes`` evaluations at once (``--concurrency``). Processes are ``Executor`` objects: this
process's own devices (``LocalExecutor``, threads) or a worker reached through JAX's
distributed key-value store (``cluster.RemoteExecutor``).

``wait`` starts queued evaluations wherever a group is free, in the order they were submitted,
and returns those that finished. What goes wrong with the infrastructure is not the
candidate's failure:

* a process that dies (the coordination service stops hearing its heartbeat) loses only the
  time it spent: its evaluations go back to the head of the queue for the live processes, and
  only an evaluation lost ``max_deals`` times is failed (with that reason: it may be the one
  killing its hosts);
* an evaluation still running ``eval_timeout_s`` after it started is answered as timed out (a
  straggler); its group stays busy until the process answers, and the late answer is dropped.

Time comes from ``clock`` and waiting from ``idle``, so a simulation can drive this same code
with virtual time (``benchmarks/scheduler_sim.py``).
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

from evolve_jax.search_space import EvalResult

# Set by the driver's first Ctrl-C: every ``wait`` then raises Interrupted at once.
STOP = threading.Event()


class Interrupted(Exception):
    """The user asked the run to stop (Ctrl-C); what is committed stays."""


@dataclasses.dataclass
class Evaluation:
    """One candidate at one stage on the run's seeds; ``tag`` is the submitter's (opaque)."""

    genome: Any
    stage: int
    seeds: tuple[int, ...]
    runs: int  # runs per candidate: the group size depends on it
    tag: Any = None
    key: int = -1  # set by submit
    deals: int = 0  # how many times it was started (re-deals after lost processes included)


@dataclasses.dataclass(frozen=True)
class Done:
    evaluation: Evaluation
    result: EvalResult
    seconds: float  # the evaluation's own time on its group
    process: int


class Executor(abc.ABC):
    """One process's devices, as the queue sees them."""

    process: int
    devices: int  # local device count
    lanes: int  # evaluations a device takes at once

    @abc.abstractmethod
    def start(self, evaluation: Evaluation, block: Sequence[int]) -> None:
        """Starts ``evaluation`` on the local devices numbered ``block``; returns at once."""

    @abc.abstractmethod
    def poll(self) -> list[tuple[int, EvalResult, float]]:
        """(key, result, seconds) of the evaluations finished since the last poll."""

    def alive(self) -> bool:
        return True

    def stop(self) -> None:  # noqa: B027 (most executors have nothing to release)
        """No more work is coming (the search is over)."""


def run_evaluation(evaluate, genome, stage, seeds, block) -> tuple[EvalResult, float]:
    """``evaluate(genome, stage, seeds, block)``; an exception it lets through (it keeps the
    candidate's own errors, so this is a bug) becomes the result instead of a lost answer."""
    try:
        return evaluate(genome, stage, seeds, block)
    except Exception as e:
        return EvalResult(error=f"{type(e).__name__}: {e}"), 0.0


class LocalExecutor(Executor):
    """This process's devices: each evaluation runs in a thread (JAX releases the GIL while a
    compiled program runs)."""

    def __init__(
        self,
        evaluate: Callable[[Any, int, Sequence[int], Sequence[int]], tuple[EvalResult, float]],
        devices: int,
        lanes: int = 1,
        process: int = 0,
    ):
        self.process, self.devices, self.lanes = process, devices, lanes
        self._evaluate = evaluate
        self._finished: queue.Queue = queue.Queue()

    def start(self, evaluation: Evaluation, block: Sequence[int]) -> None:
        key, genome, stage, seeds = (
            evaluation.key,
            evaluation.genome,
            evaluation.stage,
            evaluation.seeds,
        )

        def work():
            self._finished.put((key, *run_evaluation(self._evaluate, genome, stage, seeds, block)))

        # A thread per evaluation (the queue bounds how many run): none is left idle after.
        threading.Thread(target=work, name=f"evolve_jax-evaluation-{key}").start()

    def poll(self) -> list[tuple[int, EvalResult, float]]:
        out = []
        while True:
            try:
                out.append(self._finished.get_nowait())
            except queue.Empty:
                return out

    def wait_for_any(self, timeout: float) -> None:
        """Blocks until an evaluation finishes or ``timeout`` passes (the queue's idle wait when
        this is the only process)."""
        try:
            item = self._finished.get(timeout=timeout)
        except queue.Empty:
            return
        self._finished.put(item)


@dataclasses.dataclass
class _Running:
    evaluation: Evaluation
    process: int
    block: tuple[int, ...]
    fill: float  # real runs over the run slots of its group (padding is not work)
    started: float
    overdue: bool = False  # answered as timed out; the group is still busy


class Scheduler:
    def __init__(
        self,
        executors: Sequence[Executor],
        group_size: Callable[[int, int], int],
        eval_timeout_s: float = math.inf,
        max_deals: int = 3,
        clock: Callable[[], float] = time.monotonic,
        idle: Callable[[float], None] | None = None,
        liveness_interval_s: float = 1.0,
    ):
        self._executors = {e.process: e for e in executors}
        self._group_size = group_size
        self.eval_timeout_s = eval_timeout_s
        self.max_deals = max_deals
        self._clock = clock
        self._idle = idle or self._default_idle
        self._liveness_interval_s = liveness_interval_s
        self._pending: collections.deque[Evaluation] = collections.deque()
        self._running: dict[int, _Running] = {}
        self._load = {p: [0] * e.devices for p, e in self._executors.items()}
        # A process that never joined (a worker that never said hello) takes nothing.
        self._dead = {p for p, e in self._executors.items() if not e.alive()}
        self._next_key = 0
        self._ready: list[Done] = []
        now = clock()
        self._checked = now
        self._accounted = now
        self._usage = {
            p: {"busy_device_seconds": 0.0, "available_device_seconds": 0.0, "evaluations": 0}
            for p in self._executors
        }

    # ------------------------------------------------------------------ submitting

    def submit(self, evaluation: Evaluation) -> Evaluation:
        """Queues ``evaluation`` (after everything submitted before it)."""
        evaluation.key = self._next_key
        self._next_key += 1
        self._pending.append(evaluation)
        return evaluation

    @property
    def outstanding(self) -> int:
        """Evaluations submitted and not yet returned by ``wait``."""
        live = sum(1 for r in self._running.values() if not r.overdue)
        return len(self._pending) + live + len(self._ready)

    def free_lanes(self, runs: int) -> int:
        """How many more evaluations of ``runs`` runs would start now, after those queued."""
        free = 0
        for p, executor in self._executors.items():
            if p in self._dead:
                continue
            g = self._group_size(executor.devices, runs)
            load = self._load[p]
            free += sum(
                executor.lanes - max(load[i : i + g]) for i in range(0, executor.devices, g)
            )
        return max(free - len(self._pending), 0)

    def live_processes(self) -> list[int]:
        return [p for p in self._executors if p not in self._dead]

    # ------------------------------------------------------------------ waiting

    def wait(self, timeout: float | None = None) -> list[Done]:
        """Starts what can start and returns the evaluations finished since the last call:
        blocks until at least one finishes (or ``timeout`` seconds pass; [] if nothing is
        outstanding)."""
        deadline = None if timeout is None else self._clock() + timeout
        while True:
            if STOP.is_set():
                raise Interrupted("interrupted while evaluations were running")
            self._dispatch()
            self._collect()
            if self._ready or not self.outstanding:
                done, self._ready = self._ready, []
                return done
            now = self._clock()
            if deadline is not None and now >= deadline:
                return []
            self._idle(self._sleep_for(now, deadline))

    def drain(self) -> list[Done]:
        """Waits until every submitted evaluation has finished; returns them all."""
        done: list[Done] = []
        while self.outstanding:
            done += self.wait()
        return done

    def _sleep_for(self, now: float, deadline: float | None) -> float:
        pause = 0.05
        if deadline is not None:
            pause = min(pause, deadline - now)
        return max(pause, 0.0)

    def _default_idle(self, seconds: float) -> None:
        local = [e for e in self._executors.values() if isinstance(e, LocalExecutor)]
        if len(self._executors) == 1 and local:
            local[0].wait_for_any(max(seconds, 0.05) * 20)  # nothing else to watch
        else:
            time.sleep(seconds)

    # ------------------------------------------------------------------ internals

    def _dispatch(self) -> None:
        """Starts queued evaluations, first submitted first, each where ``_place`` finds it a
        group; one that fits nowhere waits (and so does every one behind it of the same
        size)."""
        if not self.live_processes():  # nothing will ever take what is queued
            self._fail_pending()
            return
        blocked: set[int] = set()
        waiting: collections.deque[Evaluation] = collections.deque()
        while self._pending:
            evaluation = self._pending.popleft()
            placed = None
            if evaluation.runs not in blocked:
                placed = self._place(evaluation.runs)
            if placed is None:
                blocked.add(evaluation.runs)
                waiting.append(evaluation)
                continue
            p, block = placed
            self._account()
            for i in block:
                self._load[p][i] += 1
            g = len(block)
            fill = evaluation.runs / (math.ceil(evaluation.runs / g) * g)
            evaluation.deals += 1
            self._running[evaluation.key] = _Running(evaluation, p, block, fill, self._clock())
            self._executors[p].start(evaluation, block)
        self._pending = waiting

    def _place(self, runs: int) -> tuple[int, tuple[int, ...]] | None:
        """A free group for a candidate of ``runs`` runs: on the process with the most free
        groups (ties: the lowest-numbered), its first free group; None if there is none."""
        best = None
        for p, executor in self._executors.items():
            if p in self._dead:
                continue
            g = self._group_size(executor.devices, runs)
            load = self._load[p]
            free = [
                i for i in range(0, executor.devices, g) if max(load[i : i + g]) < executor.lanes
            ]
            if free and (best is None or (len(free), -p) > (best[0], -best[1])):
                best = (len(free), p, tuple(range(free[0], free[0] + g)))
        return None if best is None else (best[1], best[2])

    def _collect(self) -> None:
        self._account()  # what finished since the last poll was busy until now
        now = self._clock()
        for p, executor in self._executors.items():
            if p in self._dead:
                continue
            for key, result, seconds in executor.poll():
                running = self._running.pop(key, None)
                if running is None:
                    continue  # an answer from a process already given up on
                # It finished about ``seconds`` after it started, not when it was collected
                # (process 0 may have been busy designing): the wait is not busy time.
                idle = now - (running.started + seconds)
                if idle > 0 and not running.overdue:
                    waste = idle * len(running.block) * running.fill
                    self._usage[p]["busy_device_seconds"] -= min(waste, self._busy_since(running))
                self._release(running)
                if not running.overdue:
                    self._usage[p]["evaluations"] += 1
                    self._ready.append(Done(running.evaluation, result, seconds, p))
        for running in list(self._running.values()):
            if not running.overdue and now - running.started > self.eval_timeout_s:
                running.overdue = True
                self._ready.append(
                    Done(
                        running.evaluation,
                        EvalResult(
                            error=f"evaluation exceeded --eval_timeout_s={self.eval_timeout_s:g} "
                            f"on process {running.process}",
                            timed_out=True,
                        ),
                        now - running.started,
                        running.process,
                    )
                )
        if now - self._checked >= self._liveness_interval_s:
            self._checked = now
            for p, executor in self._executors.items():
                if p not in self._dead and not executor.alive():
                    self._lose(p)

    def _lose(self, p: int) -> None:
        """Process ``p`` is gone: its devices leave the pool and its evaluations are re-dealt."""
        self._account()
        self._dead.add(p)
        lost = [r for r in self._running.values() if r.process == p]
        logging.error(
            "process %d is gone (no heartbeat); re-dealing its %d evaluation(s) to %s",
            p, len(lost), self.live_processes() or "nobody",
        )  # fmt: skip
        requeue = []
        for running in lost:
            del self._running[running.evaluation.key]
            if running.overdue:
                continue
            evaluation = running.evaluation
            if evaluation.deals >= self.max_deals or not self.live_processes():
                why = (
                    f"lost {evaluation.deals} time(s): the process evaluating it died each time "
                    f"(last: process {p})"
                )
                self._ready.append(Done(evaluation, EvalResult(error=why), 0.0, p))
            else:
                requeue.append(evaluation)
        self._pending.extendleft(reversed(requeue))
        self._load[p] = [0] * len(self._load[p])
        if not self.live_processes():  # nothing will ever take what is queued
            self._fail_pending()

    def _fail_pending(self) -> None:
        while self._pending:
            evaluation = self._pending.popleft()
            why = "no process is left to evaluate it (every one died)"
            self._ready.append(Done(evaluation, EvalResult(error=why), 0.0, -1))

    def _busy_since(self, running: _Running) -> float:
        """The busy device-seconds counted for ``running`` so far (an upper bound of what may
        be taken back)."""
        return (self._accounted - running.started) * len(running.block) * running.fill

    def _release(self, running: _Running) -> None:
        for i in running.block:
            self._load[running.process][i] -= 1

    def _account(self) -> None:
        """Adds the device-seconds since the last call: available per live device, busy per
        device holding an evaluation (at its fill)."""
        now = self._clock()
        dt = now - self._accounted
        self._accounted = now
        if dt <= 0:
            return
        fills: dict[tuple[int, int], float] = {}
        for r in self._running.values():
            for i in r.block:
                fills[(r.process, i)] = max(fills.get((r.process, i), 0.0), r.fill)
        for p, executor in self._executors.items():
            if p in self._dead:
                continue
            usage = self._usage[p]
            usage["available_device_seconds"] += dt * executor.devices
            usage["busy_device_seconds"] += dt * sum(f for (q, _), f in fills.items() if q == p)

    def usage(self) -> dict[str, Any]:
        """Device utilisation so far, per process and in all."""
        self._account()
        per = {}
        for p, u in sorted(self._usage.items()):
            available = u["available_device_seconds"]
            per[str(p)] = {
                **u,
                "utilisation": u["busy_device_seconds"] / available if available else 0.0,
            }
        busy = sum(u["busy_device_seconds"] for u in self._usage.values())
        available = sum(u["available_device_seconds"] for u in self._usage.values())
        return {
            "busy_device_seconds": busy,
            "available_device_seconds": available,
            "utilisation": busy / available if available else 0.0,
            "evaluations": sum(u["evaluations"] for u in self._usage.values()),
            "processes": per,
        }

    def stop(self) -> None:
        for p, executor in self._executors.items():
            if p not in self._dead:
                executor.stop()
