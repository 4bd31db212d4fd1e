"""The cognition base: prior knowledge seeded per search space, plus the Analyzer's lessons.

Retrieval is BM25 (bm25s) over title, tags and content; with an embedder set, BM25 and
embedding-cosine rankings are fused by reciprocal rank fusion, so an item that says the same
thing in other words is found too. Lessons are persisted in the experiment history as
write-once records, each with its provenance (node ids and time); a lesson that restates an
earlier one under the same ``key`` supersedes it at retrieval time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from evolve_jax.memory.embeddings import Embedder, cosine_top_k
from evolve_jax.memory.history import History

_log = logging.getLogger(__name__)
# The usual reciprocal rank fusion constant: damps the weight of the very first ranks.
RRF_K = 60


class CognitionError(ValueError):
    """A cognition file that cannot be read or parsed; the message names it."""


@dataclasses.dataclass(frozen=True)
class Item:
    id: str
    title: str
    content: str
    source: str
    tags: tuple[str, ...] = ()
    # Lessons only: which nodes the lesson was drawn from, and when.
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Items sharing a key restate the same lesson; retrieval keeps the newest.
    key: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any], where: str) -> Item:
        missing = {"title", "content"} - set(record)
        if missing:
            raise CognitionError(f"{where}: missing fields {sorted(missing)}")
        unknown = set(record) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise CognitionError(f"{where}: unknown fields {sorted(unknown)}")
        record = dict(record)
        record.setdefault("id", hashlib.sha1(record["title"].encode()).hexdigest()[:12])
        record.setdefault("source", "")
        record["tags"] = tuple(record.get("tags", ()))
        return cls(**record)

    def clipped(self, max_chars: int) -> Item:
        if len(self.content) <= max_chars:
            return self
        return dataclasses.replace(self, content=self.content[: max_chars - 1] + "…")


def load_seed_file(path: str) -> list[Item]:
    """Reads a JSON-lines file of items; raises CognitionError naming the path and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CognitionError(f"cognition file {path!r} cannot be read: {e}") from e
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CognitionError(f"cognition file {path!r}, line {number}: {e}") from e
        if not isinstance(record, dict):
            raise CognitionError(f"cognition file {path!r}, line {number}: not a JSON object")
        items.append(Item.from_json(record, f"cognition file {path!r}, line {number}"))
    return items


def _bm25s():
    """bm25s, imported on first use: its import runs a JAX op, which starts JAX's default
    backend, and the driver must set XLA flags and join other processes before that.

    Its import sets its logger to DEBUG, which then reports every index build ("Building index
    from IDs objects") through the root logger's handlers; raised to WARNING after the import
    (setting it before, at this module's import, is undone by it), so its warnings still show.
    """
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


def _tokens(texts: Sequence[str]):
    return _bm25s().tokenize(list(texts), stopwords="en", show_progress=False)


def _text(item: Item) -> str:
    """What an item is indexed (and embedded) as."""
    return f"{item.title} {' '.join(item.tags)} {item.content}"


class Cognition:
    """Items in memory, a BM25 index over them, and write-back of lessons to the history."""

    def __init__(self, items: Iterable[Item] = (), history: History | None = None):
        self._items: dict[str, Item] = {}
        self._history = history
        self._index: Any = None  # a bm25s.BM25 once built
        self._indexed: list[Item] = []
        self._embedder: Embedder | None = None
        self._vectors: np.ndarray | None = None  # embeddings of _indexed, made on first use
        self._visible: frozenset[int] | None = None
        for item in items:
            self._items.setdefault(item.id, item)
        if history is not None:
            for _, record in history.records("lessons"):
                item = Item.from_json(record, "stored lesson")
                self._items.setdefault(item.id, item)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[Item]:
        return list(self._items.values())

    def add_lesson(
        self,
        title: str,
        content: str,
        *,
        nodes: Sequence[int],
        tags: Sequence[str] = (),
        key: str | None = None,
    ) -> Item:
        """Records a lesson with its provenance (persisted when backed by a history)."""
        digest = hashlib.sha1(f"{key}|{title}|{content}".encode()).hexdigest()[:10]
        item = Item(
            id=f"lesson-{min(nodes, default=0):06d}-{digest}",
            title=title,
            content=content,
            source="analyzer",
            tags=tuple(tags),
            provenance={"nodes": sorted(set(nodes)), "time": time.time()},
            key=key,
        )
        if item.id in self._items:
            return self._items[item.id]
        if self._history is not None:
            self._history.write_record("lessons", item.id, item.to_json())
        self._items[item.id] = item
        self._index = None
        return item

    def evidence(self, key: str) -> int:
        """The most nodes any lesson under ``key`` was drawn from (0 if none yet)."""
        return max(
            (len(i.provenance.get("nodes", ())) for i in self._items.values() if i.key == key),
            default=0,
        )

    def restrict(self, visible_nodes: frozenset[int] | None) -> None:
        """Hides lessons drawn from nodes outside ``visible_nodes`` (None: hides nothing).

        A resumed run designs a step as it was first designed: lessons written after that step
        began cite nodes it could not see, so they stay out of its retrieval.
        """
        if visible_nodes != self._visible:
            self._visible = visible_nodes
            self._index = None

    def _items_visible(self) -> list[Item]:
        if self._visible is None:
            return list(self._items.values())
        return [
            i
            for i in self._items.values()
            if i.source != "analyzer" or set(i.provenance.get("nodes", ())) <= self._visible
        ]

    def _live(self) -> list[Item]:
        """Items with superseded lessons dropped (newest per key) and identical texts merged."""
        items = self._items_visible()
        newest: dict[str, Item] = {}
        for item in items:
            if item.key is None:
                continue
            held = newest.get(item.key)
            if held is None or item.provenance.get("time", 0) >= held.provenance.get("time", 0):
                newest[item.key] = item
        # Prior knowledge in file order, then lessons by id: the same order however the items
        # arrived (live or reloaded on resume), so retrieval ties break the same way.
        prior = [i for i in items if i.source != "analyzer"]
        lessons = sorted((i for i in items if i.source == "analyzer"), key=lambda i: i.id)
        ordered = prior + lessons
        seen, live = set(), []
        for item in ordered:
            if item.key is not None and newest[item.key] is not item:
                continue
            text = (item.title.strip().lower(), item.content.strip().lower())
            if text not in seen:
                seen.add(text)
                live.append(item)
        return live

    def set_embedder(self, embedder: Embedder | None) -> None:
        """Turns hybrid retrieval and ``similar`` on (an Embedder) or off (None)."""
        self._embedder = embedder
        self._vectors = None

    def _refresh_index(self) -> None:
        if self._index is None:
            self._indexed = self._live()
            self._vectors = None
            if self._indexed:
                self._index = _bm25s().BM25()
                self._index.index(_tokens([_text(i) for i in self._indexed]), show_progress=False)

    def _cosines(self, embedder: Embedder, text: str) -> list[tuple[int, float]]:
        """Every indexed item as ``(position, cosine with text)``, best first."""
        if self._vectors is None:
            self._vectors = embedder.embed([_text(i) for i in self._indexed])
        query = embedder.embed([text])[0]
        return cosine_top_k(query, self._vectors, len(self._indexed))

    def retrieve(self, query: str, k: int = 5, max_chars: int = 600) -> list[Item]:
        """The ``k`` items most relevant to ``query``, each clipped to ``max_chars``.

        BM25 alone returns only items with a score > 0; with an embedder, its ranking and the
        embedding ranking (which ranks every item) are fused, so up to ``k`` items come back.
        """
        self._refresh_index()
        if self._index is None or not query.strip():
            return []
        if self._embedder is None:
            return self._bm25(query, k, max_chars)
        try:
            cosines = self._cosines(self._embedder, query)
        except Exception as e:  # the embedding API being down must not stop the run
            _log.warning("embedding retrieval failed, using BM25 alone: %r", e)
            return self._bm25(query, k, max_chars)
        docs, scores = self._index.retrieve(
            _tokens([query]), k=len(self._indexed), show_progress=False
        )
        # BM25 ties are ranked by item order, as the fused ties are.
        bm25 = sorted(
            ((int(d), float(s)) for d, s in zip(docs[0], scores[0], strict=True) if s > 0),
            key=lambda ds: (-ds[1], ds[0]),
        )
        fused = np.zeros(len(self._indexed))
        for ranking in (bm25, cosines):
            for rank, (position, _) in enumerate(ranking, start=1):
                fused[position] += 1.0 / (RRF_K + rank)
        best = sorted(range(len(self._indexed)), key=lambda p: (-fused[p], p))
        return [self._indexed[p].clipped(max_chars) for p in best[:k]]

    def _bm25(self, query: str, k: int, max_chars: int) -> list[Item]:
        k = min(k, len(self._indexed))
        docs, scores = self._index.retrieve(_tokens([query]), k=k, show_progress=False)
        return [
            self._indexed[int(d)].clipped(max_chars)
            for d, s in zip(docs[0], scores[0], strict=True)
            if s > 0
        ]

    def similar(self, text: str, threshold: float) -> list[tuple[Item, float]]:
        """Live items whose embedding cosine with ``text`` is >= ``threshold``, best first.

        [] without an embedder, or when embedding fails (then nothing gets merged).
        """
        self._refresh_index()
        if self._embedder is None or not self._indexed:
            return []
        try:
            cosines = self._cosines(self._embedder, text)
        except Exception as e:  # as in retrieve: a lesson kept apart beats a crashed run
            _log.warning("embedding similarity failed: %r", e)
            return []
        return [(self._indexed[p], c) for p, c in cosines if c >= threshold]
