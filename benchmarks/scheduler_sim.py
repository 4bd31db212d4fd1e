"""The real work queue (evolve_jax/evaluation/scheduler.py) driven by simulated hosts in virtual
time: device utilisation and evaluations per hour of the ``steps`` and ``async`` schedules.

    python -m benchmarks.scheduler_sim [--out=benchmarks/results/scheduler_sim.json]
    python -m benchmarks.scheduler_sim --real      # 4 real processes against the simulation
    python -m benchmarks.scheduler_sim --measure_leader=6 [--measure_schedule=async]
        [--nomeasure_checks] [--measure_space=sleep]     # process 0's own costs, re-measured

What is real and what is simulated. The ``Scheduler`` is the real class, unchanged: it deals,
re-deals, times out and accounts exactly as in a job. Its executors are ``SimHost`` objects (4
devices each, one lane per device as ``--concurrency=1``): an evaluation takes a drawn number
of virtual seconds; a host dies with a fixed probability per hour, answers nothing from then on
and stops being ``alive()`` ``--heartbeat_timeout_s`` (100 s) later, when the real liveness path
re-deals what it held. Time is a virtual clock: the scheduler's idle wait jumps to the next
event, and process 0's own work (designing, recording) advances the clock by measured
constants while the devices keep running, as process 0's single thread does. The two schedules
are the loop's policies (evolve_jax/loop.py at commit 0a0c123) replayed over the real queue:

* both start as ``ResearchLoop._run`` does: the seed step (6 seeds submitted, all waited for,
  recorded, a usage record), lessons and page;
* ``steps``: then ``promote(0)``, a stage-1 batch waited for and recorded; each step designs
  ``samples_per_step`` children, submits them (the Engineer's ``start``: schema and novelty on
  process 0), waits for all, records them, writes the step's lessons and page, and promotes
  the top ``promote_top_k`` not yet promoted to stage 1 as another batch, waited for and
  recorded;
* ``async`` (``ResearchLoop.evolve_async``; no ``promote(0)`` in ``_run`` since commit
  0a0c123): ``_generation_done(0)`` submits the seeds' promotions to the queue (no usage
  record, lessons or page for generation 0) and the children start beside them; then, over
  and over, ``free_lanes(runs)`` children (1 if that is 0 and nothing is outstanding) are
  designed, each design recorded and submitted; then ``wait``; every finished child is
  recorded at once; once all of the wait's answers are recorded, for every further
  ``samples_per_step`` recorded children the usage record, lessons and page are written and
  the top ``promote_top_k`` not yet promoted are submitted to the same queue; a promotion batch
  is recorded once all of it is done; after the loop, a last usage record (what ran after the
  last generation's end).

Scores are i.i.d. normal draws (the sim does not model a search that improves, which would
promote more often); the top-k ranking is of those scores. Every child is evaluated and every
evaluation succeeds: children the loop refuses before evaluating them (duplicates: 27 of 96 in
a measurement of the leader, at no cost) and failed runs are not modelled.

Where the numbers come from (all measured on this repository's 2-core CPU machine, the
linear-attention space's default stage-0 recipe, compilation included):

* training seconds at stage 0: ``benchmarks/results/la_speed_cpu.json`` (benchmarks/la_speed.py,
  the 14 architectures of proxy_fidelity: six seeds and eight mutants), each candidate's
  ``seconds - check_seconds``: 11.8 to 44.1 s; lognormal fitted by the mean and standard
  deviation (ddof=1) of the logs: mu 3.2488, sigma 0.3764 (median 25.8 s, mean 27.6 s);
* at stage 1: the candidate's stage-0 training seconds times 6.30, the median over the same 14
  architectures of ``costly / cheap_lm`` seconds in ``benchmarks/results/proxy_fidelity.json``
  (4.2 to 8.6), so a slow architecture is slow at both stages;
* the static checks (shapes, causality, FLOPs, parameter budget; they compile), which run on
  the evaluating process just before each run (commit 7d9e9a1): ``CHECK_S`` 1.79 s added to
  every evaluation, the mean over 69 children checked in the real loop when process 0 ran them;
* process 0's own costs, measured on the real loop (``--measure_leader``: ResearchLoop with the
  pod flagfile's search settings, offline agents, linear_attention at its defaults, its
  ``evaluate`` an instant fake and its checks none, so only process 0's own work is timed;
  history on local disk; benchmarks/results/scheduler_sim_leader.json): ``LEADER`` below,
  milliseconds per child (design 3.3, its record 1.2, recording the node 19.4) and per step or
  generation (about 70). A history on GCS (the pod's) makes each record slower; not measured.

Settings, fixed before any outcome was seen: 1, 4, 16 and 64 hosts of 4 devices;
``samples_per_step`` 16 and ``promote_top_k`` 16 (configs/tpu_pod.flags); 8 evaluation seeds
and the pod's learning rates, so 24 runs per candidate at stage 0 and 16 at stage 1 (one
group of 4 devices per candidate, ``layout.queue_group_size``); 2,048 children per run (128
steps of 16) after the 6 seeds; 5 simulation seeds (0 to 4) per setting; a host dies with
probability 0.01 per hour (process 0, whose death ends the job, never does); heartbeat timeout
100 s, liveness checked every 1 s, ``max_deals`` 3, no evaluation timeout (the defaults).
Training times at the measured scale (``time_scale`` 1) and, declared with the rest before any
simulation ran but after the leader's costs were measured, at 10 times that (``time_scale`` 10:
longer evaluations, as at a pod's budgets; checks and leader costs unchanged).

Utilisation is reported two ways: ``utilisation`` is the scheduler's own ``usage()`` (what the
loop records); ``true`` counts only the seconds the devices computed (start to finish, or to
the host's death) over the seconds each host was up. Both over the whole run, and (``fed``,
added after the first results were seen, to explain them) over the part of the run in which
children were being fed: from the end of step 0 (``steps``: and of ``promote(0)``; ``async``
queues those promotions with the first children) to the submission of the last child. The
issue's goal: ``async`` at 64 hosts at least 90% utilisation.

Results against evolve_jax/loop.py as of commit 0a0c123 (benchmarks/results/scheduler_sim.json;
mean ± standard deviation over the 5 seeds; evaluations, stages 0 and 1, per virtual hour; the
same settings and seeds as before; the simulation takes 64 to 70 s of wall time here):

    scale hosts schedule | utilisation  | true         | fed: util.   | fed: true    | evals/h
        1     1    steps |  99.9% ± 0.0 |  99.9% ± 0.0 |  99.9% ± 0.0 |  99.9% ± 0.0 |  100 ±   1
        1     1    async |  99.9% ± 0.0 |  99.9% ± 0.0 |  99.9% ± 0.0 |  99.9% ± 0.0 |  100 ±   1
        1     4    steps |  73.2% ± 0.8 |  73.2% ± 0.8 |  73.2% ± 1.0 |  73.2% ± 1.0 |  293 ±   8
        1     4    async |  99.7% ± 0.2 |  99.7% ± 0.2 |  99.9% ± 0.0 |  99.9% ± 0.0 |  400 ±   7
        1    16    steps |  31.2% ± 0.7 |  31.2% ± 0.8 |  31.3% ± 0.8 |  31.3% ± 0.8 |  495 ±  17
        1    16    async |  97.6% ± 1.0 |  97.6% ± 1.0 |  99.9% ± 0.0 |  99.9% ± 0.0 | 1567 ±  37
        1    64    steps |   7.8% ± 0.2 |   7.8% ± 0.2 |   7.9% ± 0.2 |   7.9% ± 0.2 |  497 ±  16
        1    64    async |  84.7% ± 3.7 |  84.7% ± 3.7 |  99.9% ± 0.0 |  99.9% ± 0.0 | 5495 ± 251
       10     1    steps | 100.0% ± 0.0 | 100.0% ± 0.0 | 100.0% ± 0.0 | 100.0% ± 0.0 |   10 ±   0
       10     1    async | 100.0% ± 0.0 | 100.0% ± 0.0 | 100.0% ± 0.0 | 100.0% ± 0.0 |   10 ±   0
       10     4    steps |  82.4% ± 6.6 |  82.4% ± 6.6 |  82.7% ± 6.9 |  82.7% ± 6.9 |   20 ±   6
       10     4    async |  99.9% ± 0.0 |  99.9% ± 0.0 | 100.0% ± 0.0 | 100.0% ± 0.0 |   28 ±  11
       10    16    steps |  36.3% ± 3.4 |  36.3% ± 3.4 |  36.5% ± 3.6 |  36.5% ± 3.6 |   47 ±   3
       10    16    async |  98.2% ± 0.9 |  98.2% ± 0.9 | 100.0% ± 0.0 | 100.0% ± 0.0 |  150 ±   8
       10    64    steps |   9.3% ± 0.2 |   9.3% ± 0.2 |   9.3% ± 0.3 |   9.3% ± 0.3 |   51 ±   2
       10    64    async |  84.5% ± 3.9 |  84.5% ± 3.9 | 100.0% ± 0.0 | 100.0% ± 0.0 |  569 ±  24

Before 0a0c123 (loop.py as of commit 7a14a5c: ``async`` waited for ``promote(0)`` as ``steps``
does, with 6 of 64 groups busy and stage 1 taking 6.3 times stage 0), ``async`` at 64 hosts was
at 70.9% ± 5.8 (scale 1; 4621 ± 406 evaluations per hour) and 70.3% ± 5.9 (scale 10; 474 ±
43), 93.4% and 93.8% at 16 hosts, 99.1% and 99.2% at 4; 99.9% or more while fed in every case.
``steps`` is unchanged (the same numbers: its schedule did not change).

Queuing the seeds' promotions with the first children puts ``async`` at 64 hosts at 84.7% and
84.5% over the whole run: better by 14 points, but short of the 90% goal (one seed of 5
reaches 90.1% at scale 1, none at scale 10); while children are fed it stays at 99.9% and
100.0%. What is left, at 64 hosts and scale 1: the seed step, still waited for with 6 of 64
groups busy (33 to 81 s from the start), and the drain after the last child is submitted (116
to 278 s: the last children, then the last promotions at stage 1, 6.3 times as long), out of
runs of 1,315 to 1,451 s; 2,048 children are 32 per host, too few to hide that. ``steps``
cannot use more groups than ``samples_per_step`` (16 of 64 hosts) and waits for each step's
slowest evaluation and promotion batch: 8 to 9% at 64 hosts. (The first version of this
benchmark, commit d82733f, ran against the code before 7d9e9a1 and f8be0b0: process 0 ran each
child's checks, 1.79 s, and kept 15 groups fed, not 64: ``async`` at 64 hosts computed 26.6%
of the time while the queue recorded 46.9%, since it counted a finished group busy until
process 0 collected its answer.)

Real processes against the simulation (``--real``; results file, "real"; measured before
0a0c123, on the code as of commit 7a14a5c, with ``async`` waiting for ``promote(0)``; not run
again since, so neither column reflects the queued promotions): benchmarks/sleep_space.py,
whose evaluations sleep for the same lognormal at ``REAL_SCALE`` 0.05 (median 1.29 s, stage 1
6.30 times longer) and load no CPU; 4 processes of 4 CPU devices on this
machine (jax.distributed, the real cluster executors), 4 evaluation seeds (one group of 4
devices per candidate), 6 steps of 16 after the 6 seeds, ``promote_top_k`` 16, no failures;
utilisation added up from the run's ``utilisation`` records. The simulation of the same
settings uses process 0's costs measured on the sleep space (``--measure_space=sleep``) and adds
up the queue's usage at the same record points. Settings fixed before the first real run.

    schedule | real (1 run), per process 0/1/2/3     | simulated (5 seeds) | gap
    steps    | 73.6% (89.7 / 68.5 / 77.2 / 58.9%)    | 76.8% ± 3.0         | +3.3 points
    async    | 90.0% (96.1 / 85.0 / 94.8 / 84.0%)    | 94.5% ± 2.9         | +4.5 points

Within 10 points for both. Process 0's own group is the busiest: the workers' evaluations go
through the key-value store, whose latency the simulation leaves out. Wall times 159 s
(steps) and 117 s (async); an earlier pair of runs, with the code before 7d9e9a1 and f8be0b0,
gave 74.1% and 90.3%.
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
LOOP_COMMIT = "0a0c123"  # the evolve_jax/loop.py whose schedules the policies below replay


@dataclasses.dataclass(frozen=True)
class Setup:
    """One simulated job: the pod's settings unless said otherwise."""

    hosts: int
    devices: int = DEVICES
    samples_per_step: int = SAMPLES_PER_STEP
    promote_top_k: int = PROMOTE_TOP_K
    runs: tuple[int, int] = RUNS
    space_seeds: int = SPACE_SEEDS
    children: int = CHILDREN
    failures_per_host_hour: float = FAILURES_PER_HOST_HOUR
    heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S


SETTINGS = {
    "hosts": HOSTS, "devices_per_host": DEVICES, "samples_per_step": SAMPLES_PER_STEP,
    "promote_top_k": PROMOTE_TOP_K, "runs_per_candidate": RUNS, "space_seeds": SPACE_SEEDS,
    "children": CHILDREN, "sim_seeds": SIM_SEEDS, "failures_per_host_hour": FAILURES_PER_HOST_HOUR,
    "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S, "time_scales": TIME_SCALES,
}  # fmt: skip

# --real: 4 processes of 4 CPU devices on this machine, benchmarks/sleep_space.py's sleeps at
# REAL_SCALE times the fitted lognormal (median 1.29 s at stage 0), 4 evaluation seeds (4 runs:
# a group of 4 devices), 6 steps of 16 children after the 6 seeds, no host failures.
REAL_PROCESSES = 4
REAL_EVAL_SEEDS = 4
REAL_STEPS = 6
REAL_SCALE = 0.05
REAL_SIM = Setup(
    hosts=REAL_PROCESSES, runs=(REAL_EVAL_SEEDS, REAL_EVAL_SEEDS),
    children=REAL_STEPS * SAMPLES_PER_STEP, failures_per_host_hour=0.0,
)  # fmt: skip

# Process 0's own seconds on the real loop at commit f8be0b0 (--measure_leader=40 with
# --nomeasure_checks, async and steps, 646 nodes; benchmarks/results/scheduler_sim_leader.json):
# per child designed (3.1 ms in the first third, 3.6 in the last), per design record written
# (async only), per child submitted (the Engineer's start: schema and novelty), per node recorded
# (28 ms in the first third, 14 in the last), per promoted result recorded, per step of
# ``steps`` (lessons, promotion's ranking, page) and per generation of ``async`` (usage record,
# lessons, page).
LEADER = {
    "design_s": 0.0033,
    "design_record_s": 0.0012,
    "prepare_s": 0.00005,
    "record_s": 0.0194,
    "stage_record_s": 0.0012,
    "steps_step_s": 0.068,
    "async_generation_s": 0.072,
}
# The static checks, on the evaluating process before each run since commit 7d9e9a1: the mean
# per child checked in the real loop (async, 6 steps, 69 children, when process 0 ran them).
CHECK_S = 1.79


# ---------------------------------------------------------------------- the measured inputs


@dataclasses.dataclass(frozen=True)
class TimeModel:
    """Evaluation seconds on a group: ``check_s`` of static checks, then training: at stage 0
    lognormal(mu, sigma) * scale, at stage 1 that times ``stage1_ratio``."""

    mu: float
    sigma: float
    stage1_ratio: float
    scale: float = 1.0
    check_s: float = 0.0

    def seconds(self, rng_seed: int, candidate: int, stage: int) -> float:
        z = np.random.default_rng([rng_seed, 7, candidate]).standard_normal()
        t = self.scale * math.exp(self.mu + self.sigma * z)
        return self.check_s + t * (self.stage1_ratio if stage else 1.0)


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
    def __init__(
        self, world: World, process: int, setup: Setup, times: TimeModel, rng_seed, dies_at
    ):
        self.world, self.process, self.devices, self.lanes = world, process, setup.devices, 1
        self.times, self.rng_seed = times, rng_seed
        self.dies_at = dies_at
        self.detected_at = dies_at + setup.heartbeat_timeout_s
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
        return self.devices * max(0.0, min(t1, self.dies_at) - t0)

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

    def __init__(self, setup: Setup, times: TimeModel, seed: int, leader: dict[str, float]):
        self.world = World()
        self.setup = setup
        self.leader = leader
        rate = setup.failures_per_host_hour
        rng = np.random.default_rng([seed, 11])
        lifetimes = (
            rng.exponential(3600.0 / rate, size=setup.hosts) if rate else [math.inf] * setup.hosts
        )
        lifetimes[0] = math.inf  # process 0: its death ends the job
        self.world.hosts = [
            SimHost(self.world, p, setup, times, seed, lifetimes[p]) for p in range(setup.hosts)
        ]
        self.scheduler = Scheduler(
            self.world.hosts, queue_group_size, clock=self.world.clock, idle=self.world.idle
        )
        self.world.scheduler = self.scheduler
        n = setup.space_seeds + setup.children
        self.scores = np.random.default_rng([seed, 13]).standard_normal(n)
        self.recorded: list[int] = []  # node ids (candidates) recorded at stage 0
        self.promoted: set[int] = set()  # submitted at stage 1
        self.evaluations = 0
        self.usage_recorded: dict[str, Any] = {}  # the queue's usage at the last usage record

    def submit(self, candidate: int, stage: int) -> None:
        runs = self.setup.runs[stage]
        self.scheduler.submit(Evaluation(candidate, stage, (), runs, tag=candidate))

    def record_usage(self) -> None:
        """Where the loop writes a ``utilisation`` record (``_record_usage``)."""
        self.usage_recorded = self.scheduler.usage()

    def check_and_submit(self, candidates: list[int], designed: bool) -> None:
        """``evolve_step``'s designs, then ``Engineer.run``'s checks and submissions."""
        if designed:
            self.world.work(len(candidates) * self.leader["design_s"])
        for c in candidates:
            self.world.work(self.leader["prepare_s"])
            self.submit(c, 0)

    def promotions(self) -> list[int]:
        k = self.setup.promote_top_k
        ranked = sorted(self.recorded, key=lambda c: (-self.scores[c], c))[:k]
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
        if candidates:
            for done in self.scheduler.drain():
                self.record(done)
            self.record_usage()

    def seed_step(self) -> None:
        """Step 0, the same in both schedules: the seeds checked, evaluated, recorded (a usage
        record); lessons and page."""
        self.batch(list(range(self.setup.space_seeds)), 0)
        self.world.work(self.leader["steps_step_s"])

    def run_steps(self) -> None:
        """``ResearchLoop._run`` with ``--schedule=steps``: the seed step and ``promote(0)``
        (waited for), then evolve_step, promote, page."""
        self.seed_step()
        self.batch(self.promotions(), 1)
        self.fed_from = (self.world.now, self.scheduler.usage())
        width = self.setup.samples_per_step
        steps = self.setup.children // width
        for step in range(steps):
            first = self.setup.space_seeds + step * width
            if step == steps - 1:
                self.fed_until = (self.world.now, self.scheduler.usage())
            self.batch(list(range(first, first + width)), 0, designed=True)
            self.world.work(self.leader["steps_step_s"])
            self.batch(self.promotions(), 1)

    def run_async(self) -> None:
        """``ResearchLoop._run`` with ``--schedule=async``: the seed step, not ``promote(0)``,
        then ``evolve_async``, whose ``_generation_done(0)`` queues the seeds' promotions (no
        usage record, lessons or page for generation 0) before the first children."""
        self.seed_step()
        self.fed_from = (self.world.now, self.scheduler.usage())
        first = self.setup.space_seeds
        children = list(range(first, first + self.setup.children))
        width = self.setup.samples_per_step
        in_flight: set[int] = set()
        promoting: dict[int, bool] = {}  # candidate -> its stage-1 evaluation is done
        batches: list[list[int]] = []  # promotions submitted, recorded when all are done

        def generation_done(generation: int) -> None:
            if generation >= 1:  # usage record, lessons, step cost, page
                self.record_usage()
                self.world.work(self.leader["async_generation_s"])
            todo = self.promotions()
            for p in todo:
                self.submit(p, 1)
                promoting[p] = False
            batches.append(todo)

        recorded = generation = 0
        generation_done(generation)
        while children or in_flight or promoting:
            if children:
                free = self.scheduler.free_lanes(self.setup.runs[0]) or (
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
            while recorded // width > generation:  # after all of wait()'s answers are recorded
                generation += 1
                generation_done(generation)
            while batches and all(promoting[p] for p in batches[0]):
                for p in batches.pop(0):
                    self.evaluations += 1
                    self.world.work(self.leader["stage_record_s"])
                    del promoting[p]
        self.record_usage()  # the last usage record: what ran after the last generation's end

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
        recorded = self.usage_recorded
        devices = self.setup.hosts * self.setup.devices  # as long as no host is lost
        recorded_hours = recorded["available_device_seconds"] / devices / 3600
        return {
            "hours": float(end / 3600),
            "utilisation": float(usage["utilisation"]),
            # What the run's utilisation records add up to (until the last one is written).
            "recorded_utilisation": float(recorded["utilisation"]),
            "recorded_hours": float(recorded_hours),
            "recorded_evaluations_per_hour": float(recorded["evaluations"] / recorded_hours),
            "true_utilisation": float(true(0.0, end)),
            # While children were being fed: from the end of step 0 and its promotions to the
            # submission of the last child (the start and the final drain left out).
            "fed_utilisation": float(busy / available),
            "fed_true_utilisation": float(true(t0, t1)),
            "fed_hours": float((t1 - t0) / 3600),
            "evaluations": self.evaluations,
            "evaluations_per_hour": float(self.evaluations / (end / 3600)),
            "children_per_hour": float(self.setup.children / (end / 3600)),
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
                setup = Setup(hosts)
                runs = [Search(setup, scaled, s, leader).run(schedule) for s in SIM_SEEDS]
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


def measure_leader(steps: int, schedule: str, checks: bool, space: str) -> dict[str, Any]:
    """Process 0's own seconds per child, node and step on the real loop (see the docstring);
    ``checks`` False replaces the space's checks by none, to reach larger histories fast.
    ``space`` "sleep": benchmarks/sleep_space.py with no sleep, 4 evaluation seeds (--real's)."""
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
    if space == "sleep":
        from benchmarks.sleep_space import SleepSpace

        instant, eval_seeds = SleepSpace(scale="0"), REAL_EVAL_SEEDS
    else:
        instant, eval_seeds = Instant(), 8
    config = RunConfig(
        search_space=space, workdir=workdir, steps=steps, schedule=schedule,
        samples_per_step=SAMPLES_PER_STEP, eval_seeds=eval_seeds, promote_top_k=PROMOTE_TOP_K,
        sampler=SamplerConfig(name="islands", num_islands=5, migration_interval=10),
    )  # fmt: skip
    start = time.perf_counter()
    loop.run(config, instant)
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
        f"islands (5), promote_top_k {PROMOTE_TOP_K}, {eval_seeds} eval seeds, {space} defaults"
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


# ---------------------------------------------------------------------- real processes


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def real_run(schedule: str, workdir: str, timeout_s: float) -> dict[str, Any]:
    """Runs the sleep-space search as a job of REAL_PROCESSES processes on this machine and adds
    up the utilisation records process 0 wrote."""
    import subprocess

    from evolve_jax.memory.history import History

    repo = os.path.dirname(HERE)
    devices = f"--xla_force_host_platform_device_count={DEVICES}"
    env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu", XLA_FLAGS=devices)
    port = _free_port()
    command = [
        sys.executable, "-m", "evolve_jax.main", "--search_space=benchmarks.sleep_space:make",
        f"--space_opt=scale={REAL_SCALE}", f"--workdir={workdir}", f"--steps={REAL_STEPS}",
        f"--samples_per_step={SAMPLES_PER_STEP}", f"--eval_seeds={REAL_EVAL_SEEDS}",
        f"--promote_top_k={PROMOTE_TOP_K}", "--sampler=islands", "--num_islands=5",
        "--migration_interval=10", f"--schedule={schedule}",
        f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={REAL_PROCESSES}",
    ]  # fmt: skip
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*command, f"--process_id={p}"],
            cwd=repo,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for p in range(REAL_PROCESSES)
    ]
    outs = [p.communicate(timeout=timeout_s) for p in procs]
    wall = time.perf_counter() - start
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"process exited {p.returncode}: {err[-3000:]}")
    records = History(workdir).records("utilisation")
    per: dict[str, dict[str, float]] = {}
    for _, usage in records:
        for p, u in usage["processes"].items():
            total = per.setdefault(p, {"busy": 0.0, "available": 0.0, "evaluations": 0})
            total["busy"] += u["busy_device_seconds"]
            total["available"] += u["available_device_seconds"]
            total["evaluations"] += u["evaluations"]
    busy = sum(u["busy"] for u in per.values())
    available = sum(u["available"] for u in per.values())
    evaluations = sum(u["evaluations"] for u in per.values())
    hours = available / (REAL_PROCESSES * DEVICES) / 3600
    nodes = History(workdir).nodes()
    return {
        "schedule": schedule,
        "wall_s": wall,
        "nodes": len(nodes),
        "records": len(records),
        "recorded_utilisation": busy / available,
        "recorded_hours": hours,
        "recorded_evaluations_per_hour": evaluations / hours,
        "processes": {
            p: {"utilisation": u["busy"] / u["available"], "evaluations": u["evaluations"]}
            for p, u in sorted(per.items())
        },
        "design_s": float(np.mean([n.timings["design"] for n in nodes if n.timings.get("design")])),
    }


def real_against_sim(fit: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """--real: the leader's costs on the sleep space, the job of real processes for each
    schedule, and the simulation of the same settings."""
    import subprocess
    import tempfile

    leader_runs = {}
    for schedule in SCHEDULES:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.scheduler_sim", "--measure_leader=6",
             "--measure_space=sleep", f"--measure_schedule={schedule}"],
            cwd=os.path.dirname(HERE), capture_output=True, text=True, check=True,
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
        )  # fmt: skip
        leader_runs[schedule] = json.loads(done.stdout)
    a, st = leader_runs["async"], leader_runs["steps"]
    leader = {
        "design_s": a["design_s"],
        "design_record_s": a["design_record_s"],
        "prepare_s": a["prepare_s"],
        "record_s": a["record_s"],
        "stage_record_s": a["stage_record_s"],
        "steps_step_s": st["step_s"],
        "async_generation_s": a["step_s"],
    }
    print(f"the leader's costs on the sleep space: {leader}", flush=True)
    times = TimeModel(
        fit["stage0"]["mu"], fit["stage0"]["sigma"], fit["stage1_ratio"]["median"], REAL_SCALE
    )
    logging.set_verbosity(logging.FATAL)
    out = {"setup": dataclasses.asdict(REAL_SIM), "scale": REAL_SCALE, "leader": leader}
    out["loop_commit"] = LOOP_COMMIT
    out["leader_measurements"] = leader_runs
    out["rows"] = []
    for schedule in SCHEDULES:
        real = real_run(schedule, tempfile.mkdtemp(prefix=f"sleep_{schedule}_"), timeout_s)
        sims = [Search(REAL_SIM, times, s, leader).run(schedule) for s in SIM_SEEDS]
        sim = {}
        keys = ("recorded_utilisation", "recorded_evaluations_per_hour", "recorded_hours")
        for key in (*keys, "utilisation", "true_utilisation", "hours"):
            values = np.array([r[key] for r in sims])
            sim[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1))}
        gap = 100 * (sim["recorded_utilisation"]["mean"] - real["recorded_utilisation"])
        row = {"schedule": schedule, "real": real, "sim": sim, "gap_points": gap}
        row["within_10_points"] = abs(gap) <= 10
        out["rows"].append(row)
        print(
            f"{schedule:>6}: real {100 * real['recorded_utilisation']:.1f}% "
            f"({real['wall_s']:.0f} s wall, {real['recorded_evaluations_per_hour']:.0f} evals/h), "
            f"sim {100 * sim['recorded_utilisation']['mean']:.1f}% "
            f"± {100 * sim['recorded_utilisation']['std']:.1f} "
            f"({sim['recorded_evaluations_per_hour']['mean']:.0f} evals/h); gap {gap:+.1f} points",
            flush=True,
        )
    return out


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
    space = flags.DEFINE_enum(
        "measure_space", "linear_attention", ["linear_attention", "sleep"], "--measure_leader's"
    )
    real = flags.DEFINE_bool(
        "real", False, "instead: run the sleep-space search as a job of 4 processes here for "
        "each schedule, simulate the same settings, and add the comparison to --out",
    )  # fmt: skip
    return out, measure, schedule, checks, space, real


def main(argv):
    del argv
    if _MEASURE.value:
        measured = measure_leader(
            _MEASURE.value, _MEASURE_SCHEDULE.value, _MEASURE_CHECKS.value, _MEASURE_SPACE.value
        )
        print(json.dumps(measured, indent=1))
        return
    fit = fit_times()
    if _REAL.value:
        with open(_OUT.value, encoding="utf-8") as f:
            result = json.load(f)
        result["real"] = real_against_sim(fit, timeout_s=900)
        with open(_OUT.value, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(f"added to {_OUT.value}")
        return
    times = TimeModel(
        fit["stage0"]["mu"], fit["stage0"]["sigma"], fit["stage1_ratio"]["median"], 1.0, CHECK_S
    )
    print(
        f"checks {CHECK_S} s, then training: stage 0 lognormal mu {times.mu:.4f} sigma "
        f"{times.sigma:.4f} (median {math.exp(times.mu):.1f} s), stage 1 x"
        f"{times.stage1_ratio:.2f}; leader {LEADER}"
    )
    _print_header()
    rows = simulate(times, LEADER)
    goal = [r for r in rows if r["schedule"] == "async" and r["hosts"] == 64]
    result = {
        "python": sys.version.split()[0],
        "loop_commit": LOOP_COMMIT,
        "fit": fit,
        "leader": LEADER,
        "check_s": CHECK_S,
        "settings": SETTINGS,
        "goal": {
            "statement": "async at 64 hosts: utilisation >= 0.90",
            "met": {str(r["time_scale"]): r["utilisation"]["mean"] >= 0.9 for r in goal},
            "met_while_fed": {
                str(r["time_scale"]): r["fed_utilisation"]["mean"] >= 0.9 for r in goal
            },
        },
        "rows": rows,
    }
    if os.path.exists(_OUT.value):  # keep the --real comparison already there
        with open(_OUT.value, encoding="utf-8") as f:
            earlier = json.load(f)
        if "real" in earlier:
            result["real"] = earlier["real"]
            if "loop_commit" not in result["real"]:  # run before LOOP_COMMIT was recorded
                result["real"]["loop_commit"] = "7a14a5c"
                result["real"]["note"] = (
                    "measured on the code as of commit 7a14a5c, before 0a0c123 (async waited "
                    "for promote(0)); both its real and its simulated numbers"
                )
    with open(_OUT.value, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"written to {_OUT.value}")


if __name__ == "__main__":
    _OUT, _MEASURE, _MEASURE_SCHEDULE, _MEASURE_CHECKS, _MEASURE_SPACE, _REAL = _define_flags()
    app.run(main)
