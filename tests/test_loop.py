import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import scipy.stats

from evolve_jax import report
from evolve_jax.config import RunConfig
from evolve_jax.loop import ResearchLoop, run, same_history
from evolve_jax.memory.history import History
from evolve_jax.report import data
from evolve_jax.sampling import SAMPLERS, SamplerConfig
from tests.conftest import REPO, TOY, Crash, crash_at_append, run_cli
from tests.toy_space import ToySpace


def _config(workdir, **overrides):
    values = dict(search_space=TOY, workdir=workdir, steps=3, samples_per_step=3, seed=0)
    values.update(overrides)
    return RunConfig(**values)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_end_to_end_run_with_every_sampler(tmp_path, sampler):
    config = _config(str(tmp_path / sampler), sampler=SamplerConfig(name=sampler, num_islands=2))
    summary = run(config, ToySpace())
    nodes = summary.nodes
    assert len(nodes) == 3 + 3 * 3
    assert [n.name for n in nodes[:3]] == ["origin", "corner", "ridge"]
    children = nodes[3:]
    assert all(n.parents and n.operator and n.analysis for n in children)
    assert all(n.origin["run"] == "main" for n in nodes)
    assert summary.best.ok and "rank" in summary.report
    for node in nodes:
        if node.ok:
            assert math.isfinite(node.score) and node.metrics["cheap"]
        else:
            assert node.score == -math.inf and node.reason
    assert os.path.exists(os.path.join(str(tmp_path / sampler), "report.txt"))


def test_search_improves_on_the_seeds(tmp_path):
    # The toy's first children often beat the seeds by more than --implausible_gain; promotion
    # re-measures them at stage 1, which lets them count.
    config = _config(str(tmp_path / "r"), steps=8, samples_per_step=4, promote_top_k=1)
    summary = run(config, ToySpace())
    seed_best = max(n.score for n in summary.nodes[:3])
    assert summary.best.score > seed_best


def test_same_flags_and_seed_give_the_same_history(tmp_path):
    a = run(_config(str(tmp_path / "a"), sampler=SamplerConfig(name="islands")), ToySpace())
    b = run(_config(str(tmp_path / "b"), sampler=SamplerConfig(name="islands")), ToySpace())
    assert same_history(a.nodes, b.nodes)
    # Negative control: the seed alone changed.
    c = run(_config(str(tmp_path / "c"), sampler=SamplerConfig(name="islands"), seed=1), ToySpace())
    assert not same_history(a.nodes, c.nodes)


def test_rerunning_a_finished_run_adds_nothing(tmp_path):
    config = _config(str(tmp_path / "r"))
    first = run(config, ToySpace())
    again = run(config, ToySpace())
    assert same_history(first.nodes, again.nodes)


def test_baseline_normalised_scores_and_failures_in_min_direction(tmp_path):
    space = ToySpace(direction="min", baseline="origin")
    summary = run(_config(str(tmp_path / "r"), steps=4, eval_seeds=2), space)
    base = summary.nodes[0]
    assert base.name == "origin" and base.score == pytest.approx(0.5)
    assert summary.direction == "max"  # normalised scores are higher-is-better
    for node in summary.nodes:
        if node.ok:
            assert 0 < node.score < 1
            assert node.stats["vs_baseline"]["loss"]["n"] == 2
        else:
            assert node.score == -math.inf


def test_raw_min_direction_failure_scores_plus_infinity(tmp_path):
    summary = run(_config(str(tmp_path / "r"), steps=6), ToySpace(direction="min"))
    assert summary.direction == "min"
    failed = [n for n in summary.nodes if n.status == "failed"]
    assert failed and all(n.score == math.inf for n in failed)
    assert summary.best.score == min(n.score for n in summary.nodes)


def test_promotion_records_costlier_stage_and_correlation(tmp_path):
    config = _config(str(tmp_path / "r"), promote_top_k=3, eval_seeds=2)
    summary = run(config, ToySpace(baseline="none"))
    promoted = [n for n in summary.nodes if 1 in n.stages]
    assert len(promoted) >= 3
    assert all(n.stages[1]["stage_name"] == "full" for n in promoted)
    space = ToySpace(baseline="none")
    agreement = report.stage_correlation(summary.nodes, space.describe(), 1)
    rho, n = agreement.value, agreement.n
    assert n == len(promoted) and -1.0 <= rho <= 1.0  # a number: NaN fails both comparisons
    # Raw metric means per stage (the toy has no baseline, so scores are those means too).
    cheap = [np.mean([m["reward"] for m in p.metrics["cheap"].values()]) for p in promoted]
    costly = [np.mean([m["reward"] for m in p.stages[1]["metrics"].values()]) for p in promoted]
    assert cheap != costly  # the toy's stages differ by construction (noise, moved target)
    assert rho == pytest.approx(scipy.stats.spearmanr(cheap, costly).statistic)
    line = next(x for x in summary.report.splitlines() if x.startswith("Spearman"))
    if n >= 5:
        assert agreement.low <= rho <= agreement.high
        ci = f"(95% CI [{agreement.low:+.2f}, {agreement.high:+.2f}])"
    else:
        ci = "(no CI below 5 nodes)"
    if n >= 10:
        assert f"{rho:+.3f} {ci} over {n} nodes" in line
    else:  # no value where it means nothing: the count, and how many it needs
        assert f"not shown, {n} promoted node(s)" in line and "10 needed" in line
        assert f"{rho:+.3f}" not in line
    # Every stage's metric of a listed node is in the table (mean over its seeds).
    header = summary.report.splitlines()[1].split()
    assert header[3:5] == ["s0:reward", "s1:reward"]  # one column per stage (two here)
    assert summary.report.splitlines()[0].endswith("stages s0 cheap, s1 full")
    lines = summary.report.splitlines()[2:]
    rows = {int(x.split()[1]): x.split() for x in lines if x[:4].strip().isdigit()}
    shown = [n for n in promoted if n.id in rows]
    assert shown
    for node in shown:
        for stage, by_seed in enumerate((node.metrics["cheap"], node.stages[1]["metrics"])):
            mean = np.mean([m["reward"] for m in by_seed.values()])
            assert float(rows[node.id][3 + stage]) == pytest.approx(mean, rel=1e-3, abs=1e-3)


def test_lessons_are_written_back_with_provenance(tmp_path):
    loop = ResearchLoop(_config(str(tmp_path / "r"), steps=6, samples_per_step=4), ToySpace())
    loop.run()
    lessons = [i for i in loop.cognition.items() if i.source == "analyzer"]
    assert lessons
    ids = {n.id for n in loop.history.nodes()}
    assert all(set(i.provenance["nodes"]) <= ids for i in lessons)
    used = {c for n in loop.history.nodes() for c in n.cognition_ids}
    assert used  # the Researcher saw retrieved items


def _main_args(workdir, *extra):
    return (f"--search_space={TOY}", f"--workdir={workdir}", *extra)


def test_cli_runs_and_history_prints_json_lines(tmp_path):
    workdir = str(tmp_path / "cli")
    flagfile = tmp_path / "toy.flags"
    flagfile.write_text("--steps=5\n--samples_per_step=2\n--sampler=greedy\n")
    done = run_cli("evolve_jax.main", f"--flagfile={flagfile}", *_main_args(workdir, "--steps=1"))
    assert done.returncode == 0, done.stderr
    assert "rank" in done.stdout and workdir in done.stdout
    assert "step 1/1 slot 1" in done.stderr  # progress lines; --steps=1 overrode the file
    assert "JAX backend cpu: 4 device(s)" in done.stderr
    # No noise: JAX's search for a TPU, bm25s building its index.
    assert "Unable to initialize backend" not in done.stderr
    assert "Building index" not in done.stderr
    listing = run_cli("evolve_jax.history", f"--workdir={workdir}", "--sort=score")
    rows = [json.loads(line) for line in listing.stdout.splitlines()]
    assert len(rows) == 3 + 2
    assert {"id", "parents", "name", "status", "score", "metrics"} <= set(rows[0])
    ok_scores = [r["score"] for r in rows if r["status"] == "ok"]
    assert ok_scores == sorted(ok_scores, reverse=True)


@pytest.mark.parametrize(
    "args,message",
    [
        (("--bogus=1",), "Unknown command line flag 'bogus'"),
        (("--sampler=best",), "flag --sampler=best"),
        (("--steps=-1",), "flag --steps=-1"),
        (("--space_opt=oops",), "--space_opt='oops' is not key=value"),
        (("--implausible_gain=0",), "implausible_gain must be a number > 0"),
        (("--implausible_gain=nan",), "implausible_gain must be a number > 0"),
        (("--implausible_gain=much",), "flag --implausible_gain=much"),
        (("--seed=-5",), "seed must be an integer from 0 to 4294967"),
        (("--seed=4294968",), "seed must be an integer from 0 to 4294967"),
        (("--seed=4294967", "--eval_seeds=1000"), "seed must be an integer from 0 to 4294966"),
        (("--schedule=sometimes",), "flag --schedule=sometimes"),
        (("--eval_timeout_s=0",), "flag --eval_timeout_s=0"),
        (("--eval_timeout_s=nan",), "eval_timeout_s must be > 0"),
        (("--heartbeat_timeout_s=0",), "flag --heartbeat_timeout_s=0"),
    ],
)
def test_bad_flags_fail_before_any_work_with_one_line(tmp_path, args, message):
    workdir = str(tmp_path / "never")
    done = run_cli("evolve_jax.main", *_main_args(workdir, *args))
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not os.path.exists(workdir)


def test_unknown_search_space_fails_with_one_line(tmp_path):
    workdir = str(tmp_path / "never")
    done = run_cli("evolve_jax.main", "--search_space=nope", f"--workdir={workdir}")
    assert done.returncode == 2
    assert "unknown search space 'nope'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not os.path.exists(workdir)


def test_workdir_that_is_a_file_fails_with_one_line(tmp_path):
    path = tmp_path / "file"
    path.write_text("keep me")
    done = run_cli("evolve_jax.main", *_main_args(str(path)))
    assert done.returncode == 2 and "is a file" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert path.read_text() == "keep me"


def test_malformed_cognition_file_fails_naming_it(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")

    class BadSeed(ToySpace):
        def cognition_seed(self):
            return str(bad)

    with pytest.raises(ValueError, match=r"bad\.jsonl', line 1"):
        run(_config(str(tmp_path / "r")), BadSeed())


def _snapshot(workdir: str) -> dict[str, dict]:
    """Every committed node, stage result and migration record of a workdir, as JSON."""
    history = History(workdir)
    nodes = history.nodes()
    return {
        "nodes": {n.id: n.to_json() for n in nodes},
        "stages": {(n.id, s): r for n in nodes for s, r in n.stages.items()},
        "migrations": dict(history.records("migrations/main")),
    }


def _run_until(args, event: str, timeout: float = 120) -> None:
    """Starts the driver and SIGKILLs it as soon as its log shows ``event``."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(timeout, proc.kill)  # a hang fails the test, not CI
    watchdog.start()
    try:
        for line in proc.stderr:
            if event in line:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
    finally:
        watchdog.cancel()
    assert proc.returncode == -signal.SIGKILL, f"ended before {event!r} (rc {proc.returncode})"


def test_sigkill_mid_step_mid_promotion_mid_migration_then_resume_matches(tmp_path):
    """Kills land between two commits of a step, of a promotion and of a migration step.

    Each kill is checked to have landed there (the store shows part of that stage's writes),
    what it left is kept unchanged by the resumed runs, and the final history equals an
    uninterrupted run's.
    """
    extra = (
        "--steps=3", "--samples_per_step=3", "--sampler=islands", "--migration_interval=2",
        "--promote_top_k=2", "--space_opt=stages=3",
    )  # fmt: skip
    reference = run_cli("evolve_jax.main", *_main_args(str(tmp_path / "ref"), *extra))
    assert reference.returncode == 0, reference.stderr
    expected = History(str(tmp_path / "ref")).nodes()

    workdir = str(tmp_path / "killed")
    slow = ("--space_opt=delay=0.4", "--space_opt=record_delay=0.3")  # commits 0.3 s apart
    args = [sys.executable, "-m", "evolve_jax.main", *_main_args(workdir, *extra, *slow)]

    def step_nodes(snap, step):
        return [n for n in snap["nodes"].values() if n["origin"]["step"] == step]

    def mid_step(step):
        return lambda snap: 1 <= len(step_nodes(snap, step)) < 3

    kills = [  # (log line to kill at, what the store must show if the kill landed there)
        ("step 0/3 slot 0", mid_step(0)),  # the first seed committed, the others not yet
        # Mid-promotion: stage-1 results written, stage 2 (evaluated next) not yet.
        ("to stage 1", lambda snap: {s for _, s in snap["stages"]} == {1}),
        ("step 1/3 slot 0", mid_step(1)),  # mid-step again, in an evolution step
        # Mid-migration: step 2's migration record written, none of step 2's nodes.
        (
            "islands: migration at step 2",
            lambda snap: "00000002" in snap["migrations"] and not step_nodes(snap, 2),
        ),
    ]
    snapshots = []
    for event, landed in kills:
        _run_until(args, event)
        snapshots.append(_snapshot(workdir))
        assert landed(snapshots[-1]), f"the kill at {event!r} landed elsewhere"

    done = run_cli("evolve_jax.main", *_main_args(workdir, *extra, *slow))
    assert done.returncode == 0, done.stderr
    final = _snapshot(workdir)
    for snap in snapshots:  # what each kill left is still there, unchanged (not redone)
        for part in ("nodes", "stages", "migrations"):
            assert {k: final[part][k] for k in snap[part]} == snap[part]
    resumed = History(workdir).nodes()
    assert len(resumed) == 3 + 3 * 3
    assert same_history(resumed, expected)
    assert final["migrations"] == dict(History(str(tmp_path / "ref")).records("migrations/main"))
    ref_stages = {(n.id, s): r["score"] for n in expected for s, r in n.stages.items()}
    assert {k: r["score"] for k, r in final["stages"].items()} == ref_stages


@pytest.mark.parametrize("crash_after", [1, 4, 5, 7, 10])
def test_crash_between_any_two_appends_then_resume_matches(tmp_path, crash_after):
    """A crash after the k-th committed node (mid-step included) resumes to the same history."""
    config = _config(str(tmp_path / "crashed"), steps=3, samples_per_step=3)
    loop = ResearchLoop(config, ToySpace())
    crash_at_append(loop, crash_after)
    with pytest.raises(Crash):
        loop.run()
    assert len(History(config.workdir).nodes()) == crash_after
    resumed = run(config, ToySpace())
    expected = run(_config(str(tmp_path / "ref"), steps=3, samples_per_step=3), ToySpace())
    assert same_history(resumed.nodes, expected.nodes)


def test_a_slot_another_writer_committed_first_is_kept_and_the_run_goes_on(tmp_path):
    """A writer that lost its lease (presumed dead) races its successor for a slot: the node
    already there stands, this process's candidate for the slot is dropped, nothing doubles."""
    config = _config(str(tmp_path / "race"), steps=2, samples_per_step=3)
    loop = ResearchLoop(config, ToySpace())
    append = loop.history.append
    rival = History(config.workdir)  # the other process's view of the store
    stolen = []

    def append_after_a_rival(**fields):
        if fields["origin"] == {"run": "main", "step": 1, "slot": 1} and not stolen:
            stolen.append(rival.append(**{**fields, "name": "rival's node"}))
        return append(**fields)

    loop.history.append = append_after_a_rival
    summary = loop.run()
    slots = [(n.origin["step"], n.origin["slot"]) for n in summary.nodes]
    assert len(slots) == len(set(slots)) == 3 + 2 * 3
    [node] = [n for n in summary.nodes if n.origin["step"] == 1 and n.origin["slot"] == 1]
    assert node.name == "rival's node" and node.id == stolen[0].id


def test_compilation_cache_dir_keeps_the_compiled_programs(tmp_path):
    cache = tmp_path / "cache"
    done = run_cli(
        "evolve_jax.main", f"--search_space={TOY}", f"--workdir={tmp_path / 'r'}", "--steps=1",
        f"--compilation_cache_dir={cache}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert cache.is_dir() and any(cache.iterdir())


def test_a_corrupt_node_is_quarantined_and_the_run_goes_on(tmp_path):
    workdir = str(tmp_path / "q")
    run(_config(workdir, steps=1), ToySpace())  # nodes 0-2 seeds, 3-5 step 1
    history = History(workdir)
    history.kvstore.write(b"nodes/0000000004", b"\x00{not json").result()
    # The driver refuses, naming the node and the command that sets it aside.
    refused = run_cli("evolve_jax.main", *_main_args(workdir, "--steps=2", "--samples_per_step=3"))
    assert refused.returncode == 1
    error = refused.stderr.strip().splitlines()[-1]
    assert "nodes/0000000004" in error and "node 4 cannot be read" in error
    command = f"python -m evolve_jax.history --workdir={workdir} --quarantine=4"
    assert error.endswith(command)
    done = run_cli(*command.split()[2:])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "node 4 quarantined: its record is now quarantine/0000000004"
    again = run_cli(*command.split()[2:])
    assert again.returncode == 1 and "quarantined already" in again.stderr
    # The same command now resumes: the quarantined slot is not redone, step 2 runs.
    resumed = run_cli("evolve_jax.main", *_main_args(workdir, "--steps=2", "--samples_per_step=3"))
    assert resumed.returncode == 0, resumed.stderr
    assert "node 4 (step 1 slot 1) is quarantined" in resumed.stderr
    assert "quarantined, left out: node(s) 4" in resumed.stdout
    nodes = History(workdir, create=False).nodes()
    assert [n.id for n in nodes] == [0, 1, 2, 3, 5, 6, 7, 8]
    assert [(n.origin["step"], n.origin["slot"]) for n in nodes[3:]] == [
        (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)
    ]  # fmt: skip
    assert all(4 not in n.parents for n in nodes)
    assert History(workdir).slot_claims("main")[(1, 1)] == 4
    # Kept, listed by the CLI, said by the report.
    listing = run_cli("evolve_jax.history", f"--workdir={workdir}")
    listed = [json.loads(line)["id"] for line in listing.stdout.splitlines()]
    assert listed == [0, 1, 2, 3, 5, 6, 7, 8]
    assert "quarantined, left out: node(s) 4" in listing.stderr
    kept = run_cli("evolve_jax.history", f"--workdir={workdir}", "--quarantined")
    assert json.loads(kept.stdout) == {
        "id": 4, "key": "quarantine/0000000004", "record": "\x00{not json"
    }  # fmt: skip
    notices = data.collect(workdir, live=False)["notices"]
    assert any(n.startswith("Node 4 is quarantined") for n in notices)


def test_a_run_resumed_with_other_flags_stops_naming_them_and_more_steps_go_on(tmp_path):
    workdir = str(tmp_path / "run")
    first = ("--steps=1", "--samples_per_step=2", "--eval_seeds=2", "--seed=0")
    assert run_cli("evolve_jax.main", *_main_args(workdir, *first)).returncode == 0
    before = [n.to_json() for n in History(workdir).nodes()]
    changed = run_cli("evolve_jax.main", *_main_args(workdir, *first, "--eval_seeds=3", "--seed=5"))
    assert changed.returncode == 1
    [line] = [x for x in changed.stderr.splitlines() if x.startswith("error: ")]
    assert (
        "was started with --eval_seeds=2 --seed=0; this command has --eval_seeds=3 --seed=5" in line
    )
    assert "--run_name" in line
    assert [n.to_json() for n in History(workdir).nodes()] == before
    # More steps continue the same search.
    more = run_cli("evolve_jax.main", *_main_args(workdir, *first, "--steps=2"))
    assert more.returncode == 0, more.stderr
    assert len(History(workdir).nodes()) == len(before) + 2


def _interrupt_after(args, nodes: int, workdir: str, signals: int) -> subprocess.CompletedProcess:
    """Starts the driver, sends ``signals`` SIGINTs once ``nodes`` nodes are recorded, and
    returns the finished process (it must end within 30 s of the first)."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-m", "evolve_jax.main", *args], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(workdir) and len(History(workdir, create=False).nodes()) >= nodes:
                break
            time.sleep(0.1)
        for _ in range(signals):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_stops_at_a_safe_point_with_one_line_and_the_run_continues(tmp_path):
    extra = ("--steps=3", "--samples_per_step=4", "--space_opt=delay=1")
    reference = run_cli("evolve_jax.main", *_main_args(str(tmp_path / "ref"), *extra))
    assert reference.returncode == 0, reference.stderr
    workdir = str(tmp_path / "run")
    done = _interrupt_after(_main_args(workdir, *extra), 4, workdir, signals=1)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    recorded = len(History(workdir).nodes())
    assert recorded < 3 + 3 * 4, "the run ended before the interrupt"
    assert (
        f"interrupted: run 'main' has {recorded} node(s) recorded in {workdir}; run the same "
        "command to continue it"
    ) in done.stderr
    again = run_cli("evolve_jax.main", *_main_args(workdir, *extra))
    assert again.returncode == 0, again.stderr
    assert same_history(History(workdir).nodes(), History(str(tmp_path / "ref")).nodes())


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    """Both land while a node is being recorded (5 s each here), where there is no safe point."""
    workdir = str(tmp_path / "run")
    args = _main_args(workdir, "--steps=3", "--samples_per_step=4", "--space_opt=record_delay=5")
    done = _interrupt_after(args, 1, workdir, signals=2)
    assert done.returncode == 130
    assert "stopped at once; the same command continues the run" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_flagfile_is_one_plain_line(tmp_path):
    done = run_cli("evolve_jax.main", f"--flagfile={tmp_path}/missing.flags")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: cannot open the flagfile {tmp_path}/missing.flags: No such file or directory"
    )


def test_history_prints_a_table_and_chosen_fields(tmp_path):
    workdir = str(tmp_path / "run")
    done = run_cli("evolve_jax.main", *_main_args(workdir, "--steps=1", "--samples_per_step=2"))
    assert done.returncode == 0, done.stderr
    nodes = History(workdir).nodes()
    table = run_cli("evolve_jax.history", f"--workdir={workdir}", "--format=table")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["id", "origin.step", "name", "status", "score", "reason"]
    assert len(lines) == 1 + len(nodes)
    assert lines[1].split()[:4] == ["0", "0", nodes[0].name, nodes[0].status]
    picked = run_cli("evolve_jax.history", f"--workdir={workdir}", "--fields=id,origin.slot")
    rows = [json.loads(line) for line in picked.stdout.splitlines()]
    assert rows == [{"id": n.id, "origin.slot": n.origin["slot"]} for n in nodes]
    bad = run_cli("evolve_jax.history", f"--workdir={workdir}", "--fields=id,bogus")
    assert bad.returncode == 2 and "unknown field 'bogus'" in bad.stderr
