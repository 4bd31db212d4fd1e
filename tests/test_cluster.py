"""Several processes joined by jax.distributed run one search (evolve_jax/evaluation/cluster.py)."""

import os
import re
import socket
import subprocess
import sys
import time

import pytest

from evolve_jax.loop import same_history
from evolve_jax.memory.history import History
from tests.conftest import REPO, TOY, run_cli

SEARCH = (
    f"--search_space={TOY}", "--steps=2", "--samples_per_step=4", "--eval_seeds=2",
    "--promote_top_k=3", "--space_opt=stages=3",
)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "-m", "evolve_jax.main", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _job(workdir: str, *extra: str) -> list[subprocess.Popen]:
    port = _free_port()
    job = (f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2")
    return [_start(*SEARCH, *job, *extra, f"--process_id={p}") for p in (0, 1)]


def _worker_stages(log: str) -> list[int]:
    """The stage of every evaluation the worker's log says it started."""
    return [int(m) for m in re.findall(r"process 1: evaluation \d+ \(stage (\d+)\)", log)]


def test_two_processes_run_one_search_with_the_history_of_one(tmp_path):
    alone = str(tmp_path / "alone")
    done = run_cli("evolve_jax.main", *SEARCH, f"--workdir={alone}")
    assert done.returncode == 0, done.stderr

    joined = str(tmp_path / "joined")
    procs = _job(joined)
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
    # The worker evaluated candidates at every stage (promotions included); the leader
    # recorded everything, once, as one process would have.
    worker = outs[1][0].strip().splitlines()[-1]
    assert worker.startswith("process 1 of 2: evaluated ")
    assert int(worker.split()[5]) > 0
    assert {0, 1, 2} <= set(_worker_stages(outs[1][1])), outs[1][1]
    nodes = History(joined).nodes()
    assert len(nodes) == 3 + 2 * 4
    assert same_history(History(alone).nodes(), nodes)
    # The utilisation records count both processes' devices.
    records = dict(History(joined).records("utilisation"))
    assert set(records["main/000001/00"]["processes"]) == {"0", "1"}
    assert sum(r["processes"]["1"]["evaluations"] for r in records.values()) > 0
    [line] = [x for x in outs[0][0].splitlines() if x.startswith("device utilisation of run")]
    assert "process 0 " in line and "process 1 " in line, line


def test_a_worker_that_dies_mid_evaluation_loses_only_its_time(tmp_path):
    """The worker ends abruptly inside its first evaluation (as the OOM killer would end it):
    process 0 finds it gone by its heartbeat, re-deals what it held, and the history is the
    one process 0 alone records: nothing failed for it, nothing twice."""
    alone = str(tmp_path / "alone")
    assert run_cli("evolve_jax.main", *SEARCH, f"--workdir={alone}").returncode == 0
    workdir = str(tmp_path / "run")
    procs = _job(workdir, "--heartbeat_timeout_s=3", "--space_opt=exit_in_process=1")
    (_, leader_err), (_, worker_err) = [p.communicate(timeout=300) for p in procs]
    assert procs[0].returncode == 0, leader_err
    assert procs[1].returncode == 137
    assert _worker_stages(worker_err), "the worker never started an evaluation"
    assert "process 1 is gone (no heartbeat); re-dealing its " in leader_err
    assert same_history(History(alone).nodes(), History(workdir).nodes())


def test_a_worker_killed_from_outside_mid_evaluation_loses_only_its_time(tmp_path):
    """SIGKILL lands while the worker holds an evaluation (each takes 2 s): it is re-dealt."""
    alone = str(tmp_path / "alone")
    assert run_cli("evolve_jax.main", *SEARCH, "--steps=1", f"--workdir={alone}").returncode == 0
    workdir = str(tmp_path / "run")
    leader, worker = _job(workdir, "--steps=1", "--heartbeat_timeout_s=3", "--space_opt=delay=2")
    lines = []
    for line in worker.stderr:  # the worker's log, until it says it started an evaluation
        lines.append(line)
        if _worker_stages(line):
            break
    worker.kill()
    worker.wait(timeout=60)
    _, leader_err = leader.communicate(timeout=300)
    assert _worker_stages("".join(lines)), "".join(lines)
    assert leader.returncode == 0, leader_err
    assert "process 1 is gone (no heartbeat); re-dealing its 1 evaluation(s)" in leader_err
    assert same_history(History(alone).nodes(), History(workdir).nodes())


@pytest.mark.parametrize(
    ("flags", "env", "said"),
    [
        # Nothing listens on the port: the join times out.
        (("--num_processes=2", "--process_id=1", "--join_timeout_s=3"), {},
         "not reachable within 3 s"),
        (("--num_processes=2",), {"SLURM_NTASKS": "4"}, "the scheduler announces 4 processes"),
        (("--num_processes=2", "--process_id=2"), {}, "--process_id=2 is not in [0, 2)"),
    ],
)  # fmt: skip
def test_a_job_that_cannot_be_joined_is_one_line_before_any_work(tmp_path, flags, env, said):
    workdir = str(tmp_path / "never")
    coordinator = f"--coordinator_address=127.0.0.1:{_free_port()}"
    done = subprocess.run(
        [sys.executable, "-m", "evolve_jax.main", *SEARCH, f"--workdir={workdir}", coordinator,
         *flags],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **env),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    lines = [x for x in done.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and said in lines[0], done.stderr
    assert not os.path.exists(workdir)


def test_process_0_killed_mid_search_then_restarted_resumes_with_nothing_lost_or_twice(tmp_path):
    """SIGKILL process 0 once it has recorded part of the search: the worker, its coordinator
    gone, ends by itself; the same two commands run again finish the search, and the history
    is the one an uninterrupted single process records."""
    alone = str(tmp_path / "alone")
    assert run_cli("evolve_jax.main", *SEARCH, f"--workdir={alone}").returncode == 0
    workdir = str(tmp_path / "run")
    slow = ("--heartbeat_timeout_s=3", "--space_opt=delay=0.5")
    leader, worker = _job(workdir, *slow)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and leader.poll() is None:
        if os.path.exists(workdir) and len(History(workdir, create=False).nodes()) >= 5:
            break
        time.sleep(0.1)
    leader.kill()
    leader.communicate(timeout=60)
    assert leader.returncode == -9, "the search ended before the kill"
    worker.communicate(timeout=60)  # ends by itself once process 0 is gone
    recorded = {n.id: n.to_json() for n in History(workdir).nodes()}
    assert 5 <= len(recorded) < 3 + 2 * 4

    procs = _job(workdir, *slow)
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
    nodes = History(workdir).nodes()
    assert {n.id: n.to_json() for n in nodes if n.id in recorded} == recorded
    assert same_history(History(alone).nodes(), nodes)


def test_two_processes_run_an_async_search_with_each_child_recorded_once(tmp_path):
    workdir = str(tmp_path / "async")
    procs = _job(workdir, "--schedule=async", "--space_opt=delay=0.2")
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
    assert _worker_stages(outs[1][1]), "the worker evaluated nothing"
    slots = sorted((n.origin["step"], n.origin["slot"]) for n in History(workdir).nodes())
    assert slots == [(0, s) for s in range(3)] + [(t, s) for t in (1, 2) for s in range(4)]
    designs = dict(History(workdir).records("designs"))
    assert {f"main/{t:06d}/{s:04d}" for t in (1, 2) for s in range(4)} == set(designs)
