"""Several processes joined by jax.distributed run one search (evolve_jax/evaluation/cluster.py)."""

import os
import socket
import subprocess
import sys

import pytest

from evolve_jax.evaluation import cluster
from evolve_jax.loop import same_history
from evolve_jax.memory.history import History
from tests.conftest import REPO, TOY, run_cli

SEARCH = (
    f"--search_space={TOY}", "--steps=2", "--samples_per_step=4", "--eval_seeds=2",
    "--promote_top_k=1",
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


def test_deal_is_round_robin_from_the_leader():
    assert cluster.deal(5, [0, 1]) == {0: [0, 2, 4], 1: [1, 3]}
    assert cluster.deal(1, [0, 1, 2]) == {0: [0], 1: [], 2: []}


def test_two_processes_run_one_search_with_the_history_of_one(tmp_path):
    alone = str(tmp_path / "alone")
    done = run_cli("evolve_jax.main", *SEARCH, f"--workdir={alone}")
    assert done.returncode == 0, done.stderr

    joined = str(tmp_path / "joined")
    port = _free_port()
    job = (f"--workdir={joined}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2")
    procs = [_start(*SEARCH, *job, f"--process_id={p}") for p in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
    # The worker evaluated a share; the leader recorded everything, once.
    worker = outs[1][0].strip().splitlines()[-1]
    assert worker.startswith("process 1 of 2: evaluated ")
    assert int(worker.split()[5]) > 0
    nodes = History(joined).nodes()
    assert len(nodes) == 3 + 2 * 4
    assert same_history(History(alone).nodes(), nodes)
    # Each step's utilisation counts the worker's layout too.
    step = dict(History(joined).records("utilisation"))["main/000001/00"]
    assert [layout.get("process", 0) for layout in step["layouts"]] == [0, 1]


def test_a_worker_that_dies_fails_only_its_candidates_and_the_search_goes_on(tmp_path):
    workdir = str(tmp_path / "run")
    job = (
        f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{_free_port()}",
        "--num_processes=2", "--answer_timeout_s=5", "--space_opt=exit_in_process=1",
    )  # fmt: skip
    procs = [_start(*SEARCH, *job, f"--process_id={p}") for p in (0, 1)]
    (_, leader_err), _ = [p.communicate(timeout=300) for p in procs]
    assert procs[0].returncode == 0, leader_err
    assert procs[1].returncode == 137
    nodes = History(workdir).nodes()
    assert len(nodes) == 3 + 2 * 4  # every slot recorded
    lost = [n for n in nodes if n.reason and "process 1 gave no answer within 5 s" in n.reason]
    # Step 0 dealt one of the three seeds to process 1 (round-robin); it is the only loss.
    assert [n.name for n in lost] == ["corner"]
    # Later steps ran on process 0 alone: their candidates trained (the toy's "broken" shape
    # fails by design, for its own reason).
    later = [n for n in nodes if n.name not in ("origin", "corner", "ridge")]
    assert sum(n.ok for n in later) >= 4


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
