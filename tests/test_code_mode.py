"""Code mode on the wire: programs written by a scripted model (the fake Gemini server, the real
google-genai client), edited, repaired and run in the sandbox, on the circle packing space.

Every run here is a real search: the loop, the gemini backend's code-mode Researcher and
Engineer, the sandboxed workers and the harness's checker. Only the model's answers are
scripted.
"""

import json
import os
import re
import shutil
import socket
import tempfile
import uuid

import pytest

from evolve_jax import loop
from evolve_jax.evaluation import sandbox
from evolve_jax.memory.history import History
from evolve_jax.programs import Program
from evolve_jax.search_space import CodeSpec
from evolve_jax.testing.fake_gemini import FakeGemini
from search_spaces.circle_packing import code_mode as cp_code
from search_spaces.circle_packing.space import CirclePackingSpace
from tests.conftest import run_cli
from tests.test_gemini import RESEARCHER, _config, _turns, respond

ENGINEER = "fake-engineer"
N = 8  # circles: small, so every program runs in well under a second


@pytest.fixture
def server():
    with FakeGemini(respond) as fake:
        yield fake


@pytest.fixture(autouse=True)
def keys(monkeypatch, tmp_path):
    for name in ("GOOGLE_API_KEY", "GEMINI_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", "test-key-must-not-leak")
    credentials = tmp_path / "adc.json"
    credentials.write_text('{"type": "service_account"}')
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(credentials))


@pytest.fixture
def prices(tmp_path):
    models = (RESEARCHER, ENGINEER, "fake-analyzer", "fake-embedding")
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": {m: {"input": 1.0, "output": 4.0} for m in models}}))
    return str(path)


def _space(**options):
    defaults = {"mode": "code", "n": str(N), "sandbox_timeout_s": "8", "sandbox_memory_gb": "1"}
    return CirclePackingSpace(**(defaults | options))


def _code_config(tmp_path, server, prices, mix, **overrides):
    llm = {"concurrency": 1, "edit_mix": mix, "novelty_retries": 0} | overrides.pop("llm", {})
    overrides = {"samples_per_step": 1, "steps": 1} | overrides
    return _config(tmp_path, server, prices, search_space="circle_packing", llm=llm, **overrides)


def _seed_source(name="grid"):
    with open(os.path.join(cp_code.PROGRAMS, f"{name}.py"), encoding="utf-8") as f:
        return f.read()


def _blocks(body: str, name: str = "try") -> str:
    return json.dumps({"name": name, "motivation": f"{name}: see the code", "blocks": [body]})


def _edits(*pairs, name="edit") -> str:
    edits = [{"search": s, "replace": r} for s, r in pairs]
    return json.dumps({"name": name, "motivation": f"{name} of the grid", "edits": edits})


def _sum(node) -> float:
    [by_seed] = node.metrics.values()
    return by_seed["0"]["sum_radii"]


def _children(summary):
    return sorted((n for n in summary.nodes if n.origin["step"] > 0), key=lambda n: n.id)


GRID = """def construct_packing(n, seed):
    side = math.ceil(math.sqrt(n))
    cells = [((i + 0.5) / side, (j + 0.5) / side) for i in range(side) for j in range(side)]
    centers = np.asarray(cells[:n])
{extra}    return centers, lp_radii(centers)
"""


def test_edit_is_applied_and_the_child_is_run_in_the_sandbox(tmp_path, server, prices):
    server.enqueue(
        text=_edits(("rng.permutation(len(cells))[:n]", "np.arange(n)")), model=RESEARCHER
    )
    summary = loop.run(_code_config(tmp_path, server, prices, "diff=1"), _space())
    [child] = _children(summary)
    assert child.ok, child.reason
    assert child.operator == "gemini_diff"
    assert "np.arange(n)" in child.candidate["source"]
    assert Program.parse(child.candidate["source"]).frame == Program.parse(_seed_source()).frame
    assert _sum(child) > 1.0


def test_an_edit_that_does_not_apply_goes_back_with_the_nearest_lines(tmp_path, server, prices):
    wrong = _edits(("chosen = rng.permutation(cells)[:n]", "chosen = np.arange(n)"))
    right = _edits(("rng.permutation(len(cells))[:n]", "np.arange(n)"))
    server.enqueue(text=wrong, model=RESEARCHER)
    server.enqueue(text=right, model=RESEARCHER)
    summary = loop.run(_code_config(tmp_path, server, prices, "diff=1"), _space())
    [child] = _children(summary)
    assert child.ok and child.stats["design"]["calls"] == 2
    [rejected] = child.stats["design"]["rejected"]
    assert "SEARCH does not occur in the parent" in rejected
    asks = [r for r in server.requests if r["model"] == RESEARCHER]
    re_ask = _turns(asks[1])[-1]
    # The model sees the parent's nearest lines, numbered, to copy the exact text from.
    assert "chosen = rng.permutation(len(cells))[:n]" in re_ask and " | " in re_ask


def test_an_edit_that_never_applies_is_recorded_not_skipped(tmp_path, server, prices):
    outside = _edits(("import math\n", "import math, os\n"))
    server.enqueue(text=outside, model=RESEARCHER, times=3)
    summary = loop.run(_code_config(tmp_path, server, prices, "diff=1"), _space())
    [child] = _children(summary)
    assert (child.status, child.candidate) == ("invalid", None)
    assert "no valid answer in 3 calls" in child.reason
    assert "outside the EVOLVE-BLOCKs" in child.reason


def test_a_syntax_error_is_repaired_on_the_second_attempt(tmp_path, server, prices):
    broken = GRID.format(extra="    centers = centers *\n")
    server.enqueue(text=_blocks(broken, "broken"), model=RESEARCHER)
    # First repair: still not Python. Second: fixed.
    server.enqueue(
        text=json.dumps({"diagnosis": "dangling operator", "edits": [
            {"search": "centers = centers *\n", "replace": "centers = centers * (\n"}]}),
        model=ENGINEER,
    )  # fmt: skip
    server.enqueue(
        text=json.dumps({"diagnosis": "unclosed parenthesis", "edits": [
            {"search": "centers = centers * (\n", "replace": "centers = centers * 1.0\n"}]}),
        model=ENGINEER,
    )  # fmt: skip
    config = _code_config(tmp_path, server, prices, "rewrite=1", max_repairs=2)
    summary = loop.run(config, _space())
    [child] = _children(summary)
    assert child.ok, child.reason
    assert "centers = centers * 1.0" in child.candidate["source"]
    attempts = child.stats["repair_attempts"]
    assert [a["by"] for a in attempts] == ["model", "model"]
    assert attempts[0]["reason"].startswith("schema: syntax: line")
    assert "'(' was never closed" in attempts[1]["reason"]
    assert attempts[1]["diagnosis"] == "unclosed parenthesis"
    engineer_asks = [r for r in server.requests if r["model"] == ENGINEER]
    assert "syntax: line" in _turns(engineer_asks[0])[0]


def test_a_program_missing_the_entry_point_is_repaired_from_the_check(tmp_path, server, prices):
    renamed = GRID.format(extra="").replace("def construct_packing", "def build")
    server.enqueue(text=_blocks(renamed, "renamed"), model=RESEARCHER)
    server.enqueue(
        text=json.dumps({"diagnosis": "wrong name", "edits": [
            {"search": "def build(n, seed):", "replace": "def construct_packing(n, seed):"}]}),
        model=ENGINEER,
    )  # fmt: skip
    summary = loop.run(_code_config(tmp_path, server, prices, "rewrite=1"), _space())
    [child] = _children(summary)
    assert child.ok, child.reason
    [attempt] = child.stats["repair_attempts"]
    assert "interface: the program defines no function construct_packing" in attempt["reason"]


# ---------------------------------------------------------------- hostile programs

HOSTILE = {
    "loops_forever": "def construct_packing(n, seed):\n    while True:\n        pass\n",
    "allocates_without_bound": (
        "def construct_packing(n, seed):\n    hoard = []\n    while True:\n"
        "        hoard.append(bytearray(1 << 24))\n"
    ),
    # Its children become "sleep 606.5": a name the test can look for afterwards.
    "forks_without_bound": (
        "import os\n\n\ndef construct_packing(n, seed):\n    while True:\n"
        "        try:\n            pid = os.fork()\n        except OSError:\n"
        "            continue\n        if pid == 0:\n            try:\n"
        "                os.execv('/bin/sleep', ['sleep', '606.5'])\n"
        "            finally:\n                os._exit(0)\n"
    ),
    # Looks for the key in its environment and in the controller's (this process's, through
    # /proc), for the credentials file the fixture wrote, and in the controller's home.
    "reads_the_keys": GRID.format(
        extra="    import glob, os, pwd, sys\n"
        "    found = [k for k in os.environ if 'KEY' in k or 'CRED' in k]\n"
        f"    paths = ['/proc/{os.getpid()}/environ']\n"
        "    paths += glob.glob('/tmp/pytest-of-*/**/adc.json', recursive=True)\n"
        "    for path in paths:\n        try:\n            text = open(path, 'rb').read()\n"
        "        except OSError:\n            continue\n"
        # The key spelled in two parts, so that the program's source in the history is not
        # itself the leak the last assertion looks for.
        "        if b'test-key-' b'must-not-leak' in text or b'service_account' in text:\n"
        "            found.append(path)\n"
        f"    home = pwd.getpwuid({os.getuid()}).pw_dir\n"
        "    imports = [sys.prefix, sys.base_prefix, *sys.path]\n"
        "    try:\n        entries = os.listdir(home)\n    except OSError:\n        entries = []\n"
        "    found += [e for e in entries\n"
        "              if not any(p.startswith(os.path.join(home, e)) for p in imports)]\n"
        "    if found:\n        raise RuntimeError(f'found {found}')\n"
    ),
    "writes_its_own_score": GRID.format(
        extra="    import json\n    print('sum_radii: 99.0')\n"
        "    open('results.json', 'w').write(json.dumps({'sum_radii': 99.0}))\n"
        "    import search_spaces.circle_packing.validate as v\n"
        "    v.score_packing = lambda *a, **k: (99.0, None)\n"
    ),
    "wrong_shape": (
        "def construct_packing(n, seed):\n    centers = np.linspace(0.1, 0.9, n)[:, None]\n"
        "    return centers, np.full(n, 0.01)\n"
    ),
    "not_finite": (
        "def construct_packing(n, seed):\n    centers = np.full((n, 2), 0.5)\n"
        "    centers[0, 0] = np.nan\n    return centers, np.full(n, 0.01)\n"
    ),
}


def test_hostile_programs_are_contained_and_the_run_goes_on(tmp_path, server, prices):
    for name, body in HOSTILE.items():
        server.enqueue(text=_blocks(body, name), model=RESEARCHER)
    config = _code_config(
        tmp_path, server, prices, "rewrite=1", samples_per_step=len(HOSTILE), max_repairs=0
    )
    summary = loop.run(config, _space())
    by_name = {n.name.split("+", 1)[1].split(".")[0]: n for n in _children(summary)}
    assert set(by_name) == set(HOSTILE)
    status = {name: (n.status, n.reason or "") for name, n in by_name.items()}
    assert status["loops_forever"][0] == "timeout", status
    # Killed by the watchdog ("memory: ...") or stopped by RLIMIT_DATA (MemoryError).
    allocates = status["allocates_without_bound"]
    assert allocates[0] == "failed" and ("MemoryError" in allocates[1] or "memory" in allocates[1])

    assert status["forks_without_bound"][0] in ("timeout", "failed"), status
    assert status["reads_the_keys"][0] == "ok", status  # it raises if it finds any
    honest = by_name["writes_its_own_score"]
    assert honest.ok and _sum(honest) < 3.0
    # What it printed is kept on the node and shown to the Analyzer, not counted.
    assert "sum_radii: 99.0" in honest.stats["output"]["stdout"]
    analyses = [_turns(r)[-1] for r in server.requests if r["model"] == "fake-analyzer"]
    fenced = r"its stdout \(last lines\).*\n(~{6} program output \w+ ~{6})\nsum_radii: 99.0\n\1"
    assert any(re.search(fenced, text) for text in analyses)
    assert status["wrong_shape"] == ("failed", status["wrong_shape"][1])
    assert "centers must have shape (8, 2)" in status["wrong_shape"][1]
    assert "is not finite" in status["not_finite"][1]
    # The run went on: the seeds and every child are recorded, and the report was written.
    assert len(summary.nodes) == len(cp_code.SEED_PROGRAMS) + len(HOSTILE)
    assert os.path.exists(os.path.join(summary.workdir, "report.txt"))
    # Nothing the fork bomb started outlives the run, and no key reached the history.
    assert not _processes_named("606.5")
    dump = json.dumps([n.to_json() for n in History(summary.workdir).nodes()])
    assert "test-key-must-not-leak" not in dump


def _processes_named(word: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if word.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_a_program_cannot_reach_the_network(tmp_path, server, prices):
    if not sandbox.isolation_support().get("net_ns"):
        pytest.skip("no network namespace on this machine: the sandbox keeps the host network")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    dials = GRID.format(
        extra="    import socket\n    try:\n"
        f"        socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
        "    except OSError:\n        pass\n    else:\n"
        "        raise RuntimeError('connected')\n"
    )
    server.enqueue(text=_blocks(dials, "dials"), model=RESEARCHER)
    try:
        summary = loop.run(_code_config(tmp_path, server, prices, "rewrite=1"), _space())
    finally:
        listener.close()
    [child] = _children(summary)
    assert child.ok, child.reason  # it raises when the connection succeeds


# ---------------------------------------------------------------- bad input


def test_a_seed_program_without_the_interface_is_a_recorded_reason(tmp_path, server, prices):
    class Space(CirclePackingSpace):
        def seeds(self):
            seeds = super().seeds()
            source = _seed_source().replace("def construct_packing(n, seed):", "def f(n, seed):")
            seeds["empty"] = {"source": source}
            return seeds

    config = _code_config(tmp_path, server, prices, "diff=1", steps=0, max_repairs=0)
    summary = loop.run(config, Space(mode="code", n=str(N)))
    [empty] = [n for n in summary.nodes if n.name == "empty"]
    assert empty.status == "invalid"
    assert "interface: the program defines no function construct_packing" in empty.reason
    assert all(n.ok for n in summary.nodes if n.name != "empty")


class _UnmarkedSpace(CirclePackingSpace):
    def code_spec(self):
        return CodeSpec("def construct_packing(n, seed): ...\n", "unmarked.py", "interface")


def unmarked_space(**options):
    """A space whose template has no EVOLVE-BLOCK (for the CLI test below)."""
    return _UnmarkedSpace(**options)


def test_a_template_without_markers_stops_the_run_before_any_work(tmp_path, prices):
    result = run_cli(
        "evolve_jax.main", "--search_space=tests.test_code_mode:unmarked_space",
        f"--workdir={tmp_path}/w", "--space_opt=mode=code", "--agents=gemini",
        f"--prices_file={prices}", f"--researcher_model={RESEARCHER}",
        f"--engineer_model={ENGINEER}", "--analyzer_model=fake-analyzer",
        "--embedding_model=fake-embedding",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "template unmarked.py has no EVOLVE-BLOCK" in result.stderr
    assert not os.path.exists(tmp_path / "w")


def test_code_mode_refuses_the_offline_backend_before_any_work(tmp_path):
    result = run_cli(
        "evolve_jax.main", "--search_space=circle_packing", f"--workdir={tmp_path}/w",
        "--space_opt=mode=code", "--agents=offline",
    )  # fmt: skip
    assert result.returncode == 2
    assert "code mode" in result.stderr and "--agents=gemini" in result.stderr
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("flagfile", ["configs/la_code.flags", "configs/circle_packing_code.flags"])
def test_code_mode_flagfiles_parse_and_ask_for_credentials_before_any_work(
    tmp_path, monkeypatch, flagfile
):
    for name in ("GEMINI_API_KEY", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(name)
    result = run_cli("evolve_jax.main", f"--flagfile={flagfile}", f"--workdir={tmp_path}/w")
    assert result.returncode == 2 and "needs credentials" in result.stderr, result.stderr
    assert not os.path.exists(tmp_path / "w")


def test_map_elites_is_refused_in_code_mode_before_any_work(tmp_path):
    result = run_cli(
        "evolve_jax.main", "--search_space=circle_packing", f"--workdir={tmp_path}/w",
        "--space_opt=mode=code", "--sampler=map_elites",
    )  # fmt: skip
    assert result.returncode == 2 and "map_elites needs behaviour descriptors" in result.stderr
    assert not os.path.exists(tmp_path / "w")


# ---------------------------------------------------------------- what a program can write


def test_a_program_writes_nothing_outside_its_sandbox(tmp_path, server, prices, monkeypatch):
    monkeypatch.setattr(sandbox, "_HIDDEN", set())
    # A run's workdir outside /tmp (which every sandbox covers anyway), readable by anyone.
    parent = tempfile.mkdtemp(prefix="code-mode-test-", dir="/var/tmp")
    os.chmod(parent, 0o777)
    workdir = os.path.join(parent, "run")
    marker = f"hostile-{uuid.uuid4().hex}"
    places = ["/tmp", "/dev/shm", "/var/tmp", parent, workdir]
    writes = GRID.format(
        extra="    import os\n"
        f"    for place in {places!r}:\n"
        "        try:\n"
        f"            open(os.path.join(place, {marker!r}), 'w').write('x')\n"
        "        except OSError:\n            pass\n"
        f"    seen = os.listdir({workdir!r}) if os.path.isdir({workdir!r}) else []\n"
        "    if seen:\n        raise RuntimeError(f'sees the run: {seen}')\n"
    )
    server.enqueue(text=_blocks(writes, "writes"), model=RESEARCHER)
    try:
        config = _code_config(tmp_path, server, prices, "rewrite=1", workdir=workdir)
        summary = loop.run(config, _space())
        written = [place for place in places if os.path.exists(os.path.join(place, marker))]
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    [child] = _children(summary)
    assert child.ok, child.reason  # it raises if it can list the run's workdir
    assert written == []


def test_code_mode_stops_where_sandboxes_get_no_filesystem_of_their_own(
    tmp_path, prices, monkeypatch, capsys
):
    from evolve_jax.evaluation import sandbox as sandbox_module
    from tests.test_main import _main

    def started(config, space):
        raise SystemExit(7)

    monkeypatch.setattr(sandbox_module, "isolation_support", lambda: {"fs_private": False})
    monkeypatch.setattr(loop, "run", started)
    # The driver appends to XLA_FLAGS (--deterministic): restored after this test.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    argv = [
        "--search_space=circle_packing", f"--workdir={tmp_path}/w", "--space_opt=mode=code",
        "--agents=gemini", f"--prices_file={prices}", f"--researcher_model={RESEARCHER}",
        f"--engineer_model={ENGINEER}", "--analyzer_model=fake-analyzer",
        "--embedding_model=fake-embedding",
    ]  # fmt: skip
    code, err = _main(capsys, *argv)
    assert code == 2 and "--allow_weak_sandbox" in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "w")
    assert _main(capsys, *argv, "--allow_weak_sandbox")[0] == 7  # the run would start
