"""Sandbox: the channel's refusals, the limits, and what leaks from the parent (nothing)."""

import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np
import pytest

from evolve_jax.evaluation import sandbox, sandbox_channel, sandbox_worker
from evolve_jax.evaluation.sandbox import Channel, Limits, Sandbox, SandboxError, run_once

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = "tests.sandbox_targets"
SMALL = Limits(timeout_s=3, memory_bytes=512 << 20)


@pytest.fixture
def mark():
    """An environment variable every process of the child's tree inherits, to find them."""
    return f"SANDBOX_TEST_MARK={uuid.uuid4().hex}"


def _env(mark: str | None = None) -> dict[str, str]:
    env = {"PYTHONPATH": REPO}
    if mark:
        name, value = mark.split("=")
        env[name] = value
    return env


def _marked(mark: str) -> list[int]:
    """Pids of processes whose environment holds ``mark`` (a zombie's environment is empty)."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if mark.encode() in f.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    return found


def _children() -> list[int]:
    """This process's children that it did not have before the test, zombies included: a
    sandbox must reap what it started (earlier tests may have left children of their own,
    e.g. multiprocessing's resource tracker)."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                if int(f.read().rsplit(b")", 1)[1].split()[1]) == os.getpid():
                    found.append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    return [pid for pid in found if pid not in _EARLIER_CHILDREN]


_EARLIER_CHILDREN: set[int] = set()


@pytest.fixture(autouse=True)
def _earlier_children():
    _EARLIER_CHILDREN.clear()
    _EARLIER_CHILDREN.update(_children())
    yield


# --------------------------------------------------------------------------- channel, no child


@pytest.fixture
def pipe_channels():
    """Two channels joined back to back, as parent and child would be."""
    (a_read, b_write), (b_read, a_write) = os.pipe(), os.pipe()
    a, b = Channel(a_read, a_write), Channel(b_read, b_write)
    yield a, b
    a.close()
    b.close()


def test_channel_round_trip_keeps_dtypes(pipe_channels):
    a, b = pipe_channels
    a.send(
        {"step": 1, "nested": {"x": [1.5]}}, {"f": np.ones((2, 3), np.float32), "i": np.arange(4)}
    )
    header, arrays = b.receive(timeout_s=5)
    assert header == {"step": 1, "nested": {"x": [1.5]}}
    assert arrays["f"].dtype == np.float32 and arrays["f"].shape == (2, 3)
    np.testing.assert_array_equal(arrays["i"], np.arange(4))


def test_channel_refuses_to_send_object_arrays(pipe_channels):
    with pytest.raises(ValueError, match="pickle"):
        pipe_channels[0].send({}, {"x": np.array([{}], dtype=object)})


def test_channel_refuses_oversized_and_non_object_messages_and_times_out(pipe_channels):
    a, b = pipe_channels
    with pytest.raises(SandboxError, match="timeout"):
        b.receive(timeout_s=0.1)
    small = Channel(os.dup(b.read_fd), os.dup(a.write_fd), max_message_bytes=100)
    try:
        with pytest.raises(SandboxError, match="over the 100 limit"):
            small.send({"x": "y" * 200})
        a.send({"x": "y" * 200})
        with pytest.raises(SandboxError, match="over the 100 limit"):
            small.receive(timeout_s=5)
    finally:
        small.close()
    header = b"[1, 2]"
    os.write(a.write_fd, sandbox_channel.frame_head(header, b""))
    with pytest.raises(SandboxError, match="not an object"):
        b.receive(timeout_s=5)


def test_child_environment_keeps_runtime_knobs_and_drops_credentials(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JAX_SECRET_TOKEN", "s1")  # allowlisted prefix, credential-looking name
    monkeypatch.setenv("XLA_API_KEY", "s2")
    monkeypatch.setenv("GOOGLE_API_KEY", "s3")
    monkeypatch.setenv("SOME_UNRELATED_VAR", "x")
    env = sandbox.child_environment({"CUDA_VISIBLE_DEVICES": "1"})
    assert env["PATH"] == "/usr/bin" and env["JAX_PLATFORMS"] == "cpu"
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    for name in ("JAX_SECRET_TOKEN", "XLA_API_KEY", "GOOGLE_API_KEY", "SOME_UNRELATED_VAR"):
        assert name not in env


# ------------------------------------------------------------------------------- with a child


def test_round_trip_with_arrays_both_ways_imports_the_candidate_file():
    x, n = np.arange(3, dtype=np.float32), np.arange(4, dtype=np.int32)
    with Sandbox(
        f"{TARGETS}:echo",
        SMALL,
        files={"candidate.py": "def scale(x):\n    return 2 * x\n"},
        env=_env(),
    ) as box:
        box.send({"step": 7}, {"x": x, "n": n})
        header, arrays = box.receive()
        report = box.finish()
        workdir = box.workdir
    assert header["echo"] == {"step": 7} and header["cwd"] == workdir
    assert arrays["scaled"].dtype == np.float32 and arrays["shifted"].dtype == np.int32
    np.testing.assert_array_equal(arrays["scaled"], 2 * x)
    np.testing.assert_array_equal(arrays["shifted"], n + 1)
    assert report.returncode == 0 and report.reason() is None
    assert box.finish() is report  # idempotent, also after __exit__
    assert not os.path.exists(workdir)


def test_endless_loop_is_killed_at_the_timeout_leaving_no_process(mark):
    start = time.monotonic()
    reply, report = run_once(f"{TARGETS}:spin", {}, limits=SMALL, env=_env(mark))
    elapsed = time.monotonic() - start
    assert reply is None
    assert report.timed_out and report.reason().startswith("timeout"), report
    assert elapsed < SMALL.timeout_s + 3
    assert _marked(mark) == [] and _children() == []


def test_unbounded_allocation_is_stopped_and_reported_as_what_was_observed():
    limits = Limits(timeout_s=20, memory_bytes=512 << 20)
    reply, report = run_once(f"{TARGETS}:allocate", {}, limits=limits, env=_env())
    assert not report.timed_out
    # RLIMIT_DATA turned the allocation into a MemoryError, which the worker still reported;
    # the reason is the exit code, the peak RSS the watchdog saw, and the program's own words.
    assert "MemoryError" in reply[0]["error"]
    assert not report.memory_exceeded and 0 < report.peak_rss_bytes <= limits.memory_bytes
    reason = report.reason()
    assert re.fullmatch(
        r"exit code 1 \(peak RSS seen 0\.\d\d GiB of the 0\.5 GiB cap\); "
        r"the program's stderr ends: MemoryError",
        reason,
    ), reason


def test_a_program_that_exits_3_on_its_own_is_not_reported_as_memory():
    reply, report = run_once(f"{TARGETS}:exit_3", {}, limits=SMALL, env=_env())
    assert reply is None and report.returncode == 3
    assert not report.memory_exceeded
    assert report.reason().startswith("exit code 3 (peak RSS seen "), report.reason()
    assert "memory" not in report.reason()


def test_memory_summed_over_the_tree_is_capped_by_the_watchdog(mark):
    # Each child stays under the per-process RLIMIT_DATA; only their sum passes the cap.
    limits = Limits(timeout_s=20, memory_bytes=512 << 20)
    reply, report = run_once(f"{TARGETS}:allocate_in_children", {}, limits=limits, env=_env(mark))
    assert reply is None
    assert report.memory_exceeded and not report.timed_out, report
    assert report.peak_rss_bytes > limits.memory_bytes
    reason = report.reason()
    assert re.fullmatch(
        r"memory: the process tree's RSS reached 0\.\d\d GiB, over the 0\.5 GiB cap", reason
    ), reason
    assert report.seconds < 10
    assert _marked(mark) == [] and _children() == []


def test_fork_bomb_is_bounded_by_nproc_and_cleaned_up(mark):
    limits = Limits(timeout_s=20, memory_bytes=8 << 30, max_tasks=32)
    with Sandbox(f"{TARGETS}:fork_bomb", limits, env=_env(mark)) as box:
        header, _ = box.receive()
        alive = _marked(mark)
        report = box.finish(timeout_s=0)
        left = _marked(mark)
    assert header["errno"] == "EAGAIN"
    if report.isolation["user_ns"] and sandbox_worker.nproc_per_namespace():
        # Only the namespace's tasks count: the bound holds whatever else runs as the uid.
        assert 0 < header["forks"] <= limits.max_tasks
        assert len(alive) <= limits.max_tasks + 1  # + the worker
    else:
        assert 0 < header["forks"] < report.isolation["nproc_limit"]
    assert left == [] and _children() == []


def test_daemon_that_left_the_session_dies_with_the_sandbox(mark):
    if not sandbox.isolation_support()["pid_ns"]:
        pytest.skip("no PID namespace here: such a daemon escapes the cleanup (documented)")
    reply, report = run_once(f"{TARGETS}:daemonize", {}, limits=SMALL, env=_env(mark))
    assert reply[0] == {"ok": True} and report.returncode == 0
    assert _marked(mark) == []


def test_credentials_in_the_parent_environment_do_not_reach_the_child(monkeypatch):
    secrets = {
        "GEMINI_API_KEY": "g-secret",
        "GOOGLE_API_KEY": "k-secret",
        "GOOGLE_APPLICATION_CREDENTIALS": "/secret/key.json",
        "AWS_SECRET_ACCESS_KEY": "a-secret",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    reply, _ = run_once(f"{TARGETS}:environment", {}, limits=SMALL, env=_env())
    environ = reply[0]["environ"]
    assert not set(secrets) & set(environ)
    assert not set(secrets.values()) & set(environ.values())
    assert environ["JAX_PLATFORMS"] == "cpu"  # the allowlist does let runtime knobs through
    assert environ["HOME"] == environ["TMPDIR"] != os.environ.get("HOME")


def test_connection_to_the_parents_localhost_fails_without_network():
    support = sandbox.isolation_support()
    if not support["net_ns"]:
        pytest.skip(f"no network namespace on this machine: {support}")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        request = {"port": server.getsockname()[1]}
        denied, report = run_once(f"{TARGETS}:connect", request, limits=SMALL, env=_env())
        allowed, _ = run_once(
            f"{TARGETS}:connect", request, limits=Limits(timeout_s=3, network=True), env=_env()
        )
    assert report.isolation["net_ns"]
    assert denied[0]["connected"] is False, denied
    assert allowed[0]["connected"] is True, allowed  # the target itself works


def _peak_rss_growth(function) -> int:
    """Bytes by which this process's peak RSS passes its RSS before ``function`` ran."""

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field))
        return int(line.split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak to the current RSS
    before = status("VmRSS:")
    function()
    return status("VmHWM:") - before


def test_ten_megabytes_of_output_keep_head_and_tail_within_output_bytes():
    limits = Limits(timeout_s=20, output_bytes=32_768)
    result = []
    growth = _peak_rss_growth(
        lambda: result.append(run_once(f"{TARGETS}:print_lines", {}, limits=limits, env=_env()))
    )
    reply, report = result[0]
    assert reply[0] == {"done": True}
    total = 100_000 * 101  # bytes printed
    assert report.stdout.startswith("line 000000 xxx")
    assert report.stdout.endswith("line 099999 " + "x" * 88 + "\n")
    assert f"[... {total - limits.output_bytes} bytes cut ...]" in report.stdout
    assert len(report.stdout) <= limits.output_bytes + 64
    assert growth < 4 << 20, f"the parent's peak RSS grew by {growth} bytes"


def test_exception_in_the_target_comes_back_as_an_error_reply():
    reply, report = run_once(f"{TARGETS}:fail", {}, limits=SMALL, env=_env())
    assert "ValueError: candidate exploded" in reply[0]["error"]
    assert reply[0]["error"].startswith("Traceback")
    assert report.returncode == 1
    reason = report.reason()
    assert re.fullmatch(
        r"exit code 1 \(peak RSS seen 0\.\d\d GiB of the 0\.5 GiB cap\); "
        r"the program's stderr ends: ValueError: candidate exploded",
        reason,
    ), reason


def test_garbage_on_the_channel_raises_sandbox_error_at_once():
    with Sandbox(f"{TARGETS}:garbage", Limits(timeout_s=30), env=_env()) as box:
        start = time.monotonic()
        with pytest.raises(SandboxError, match="malformed"):
            box.receive()
        assert time.monotonic() - start < 5
        with pytest.raises(SandboxError, match="malformed"):  # and the channel stays broken
            box.receive()


def test_reply_that_needs_pickle_is_refused():
    box = Sandbox(f"{TARGETS}:send_pickled_array", SMALL, env=_env())
    with box, pytest.raises(SandboxError, match="allow_pickle=False"):
        box.receive()


def test_startup_cost_is_measured(capsys):
    """Prints the median time from start to first reply; asserts nothing about it."""

    def seconds(target: str, env: dict) -> float:
        runs = []
        for _ in range(3):
            start = time.monotonic()
            with Sandbox(f"{TARGETS}:{target}", Limits(timeout_s=120), env=env) as box:
                box.receive()
                runs.append(time.monotonic() - start)
        return statistics.median(runs)

    light = seconds("reply", _env())
    heavy = seconds("reply_with_jax", {**_env(), "JAX_PLATFORMS": "cpu"})
    with capsys.disabled():
        print(
            f"\nsandbox startup to first reply (median of 3): {light:.2f} s plain, "
            f"{heavy:.2f} s importing jax + jnp.ones(3).sum() on CPU"
        )


# ------------------------------------------------------------------- what a program can reach


def test_a_deflated_array_member_is_refused():
    box = Sandbox(f"{TARGETS}:send_deflated_array", SMALL, env=_env())
    with box, pytest.raises(SandboxError, match=r"member 'x\.npy' refused"):
        box.receive()


def _run_as(uid: int, gid: int, argv: list[str]) -> subprocess.CompletedProcess:
    """``argv`` as ``uid``/``gid`` (this process's own when they are)."""
    kwargs = {} if uid == os.getuid() else {"user": uid, "group": gid, "extra_groups": []}
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, **kwargs)


def _children_of(parent: int) -> list[int]:
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{name}/stat", "rb") as f:
            if int(f.read().rsplit(b")", 1)[1].split()[1]) == parent:
                found.append(int(name))
    return found


def test_a_process_of_the_sandbox_uid_cannot_read_a_sandboxed_program(mark):
    # What another sandbox outside its namespaces would try: the same uid reading the
    # program's environment and memory through /proc.
    with Sandbox(f"{TARGETS}:wait", SMALL, env=_env(mark)) as box:
        box.send({})
        box.receive()
        uid = box._isolation["uid"]
        gid = uid if os.getuid() == 0 else os.getgid()
        worker = box._process.pid
        pids = [worker, *_children_of(worker)]  # the target: its PID namespace's init
        results = {
            pid: [_run_as(uid, gid, ["cat", f"/proc/{pid}/{name}"]) for name in ("environ", "mem")]
            for pid in pids
        }
        box.send({})
    assert len(results) == 2, results
    for pid, runs in results.items():
        for run in runs:
            assert run.returncode != 0 and "Permission denied" in run.stderr, (pid, run)
            assert mark.split("=")[1] not in run.stdout


def test_a_sandbox_can_neither_see_nor_plant_a_module_in_another_ones_dir():
    with Sandbox(f"{TARGETS}:import_planted", SMALL, env=_env()) as victim:
        plant, _ = run_once(
            f"{TARGETS}:plant", {"victim": victim.workdir}, limits=SMALL, env=_env()
        )
        victim.send({})
        imported, _ = victim.receive()
        planted = os.path.exists(os.path.join(victim.workdir, "planted_by_a.py"))
    assert not plant[0]["seen"], plant
    assert os.path.basename(victim.workdir) not in plant[0]["listed"], plant
    assert not plant[0]["writes"][f"{victim.workdir}/planted_by_a.py"].startswith("ok"), plant
    # Its write to its own private /tmp went through, and stayed there.
    assert not planted and not os.path.exists(f"{os.path.dirname(victim.workdir)}/planted_by_a.py")
    assert imported["imported"].startswith("ModuleNotFoundError"), imported
    assert not imported["cwd_on_path"]


@pytest.fixture
def outside(tmp_path_factory):
    """A world-writable, world-readable directory outside /tmp (which sandboxes cover)."""
    path = tempfile.mkdtemp(prefix="sandbox-test-", dir="/var/tmp")
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_writes_outside_the_working_dir_reach_nothing_on_the_host(outside):
    name = f"written-by-a-sandbox-{uuid.uuid4().hex}"
    places = ["/tmp", "/dev/shm", outside, tempfile.gettempdir(), "/var/tmp"]
    paths = [os.path.join(place, name) for place in places]
    reply, report = run_once(
        f"{TARGETS}:write_everywhere", {"paths": paths}, limits=SMALL, env=_env()
    )
    assert report.isolation["fs_private"], report.isolation
    written = reply[0]
    # Its private /tmp and /dev/shm take the writes; the rest of the machine is read-only.
    assert written[f"/tmp/{name}"].startswith("ok") and written[f"/dev/shm/{name}"].startswith("ok")
    assert written[f"{outside}/{name}"].startswith("OSError: [Errno 30] Read-only"), written
    assert [p for p in paths if os.path.exists(p)] == []  # nothing reached the host


def test_home_credentials_hidden_paths_and_this_process_are_out_of_reach(
    outside, monkeypatch, mark
):
    secret = "hidden-secret-" + uuid.uuid4().hex
    home, data, credentials = (os.path.join(outside, name) for name in ("home", "data", "cred"))
    for directory in (home, data, credentials):
        os.mkdir(directory, 0o755)
    files = [os.path.join(d, "secret.txt") for d in (home, data, credentials)]
    for path in files:
        with open(path, "w") as f:
            f.write(secret)
        os.chmod(path, 0o644)
    monkeypatch.setenv("HOME", home)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", files[2])
    monkeypatch.setattr(sandbox, "_HIDDEN", set())
    pydoc_data = os.path.dirname(importlib.util.find_spec("pydoc_data").origin)
    sandbox.hide(data, pydoc_data)
    sandbox.hide(data)  # idempotent
    request = {
        "paths": [*files, home, data, f"/proc/{os.getpid()}/environ"],
        "imports": ["pydoc_data.topics", "json", "email.parser", "numpy"],
    }
    reply, report = run_once(f"{TARGETS}:read_everywhere", request, limits=SMALL, env=_env(mark))
    seen = reply[0]
    assert secret not in json.dumps(seen["read"]), seen["read"]
    assert seen["read"][home] == "ok []" and seen["read"][data] == "ok []", seen["read"]
    assert seen["read"][files[2]] in (
        "ok ''",
        f"FileNotFoundError: [Errno 2] No such file or directory: '{files[2]}'",
    )
    # A hidden directory inside the Python install, and the rest of it still importable.
    assert seen["imports"]["pydoc_data.topics"].startswith("ModuleNotFoundError"), seen
    assert all(seen["imports"][n].startswith("ok") for n in ("json", "email.parser", "numpy"))
    if report.isolation["proc_private"]:
        # Its own /proc: no process outside its PID namespace, this one included.
        assert os.getpid() not in seen["pids"] and len(seen["pids"]) == 1, seen["pids"]
        assert seen["read"][f"/proc/{os.getpid()}/environ"].startswith("FileNotFoundError")


def test_read_only_by_remount_where_mount_setattr_is_missing(outside):
    # Kernels before 5.12 lack mount_setattr(2): the worker then remounts each mount.
    code = (
        "import os, sys\n"
        "from evolve_jax.evaluation import sandbox_worker as w\n"
        "w.SYS_MOUNT_SETATTR = 10**6  # no such syscall: ENOSYS, as on an old kernel\n"
        "w._mount(None, '/', None, w.MS_REC | w.MS_PRIVATE)\n"
        "w.set_read_only('/', True, recursive=True)\n"
        "try:\n"
        f"    open({os.path.join(outside, 'x')!r}, 'w')\n"
        "except OSError as e:\n"
        "    sys.exit(0 if e.errno == 30 else 1)\n"
        "sys.exit(2)\n"
    )
    run = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": REPO},
    )  # fmt: skip
    if "unshare failed" in run.stderr:
        pytest.skip(f"no user namespaces here: {run.stderr}")
    assert run.returncode == 0, run.stderr
    assert not os.path.exists(os.path.join(outside, "x"))
