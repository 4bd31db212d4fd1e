"""The run lease (evolve_jax/memory/lease.py): one process drives a run at a time."""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from evolve_jax.memory.history import History
from evolve_jax.memory.lease import Lease, LeaseLost, RunIsLive
from tests.conftest import REPO, TOY


def _stored(history, run="main"):
    value = history.kvstore.read(f"leases/{run}".encode()).result()
    return json.loads(value.value) if value.state == "value" else None


def _plant(history, **record):
    """A lease written by someone else, as its holder would have written it."""
    history.kvstore.write(b"leases/main", json.dumps(record).encode()).result()


def test_a_held_lease_refuses_a_second_holder_naming_the_run(workdir):
    history = History(workdir)
    with Lease(history, "main") as lease:
        assert _stored(history)["token"] == lease.holder["token"]
        with pytest.raises(RunIsLive, match=r"run 'main' is live: process \d+ on .* ago"):
            Lease(History(workdir), "main").acquire()
        with Lease(history, "other"):  # another run name is another lease
            pass
    assert _stored(history) is None  # released
    with Lease(history, "main"):
        pass


def test_a_dead_local_holder_or_a_stale_remote_one_is_taken_over(workdir):
    history = History(workdir)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    host = socket.gethostname()
    _plant(history, host=host, pid=int(dead.stdout), token="t", renewed=time.time())
    with Lease(history, "main"):
        pass
    _plant(history, host="elsewhere", pid=1, token="t", renewed=time.time() - 61)
    with Lease(history, "main", stale_after=60):
        pass
    # A remote holder renewed within stale_after is live.
    _plant(history, host="elsewhere", pid=1, token="t", renewed=time.time() - 5)
    with pytest.raises(RunIsLive, match="on elsewhere renewed its lease 5 s ago"):
        Lease(history, "main", stale_after=60).acquire()


def test_renewal_keeps_a_lease_fresh_and_a_replaced_holder_learns_it(workdir):
    history = History(workdir)
    lease = Lease(history, "main", renew_every=0.05, stale_after=1.0)
    lease.acquire()
    first = _stored(history)["renewed"]
    time.sleep(0.3)
    assert _stored(history)["renewed"] > first and not lease.lost
    # Presumed dead and taken over: the next renewal fails, and release leaves the successor's.
    _plant(history, host="elsewhere", pid=1, token="successor", renewed=time.time())
    deadline = time.time() + 5
    while not lease.lost and time.time() < deadline:
        time.sleep(0.05)
    lease.release()
    assert lease.lost and _stored(history)["token"] == "successor"
    with pytest.raises(LeaseLost, match="run 'main' lost its lease: process 1 on elsewhere took"):
        lease.check("step 3")


class _FlakyStore:
    """The history's store, whose next ``failures`` writes raise a storage error."""

    def __init__(self, kv):
        self._kv, self.failures, self.writes = kv, 0, 0

    def write(self, *args, **kwargs):
        self.writes += 1
        if self.failures:
            self.failures -= 1
            raise ValueError("UNAVAILABLE: injected storage error")
        return self._kv.write(*args, **kwargs)

    def read(self, *args, **kwargs):
        return self._kv.read(*args, **kwargs)


def _wait(condition, timeout=5.0):
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.02)
    return condition()


def test_a_renewal_that_fails_transiently_is_retried_and_keeps_the_lease(workdir):
    history = History(workdir)
    lease = Lease(history, "main", renew_every=0.05, stale_after=1.0)
    lease._kv = store = _FlakyStore(lease._kv)
    lease.acquire()
    store.failures = 1  # the next renewal's write fails
    writes = store.writes
    assert _wait(lambda: store.writes >= writes + 1 and not store.failures)
    failed_at = time.time()
    assert _wait(lambda: _stored(history)["renewed"] > failed_at)  # renewed again since
    lease.check("step 1")  # not lost
    lease.release()
    assert not lease.lost and _stored(history) is None


def test_a_renewal_failing_until_the_lease_is_stale_loses_it_naming_why(workdir):
    history = History(workdir)
    lease = Lease(history, "main", renew_every=0.05, stale_after=0.5)
    lease._kv = store = _FlakyStore(lease._kv)
    lease.acquire()
    store.failures, writes, started = 10**9, store.writes, time.time()
    assert _wait(lambda: lease.lost)
    assert time.time() - started >= 0.45  # not before the lease went stale
    # Retried after 0.005, 0.01, 0.02, 0.04 s, then every 0.05 s: not in a busy loop.
    assert 5 <= store.writes - writes <= 20
    with pytest.raises(
        LeaseLost,
        match=r"run 'main' lost its lease: its renewal has failed for 0.5 s, after which another "
        r"process may take it \(last error: UNAVAILABLE: injected storage error\)\. This "
        r"process stopped before step 2",
    ):
        lease.check("step 2")
    lease.release()


def test_same_command_twice_on_one_workdir_runs_once_and_refuses_once(tmp_path):
    """Two processes started at once with the same command: one runs, one stops with a line
    naming the run, and every (run, step, slot) is committed exactly once."""
    workdir = str(tmp_path / "run")
    command = [
        sys.executable, "-m", "evolve_jax.main", f"--search_space={TOY}",
        f"--workdir={workdir}", "--steps=6", "--samples_per_step=4",
        "--space_opt=delay=0.3",  # the run lasts ~10 s: the second start finds it live
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    refused = next(err for code, err in results if code == 1)
    [line] = [ln for ln in refused.splitlines() if ln.startswith("error: ")]
    assert "run 'main' is live" in line and "--run_name" in line
    nodes = History(workdir).nodes()
    slots = [(n.origin["run"], n.origin["step"], n.origin["slot"]) for n in nodes]
    assert len(slots) == len(set(slots)) == 3 + 6 * 4
    assert History(workdir).kvstore.read(b"leases/main").result().state == "missing"


# Runs the driver (evolve_jax.main, arguments from the command line) with the patches in
# PATCH, which sees `loop`, `history` and `lease` (the modules) and the environment.
_DRIVER = textwrap.dedent(
    """
    import json, os, runpy, sys, time
    from evolve_jax import loop
    from evolve_jax.memory import history, lease
    exec(os.environ["PATCH"])
    sys.argv = ["evolve_jax.main", *sys.argv[1:]]
    runpy.run_module("evolve_jax.main", run_name="__main__", alter_sys=True)
    """
)


def _drivers(workdir, patch, count, *args):
    command = [
        sys.executable, "-c", _DRIVER, f"--search_space={TOY}", f"--workdir={workdir}", *args
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", PATCH=textwrap.dedent(patch))
    procs = [
        subprocess.Popen(
            command, cwd=REPO, env=dict(env, TAG=str(i)), stderr=subprocess.PIPE, text=True
        )
        for i in range(count)
    ]
    return [(p.wait(timeout=300), p.stderr.read()) for p in procs]


def test_a_driver_whose_lease_is_taken_over_stops_at_its_next_check_with_one_line(workdir):
    """Another process takes the lease just after the driver committed step 1 slot 0 (as one
    that presumed it dead would): the driver stops before its next commit, exit 1."""
    patch = """
        leases = []
        def short_lease(*args, **kwargs):
            leases.append(lease.Lease(*args, renew_every=0.05, stale_after=1.0, **kwargs))
            return leases[-1]
        loop.Lease = short_lease
        append = history.History.append
        def append_then_be_replaced(self, **fields):
            node = append(self, **fields)
            if fields["origin"] == {"run": "main", "step": 1, "slot": 0}:
                successor = {"host": "elsewhere", "pid": 7, "token": "successor",
                             "renewed": time.time()}
                self.kvstore.write(b"leases/main", json.dumps(successor).encode()).result()
                deadline = time.time() + 30
                while not leases[0].lost and time.time() < deadline:
                    time.sleep(0.01)
            return node
        history.History.append = append_then_be_replaced
    """
    [(code, err)] = _drivers(workdir, patch, 1, "--steps=3", "--samples_per_step=3")
    assert code == 1, err
    [line] = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert line == (
        "error: run 'main' lost its lease: process 7 on elsewhere took it over, this process "
        "presumed dead. This process stopped before committing step 1 slot 1"
    )
    nodes = History(workdir).nodes()  # the 3 seeds and step 1 slot 0, nothing after
    assert [(n.origin["step"], n.origin["slot"]) for n in nodes] == [
        (0, 0), (0, 1), (0, 2), (1, 0)
    ]  # fmt: skip
    assert _stored(History(workdir))["token"] == "successor"  # left to its holder


def test_two_drivers_without_the_lease_commit_each_slot_once(workdir):
    """With the lease bypassed, two drivers of the same command both design and evaluate every
    slot of step 1 (each waits for the other before its first commit of it), and race to
    commit them: the slot claim refuses the second writer of each, whose log names the node
    that stands, and each (run, step, slot) is committed once."""
    patch = """
        class NoLease:  # taken and held whatever else holds the run
            lost = False
            def __init__(self, *args, **kwargs): pass
            def __enter__(self): return self
            def __exit__(self, *exc): pass
            def check(self, before): pass
        loop.Lease = NoLease
        append = history.History.append
        def append_after_the_other(self, **fields):
            barrier = os.path.join(self.workdir, "..", "barrier")
            if fields["origin"]["step"] == 1 and not os.path.exists(barrier + os.environ["TAG"]):
                open(barrier + os.environ["TAG"], "w").close()
                deadline = time.time() + 120
                while not all(os.path.exists(barrier + t) for t in "01"):
                    assert time.time() < deadline, "the other driver never reached step 1"
                    time.sleep(0.01)
            return append(self, **fields)
        history.History.append = append_after_the_other
    """
    results = _drivers(workdir, patch, 2, "--steps=2", "--samples_per_step=3")
    assert [code for code, _ in results] == [0, 0], results
    nodes = History(workdir).nodes()
    slots = [(n.origin["run"], n.origin["step"], n.origin["slot"]) for n in nodes]
    assert len(slots) == len(set(slots)) == 3 + 2 * 3
    refused = re.findall(
        r"step (\d+) slot (\d+): slots/main/\d+/\d+ is already node (\d+); keeping it",
        "".join(err for _, err in results),
    )
    assert {(int(step), int(slot)) for step, slot, _ in refused if step == "1"} == {
        (1, 0), (1, 1), (1, 2)
    }  # fmt: skip
    for step, slot, node_id in refused:  # the first writer's node stands
        assert nodes[int(node_id)].origin == {"run": "main", "step": int(step), "slot": int(slot)}
