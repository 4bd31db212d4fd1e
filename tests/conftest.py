"""Test setup: several CPU devices (for population sharding) and helpers for the toy space."""

import os
import subprocess
import sys

import pytest

# Must happen before JAX initialises its backends. Appended to any XLA_FLAGS already set (a
# device count given there wins), and kept in os.environ so run_cli's subprocesses inherit it.
# The programs here are tiny and run a few steps, so compiling dominates: XLA's backend
# optimisation is off (about 40% less wall time for a training test on 2 cores). Numbers are
# compared only between programs compiled under the same flags.
_TEST_XLA_FLAGS = {
    "--xla_force_host_platform_device_count": "4",
    "--xla_backend_optimization_level": "0",
}
for _flag, _value in _TEST_XLA_FLAGS.items():
    _xla_flags = os.environ.get("XLA_FLAGS", "")
    if _flag not in _xla_flags:
        os.environ["XLA_FLAGS"] = f"{_xla_flags} {_flag}={_value}".strip()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = "tests.toy_space:make"


def run_cli(module: str, *args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """Runs ``python -m module args`` from the repo root; returns the finished process."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


@pytest.fixture
def workdir(tmp_path):
    return str(tmp_path / "run")


def pytest_sessionfinish(session, exitstatus):
    """Names the threads a test left running: one still working at interpreter exit (two lease
    renewals did, once) can abort the process after every test has passed."""
    import threading

    alive = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if alive:
        names = ", ".join(sorted(alive))
        print(f"\nthreads alive at the end of the tests: {names}", file=sys.stderr)


class Crash(Exception):
    """Raised by ``crash_at_append``: a process that died between two appends."""


def crash_at_append(loop, after: int) -> None:
    """Makes ``loop``'s history raise Crash instead of its append number ``after`` (0-based)."""
    append, calls = loop.history.append, []

    def crashing_append(**fields):
        if len(calls) == after:
            raise Crash
        calls.append(1)
        return append(**fields)

    loop.history.append = crashing_append
