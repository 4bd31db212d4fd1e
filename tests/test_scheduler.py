"""The work queue (evolve_jax/evaluation/scheduler.py), driven by fake processes in virtual time.

Every test runs the real ``Scheduler``; only the processes are fakes (``FakeProcess``: each
evaluation takes a set number of virtual seconds) and time is a virtual clock that the
scheduler's idle wait advances by half a second, so nothing here sleeps.
"""

from __future__ import annotations

import math

import pytest

from evolve_jax.evaluation.layout import queue_group_size
from evolve_jax.evaluation.scheduler import Evaluation, Executor, Scheduler
from evolve_jax.search_space import EvalResult

TICK = 0.5  # virtual seconds per idle wait (a power of two: sums of it are exact)


class World:
    """Virtual time: the scheduler's clock, and its idle wait (one tick, whatever it asks)."""

    def __init__(self, limit: float = 10_000.0):
        self.now = 0.0
        self.limit = limit  # a wait that never ends fails the test instead of hanging it

    def clock(self) -> float:
        return self.now

    def idle(self, seconds: float) -> None:
        del seconds
        self.now += TICK
        if self.now > self.limit:
            raise TimeoutError(f"still waiting at virtual time {self.now:g} s")


class FakeProcess(Executor):
    """A process whose evaluations take ``duration(evaluation)`` virtual seconds; it checks
    that no device ever holds more than ``lanes`` evaluations. ``dies_at``: from then on it
    answers nothing and is not alive (as its missed heartbeats would say)."""

    def __init__(self, world, process, devices=1, lanes=1, duration=lambda e: 2.0):
        self.world, self.process, self.devices, self.lanes = world, process, devices, lanes
        self.duration = duration
        self.dies_at = math.inf
        self.load = [0] * devices
        self.peak = 0  # the most evaluations a device held at once
        self.started: list[tuple[float, int, tuple[int, ...]]] = []  # (time, key, block)
        self.running: dict[int, tuple[float, tuple[int, ...], Evaluation]] = {}
        self.poison = None  # genome that kills this process when it starts it

    def start(self, evaluation, block):
        now = self.world.now
        block = tuple(block)
        for i in block:
            self.load[i] += 1
            assert self.load[i] <= self.lanes, f"device {i} of process {self.process} overfull"
            self.peak = max(self.peak, self.load[i])
        self.started.append((now, evaluation.key, block))
        self.running[evaluation.key] = (now + self.duration(evaluation), block, evaluation)
        if evaluation.genome == self.poison:
            self.dies_at = min(self.dies_at, now)

    def poll(self):
        if self.world.now >= self.dies_at:
            return []
        out = []
        for key, (finish, block, evaluation) in list(self.running.items()):
            if finish <= self.world.now:
                del self.running[key]
                for i in block:
                    self.load[i] -= 1
                result = EvalResult(metrics={0: {"genome": float(evaluation.genome)}})
                out.append((key, result, self.duration(evaluation)))
        return out

    def alive(self):
        return self.world.now < self.dies_at


def _scheduler(world, processes, **kwargs) -> Scheduler:
    kwargs.setdefault("group_size", queue_group_size)
    return Scheduler(processes, clock=world.clock, idle=world.idle, **kwargs)


def _submit(scheduler, genomes, runs=1, stage=0):
    return [scheduler.submit(Evaluation(g, stage, (0,), runs, tag=g)) for g in genomes]


def _once_each(done, submitted):
    """Every submitted evaluation came back exactly once."""
    keys = [d.evaluation.key for d in done]
    assert sorted(keys) == sorted(e.key for e in submitted), keys


def test_first_submitted_is_first_dealt_and_first_returned():
    world = World()
    p = FakeProcess(world, 0)
    scheduler = _scheduler(world, [p])
    submitted = _submit(scheduler, range(5))
    done = scheduler.drain()
    assert [key for _, key, _ in p.started] == [e.key for e in submitted]
    assert [d.evaluation.genome for d in done] == list(range(5))
    assert [t for t, _, _ in p.started] == [0.0, 2.0, 4.0, 6.0, 8.0]  # no gap between them
    assert all(d.result.error is None for d in done)


def test_queue_order_holds_across_processes():
    """Two processes of one device: evaluations start in submission order, two at a time."""
    world = World()
    processes = [FakeProcess(world, p) for p in (0, 1)]
    scheduler = _scheduler(world, processes)
    submitted = _submit(scheduler, range(6))
    scheduler.drain()
    starts = sorted((t, key) for p in processes for t, key, _ in p.started)
    assert [key for _, key in starts] == [e.key for e in submitted]
    assert [t for t, _ in starts] == [0.0, 0.0, 2.0, 2.0, 4.0, 4.0]


@pytest.mark.parametrize(("devices", "lanes"), [((4, 8), 1), ((2, 4), 2), ((8,), 3)])
def test_groups_are_sized_by_queue_group_size_and_no_device_exceeds_its_lanes(devices, lanes):
    world = World()
    processes = [
        FakeProcess(world, p, d, lanes, duration=lambda e: 0.5 * (1 + e.genome % 5))
        for p, d in enumerate(devices)
    ]
    scheduler = _scheduler(world, processes)
    runs = [1, 2, 3, 4, 6, 8, 24, 5]
    submitted = [
        scheduler.submit(Evaluation(i, 0, (0,), runs[i % len(runs)], tag=i)) for i in range(60)
    ]
    done = scheduler.drain()  # FakeProcess.start asserts the lanes
    _once_each(done, submitted)
    by_key = {e.key: e for e in submitted}
    for p in processes:
        assert p.started
        for _, key, block in p.started:
            g = queue_group_size(p.devices, by_key[key].runs)
            assert len(block) == g
            assert block == tuple(range(block[0], block[0] + g)) and block[0] % g == 0
        assert p.peak == lanes  # every lane was used


def test_free_lanes_counts_free_groups_less_the_queue():
    world = World()
    # 4 devices each, 2 runs: groups of 2 (queue_group_size), 2 groups per process.
    assert queue_group_size(4, 2) == 2
    processes = [FakeProcess(world, p, 4, duration=lambda e: 10.0) for p in (0, 1)]
    scheduler = _scheduler(world, processes)
    assert scheduler.free_lanes(2) == 4
    assert scheduler.free_lanes(1) == 8  # groups of 1 for 1 run
    _submit(scheduler, [0], runs=2)
    assert scheduler.free_lanes(2) == 3  # queued, not started: still counted against
    assert scheduler.wait(timeout=0) == []  # starts it
    assert scheduler.free_lanes(2) == 3
    assert scheduler.free_lanes(1) == 6
    _submit(scheduler, [1, 2, 3, 4], runs=2)
    assert scheduler.free_lanes(2) == 0  # never negative
    scheduler.wait(timeout=0)
    assert scheduler.free_lanes(2) == 0
    assert scheduler.outstanding == 5
    processes[1].dies_at = world.now  # its groups leave the pool once it is found dead
    world.now += 1.0
    scheduler.wait(timeout=0)
    assert scheduler.live_processes() == [0]
    assert scheduler.free_lanes(2) == 0  # the two lost ones are queued again, for process 0
    done = scheduler.drain()
    assert len(done) == 5
    assert scheduler.free_lanes(2) == 2
    lanes2 = _scheduler(World(), [FakeProcess(world, 0, 4, lanes=2)])
    assert lanes2.free_lanes(2) == 4


def test_a_dead_process_has_its_evaluations_redealt_first_to_the_live_ones():
    world = World()
    p0, p1 = FakeProcess(world, 0), FakeProcess(world, 1)
    p1.dies_at = 1.0  # mid-way through its first evaluation (each takes 2 s)
    scheduler = _scheduler(world, [p0, p1], liveness_interval_s=1.0)
    submitted = _submit(scheduler, range(4))
    done = scheduler.drain()
    _once_each(done, submitted)
    assert [key for _, key, _ in p1.started] == [1]
    # Evaluation 1 goes back at the head of the queue: process 0 takes it before 2 and 3.
    assert [key for _, key, _ in p0.started] == [0, 1, 2, 3]
    assert all(d.result.error is None and d.process == 0 for d in done)
    assert submitted[1].deals == 2
    assert scheduler.live_processes() == [0]
    assert scheduler.usage()["processes"]["1"]["evaluations"] == 0


def test_an_evaluation_lost_max_deals_times_fails_naming_why():
    """The poison candidate kills every process that starts it: after two deals it is failed
    with the reason; the rest is evaluated by the survivor."""
    world = World()
    processes = [FakeProcess(world, p) for p in range(3)]
    for p in processes[:2]:
        p.poison = 0
    scheduler = _scheduler(world, processes, max_deals=2)
    submitted = _submit(scheduler, range(4))
    done = scheduler.drain()
    _once_each(done, submitted)
    by_genome = {d.evaluation.genome: d for d in done}
    poison = by_genome[0]
    assert poison.result.error == (
        "lost 2 time(s): the process evaluating it died each time (last: process 1)"
    )
    assert not poison.result.timed_out
    assert submitted[0].deals == 2
    assert all(by_genome[g].result.error is None for g in (1, 2, 3))
    assert scheduler.live_processes() == [2]


def test_with_no_live_process_left_lost_work_comes_back_failed():
    world = World(limit=100.0)
    p = FakeProcess(world, 0, duration=lambda e: 10.0)
    p.dies_at = 3.0
    scheduler = _scheduler(world, [p], max_deals=5)
    [running] = _submit(scheduler, [7])
    done = scheduler.drain()  # World raises TimeoutError after 100 virtual seconds
    assert [d.evaluation.key for d in done] == [running.key]
    assert done[0].result.error.startswith("lost 1 time(s)")
    assert world.now < 10.0
    assert scheduler.outstanding == 0


def test_with_no_live_process_left_queued_work_comes_back_failed():
    world = World(limit=100.0)
    p = FakeProcess(world, 0, duration=lambda e: 10.0)
    p.dies_at = 3.0
    scheduler = _scheduler(world, [p])
    submitted = _submit(scheduler, [7, 8])  # 8 waits behind 7
    done = scheduler.drain()
    _once_each(done, submitted)
    assert all(d.result.error for d in done)


def test_work_submitted_after_every_process_is_gone_comes_back_failed():
    world = World(limit=100.0)
    p = FakeProcess(world, 0, duration=lambda e: 10.0)
    p.dies_at = 3.0
    scheduler = _scheduler(world, [p])
    _submit(scheduler, [7])
    scheduler.drain()  # process 0 is found gone
    [late] = _submit(scheduler, [8])
    [done] = scheduler.drain()
    assert done.evaluation.key == late.key and done.result.error


def test_a_straggler_times_out_its_group_stays_busy_and_its_late_answer_is_dropped():
    world = World()
    p = FakeProcess(world, 0, duration=lambda e: 30.0 if e.genome == 0 else 2.0)
    scheduler = _scheduler(world, [p], eval_timeout_s=10.0)
    slow, quick = _submit(scheduler, [0, 1])
    [late] = scheduler.wait()
    assert late.evaluation.key == slow.key
    assert late.result.timed_out
    assert late.result.error == "evaluation exceeded --eval_timeout_s=10 on process 0"
    assert 10.0 < world.now <= 10.0 + TICK and late.seconds == world.now
    assert scheduler.outstanding == 1  # the quick one; the straggler is answered
    assert scheduler.free_lanes(1) == 0  # the group is still busy with the straggler
    [after] = scheduler.wait()
    assert after.evaluation.key == quick.key and after.result.error is None
    # The quick one started only once the straggler's group answered, at 30 s.
    [(t0, k0), (t1, k1)] = [(t, key) for t, key, _ in p.started]
    assert (t0, k0, k1) == (0.0, slow.key, quick.key) and 30.0 <= t1 <= 30.0 + TICK
    assert scheduler.wait() == [] and scheduler.outstanding == 0  # the late answer: dropped
    assert scheduler.usage()["evaluations"] == 1


def test_a_fully_busy_process_is_used_at_its_fill():
    """Back-to-back work: utilisation 1.0; with 3 runs on groups of 2 devices each group's
    second round is half padding, so the busy share is 3 / 4."""
    for group, runs, expected in ((2, 2, 1.0), (2, 3, 0.75), (1, 3, 1.0)):
        world = World()
        p = FakeProcess(world, 0, devices=2)
        scheduler = _scheduler(world, [p], group_size=lambda devices, runs, g=group: g)
        _submit(scheduler, range(8), runs=runs)
        scheduler.drain()
        usage = scheduler.usage()
        groups = 2 // group
        assert world.now == 8 * 2.0 / groups
        assert usage["available_device_seconds"] == 2 * world.now
        assert usage["utilisation"] == pytest.approx(expected)
        assert usage["processes"]["0"]["utilisation"] == pytest.approx(expected)
        assert usage["evaluations"] == 8


def test_usage_counts_idle_time_and_weights_processes_by_their_devices():
    world = World()
    busy = FakeProcess(world, 0, devices=2, duration=lambda e: 4.0)  # one group of 2
    idle = FakeProcess(world, 1, devices=2)
    scheduler = _scheduler(world, [busy, idle], group_size=lambda devices, runs: 2)
    _submit(scheduler, [0], runs=2)
    scheduler.drain()
    assert world.now == 4.0
    world.now = 8.0  # nothing runs for 4 s
    usage = scheduler.usage()
    per = usage["processes"]
    assert per["0"]["busy_device_seconds"] == 8.0 and per["0"]["utilisation"] == 0.5
    assert per["1"]["busy_device_seconds"] == 0.0 and per["1"]["utilisation"] == 0.0
    assert usage["available_device_seconds"] == 32.0
    assert usage["utilisation"] == 0.25
    # A dead process's devices stop counting once it is found dead.
    idle.dies_at = 8.0
    scheduler.wait(timeout=1.0)
    world.now = 20.0
    usage = scheduler.usage()
    assert usage["processes"]["1"]["available_device_seconds"] == 16.0
    assert usage["processes"]["0"]["available_device_seconds"] == 40.0


def test_a_finished_group_waiting_for_a_busy_process_0_is_not_counted_busy():
    """The evaluation ends at 2 s; process 0, busy designing, collects it at 10 s: the 8 s
    between are idle device time."""
    world = World()
    p = FakeProcess(world, 0, devices=2, duration=lambda e: 2.0)
    scheduler = _scheduler(world, [p])
    _submit(scheduler, [1], runs=2)
    scheduler.wait(timeout=0)  # dispatched at 0 s
    world.now = 10.0  # process 0 was away
    [done] = scheduler.wait()
    usage = scheduler.usage()
    assert done.seconds == 2.0
    assert usage["busy_device_seconds"] == pytest.approx(2 * 2.0)
    assert usage["available_device_seconds"] == pytest.approx(2 * 10.0)
