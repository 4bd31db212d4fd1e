"""The HTML report's payload and file: what it reads, what it says it could not show, how it is
written (whole, where asked, live while the run is). The browser tests are in
test_report_browser.py."""

import json
import math
import os
import statistics
import threading

import jax
import pytest

from evolve_jax import storage
from evolve_jax.config import RunConfig
from evolve_jax.loop import run
from evolve_jax.memory.history import CorruptRecordError, History
from evolve_jax.memory.lease import Lease
from evolve_jax.report import data, page
from tests.conftest import TOY, run_cli
from tests.test_history import _fields
from tests.toy_space import ToySpace


def toy_search(workdir: str, **overrides):
    """A quickstart-sized toy search: 3 seeds (the baseline among them), 2 steps of 3
    children, 2 seeds per candidate, the top 2 promoted to stage 1."""
    values = dict(
        search_space=TOY,
        workdir=workdir,
        steps=2,
        samples_per_step=3,
        eval_seeds=2,
        promote_top_k=2,
        seed=0,
    )
    values.update(overrides)
    return run(RunConfig(**values), ToySpace(baseline="origin"))


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("report") / "run")
    jax.clear_caches()  # so that this search compiles, whatever ran before it in this process
    return workdir, toy_search(workdir)


def _append(history: History, **fields):
    return history.append(**_fields(**fields))


def _read(path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _payload_of(html: str) -> dict:
    return page.unpacked(html)


# ----------------------------------------------------------------------------- contents


def test_payload_holds_every_node_stage_and_record(searched):
    workdir, summary = searched
    payload = data.collect(workdir, live=False)
    nodes = summary.nodes
    columns = payload["nodes"]
    assert columns["id"] == [n.id for n in nodes]
    assert columns["status"] == [n.status for n in nodes]
    assert [s["name"] for s in payload["stages"]] == ["cheap", "full"]
    assert payload["stages"][0]["metric"] == "reward"
    # Stage-1 metrics for exactly the promoted nodes, stage 0 for every node that ran.
    promoted = [n.id for n in nodes if 1 in n.stages]
    assert len(promoted) >= 2
    assert [i for i, s in zip(columns["id"], columns["s1_status"], strict=True) if s] == promoted
    rows = zip(nodes, columns["s0_mean"], columns["s0_sd"], columns["s0_n"], strict=True)
    for node, mean, sd, n in rows:
        if node.ok:
            values = [m["reward"] for m in node.metrics["cheap"].values()]
            assert n == 2 and mean == pytest.approx(statistics.mean(values), rel=1e-4)
            assert sd == pytest.approx(statistics.stdev(values), rel=1e-4, abs=1e-9)
        else:
            assert mean is None and sd is None and n == 0
    # The baseline comparison is the one the loop recorded.
    child = next(n for n in nodes if n.ok and n.parents)
    index = columns["id"].index(child.id)
    assert columns["s0_vs"][index]["mean_diff"] == pytest.approx(
        child.stats["vs_baseline"]["reward"]["mean_diff"], rel=1e-4
    )
    correlation = payload["correlations"][0]
    assert correlation["n"] == len(promoted) == len(correlation["points"])
    # The run record: its task, its settings; and compile time measured from JAX's events.
    assert payload["settings"]["eval_seeds"] == 2
    (row,) = payload["time"]
    assert row["nodes"] == len(nodes) and row["compile_recorded"] and row["compile_s"] > 0
    assert row["evaluate_s"] == pytest.approx(sum(n.timings["evaluate"] for n in nodes), abs=0.01)


def test_operator_gain_is_child_minus_first_parent(searched):
    workdir, summary = searched
    by_id = {n.id: n for n in summary.nodes}
    payload = data.collect(workdir, live=False)
    for row in payload["operators"]:
        children = [n for n in summary.nodes if n.operator == row["operator"]]
        pairs = [
            n.score - by_id[n.parents[0]].score for n in children if n.ok and by_id[n.parents[0]].ok
        ]
        assert row["uses"] == len(children)
        assert row["n"] == len(pairs)
        assert row["wins"] == sum(g > 0 for g in pairs)
        if pairs:
            assert row["mean_gain"] == pytest.approx(sum(pairs) / len(pairs), rel=1e-3)


def test_details_show_genes_changed_from_the_parent(searched):
    workdir, summary = searched
    payload = data.collect(workdir, live=False)
    by_id = {n.id: n for n in summary.nodes}
    for node, detail in zip(summary.nodes, payload["details"], strict=True):
        view = detail["candidate"]
        assert view["kind"] == "genome" and json.loads(view["text"]) == node.candidate
        if node.parents:
            parent = by_id[node.parents[0]].candidate
            changed = {k for k in node.candidate if node.candidate[k] != parent.get(k)}
            assert {row[0] for row in view["changed"]} == changed


def test_details_travel_in_chunks_inflated_apart(searched, monkeypatch):
    workdir, summary = searched
    monkeypatch.setattr(page, "DETAIL_CHUNK", 4)
    payload = data.collect(workdir, live=False)
    html = page.render(payload)
    assert html.count('class="report-details"') == -(-len(summary.nodes) // 4)  # 4 nodes each
    assert page.unpacked(html)["detail_chunk"] == 4
    assert page.unpacked_details(html) == json.loads(json.dumps(payload["details"]))


def test_code_candidates_show_a_diff_from_the_parent(workdir):
    history = History(workdir)
    history.initialise("toy", "max")
    parent = _append(history, candidate={"source": "a = 1\nb = 2\n"}, name="seed")
    _append(history, candidate={"source": "a = 1\nb = 3\n"}, parents=[parent.id], name="child")
    details = data.collect(workdir, live=False)["details"]
    assert details[0]["candidate"]["kind"] == "source"
    diff = details[1]["candidate"]
    assert diff["kind"] == "diff" and "-b = 2\n+b = 3\n" in diff["text"]


def test_an_open_history_makes_each_candidate_view_once(workdir, monkeypatch):
    # The driver rewrites the page after every step with its open history: only new nodes'
    # views are made, and each is clipped to the budget of the page being written.
    monkeypatch.setattr(data, "DETAIL_BUDGET", 3 * 4 * 700)  # 700 characters a text at 4 nodes
    history = History(workdir)
    history.initialise("toy", "max")
    seed = _append(history, candidate={"source": "a = 1\n" * 80}, name="seed")
    for i in range(3):
        _append(history, candidate={"source": f"a = {i}\n" * 80}, parents=[seed.id])
    made = []
    real = data._candidate
    monkeypatch.setattr(data, "_candidate", lambda n, p: made.append(n.id) or real(n, p))
    first = data.collect(workdir, live=False, history=history)["details"]
    assert sorted(made) == [0, 1, 2, 3]
    assert len(first[1]["candidate"]["text"]) == 700
    _append(history, candidate={"source": "b = 1\n" * 80}, parents=[seed.id])
    made.clear()
    again = data.collect(workdir, live=False, history=history)["details"]
    assert made == [4]
    assert len(again[1]["candidate"]["text"]) == data.MIN_NODE_TEXT  # 560 would be under it
    fresh = data.collect(workdir, live=False)["details"]
    assert [d["candidate"] for d in again] == [d["candidate"] for d in fresh]


# ----------------------------------------------------------------------------- bad input


def test_a_workdir_without_history_gets_one_line_and_nothing_is_created(tmp_path):
    for name, made in (("typo", []), ("empty", ["empty"]), ("bare", ["bare", "bare/history"])):
        for path in made:
            os.mkdir(tmp_path / path)
        workdir = str(tmp_path / name)
        result = run_cli("evolve_jax.report", f"--workdir={workdir}")
        assert result.returncode == 2, result.stderr
        assert "no report written" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not os.path.exists(os.path.join(workdir, "report.html"))
    # Nor does the history CLI create anything there.
    typo = str(tmp_path / "typo")
    listing = run_cli("evolve_jax.history", f"--workdir={typo}")
    assert listing.returncode == 1 and listing.stdout == ""
    assert listing.stderr.strip() == f"error: no experiment history under {typo!r}"
    assert sorted(os.listdir(tmp_path)) == ["bare", "empty"]  # the mistyped one is not made
    assert os.listdir(tmp_path / "bare" / "history") == []
    # The page itself, asked for such a workdir from Python, says there is nothing to show.
    payload = data.collect(str(tmp_path / "typo"), live=False)
    assert payload["nodes"] is None
    assert any("Nothing to show" in n and "no experiment history" in n for n in payload["notices"])


def test_only_failed_nodes_are_listed_with_a_notice(workdir):
    history = History(workdir)
    history.initialise("toy", "max")
    for i in range(3):
        _append(history, status="failed", reason=f"boom {i}", score=-math.inf)
    payload = data.collect(workdir, live=False)
    assert payload["nodes"]["reason"] == ["boom 0", "boom 1", "boom 2"]
    assert payload["nodes"]["score"] == [None, None, None]
    assert any("None of the 3 nodes succeeded" in n for n in payload["notices"])
    page.write(workdir, live=False)  # renders without error


def test_a_huge_candidate_is_clipped_with_a_notice(workdir, monkeypatch):
    history = History(workdir)
    history.initialise("toy", "max")
    huge = "x = 0\n" * 500_000  # 3 MB of program
    _append(history, candidate={"source": huge}, name="huge")
    payload = data.collect(workdir, live=False)
    view = payload["details"][0]["candidate"]
    assert len(view["text"]) == data.MAX_NODE_TEXT
    assert any("3,000,000 characters" in n for n in view["notices"])
    assert any(n.startswith("Node 0:") and "first 20,000" in n for n in payload["notices"])
    html = page.render(payload)
    assert len(html.encode()) < 3_000_000  # BokehJS (~1.4 MB) and the clipped text


def test_a_record_that_is_not_utf8_is_salvaged_and_named(workdir):
    history = History(workdir)
    history.initialise("toy", "max")
    _append(history, name="fine")
    record = json.dumps(_append(history, name="BAD").to_json()).encode()
    raw = record.replace(b"BAD", b"B\xff\xfeD")
    key = b"nodes/%010d" % 1
    history.kvstore.write(key, raw).result()
    # The strict reader refuses it; the report reads what it can and says what it could not.
    with pytest.raises(CorruptRecordError):
        History(workdir, create=False).nodes()
    payload = data.collect(workdir, live=False)
    assert payload["nodes"]["name"] == ["fine", "B\ufffd\ufffdD"]
    assert any("nodes/0000000001" in n and "not UTF-8" in n for n in payload["notices"])
    assert history.kvstore.read(key).result().value == raw  # the report only reads


def test_an_unreadable_record_is_skipped_and_named(workdir):
    history = History(workdir)
    history.initialise("toy", "max")
    _append(history, name="fine")
    _append(history, name="gone")
    history.kvstore.write(b"nodes/%010d" % 1, b"{not json").result()
    payload = data.collect(workdir, live=False)
    assert payload["nodes"]["name"] == ["fine"]
    assert any("nodes/0000000001" in n for n in payload["notices"])


def test_text_that_is_not_unicode_is_shown_replaced(workdir):
    history = History(workdir)
    history.initialise("toy", "max")
    _append(history, candidate={"source": "print('\udcff')\n"})  # a lone surrogate
    payload = data.collect(workdir, live=False)
    view = payload["details"][0]["candidate"]
    assert "\ufffd" in view["text"] and any("not valid Unicode" in n for n in view["notices"])
    page.render(payload).encode("utf-8")  # the page itself is valid UTF-8


def test_history_text_cannot_close_the_script_element(workdir):
    history = History(workdir)
    history.initialise("toy", "max")
    _append(history, name="</script><script>alert(1)</script>")
    html = page.render(data.collect(workdir, live=False))
    assert "<script>alert(1)" not in html
    assert _payload_of(html)["nodes"]["name"] == ["</script><script>alert(1)</script>"]


# ----------------------------------------------------------------------------- writing


def test_the_cli_writes_where_asked(searched, tmp_path):
    workdir, _ = searched
    out = str(tmp_path / "elsewhere" / "page.html")
    result = run_cli("evolve_jax.report", f"--workdir={workdir}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == storage.to_url(out)
    assert _payload_of(_read(out))["nodes"]["id"]


def test_the_cli_rejects_a_directory_as_out(searched):
    workdir, _ = searched
    result = run_cli("evolve_jax.report", f"--workdir={workdir}", f"--out={workdir}/")
    assert result.returncode == 2 and "names a directory" in result.stderr


def test_a_reader_never_sees_half_a_page(searched):
    workdir, _ = searched
    path = os.path.join(workdir, "report.html")
    payload = data.collect(workdir, live=False)
    small, large = page.render(payload), page.render({**payload, "padding": "y" * 3_000_000})
    storage.write_text(workdir, "report.html", small)
    done, seen = threading.Event(), []

    def read():
        while not done.is_set():
            try:
                with open(path, "rb") as f:
                    seen.append(f.read())
            except FileNotFoundError:
                pass

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(12):
            storage.write_text(workdir, "report.html", large if i % 2 else small)
    finally:
        done.set()
        reader.join()
    assert len(seen) > 12
    assert all(s in (small.encode(), large.encode()) for s in seen)


def test_the_page_is_live_while_a_process_holds_the_lease(searched):
    workdir, _ = searched
    history = History(workdir, create=False)
    with Lease(history, "someone"):
        assert data.collect(workdir)["live"] is True
    assert data.collect(workdir)["live"] is False


def test_the_driver_rewrites_the_page_every_step_and_ends_it(tmp_path, monkeypatch):
    written = []
    real_write = page.write

    histories = []

    def spy(workdir, out=None, *, live=None, history=None):
        histories.append(history)
        url = real_write(workdir, out, live=live, history=history)
        with open(os.path.join(workdir, "report.html"), encoding="utf-8") as f:
            written.append(_payload_of(f.read()))
        return url

    monkeypatch.setattr(page, "write", spy)
    workdir = str(tmp_path / "run")
    toy_search(workdir, steps=2)
    # Seeds, step 1, step 2 (live), then the end (not live), each with the nodes so far.
    assert [p["live"] for p in written] == [True, True, True, False]
    assert [len(p["nodes"]["id"]) for p in written] == [3, 6, 9, 9]
    # The driver hands over its open history (read incrementally), and its last page shows
    # what a fresh read of the store does, promotions to stage 1 included.
    assert all(h is histories[0] and h is not None for h in histories)
    fresh = data.collect(workdir, live=False)["nodes"]
    assert any(fresh["s1_status"])
    for column in ("id", "status", "s0_mean", "s1_status", "s1_mean"):
        assert written[-1]["nodes"][column] == fresh[column], column
    assert page.unpacked(page.render(written[0]))["reload_seconds"] == page.RELOAD_SECONDS


def test_a_failed_run_ends_its_page(tmp_path, monkeypatch):
    calls = []
    real_write = page.write
    monkeypatch.setattr(
        page, "write", lambda *a, live=None, **k: calls.append(live) or real_write(*a, live=live)
    )

    def explode(self, step):
        raise RuntimeError("the step broke")

    monkeypatch.setattr("evolve_jax.loop.ResearchLoop.evolve_step", explode)
    with pytest.raises(RuntimeError, match="the step broke"):
        toy_search(str(tmp_path / "run"))
    assert calls == [True, False]
    assert _payload_of(_read(tmp_path / "run" / "report.html"))["live"] is False
