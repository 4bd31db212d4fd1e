"""The real work queue (evolve_jax/evaluation/scheduler.py) driven by simulated hosts in virtual
time: device utilisation and evaluations per hour of the ``steps`` and ``async`` schedules.

    python -m benchmarks.scheduler_sim [--out=benchmarks/results/scheduler_sim.json]
    python -m benchmarks.scheduler_sim --measure_leader=6     # re-measure the leader's costs

What is real and what is simulated. The ``Scheduler`` is the real class, unchanged: it deals,
re-deals, times out and accounts exactly as in a job. Its executors are ``SimHost`` objects (4
devices each, one lane per device as ``--concurrency=1``): an evaluation takes a drawn number
of virtual seconds; a host dies with a fixed probability per hour, answers nothing from then on
and stops being ``alive()`` ``--heartbeat_timeout_s`` (100 s) later, when the real liveness path
re-deals what it held. Time is a virtual clock: the scheduler's idle wait jumps to the next
event, and the leader's own work (designing, checking, recording) advances the clock by
measured constants while the devices keep running, as process 0's single thread does. The two
schedules are the loop's policies (evolve_jax/loop.py) replayed over the real queue:

* both start as ``ResearchLoop._run`` does: the seed step (6 seeds checked, submitted, all
  waited for, recorded), lessons, and ``promote(0)``, a stage-1 batch waited for and recorded;
* ``steps``: each step designs ``samples_per_step`` children, checks each (the Engineer's
  ``start``, on process 0) and submits it, waits for all, records them, writes the step's
  lessons and page, and promotes the top ``promote_top_k`` not yet promoted to stage 1 as
  another batch, waited for and recorded;
* ``async`` (``ResearchLoop.evolve_async`` as of commit 0a042f0): ``free_lanes(runs)`` children
  (1 if that is 0 and nothing is outstanding) are designed, each design recorded, checked and
  submitted; then ``wait``; every finished child is recorded at once; every ``samples_per_step``
  recorded children the usage record, lessons and page are written and the top
  ``promote_top_k`` not yet promoted are submitted to the same queue; a promotion batch is
  recorded once all of it is done.

Scores are i.i.d. normal draws (the sim does not model a search that improves, which would
promote more often); the top-k ranking is of those scores. Every child is evaluated and every
evaluation succeeds: children the loop refuses before evaluating them (duplicates: 27 of 96 in
the leader's measurement, at no cost) and failed runs are not modelled.

Where the numbers come from (all measured on this repository's 2-core CPU machine, the
linear-attention space's default stage-0 recipe, compilation included):

* stage-0 evaluation seconds: ``benchmarks/results/la_speed_cpu.json`` (benchmarks/la_speed.py,
  the 14 architectures of proxy_fidelity: six seeds and eight mutants), each candidate's
  ``seconds - check_seconds`` (the checks run on process 0, below, not on the evaluating
  group): 11.8 to 44.1 s; lognormal fitted by the mean and standard deviation (ddof=1) of the
  logs: mu 3.2488, sigma 0.3764 (median 25.8 s);
* stage-1 seconds: the candidate's stage-0 seconds times 6.30, the median over the same 14
  architectures of ``costly / cheap_lm`` seconds in ``benchmarks/results/proxy_fidelity.json``
  (4.2 to 8.6), so a slow architecture is slow at both stages;
* the leader's own costs, measured on the real loop (``--measure_leader=6``: ResearchLoop with
  the pod flagfile's search settings, offline agents, linear_attention at its defaults, its
  ``evaluate`` replaced by an instant fake so only process 0's own work is timed, history on
  local disk): ``LEADER`` below. The checks a child goes through before it may run (the
  Engineer's ``prepare``: shapes, causality, FLOPs, parameter budget, compiled on process 0)
  are nearly all of it; designing (offline operators) and recording a node are milliseconds.
  A history on GCS (the pod's) makes each record slower; that is not measured here.

Settings, fixed before any outcome was seen: 1, 4, 16 and 64 hosts of 4 devices;
``samples_per_step`` 16 and ``promote_top_k`` 16 (configs/tpu_pod.flags); 8 evaluation seeds
and the pod's learning rates, so 24 runs per candidate at stage 0 and 16 at stage 1 (one
group of 4 devices per candidate, ``layout.queue_group_size``); 2,048 children per run (128
steps of 16) after the 6 seeds; 5 simulation seeds (0 to 4) per setting; a host dies with
probability 0.01 per hour (process 0, whose death ends the job, never does); heartbeat timeout
100 s, liveness checked every 1 s, ``max_deals`` 3, no evaluation timeout (the defaults).
Evaluation times at the measured scale (``time_scale`` 1) and, declared with the rest before any
simulation ran but after the leader's costs were measured, at 10 times the measured evaluation
seconds with the leader's costs unchanged (``time_scale`` 10: longer evaluations, as at a pod's
budgets, where the leader's share is smaller).

Utilisation is reported two ways: ``utilisation`` is the scheduler's own ``usage()`` (what the
loop records): an evaluation's group counts as busy until process 0 collects its answer; ``true``
counts only the seconds the devices computed (start to finish, or to the host's death) over the
seconds each host was up. They differ by the time finished groups wait for a busy leader. Both
over the whole run, and (``fed``, added after the first results were seen, to explain them)
over the part of the run in which children were being fed: from the end of step 0 and its
promotions to the submission of the last child. The issue's goal: ``async`` at 64 hosts at
least 90% utilisation.

Results (benchmarks/results/scheduler_sim.json; mean ± standard deviation over the 5 seeds;
evaluations per virtual hour, stages 0 and 1; ``leader``: share of the run process 0 was busy):

    scale hosts schedule | utilisation | true        | fed: util.  | fed: true   | evals/h
        1     1    steps | 95.1% ± 0.1 | 95.1% ± 0.1 | 95.1% ± 0.1 | 95.1% ± 0.1 |  100 ±  1
        1     1    async | 95.1% ± 0.1 | 95.1% ± 0.1 | 95.1% ± 0.1 | 95.1% ± 0.1 |  100 ±  1
        1     4    steps | 63.4% ± 0.4 | 63.4% ± 0.4 | 63.3% ± 0.5 | 63.3% ± 0.6 |  265 ±  7
        1     4    async | 94.2% ± 0.4 | 93.8% ± 0.4 | 95.0% ± 0.1 | 94.6% ± 0.1 |  396 ±  8
        1    16    steps | 24.5% ± 0.5 | 24.5% ± 0.5 | 24.5% ± 0.5 | 24.5% ± 0.5 |  406 ± 10
        1    16    async | 85.5% ± 2.0 | 82.7% ± 1.9 | 90.9% ± 0.2 | 87.9% ± 0.3 | 1396 ± 53
        1    64    steps |  6.1% ± 0.1 |  6.1% ± 0.1 |  6.1% ± 0.1 |  6.1% ± 0.1 |  408 ±  9
        1    64    async | 46.9% ± 1.5 | 26.6% ± 0.9 | 52.2% ± 0.3 | 29.3% ± 0.5 | 1819 ± 64
       10     1    steps | 99.5% ± 0.0 | 99.5% ± 0.0 | 99.5% ± 0.0 | 99.5% ± 0.0 |   10 ±  0
       10     1    async | 99.5% ± 0.0 | 99.5% ± 0.0 | 99.5% ± 0.0 | 99.5% ± 0.0 |   10 ±  0
       10     4    steps | 81.6% ± 6.7 | 81.6% ± 6.7 | 81.8% ± 7.1 | 81.8% ± 7.1 |   20 ±  6
       10     4    async | 98.7% ± 0.5 | 98.7% ± 0.5 | 99.5% ± 0.0 | 99.5% ± 0.0 |   28 ± 11
       10    16    steps | 35.5% ± 3.3 | 35.5% ± 3.3 | 35.8% ± 3.5 | 35.8% ± 3.5 |   46 ±  3
       10    16    async | 93.3% ± 2.5 | 93.3% ± 2.5 | 99.4% ± 0.0 | 99.4% ± 0.0 |  142 ± 11
       10    64    steps |  9.1% ± 0.2 |  9.1% ± 0.2 |  9.1% ± 0.3 |  9.1% ± 0.3 |   50 ±  2
       10    64    async | 69.4% ± 5.7 | 69.4% ± 5.7 | 98.4% ± 0.0 | 98.3% ± 0.0 |  470 ± 42

The goal is not met. At the measured times, ``async`` at 64 hosts uses 26.6% of the devices
(the scheduler records 46.9%): process 0 is busy 88% of the run, 1.79 s of checks per child
against a 27 s mean evaluation, so it keeps about 15 groups fed, not 64. With evaluations 10
times longer it keeps them fed (98.4% while children are fed) but the run's whole figure is
69.4%: the seed step and its promotions are waited for with 6 of 64 hosts busy (stage 1 takes
6.3 times stage 0), and the last evaluations drain at the end; 2,048 children are 32 per host,
too few to hide that. ``steps`` cannot use more groups than ``samples_per_step`` (16 of 64
hosts at most) and waits for each step's slowest evaluation and promotion batch: 6 to 9% at 64
hosts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

from evolve_jax.evaluation.layout import queue_group_size
from evolve_jax.evaluation.scheduler import Evaluation, Executor, Scheduler
from evolve_jax.search_space import EvalResult

HERE = os.path.dirname(os.path.abspath(__file__))
LA_SPEED = os.path.join(HERE, "results", "la_speed_cpu.json")
PROXY_FIDELITY = os.path.join(HERE, "results", "proxy_fidelity.json")

HOSTS = (1, 4, 16, 64)
DEVICES = 4
SAMPLES_PER_STEP = 16  # configs/tpu_pod.flags
PROMOTE_TOP_K = 16  # configs/tpu_pod.flags
RUNS = (24, 16)  # runs per candidate at stages 0 and 1: 8 seeds x 3 and x 2 learning rates
SPACE_SEEDS = 6  # linear_attention's named seeds, evaluated at step 0
CHILDREN = 2048
SIM_SEEDS = (0, 1, 2, 3, 4)
FAILURES_PER_HOST_HOUR = 0.01
HEARTBEAT_TIMEOUT_S = 100.0  # --heartbeat_timeout_s's default
TIME_SCALES = (1.0, 10.0)
SCHEDULES = ("steps", "async")
SETTINGS = {
    "hosts": HOSTS, "devices_per_host": DEVICES, "samples_per_step": SAMPLES_PER_STEP,
    "promote_top_k": PROMOTE_TOP_K, "runs_per_candidate": RUNS, "space_seeds": SPACE_SEEDS,
    "children": CHILDREN, "sim_seeds": SIM_SEEDS, "failures_per_host_hour": FAILURES_PER_HOST_HOUR,
    "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S, "time_scales": TIME_SCALES,
}  # fmt: skip

# Process 0's own seconds on the real loop (--measure_leader; benchmarks/results/
# scheduler_sim_leader.json holds the measurements): per child designed (async 40 steps, no
# checks: 4 ms in the first third of 646 nodes, 7.5 ms in the last), per design record written
# (async only), per child checked (the Engineer's prepare; async 6 steps: 69 children checked,
# 27 refused as duplicates for nothing; 1.79 s mean, 1.57 s median over all), per node recorded
# (async 40 steps), per promoted result recorded, per step of ``steps`` (lessons, promotion's
# ranking, page) and per generation of ``async`` (usage record, lessons, page).
LEADER = {
    "design_s": 0.0057,
    "design_record_s": 0.0021,
    "prepare_s": 1.79,
    "record_s": 0.0245,
    "stage_record_s": 0.0016,
    "steps_step_s": 0.074,
    "async_generation_s": 0.027,
}


# ---------------------------------------------------------------------- the measured inputs


@dataclasses.dataclass(frozen=True)
class TimeModel:
    """Evaluation seconds: stage 0 lognormal(mu, sigma) * scale, stage 1 that times ratio."""

    mu: float
    sigma: float
    stage1_ratio: float
    scale: float = 1.0

    def seconds(self, rng_seed: int, candidate: int, stage: int) -> float:
        z = np.random.default_rng([rng_seed, 7, candidate]).standard_normal()
        t = self.scale * math.exp(self.mu + self.sigma * z)
        return t * (self.stage1_ratio if stage else 1.0)


def fit_times() -> dict[str, Any]:
    """The lognormal of stage-0 evaluation seconds and the stage-1 ratio, from the results files
    named in the docstring."""
    with open(LA_SPEED, encoding="utf-8") as f:
        rows = json.load(f)["candidates"]
    seconds = np.array([r["seconds"] - r["check_seconds"] for r in rows])
    logs = np.log(seconds)
    cheap, costly = {}, {}
    with open(PROXY_FIDELITY, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["error"] is None and r["stage"] in ("cheap_lm", "costly"):
                (cheap if r["stage"] == "cheap_lm" else costly)[r["arch"]] = r["seconds"]
    ratios = np.array([costly[a] / cheap[a] for a in sorted(costly) if a in cheap])
    return {
        "stage0": {
            "source": "benchmarks/results/la_speed_cpu.json: seconds - check_seconds, "
            f"{len(seconds)} architectures, stage {json.dumps('byte_lm_short')} at the space's "
            "defaults, 1 seed, 2 CPU cores, compilation included",
            "seconds": sorted(round(float(s), 1) for s in seconds),
            "mu": float(logs.mean()),
            "sigma": float(logs.std(ddof=1)),
            "median_s": float(math.exp(logs.mean())),
        },
        "stage1_ratio": {
            "source": "benchmarks/results/proxy_fidelity.json: costly / cheap_lm seconds per "
            f"architecture ({len(ratios)}), median",
            "ratios": sorted(round(float(r), 2) for r in ratios),
            "median": float(np.median(ratios)),
        },
    }


# ---------------------------------------------------------------------- simulated hosts


class World:
    """Virtual time: the scheduler's clock; its idle wait jumps to the next event."""

    def __init__(self):
        self.now = 0.0
        self.hosts: list[SimHost] = []
        self.scheduler: Scheduler | None = None
        self._live = -1
        self.leader_s = 0.0

    def clock(self) -> float:
        return self.now

    def work(self, seconds: float) -> None:
        """Process 0 is busy (designing, checking, recording): time passes, devices run."""
        self.now += seconds
        self.leader_s += seconds

    def idle(self, seconds: float) -> None:
        """The next answer or death detection, or the pause the queue asks for when it just
        lost a process (it re-deals that process's work at its next dispatch)."""
        live = len(self.scheduler.live_processes())
        ahead = [t for h in self.hosts for t in h.events() if t > self.now]
        if ahead and live == self._live:
            self.now = min(ahead)
        else:
            self.now += max(seconds, 1e-3)
        self._live = live


class SimHost(Executor):
    def __init__(self, world: World, process: int, times: TimeModel, rng_seed: int, dies_at):
        self.world, self.process, self.devices, self.lanes = world, process, DEVICES, 1
        self.times, self.rng_seed = times, rng_seed
        self.dies_at = dies_at
        self.detected_at = dies_at + HEARTBEAT_TIMEOUT_S
        self.flight: dict[int, tuple[float, float]] = {}  # key -> (start, finish)
        self.computed: list[tuple[float, float, float]] = []  # (from, to, devices at fill)

    def start(self, evaluation: Evaluation, block: Sequence[int]) -> None:
        now = self.world.now
        finish = now + self.times.seconds(self.rng_seed, evaluation.genome, evaluation.stage)
        self.flight[evaluation.key] = (now, finish)
        g = len(block)
        fill = evaluation.runs / (math.ceil(evaluation.runs / g) * g)
        self.computed.append((now, min(finish, self.dies_at), g * fill))

    def busy(self, t0: float, t1: float) -> float:
        """Device-seconds of real runs (padding excluded) between ``t0`` and ``t1``."""
        return sum(w * max(0.0, min(b, t1) - max(a, t0)) for a, b, w in self.computed)

    def up(self, t0: float, t1: float) -> float:
        """Device-seconds the host was up between ``t0`` and ``t1``."""
        return DEVICES * max(0.0, min(t1, self.dies_at) - t0)

    def poll(self) -> list[tuple[int, EvalResult, float]]:
        until = min(self.world.now, self.dies_at)
        out = []
        for key, (start, finish) in list(self.flight.items()):
            if finish <= until and start < self.dies_at:
                del self.flight[key]
                out.append((key, EvalResult(metrics={0: {"x": 0.0}}), finish - start))
        return out

    def alive(self) -> bool:
        return self.world.now < self.detected_at

    def events(self) -> list[float]:
        out = [f for s, f in self.flight.values() if f <= self.dies_at and s < self.dies_at]
        return [*out, self.detected_at] if math.isfinite(self.dies_at) else out


# ---------------------------------------------------------------------- the loop's policies


class Search:
    """One simulated run: hosts, the real Scheduler, the nodes the leader recorded."""

    def __init__(self, hosts: int, times: TimeModel, seed: int, leader: dict[str, float]):
        self.world = World()
        self.leader = leader
        rng = np.random.default_rng([seed, 11])
        lifetimes = rng.exponential(3600.0 / FAILURES_PER_HOST_HOUR, size=hosts)
        lifetimes[0] = math.inf  # process 0: its death ends the job
        self.world.hosts = [SimHost(self.world, p, times, seed, lifetimes[p]) for p in range(hosts)]
        self.scheduler = Scheduler(
            self.world.hosts, queue_group_size, clock=self.world.clock, idle=self.world.idle
        )
        self.world.scheduler = self.scheduler
        self.scores = np.random.default_rng([seed, 13]).standard_normal(SPACE_SEEDS + CHILDREN)
        self.recorded: list[int] = []  # node ids (candidates) recorded at stage 0
        self.promoted: set[int] = set()  # submitted at stage 1
        self.designed = 0
        self.evaluations = 0

    def submit(self, candidate: int, stage: int) -> None:
        self.scheduler.submit(Evaluation(candidate, stage, (), RUNS[stage], tag=candidate))

    def check_and_submit(self, candidates: list[int], designed: bool) -> None:
        """``evolve_step``'s designs, then ``Engineer.run``'s checks and submissions."""
        if designed:
            self.world.work(len(candidates) * self.leader["design_s"])
        for c in candidates:
            self.world.work(self.leader["prepare_s"])
            self.submit(c, 0)

    def promotions(self) -> list[int]:
        ranked = sorted(self.recorded, key=lambda c: (-self.scores[c], c))[:PROMOTE_TOP_K]
        todo = [c for c in ranked if c not in self.promoted]
        self.promoted.update(todo)
        return todo

    def record(self, done) -> None:
        assert done.result.error is None, done.result.error  # a lost one would be an error
        self.evaluations += 1
        if done.evaluation.stage == 0:
            self.world.work(self.leader["record_s"])
            self.recorded.append(done.evaluation.genome)
        else:
            self.world.work(self.leader["stage_record_s"])

    def batch(self, candidates: list[int], stage: int, designed: bool = False) -> None:
        if stage == 0:
            self.check_and_submit(candidates, designed)
        else:
            for c in candidates:
                self.submit(c, stage)
        for done in self.scheduler.drain():
            self.record(done)

    def seed_step(self) -> None:
        """Step 0 and ``promote(0)``, the same in both schedules: the seeds checked, evaluated,
        recorded; lessons; their promotions evaluated and recorded."""
        self.batch(list(range(SPACE_SEEDS)), 0)
        self.world.work(self.leader["steps_step_s"])
        self.batch(self.promotions(), 1)

    def run_steps(self) -> None:
        """``ResearchLoop._run`` with ``--schedule=steps``: evolve_step, promote, page."""
        self.seed_step()
        self.fed_from = (self.world.now, self.scheduler.usage())
        for step in range(CHILDREN // SAMPLES_PER_STEP):
            first = SPACE_SEEDS + step * SAMPLES_PER_STEP
            if step == CHILDREN // SAMPLES_PER_STEP - 1:
                self.fed_until = (self.world.now, self.scheduler.usage())
            self.batch(list(range(first, first + SAMPLES_PER_STEP)), 0, designed=True)
            self.world.work(self.leader["steps_step_s"])
            self.batch(self.promotions(), 1)

    def run_async(self) -> None:
        """``ResearchLoop.evolve_async`` after the seed step and its promotions."""
        self.seed_step()
        self.fed_from = (self.world.now, self.scheduler.usage())
        children = list(range(SPACE_SEEDS, SPACE_SEEDS + CHILDREN))
        in_flight: set[int] = set()
        promoting: dict[int, bool] = {}  # candidate -> its stage-1 evaluation is done
        batches: list[list[int]] = []  # promotions submitted, recorded when all are done
        recorded = generation = 0
        while children or in_flight or promoting:
            if children:
                free = self.scheduler.free_lanes(RUNS[0]) or (
                    0 if self.scheduler.outstanding else 1
                )
                batch, children = children[:free], children[free:]
                self.world.work(len(batch) * self.leader["design_s"])
                for c in batch:
                    self.world.work(self.leader["design_record_s"] + self.leader["prepare_s"])
                    self.submit(c, 0)
                    in_flight.add(c)
                if batch and not children:
                    self.fed_until = (self.world.now, self.scheduler.usage())
            for done in self.scheduler.wait() if self.scheduler.outstanding else []:
                c = done.evaluation.genome
                if done.evaluation.stage:
                    promoting[c] = True
                    continue
                in_flight.remove(c)
                self.record(done)
                recorded += 1
                if recorded // SAMPLES_PER_STEP > generation:
                    generation = recorded // SAMPLES_PER_STEP
                    self.world.work(self.leader["async_generation_s"])
                    todo = self.promotions()
                    for p in todo:
                        self.submit(p, 1)
                        promoting[p] = False
                    if todo:
                        batches.append(todo)
            while batches and all(promoting[p] for p in batches[0]):
                for p in batches.pop(0):
                    self.evaluations += 1
                    self.world.work(self.leader["stage_record_s"])
                    del promoting[p]

    def run(self, schedule: str) -> dict[str, Any]:
        getattr(self, f"run_{schedule}")()
        end = self.world.now
        usage = self.scheduler.usage()
        self.scheduler.stop()
        for h in self.world.hosts:
            assert not h.flight or h.dies_at < end, "a live host still holds work"

        def true(t0, t1):
            hosts = self.world.hosts
            return sum(h.busy(t0, t1) for h in hosts) / sum(h.up(t0, t1) for h in hosts)

        (t0, u0), (t1, u1) = self.fed_from, self.fed_until
        busy = u1["busy_device_seconds"] - u0["busy_device_seconds"]
        available = u1["available_device_seconds"] - u0["available_device_seconds"]
        return {
            "hours": float(end / 3600),
            "utilisation": float(usage["utilisation"]),
            "true_utilisation": float(true(0.0, end)),
            # While children were being fed: from the end of step 0 and its promotions to the
            # submission of the last child (the start and the final drain left out).
            "fed_utilisation": float(busy / available),
            "fed_true_utilisation": float(true(t0, t1)),
            "fed_hours": float((t1 - t0) / 3600),
            "evaluations": self.evaluations,
            "evaluations_per_hour": float(self.evaluations / (end / 3600)),
            "children_per_hour": float(CHILDREN / (end / 3600)),
            "leader_busy": float(self.world.leader_s / end),
            "hosts_lost": sum(1 for h in self.world.hosts if h.dies_at < end),
        }


def simulate(times: TimeModel, leader: dict[str, float]) -> list[dict[str, Any]]:
    logging.set_verbosity(logging.FATAL)  # the queue's line per lost host (counted instead)
    rows = []
    for scale in TIME_SCALES:
        scaled = dataclasses.replace(times, scale=scale)
        for hosts in HOSTS:
            for schedule in SCHEDULES:
                start = time.perf_counter()
                runs = [Search(hosts, scaled, s, leader).run(schedule) for s in SIM_SEEDS]
                row = {"time_scale": scale, "hosts": hosts, "schedule": schedule, "seeds": runs}
                keys = (
                    "utilisation",
                    "true_utilisation",
                    "fed_utilisation",
                    "fed_true_utilisation",
                )
                for key in (*keys, "evaluations_per_hour"):
                    values = np.array([r[key] for r in runs])
                    row[key] = {
                        "mean": float(values.mean()),
                        "std": float(values.std(ddof=1)),
                        "min": float(values.min()),
                        "max": float(values.max()),
                    }
                row["leader_busy"] = float(np.mean([r["leader_busy"] for r in runs]))
                row["hosts_lost"] = float(np.mean([r["hosts_lost"] for r in runs]))
                row["hours"] = float(np.mean([r["hours"] for r in runs]))
                row["sim_wall_s"] = round(time.perf_counter() - start, 2)
                rows.append(row)
                _print_row(row)
    return rows


def _print_header() -> None:
    print(
        f"{'scale':>5} {'hosts':>5} {'schedule':>8} | {'utilisation':>15} | {'true':>15} | "
        f"{'fed: util.':>15} | {'fed: true':>15} | {'evals/h':>13} | {'leader':>6} "
        f"{'lost':>5} {'hours':>6}"
    )


def _print_row(row: dict[str, Any]) -> None:
    def pct(d):
        return f"{100 * d['mean']:5.1f}% ±{100 * d['std']:4.1f}"

    e = row["evaluations_per_hour"]
    print(
        f"{row['time_scale']:>5g} {row['hosts']:>5} {row['schedule']:>8} | "
        f"{pct(row['utilisation']):>15} | {pct(row['true_utilisation']):>15} | "
        f"{pct(row['fed_utilisation']):>15} | {pct(row['fed_true_utilisation']):>15} | "
        f"{e['mean']:7.0f} ±{e['std']:4.0f} | {100 * row['leader_busy']:5.1f}% "
        f"{row['hosts_lost']:5.1f} {row['hours']:6.2f}",
        flush=True,
    )


# ---------------------------------------------------------------------- the leader's costs


def measure_leader(steps: int, schedule: str, checks: bool) -> dict[str, Any]:
    """Process 0's own seconds per child, node and step on the real loop (see the docstring);
    ``checks`` False replaces the space's checks by none, to reach larger histories fast."""
    import collections
    import hashlib
    import tempfile

    from evolve_jax import loop
    from evolve_jax.agents.engineer import RuleEngineer
    from evolve_jax.config import RunConfig
    from evolve_jax.memory.history import History
    from evolve_jax.sampling import SamplerConfig
    from evolve_jax.search_space import fingerprint
    from search_spaces.linear_attention.space import LinearAttentionSpace

    class Instant(LinearAttentionSpace):
        """The linear-attention space with an instant, deterministic fake evaluation."""

        def evaluate(self, candidates, stage, seeds, devices):
            out = []
            for c in candidates:
                h = int(hashlib.sha256(fingerprint(c).encode()).hexdigest()[:8], 16)
                rng = np.random.default_rng([h, stage])
                bpb = 2.5 + 0.2 * rng.standard_normal()
                metrics = {s: {"val_bpb": float(bpb + 0.01 * rng.standard_normal())} for s in seeds}
                out.append(EvalResult(metrics=metrics))
            return out

        def check(self, candidate):
            return super().check(candidate) if checks else []

    timed: dict[str, list[float]] = collections.defaultdict(list)
    phase = {"promoting": False}

    def wrap(cls, name, key):
        original = getattr(cls, name)

        def timed_call(*args, **kwargs):
            k = key(*args) if callable(key) else key
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if k:
                    timed[k].append(time.perf_counter() - start)

        setattr(cls, name, timed_call)

    def promoting(name):
        original = getattr(loop.ResearchLoop, name)

        def call(*args, **kwargs):
            phase["promoting"] = True
            try:
                return original(*args, **kwargs)
            finally:
                phase["promoting"] = False

        setattr(loop.ResearchLoop, name, call)

    promoting("promote")
    promoting("_generation_done")
    wrap(RuleEngineer, "start", lambda *a: "prepare_promoted" if phase["promoting"] else "prepare")
    wrap(loop.ResearchLoop, "_record", "record")
    wrap(History, "add_stage_result", "stage_record")
    wrap(
        History, "write_record", lambda self, kind, *a: "design_record" if kind == "designs" else ""
    )
    wrap(loop.ResearchLoop, "evolve_step", "evolve_step")
    wrap(loop.ResearchLoop, "promote", "promote")
    wrap(loop.ResearchLoop, "_generation_done", "generation_done")
    wrap(loop.ResearchLoop, "_write_page", "page")
    workdir = tempfile.mkdtemp(prefix="leader_")
    config = RunConfig(
        search_space="linear_attention", workdir=workdir, steps=steps, schedule=schedule,
        samples_per_step=SAMPLES_PER_STEP, eval_seeds=8, promote_top_k=PROMOTE_TOP_K,
        sampler=SamplerConfig(name="islands", num_islands=5, migration_interval=10),
    )  # fmt: skip
    start = time.perf_counter()
    loop.run(config, Instant())
    wall = time.perf_counter() - start
    nodes = sorted(History(workdir).nodes(), key=lambda n: n.id)
    design = [n.timings["design"] for n in nodes if n.origin.get("step", 0) > 0]
    children = len(design)
    prepare, record = timed["prepare"][SPACE_SEEDS:], timed["record"][SPACE_SEEDS:]
    # What a step or generation costs beyond its children and nodes: lessons, usage record,
    # page, the promotion's ranking (evaluations are instant).
    if schedule == "steps":
        whole = sum(timed["evolve_step"]) + sum(timed["promote"][1:]) + sum(timed["page"][1:])
        inside = sum(design) + sum(prepare) + sum(record) + sum(timed["stage_record"][6:])
    else:
        whole = sum(timed["generation_done"])
        inside = 0.0
    inside += sum(timed["prepare_promoted"][SPACE_SEEDS:])
    third = max(1, children // 3)
    return {
        "how": f"ResearchLoop --schedule={schedule}, {steps} steps of {SAMPLES_PER_STEP}, "
        f"islands (5), promote_top_k {PROMOTE_TOP_K}, 8 eval seeds, linear_attention defaults"
        f"{'' if checks else ' with its checks replaced by none'}, instant fake evaluate, "
        f"local-disk history; {os.cpu_count()} CPU cores, load average "
        f"{os.getloadavg()[0]:.2f} at the end",
        "wall_s": wall,
        "nodes": len(nodes),
        "design_s": float(np.mean(design)),
        "design_s_first_third": float(np.mean(design[:third])),
        "design_s_last_third": float(np.mean(design[-third:])),
        "prepare_s": float(np.mean(prepare)),
        # Children refused before checking (duplicates) cost nothing and are not evaluated.
        "prepare_checked_s": float(np.mean([t for t in prepare if t > 0.01] or [0.0])),
        "checked": sum(1 for t in prepare if t > 0.01),
        "prepare_s_median": float(np.median(prepare)),
        "prepare_s_range": [float(np.min(prepare)), float(np.max(prepare))],
        "prepare_promoted_s": float(np.mean(timed["prepare_promoted"] or [0.0])),
        "design_record_s": float(np.mean(timed["design_record"] or [0.0])),
        "record_s": float(np.mean(record)),
        "record_s_first_third": float(np.mean(record[:third])),
        "record_s_last_third": float(np.mean(record[-third:])),
        "stage_record_s": float(np.mean(timed["stage_record"] or [0.0])),
        "step_s": float((whole - inside) / steps),
        "counts": {k: len(v) for k, v in timed.items()},
    }


# ---------------------------------------------------------------------- main


def _define_flags():
    out = flags.DEFINE_string(
        "out", os.path.join(HERE, "results", "scheduler_sim.json"), "results JSON"
    )
    measure = flags.DEFINE_integer(
        "measure_leader", 0, "instead: measure the leader's costs on the real loop for this "
        "many steps and print them",
    )  # fmt: skip
    schedule = flags.DEFINE_enum("measure_schedule", "steps", SCHEDULES, "--measure_leader's")
    checks = flags.DEFINE_bool("measure_checks", True, "--measure_leader with the checks")
    return out, measure, schedule, checks


def main(argv):
    del argv
    if _MEASURE.value:
        measured = measure_leader(_MEASURE.value, _MEASURE_SCHEDULE.value, _MEASURE_CHECKS.value)
        print(json.dumps(measured, indent=1))
        return
    fit = fit_times()
    times = TimeModel(fit["stage0"]["mu"], fit["stage0"]["sigma"], fit["stage1_ratio"]["median"])
    print(
        f"stage 0: lognormal mu {times.mu:.4f} sigma {times.sigma:.4f} (median "
        f"{math.exp(times.mu):.1f} s); stage 1: x{times.stage1_ratio:.2f}; leader {LEADER}"
    )
    _print_header()
    rows = simulate(times, LEADER)
    goal = [r for r in rows if r["schedule"] == "async" and r["hosts"] == 64]
    result = {
        "python": sys.version.split()[0],
        "fit": fit,
        "leader": LEADER,
        "settings": SETTINGS,
        "goal": {
            "statement": "async at 64 hosts: utilisation >= 0.90",
            "met": {str(r["time_scale"]): r["utilisation"]["mean"] >= 0.9 for r in goal},
        },
        "rows": rows,
    }
    with open(_OUT.value, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"written to {_OUT.value}")


if __name__ == "__main__":
    _OUT, _MEASURE, _MEASURE_SCHEDULE, _MEASURE_CHECKS = _define_flags()
    app.run(main)
