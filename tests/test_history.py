import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import tensorstore as ts

from evolve_jax.memory.history import (
    CorruptRecordError,
    History,
    HistoryError,
    SlotTaken,
    kvstore_url,
)
from tests.conftest import REPO, run_cli


def _fields(name="n", status="ok", score=1.0, **extra):
    fields = dict(
        parents=[],
        search_space="toy",
        name=name,
        motivation="m",
        candidate={"x": [1]},
        status=status,
        reason=None,
        metrics={"cheap": {"0": {"reward": score}}},
        score=score,
        stats={},
        analysis="",
        timings={},
        island=0,
        created=0.0,
    )
    fields.update(extra)
    return fields


def _history(workdir, direction="max"):
    history = History(workdir)
    history.initialise("toy", direction)
    return history


def test_append_assigns_consecutive_ids_and_round_trips(workdir):
    history = _history(workdir)
    nodes = [history.append(**_fields(f"n{i}", score=float(i))) for i in range(5)]
    assert [n.id for n in nodes] == list(range(5))
    reread = History(workdir, create=False).nodes()
    assert [(n.id, n.name, n.score) for n in reread] == [(i, f"n{i}", float(i)) for i in range(5)]
    assert reread[3].metrics == {"cheap": {"0": {"reward": 3.0}}}


def test_failed_node_reads_back_with_worst_score_for_direction(workdir):
    for direction, worst in (("max", -math.inf), ("min", math.inf)):
        path = os.path.join(workdir, direction)
        history = _history(path, direction)
        history.append(**_fields(status="failed", score=worst, reason="boom"))
        node = History(path).nodes()[0]
        assert node.score == worst and node.score != 0
        assert node.summary()["score"] is None  # JSON has no inf: null for jq and pandas


def test_refresh_is_incremental_and_sees_other_writers(workdir):
    a, b = _history(workdir), History(workdir)
    a.append(**_fields("a0"))
    assert [n.name for n in b.refresh()] == ["a0"]
    a.append(**_fields("a1"))
    assert [n.name for n in b.refresh()] == ["a1"]  # only the new node is read
    assert b.refresh() == []


def test_write_once_never_overwrites(workdir):
    history = _history(workdir)
    assert history.write_record("lessons", "x", {"v": 1})
    assert not history.write_record("lessons", "x", {"v": 2})
    assert history.records("lessons") == [("x", {"v": 1})]


def test_stage_results_are_write_once(workdir):
    history = _history(workdir)
    node = history.append(**_fields())
    assert history.add_stage_result(node.id, 1, {"score": 2.0, "status": "ok"})
    assert not history.add_stage_result(node.id, 1, {"score": 9.0, "status": "ok"})
    assert History(workdir).nodes()[0].stages == {1: {"score": 2.0, "status": "ok"}}


def test_other_search_space_is_refused(workdir):
    _history(workdir)
    with pytest.raises(HistoryError, match="holds a 'toy' history"):
        History(workdir).initialise("other", "max")


def test_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a dir")
    with pytest.raises(HistoryError, match="is a file"):
        History(str(path))
    assert path.read_text() == "not a dir"


def test_gs_workdir_maps_to_ocdbt_url():
    assert kvstore_url("gs://bucket/run") == "gs://bucket/run/history/"


def _corrupt(workdir, key):
    kv = ts.KvStore.open({"driver": "ocdbt", "base": kvstore_url(workdir)}).result()
    kv.write(key, b"\x00{not json").result()


def test_corrupted_record_is_named_and_nothing_else_is_lost(workdir):
    history = _history(workdir)
    for i in range(4):
        history.append(**_fields(f"n{i}"))
    _corrupt(workdir, b"nodes/0000000002")
    with pytest.raises(CorruptRecordError, match="nodes/0000000002"):
        History(workdir).nodes()
    cli = run_cli("evolve_jax.history", f"--workdir={workdir}")
    assert cli.returncode == 1
    assert "corrupted record 'nodes/0000000002'" in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1
    kv = ts.KvStore.open({"driver": "ocdbt", "base": kvstore_url(workdir)}).result()
    for i in (0, 1, 3):  # the other records are untouched
        assert json.loads(kv.read(b"nodes/%010d" % i).result().value)["name"] == f"n{i}"


_APPENDER = textwrap.dedent(
    """
    import sys
    from evolve_jax.memory.history import History
    history = History(sys.argv[1])
    history.initialise("toy", "max")
    for i in range(int(sys.argv[3])):
        history.append(parents=[], search_space="toy", name=f"{sys.argv[2]}{i}", motivation="",
                       candidate={}, status="ok", reason=None, metrics={}, score=float(i),
                       stats={}, analysis="", timings={}, island=0, created=0.0)
    """
)


def test_two_processes_appending_at_once_lose_nothing(workdir):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _APPENDER, workdir, tag, "40"],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=REPO),
        )
        for tag in "AB"
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    nodes = History(workdir).nodes()
    assert [n.id for n in nodes] == list(range(80))
    names = sorted(n.name for n in nodes)
    assert names == sorted([f"A{i}" for i in range(40)] + [f"B{i}" for i in range(40)])


def test_a_slot_is_committed_once_whoever_writes_it(workdir):
    history = _history(workdir)
    origin = {"run": "main", "step": 2, "slot": 1}
    first = history.append(**_fields("first", origin=origin))
    other = History(workdir)  # a second writer with its own view of the store
    with pytest.raises(SlotTaken, match="slots/main/000002/000001 is already node 0") as taken:
        other.append(**_fields("second", origin=origin))
    assert taken.value.node_id == first.id
    # Nothing of the refused node was written: no node, the counter where it was.
    assert [n.name for n in History(workdir).nodes()] == ["first"]
    assert other.append(**_fields("next", origin={**origin, "slot": 2})).id == 1
    # Nodes without a loop slot (tools, tests) are never refused.
    assert other.append(**_fields("free")).id == 2
