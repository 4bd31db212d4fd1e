"""The run lease (evolve_jax/memory/lease.py): one process drives a run at a time."""

import json
import os
import socket
import subprocess
import sys
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
