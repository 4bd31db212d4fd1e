"""--schedule=async: every free device group gets a child designed from the history as it stands."""

import os
import subprocess
import sys
import time

from evolve_jax.config import RunConfig
from evolve_jax.loop import ResearchLoop, _expand
from evolve_jax.memory.history import History
from tests.conftest import REPO, TOY, run_cli

STEPS, WIDTH = 3, 4
SEARCH = (
    f"--search_space={TOY}", f"--steps={STEPS}", f"--samples_per_step={WIDTH}", "--eval_seeds=1",
    "--promote_top_k=2", "--schedule=async",
)  # fmt: skip


def _loop(workdir: str) -> ResearchLoop:
    config = RunConfig(
        search_space=TOY, workdir=workdir, steps=STEPS, samples_per_step=WIDTH, eval_seeds=1,
        promote_top_k=2, schedule="async",
    )  # fmt: skip
    return ResearchLoop(config)


def _check_children(workdir: str) -> list:
    """Every child recorded once, each with a design record it can be designed again from."""
    nodes = History(workdir).nodes()
    slots = [(n.origin["step"], n.origin["slot"]) for n in nodes]
    assert sorted(slots) == sorted(
        [(0, s) for s in range(3)] + [(t, s) for t in range(1, STEPS + 1) for s in range(WIDTH)]
    )
    designs = dict(History(workdir).records("designs"))
    loop = _loop(workdir)
    children = [n for n in nodes if n.origin["step"] >= 1]
    for node in children:
        step, slot = node.origin["step"], node.origin["slot"]
        record = designs[f"main/{step:06d}/{slot:04d}"]
        seen = set(_expand(record["visible"]))
        assert node.id not in seen and all(i < node.id for i in seen)
        again = loop.redesign(step, slot)
        assert (again.name, again.parents, again.operator) == (
            node.name,
            tuple(node.parents),
            node.operator,
        )
        assert set(again.cognition_ids) == set(node.cognition_ids)
    return children


def test_async_records_each_child_once_with_what_its_design_saw(tmp_path):
    workdir = str(tmp_path / "async")
    done = run_cli("evolve_jax.main", *SEARCH, f"--workdir={workdir}", "--space_opt=delay=0.2")
    assert done.returncode == 0, done.stderr
    children = _check_children(workdir)
    # Four devices, four lanes: children were designed while others ran, so some design did
    # not see a node recorded before its own.
    designs = dict(History(workdir).records("designs"))
    unseen = [
        n
        for n in children
        if set(range(n.id))
        - set(_expand(designs[f"main/{n.origin['step']:06d}/{n.origin['slot']:04d}"]["visible"]))
    ]
    assert unseen, "every design saw every earlier node: nothing ran concurrently"
    # Promotions ran in the same queue; utilisation is recorded per generation.
    assert any(1 in n.stages for n in History(workdir).nodes() if n.origin["step"] >= 1)
    usage = dict(History(workdir).records("utilisation"))
    assert {f"main/{g:06d}/00" for g in range(1, STEPS + 1)} <= set(usage)


def test_async_killed_mid_evaluation_resumes_from_its_design_records(tmp_path):
    """SIGKILL while children are in flight (each evaluation takes 0.5 s, four at once): the
    resumed run designs them again from their records, and records nothing twice."""
    workdir = str(tmp_path / "killed")
    args = [sys.executable, "-m", "evolve_jax.main", *SEARCH, f"--workdir={workdir}"]
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [*args, "--space_opt=delay=0.5"], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(workdir) and len(History(workdir, create=False).nodes()) >= 3 + 5:
                break
            time.sleep(0.1)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -9, "the run ended before the kill"
    before = {n.id: n.to_json() for n in History(workdir).nodes()}
    designs = dict(History(workdir).records("designs"))
    recorded = {(n["origin"]["step"], n["origin"]["slot"]) for n in before.values()}
    in_flight = [k for k in designs if (int(k.split("/")[1]), int(k.split("/")[2])) not in recorded]
    assert in_flight, "no child was in flight when the kill landed"

    done = run_cli("evolve_jax.main", *SEARCH, f"--workdir={workdir}", "--space_opt=delay=0.5")
    assert done.returncode == 0, done.stderr
    after = {n.id: n.to_json() for n in History(workdir).nodes()}
    assert {i: after[i] for i in before} == before  # what the killed run recorded stands
    assert dict(History(workdir).records("designs")).items() >= designs.items()
    _check_children(workdir)


def test_a_run_resumed_with_another_schedule_is_refused_and_left_as_it_was(tmp_path):
    workdir = str(tmp_path / "steps")
    steps = [a for a in SEARCH if a != "--schedule=async"]
    assert run_cli("evolve_jax.main", *steps, f"--workdir={workdir}", "--steps=1").returncode == 0
    before = [n.to_json() for n in History(workdir).nodes()]
    done = run_cli("evolve_jax.main", *SEARCH, f"--workdir={workdir}")
    assert done.returncode == 1
    assert "was started with --schedule=steps; this command has --schedule=async" in done.stderr
    assert [n.to_json() for n in History(workdir).nodes()] == before
