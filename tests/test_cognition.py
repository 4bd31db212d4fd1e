import json
import os
import subprocess
import sys

import pytest

from evolve_jax.memory.cognition import Cognition, CognitionError, Item, load_seed_file
from evolve_jax.memory.history import History
from tests.conftest import REPO

SEED = os.path.join(os.path.dirname(__file__), "toy_cognition.jsonl")


def test_seed_file_loads_items_with_fields():
    items = load_seed_file(SEED)
    assert len(items) == 3
    assert items[0].title == "Small steps near the optimum"
    assert items[0].tags == ("gauss", "mutation") and items[0].source == "toy prior"


def test_missing_file_is_named(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(CognitionError, match=r"nope\.jsonl"):
        load_seed_file(path)


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "binary.jsonl"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CognitionError, match=r"binary\.jsonl.*cannot be read"):
        load_seed_file(str(path))


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "line 2"),
        ('["a list"]', "line 2: not a JSON object"),
        ('{"title": "t"}', "missing fields \\['content'\\]"),
        ('{"title": "t", "content": "c", "colour": "red"}', "unknown fields \\['colour'\\]"),
    ],
)
def test_malformed_file_names_path_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"title": "ok", "content": "fine"}\n' + line + "\n")
    with pytest.raises(CognitionError, match=message):
        load_seed_file(str(path))


def test_retrieval_ranks_by_relevance_and_is_bounded():
    cognition = Cognition(load_seed_file(SEED))
    hits = cognition.retrieve("interpolating parents blend crossover", k=2)
    assert hits[0].title == "Blending parents"
    assert len(cognition.retrieve("parents shape gaussian broken", k=2)) <= 2
    assert cognition.retrieve("zebra quantum", k=3) == []  # nothing relevant, nothing returned
    clipped = cognition.retrieve("gaussian perturbations", k=1, max_chars=20)[0]
    assert len(clipped.content) == 20 and clipped.content.endswith("…")


def test_retrieval_deduplicates_identical_items():
    twin = Item(id="a", title="Blend", content="Blend two parents.", source="x")
    copy = Item(id="b", title="blend", content="blend two parents.", source="y")
    cognition = Cognition([twin, copy])
    assert len(cognition.retrieve("blend parents", k=5)) == 1


# In a fresh interpreter: bm25s is imported on first use, and its import is what sets its
# logger to DEBUG, so a process that imported it already would not show the chatter.
_BUILD_AN_INDEX = f"""
import logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(name)s %(message)s")
from evolve_jax.memory.cognition import Cognition, load_seed_file
assert Cognition(load_seed_file({SEED!r})).retrieve("blend parents", k=1)
logging.getLogger("bm25s").warning("a bm25s warning")
"""


def test_building_the_index_logs_no_bm25s_chatter_but_keeps_its_warnings():
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", _BUILD_AN_INDEX],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    bm25s_lines = [x for x in done.stderr.splitlines() if x.startswith("bm25s")]
    assert bm25s_lines == ["bm25s a bm25s warning"]


def test_lessons_persist_with_provenance_and_supersede_by_key(tmp_path):
    history = History(str(tmp_path / "run"))
    history.initialise("toy", "max")
    cognition = Cognition(load_seed_file(SEED), history=history)
    first = cognition.add_lesson("gauss on origin", "gain +0.1 over 3", nodes=[4, 5, 6], key="k")
    assert first.provenance["nodes"] == [4, 5, 6] and first.provenance["time"] > 0
    second = cognition.add_lesson("gauss on origin", "gain +0.2 over 6", nodes=[4, 9], key="k")
    stored = dict(history.records("lessons"))
    assert set(stored) == {first.id, second.id}
    assert json.dumps(stored[first.id])  # plain JSON
    reloaded = Cognition(load_seed_file(SEED), history=History(str(tmp_path / "run")))
    assert len(reloaded) == 5
    hits = reloaded.retrieve("gauss origin gain", k=5)
    assert [h.content for h in hits if h.key == "k"] == ["gain +0.2 over 6"]
