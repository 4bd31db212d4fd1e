"""A gs:// workdir through the real clients, against the fake GCS server in fake_gcs.py.

The history and the report go through TensorStore's ``gcs`` driver; checkpoints through Orbax,
which writes arrays with TensorStore and everything else with etils.epath (gcsfs). Both read the
fake's address and test token from the environment, TensorStore once per process, so each gs://
step runs in a fresh Python (``_start``) and prints its result as JSON; a second process
reading what the first wrote is also what a resumed run does. The driver runs as
``python -m evolve_jax.main``, as a user starts it.

The tests that name gs:// also check that nothing went to local disk instead: their processes
run in an empty directory that must stay empty, and neither a ``gs:`` directory (a URL taken
for a relative path) nor etils' ``/gs/<bucket>`` may appear.
"""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request

import pytest

from evolve_jax.report import page
from tests.conftest import REPO, TOY
from tests.fake_gcs import TOKEN, fake_gcs_server, gcs_env

BUCKET = "test-bucket"
WORKDIR = f"gs://{BUCKET}/run"
MANIFEST = "run/history/manifest.ocdbt"  # the OCDBT root every history commit replaces
# A gs:// run needs gcsfs (the gcs extra) for Orbax's etils.epath paths, and the driver checks
# for it before it starts (storage.check_epath), whatever the search space.
needs_gcsfs = pytest.mark.skipif(
    importlib.util.find_spec("gcsfs") is None,
    reason="gcsfs is not installed (pip install -e '.[gcs]'): gs:// checkpoints need it",
)

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


def _start(server, code: str, *args: str, cwd: str = REPO) -> subprocess.Popen:
    """Starts ``code`` in a fresh Python whose gs:// storage is ``server``."""
    env = gcs_env(server.url, dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
    return subprocess.Popen(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(code), *args],
        cwd=cwd,
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


def _run(server, code: str, *args: str, cwd: str = REPO):
    return _result(_start(server, code, *args, cwd=cwd))


def _credentials(tmp_path) -> str:
    """A Google credentials file for the driver's credentials check: an authorised-user file
    is enough for it (the clients themselves use the fake's test token)."""
    credentials = tmp_path / "adc.json"
    fields = {"type": "authorized_user", "client_id": "c", "client_secret": "s"}
    credentials.write_text(json.dumps({**fields, "refresh_token": "r"}))
    return str(credentials)


def _empty_dir(tmp_path):
    """The working directory of a gs:// process; ``_nothing_local`` checks it stayed empty."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


def _nothing_local(cwd) -> None:
    """Nothing a gs:// process wrote landed on local disk where a misrouted URL would go."""
    assert sorted(p.relative_to(cwd).as_posix() for p in cwd.rglob("*")) == []
    assert not os.path.exists(os.path.join(REPO, "gs:"))
    assert not os.path.exists(f"/gs/{BUCKET}")


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
    env = gcs_env(gcs.url, dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
    env["GOOGLE_APPLICATION_CREDENTIALS"] = _credentials(tmp_path)
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


# ---------------------------------------------------------------------------- the driver


def _history_state(server, cwd) -> dict:
    """The gs:// history as a fresh process reads it: its nodes, and a digest of every key."""
    code = """
    import hashlib
    kv = storage.open_kvstore(storage.store_url(WORKDIR, "history"), "history")
    keys = {k.decode(): hashlib.sha256(kv.read(k).result().value).hexdigest()
            for k in kv.list().result()}
    print(json.dumps({"nodes": [n.to_json() for n in History(WORKDIR).nodes()], "keys": keys}))
    """
    return _run(server, code, cwd=str(cwd))


@needs_gcsfs
def test_the_driver_runs_and_resumes_on_a_gcs_workdir(gcs, tmp_path):
    cwd = _empty_dir(tmp_path)
    env = gcs_env(gcs.url, dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
    env["GOOGLE_APPLICATION_CREDENTIALS"] = _credentials(tmp_path)
    command = [
        sys.executable, "-m", "evolve_jax.main", f"--search_space={TOY}", f"--workdir={WORKDIR}",
        "--steps=1", "--samples_per_step=3", "--eval_seeds=2", "--promote_top_k=1",
    ]  # fmt: skip
    runs = []
    for _ in range(2):  # the second, the same command, resumes a finished run
        done = subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        report, html = (gcs.read(BUCKET, f"run/report.{ext}") for ext in ("txt", "html"))
        runs.append((done.stdout, _history_state(gcs, cwd), gcs.names(BUCKET), report, html))
    (out, state, names, report, html), (out_again, state_again, *_, report_again, _) = runs

    # The history: the toy's 3 seed nodes and one step of 3, as the driver's own objects.
    assert [n["name"] for n in state["nodes"][:3]] == ["origin", "corner", "ridge"]
    assert len(state["nodes"]) == 3 + 3
    assert MANIFEST in names and any(n.startswith("run/history/d/") for n in names)
    # The report, both forms, where the driver said; the text is what it printed.
    head, printed = out.split("\n", 1)
    assert head == f"report (rewritten every step): {WORKDIR}/report.html"
    assert report.decode() == printed and f"History: {WORKDIR}" in printed
    assert page.unpacked(html.decode())["nodes"]["name"] == [n["name"] for n in state["nodes"]]
    # Resuming added nothing: every key of the history holds what it held, the same report.
    assert state_again == state
    assert report_again == report and out_again == out
    assert gcs.tokens == {TOKEN}
    _nothing_local(cwd)


# ---------------------------------------------------------------------------- checkpoints

_CHECKPOINT = """
import jax, numpy as np
from flax import nnx
from search_spaces.linear_attention import checkpoints, model
from tests.test_linear_attention import _cfg, _tiny

directory, offered, expected = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
g = _tiny("gated_deltanet")
params = lambda seed: nnx.to_pure_dict(model.init(_cfg(g), jax.random.key(seed))[1])
paths = checkpoints.save(directory, g, 1, {3: params(offered)}, {"note": "gcs"})
lm, meta = checkpoints.restore(paths[0], lambda meta: _cfg(meta["genome"]))
restored = nnx.to_pure_dict(nnx.state(lm, nnx.Param))

def differ(seed):  # the leaves of the restored parameters not bit-equal to seed's
    a, b = jax.tree.leaves_with_path(restored), jax.tree.leaves_with_path(params(seed))
    assert [p for p, _ in a] == [p for p, _ in b]
    return [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(a, b)
            if x.dtype != y.dtype or not np.array_equal(x, y)]

print(json.dumps({
    "paths": paths, "listed": checkpoints.list_checkpoints(directory), "meta": meta, "genome": g,
    "leaves": len(jax.tree.leaves(restored)), "unlike_expected": differ(expected),
    "unlike_offered": differ(offered),
}))
"""


@needs_gcsfs
def test_orbax_checkpoints_round_trip_through_gcs(gcs, tmp_path):
    cwd = _empty_dir(tmp_path)
    directory = f"{WORKDIR}/checkpoints/0123abcd"
    path = f"{directory}/stage1_seed3"
    prefix = "run/checkpoints/0123abcd/stage1_seed3/"
    saved = _run(gcs, _CHECKPOINT, directory, "3", "3", cwd=str(cwd))
    assert saved["paths"] == saved["listed"] == [path]
    expected_meta = {"genome": saved["genome"], "stage": 1, "seed": 3, "options": {"note": "gcs"}}
    assert saved["meta"] == expected_meta
    assert saved["leaves"] > 10 and saved["unlike_expected"] == []
    # Orbax's two routes both reached the fake: arrays through TensorStore (OCDBT under
    # params/), the rest through etils.epath's gcsfs (resumable uploads, commit markers).
    names = gcs.names(BUCKET, prefix)
    for name in ("_CHECKPOINT_METADATA", "commit_success.txt", "meta/metadata"):
        assert prefix + name in names
    assert any(n.startswith(prefix + "params/") and "/d/" in n for n in names)
    uploads = {r.query.get("name"): r.query["uploadType"] for r in gcs.requests if r.status == 200
               and r.method == "POST" and "name" in r.query}  # fmt: skip
    assert uploads[prefix + "params/manifest.ocdbt"] == "media"  # TensorStore
    assert uploads[prefix + "_CHECKPOINT_METADATA"] == "resumable"  # gcsfs
    assert gcs.tokens == {TOKEN}

    # A fresh process: save keeps the checkpoint that exists (offered other parameters, it
    # writes nothing) and restore gives back the first ones, bit for bit.
    objects = {n: gcs.read(BUCKET, n) for n in gcs.names(BUCKET)}
    again = _run(gcs, _CHECKPOINT, directory, "4", "3", cwd=str(cwd))
    assert again["paths"] == again["listed"] == [path]
    assert again["meta"] == expected_meta
    assert again["unlike_expected"] == [] and again["unlike_offered"] != []
    assert {n: gcs.read(BUCKET, n) for n in gcs.names(BUCKET)} == objects
    _nothing_local(cwd)


# ---------------------------------------------------------------------------- the fake itself


def _call(server, method: str, path: str, body: bytes = b"", **headers):
    """(status, headers, body) of one request to the fake; errors are answers too."""
    url = path if path.startswith("http") else server.url + path
    request = urllib.request.Request(url, data=body or None, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_the_fake_does_resumable_uploads_and_delimited_listing(gcs):
    start = f"/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable&ifGenerationMatch=0"
    meta = json.dumps({"name": "d/big"}).encode()
    status, headers, _ = _call(gcs, "POST", start, meta, **{"Content-Type": "application/json"})
    assert status == 200
    session = headers["Location"]
    data = hashlib.sha256(b"x").digest() * 3  # 96 bytes in two chunks
    status, headers, _ = _call(gcs, "PUT", session, data[:64], **{"Content-Range": "bytes 0-63/*"})
    assert (status, headers["Range"]) == (308, "bytes=0-63")
    assert gcs.read(BUCKET, "d/big") is None  # nothing stored before the last chunk
    last = {"Content-Range": "bytes 64-95/96"}
    status, _, body = _call(gcs, "PUT", session, data[64:], **last)
    assert status == 200 and json.loads(body)["size"] == "96"
    assert gcs.read(BUCKET, "d/big") == data
    # The precondition given at the start is checked at the end: the object exists now.
    status, headers, _ = _call(gcs, "POST", start, meta)
    status, _, _ = _call(gcs, "PUT", headers["Location"], b"y", **{"Content-Range": "bytes 0-0/1"})
    assert status == 412 and gcs.read(BUCKET, "d/big") == data

    for name in ("a", "d/e/f", "d/e/g", "d/h"):
        status, _, _ = _call(
            gcs, "POST", f"/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={name}", b"1"
        )
        assert status == 200
    pages, token = [], ""
    while True:  # one entry a page: a rolled-up prefix counts once
        query = f"prefix=d/&delimiter=/&maxResults=1&pageToken={token}"
        status, _, body = _call(gcs, "GET", f"/storage/v1/b/{BUCKET}/o?{query}")
        listed = json.loads(body)
        pages.append([i["name"] for i in listed.get("items", [])] + listed.get("prefixes", []))
        if not (token := listed.get("nextPageToken", "")):
            break
    assert pages == [["d/big"], ["d/e/"], ["d/h"]]
