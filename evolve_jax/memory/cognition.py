"""The cognition base: prior knowledge seeded per search space, plus the Analyzer's lessons.

Retrieval is BM25 (bm25s) over title, tags and content. Lessons are persisted in the
experiment history as write-once records, each with its provenance (node ids and time); a
lesson that restates an earlier one under the same ``key`` supersedes it at retrieval time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import bm25s

from evolve_jax.memory.history import History

# bm25s logs every index build at DEBUG through the root logger; keep run logs readable.
logging.getLogger("bm25s").setLevel(logging.WARNING)


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


def _tokens(texts: Sequence[str]):
    return bm25s.tokenize(list(texts), stopwords="en", show_progress=False)


class Cognition:
    """Items in memory, a BM25 index over them, and write-back of lessons to the history."""

    def __init__(self, items: Iterable[Item] = (), history: History | None = None):
        self._items: dict[str, Item] = {}
        self._history = history
        self._index: bm25s.BM25 | None = None
        self._indexed: list[Item] = []
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

    def _live(self) -> list[Item]:
        """Items with superseded lessons dropped (newest per key) and identical texts merged."""
        newest: dict[str, Item] = {}
        for item in self._items.values():
            if item.key is None:
                continue
            held = newest.get(item.key)
            if held is None or item.provenance.get("time", 0) >= held.provenance.get("time", 0):
                newest[item.key] = item
        # Prior knowledge in file order, then lessons by id: the same order however the items
        # arrived (live or reloaded on resume), so retrieval ties break the same way.
        prior = [i for i in self._items.values() if i.source != "analyzer"]
        lessons = sorted(
            (i for i in self._items.values() if i.source == "analyzer"), key=lambda i: i.id
        )
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

    def retrieve(self, query: str, k: int = 5, max_chars: int = 600) -> list[Item]:
        """The ``k`` items most relevant to ``query`` (score > 0), each clipped to ``max_chars``."""
        if self._index is None:
            self._indexed = self._live()
            if self._indexed:
                self._index = bm25s.BM25()
                docs = [f"{i.title} {' '.join(i.tags)} {i.content}" for i in self._indexed]
                self._index.index(_tokens(docs), show_progress=False)
        if self._index is None or not query.strip():
            return []
        k = min(k, len(self._indexed))
        docs, scores = self._index.retrieve(_tokens([query]), k=k, show_progress=False)
        return [
            self._indexed[int(d)].clipped(max_chars)
            for d, s in zip(docs[0], scores[0], strict=True)
            if s > 0
        ]
