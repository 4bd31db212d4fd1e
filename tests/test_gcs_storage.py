"""A gs:// workdir through TensorStore's real ``gcs`` driver, against the fake in fake_gcs.py.

TensorStore reads the fake's address and test token from the environment once per process, so
each gs:// step runs in a fresh Python (``_start``) and prints its result as JSON; a second
process reading what the first wrote is also what a resumed run does.
"""

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from evolve_jax.report import page
from tests.conftest import REPO
from tests.fake_gcs import TOKEN, fake_gcs_server, gcs_env

BUCKET = "test-bucket"
WORKDIR = f"gs://{BUCKET}/run"
MANIFEST = "run/history/manifest.ocdbt"  # the OCDBT root every history commit replaces

_PRELUDE = f"""
import json, sys
from evolve_jax import storage
from evolve_jax.memory.history import History
from tests.test_history import _fields
WORKDIR = {WORKDIR!r}
"""


@pytest.fixture
def gcs():
    before = set(threading.enumerate())
    with fake_gcs_server() as server:
        yield server
    # The fake's serving and handler threads are joined on exit.
    assert set(threading.enumerate()) <= before


def _start(server, code: str, *args: str) -> subprocess.Popen:
    """Starts ``code`` in a fresh Python whose gs:// storage is ``server``."""
    env = gcs_env(server.url, dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
    return subprocess.Popen(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(code), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen):
    """The JSON the process printed last; its stderr if it failed."""
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # a no-op once it has exited; never leave one behind
        proc.wait()
    assert proc.returncode == 0, err
    return json.loads(out.splitlines()[-1])


def _run(server, code: str, *args: str):
    return _result(_start(server, code, *args))


def test_history_round_trips_through_gcs(gcs):
    written = _run(
        gcs,
        """
        history = History(WORKDIR)
        history.initialise("toy", "max")
        origin = lambda i: {"run": "r", "step": 0, "slot": i}
        nodes = [history.append(**_fields(f"n{i}", score=i, origin=origin(i))) for i in range(3)]
        print(json.dumps([n.to_json() for n in nodes]))
        """,
    )
    read = _run(
        gcs,
        """
        history = History(WORKDIR)
        nodes = [n.to_json() for n in history.nodes()]
        print(json.dumps({"meta": history.meta, "nodes": nodes}))
        """,
    )
    assert [n["id"] for n in written] == [0, 1, 2]
    assert read["nodes"] == written
    assert read["meta"]["search_space"] == "toy" and read["meta"]["direction"] == "max"
    # It really went through the fake, as the driver's own objects, with the test token.
    assert MANIFEST in gcs.names(BUCKET, "run/history/")
    assert gcs.tokens == {TOKEN}


def test_write_text_puts_the_object_on_gcs(gcs):
    code = "print(json.dumps(storage.write_text(WORKDIR, 'report.txt', sys.argv[1])))"
    for text in ("# Report\nbest: 1.5 ✓\n", "# Report\nrewritten\n"):  # the second replaces it
        assert _run(gcs, code, text) == f"{WORKDIR}/report.txt"
        assert gcs.read(BUCKET, "run/report.txt") == text.encode("utf-8")


def test_write_once_refuses_a_second_write(gcs):
    code = """
    history = History(WORKDIR)
    history.initialise("toy", "max")
    written = history.write_record("lessons", "x", {"writer": sys.argv[1]})
    print(json.dumps([written, history.records("lessons")]))
    """
    assert _run(gcs, code, "first") == [True, [["x", {"writer": "first"}]]]
    assert _run(gcs, code, "second") == [False, [["x", {"writer": "first"}]]]


def test_racing_write_once_has_one_winner(gcs):
    """Two processes read the same history, then both commit the same key: the server's
    ifGenerationMatch on the manifest must turn the loser away (else both think they won)."""
    _run(gcs, "History(WORKDIR).initialise('toy', 'max'); print('null')")
    gcs.race_uploads(MANIFEST, writers=2)
    code = """
    history = History(WORKDIR)
    print(json.dumps(history.write_record("lessons", "x", {"writer": sys.argv[1]})))
    """
    procs = [_start(gcs, code, name) for name in ("a", "b")]
    won = dict(zip(("a", "b"), [_result(p) for p in procs], strict=True))
    assert sorted(won.values()) == [False, True]
    winner = next(name for name, w in won.items() if w)
    records = _run(gcs, "print(json.dumps(History(WORKDIR).records('lessons')))")
    assert records == [["x", {"writer": winner}]]
    assert gcs.count("POST", 412, name=MANIFEST) >= 1  # the precondition did the refusing


def test_the_report_of_a_gcs_history_goes_where_asked(gcs, tmp_path):
    _run(
        gcs,
        """
        history = History(WORKDIR)
        history.initialise("toy", "max")
        for i in range(3):
            history.append(**_fields(f"n{i}", score=i))
        print("{}")
        """,
    )
    # The driver's credentials check wants Google credentials; an authorised-user file is
    # enough for it (TensorStore itself uses the fake's test token).
    credentials = tmp_path / "adc.json"
    credentials.write_text(
        json.dumps(
            {
                "type": "authorized_user",
                "client_id": "c",
                "client_secret": "s",
                "refresh_token": "r",
            }
        )
    )
    env = gcs_env(gcs.url, dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
    env["GOOGLE_APPLICATION_CREDENTIALS"] = str(credentials)
    local = tmp_path / "page.html"
    for out, expected in ((None, f"{WORKDIR}/report.html"), (str(local), f"file://{local}")):
        command = [sys.executable, "-m", "evolve_jax.report", f"--workdir={WORKDIR}"]
        result = subprocess.run(
            command + ([f"--out={out}"] if out else []),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected
    for html in (gcs.read(BUCKET, "run/report.html").decode(), local.read_text()):
        assert page.unpacked(html)["nodes"]["name"] == ["n0", "n1", "n2"]
