"""The experiment history: an append-only TensorStore OCDBT key-value store.

Layout (all values JSON, but for a quarantined record, kept as it was):
  meta                          written once: format, search space, score direction
  counters/next_node            next node id, advanced by compare-and-swap
  nodes/<id:010d>               one node, written once, in the same atomic transaction as
                                the counter that allocated its id and its slot key
  slots/<run>/<step>/<slot>     the id of the node that filled a loop's (run, step, slot): a
                                second writer of the same slot is refused, whoever it is
  leases/<run>                  which process drives a run, renewed while it lives (lease.py)
  stages/<id:010d>/<stage:02d>  a promoted node's result at a costlier stage, written once
  records/<kind>/<key>          other write-once records (island migrations, lessons, ...)
  quarantine/<id:010d>          a node's record, bytes as they were, moved out of nodes/ by
                                ``History.quarantine`` (the history CLI's --quarantine=ID), for
                                one that cannot be read; its id and slot stay taken

Nothing but a lease is ever rewritten, and nothing but a quarantined node's key is ever
deleted, so an append costs the same at node 100 and node 100,000, a killed writer leaves either
a whole node or none, and writers in several processes (or hosts sharing a gs:// workdir) only
ever race on the counter, which they retry, and on a slot, which the loser gives up.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import tensorstore as ts

from evolve_jax import storage

FORMAT = 1
STATUSES = ("ok", "invalid", "failed", "timeout")
_NODE_PREFIX = b"nodes/"
_STAGE_PREFIX = b"stages/"
_COUNTER = b"counters/next_node"
_SLOT_PREFIX = b"slots/"
_QUARANTINE_PREFIX = b"quarantine/"
_MAX_CAS_ATTEMPTS = 10_000


class HistoryError(RuntimeError):
    """The store cannot be opened or used as asked."""


class CorruptRecordError(HistoryError):
    """A stored value cannot be decoded; the message names its key (``key``)."""

    def __init__(self, message: str, key: bytes | None = None):
        super().__init__(message)
        self.key = key


class SlotTaken(HistoryError):
    """Another writer committed this (run, step, slot) first; ``node_id`` is its node."""

    def __init__(self, slot: bytes, node_id: int):
        super().__init__(f"{slot.decode()} is already node {node_id}")
        self.node_id = node_id


@dataclasses.dataclass
class Node:
    """One experiment: a candidate, where it came from, and what happened to it.

    ``metrics[stage][seed][metric]``; ``score`` is higher-is-better in ``meta.direction`` terms,
    and a failure's score is the worst value for that direction (never a literal 0).
    """

    id: int
    parents: list[int]
    search_space: str
    name: str
    motivation: str
    candidate: Any
    status: str
    reason: str | None
    metrics: dict[str, dict[str, dict[str, float | None]]]
    score: float
    stats: dict[str, Any]
    analysis: str
    timings: dict[str, float]
    island: int
    created: float
    operator: str | None = None
    origin: dict[str, Any] = dataclasses.field(default_factory=dict)
    descriptor: list[float] = dataclasses.field(default_factory=list)
    cognition_ids: list[str] = dataclasses.field(default_factory=list)
    # Results at costlier stages, filled from stages/ keys: {stage_index: record}.
    stages: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record.pop("stages")
        return _finite_or_none(record)

    def summary(self) -> dict[str, Any]:
        """The flat view printed by the history CLI (one JSON object per node)."""
        record = self.to_json()
        record["stages"] = {str(k): _finite_or_none(v) for k, v in sorted(self.stages.items())}
        return record


def _finite_or_none(value: Any) -> Any:
    """JSON has no inf/nan (jq and pandas choke on them): store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def worst_score(direction: str) -> float:
    return -math.inf if direction == "max" else math.inf


def _node_key(node_id: int) -> bytes:
    return b"%s%010d" % (_NODE_PREFIX, node_id)


def _quarantine_key(node_id: int) -> bytes:
    return b"%s%010d" % (_QUARANTINE_PREFIX, node_id)


def _stage_key(node_id: int, stage: int) -> bytes:
    return b"%s%010d/%02d" % (_STAGE_PREFIX, node_id, stage)


def _slot_key(origin: Mapping[str, Any]) -> bytes | None:
    """The key of a loop's (run, step, slot); None for nodes without one."""
    if not {"run", "step", "slot"} <= set(origin):
        return None
    return b"%s%s/%06d/%06d" % (
        _SLOT_PREFIX,
        str(origin["run"]).encode(),
        origin["step"],
        origin["slot"],
    )


def kvstore_url(workdir: str) -> str:
    """The OCDBT base URL of a workdir's history (see evolve_jax.storage)."""
    try:
        return storage.store_url(workdir, "history")
    except storage.StorageError as e:
        raise HistoryError(str(e)) from e


class History:
    """The experiment history of one workdir. Reads are incremental; writes are append-only."""

    def __init__(self, workdir: str, *, create: bool = True, salvage: bool = False):
        """``salvage``: read what can be read (for reports). A record that is not UTF-8 is
        decoded with U+FFFD in place of its bad bytes, one that is not a node is skipped, and
        ``problems`` says which and why; otherwise either raises CorruptRecordError."""
        self.workdir = workdir
        self.salvage = salvage
        self.problems: dict[str, str] = {}
        url = kvstore_url(workdir)
        local = storage.local_path(url)
        if not create and local is not None and not os.path.isdir(local):
            raise HistoryError(f"no experiment history under {workdir!r}")
        try:
            self._kv = storage.open_kvstore(url, "experiment history")
        except storage.StorageError as e:
            raise HistoryError(str(e)) from e
        self._nodes: dict[int, Node] = {}
        self._last_key = b""
        self._meta: dict[str, Any] | None = None

    # ----------------------------------------------------------------- metadata

    @property
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            self._meta = self._read_json(b"meta")
        if self._meta is None:
            raise HistoryError(f"the history under {self.workdir!r} has not been initialised")
        return self._meta

    def initialise(self, search_space: str, direction: str) -> dict[str, Any]:
        """Writes the store's metadata once; later runs must name the same search space."""
        meta = {
            "format": FORMAT,
            "search_space": search_space,
            "direction": direction,
            "created": time.time(),
        }
        self.write_once(b"meta", meta)
        stored = self._read_json(b"meta")
        if stored["search_space"] != search_space:
            raise HistoryError(
                f"workdir {self.workdir!r} holds a {stored['search_space']!r} history, "
                f"not {search_space!r}: use another --workdir"
            )
        if stored.get("format") != FORMAT:
            raise HistoryError(f"history format {stored.get('format')} is not {FORMAT}")
        self._meta = stored
        return stored

    @property
    def direction(self) -> str:
        return self.meta["direction"]

    # ----------------------------------------------------------------- reading

    @property
    def kvstore(self) -> ts.KvStore:
        """The store itself, for records with their own protocol (lease.py)."""
        return self._kv

    def _decode(self, key: bytes, value: bytes) -> Any:
        try:
            return json.loads(value)
        except UnicodeDecodeError as e:
            if self.salvage:
                self.problems[key.decode()] = f"not UTF-8 ({e.reason} at byte {e.start})"
                return self._decode(key, value.decode("utf-8", "replace").encode())
            error: Exception = e
        except json.JSONDecodeError as e:
            error = e
        raise CorruptRecordError(
            f"corrupted record {key.decode()!r} in {self._kv.base.url}: {error}", key
        ) from error

    def _read_json(self, key: bytes) -> Any:
        result = self._kv.read(key).result()
        if result.state != "value":
            return None
        return self._decode(key, result.value)

    def _read_many(self, keys: list[bytes]) -> list[tuple[bytes, Any]]:
        futures = [self._kv.read(k) for k in keys]  # issued together, awaited together
        pairs = []
        for key, future in zip(keys, futures, strict=True):
            try:
                pairs.append((key, self._decode(key, future.result().value)))
            except CorruptRecordError as e:
                if not self.salvage:
                    raise
                self.problems[key.decode()] = str(e)
        return pairs

    def _node_from_json(self, key: bytes, record: Mapping[str, Any]) -> Node:
        fields = {f.name for f in dataclasses.fields(Node)} - {"stages"}
        if not isinstance(record, Mapping):
            raise CorruptRecordError(f"corrupted record {key.decode()!r}: not a JSON object", key)
        missing = {"id", "parents", "name", "status", "candidate"} - set(record)
        if missing:
            raise CorruptRecordError(
                f"corrupted record {key.decode()!r}: missing fields {sorted(missing)}", key
            )
        try:
            node = Node(**{k: v for k, v in record.items() if k in fields})
        except TypeError as e:
            raise CorruptRecordError(f"corrupted record {key.decode()!r}: {e}", key) from e
        if node.score is None:
            node.score = worst_score(self.direction)
        return node

    def refresh(self) -> list[Node]:
        """Loads nodes appended since the last refresh (by any process); returns them."""
        key_range = ts.KvStore.KeyRange(
            inclusive_min=self._last_key + b"\0" if self._last_key else _NODE_PREFIX,
            exclusive_max=b"nodes0",  # '0' follows '/'
        )
        keys = sorted(self._kv.list(key_range).result())
        fresh = []
        try:
            pairs = self._read_many(keys)
        except CorruptRecordError as e:
            raise self._unreadable_node(e) from e
        for key, record in pairs:
            try:
                node = self._node_from_json(key, record)
            except CorruptRecordError as e:
                if not self.salvage:
                    raise self._unreadable_node(e) from e
                self.problems[key.decode()] = str(e)
                continue
            self._nodes[node.id] = node
            fresh.append(node)
        if keys:
            self._last_key = keys[-1]
        if fresh:
            self._load_stages(fresh)
        return fresh

    def _unreadable_node(self, error: CorruptRecordError) -> CorruptRecordError:
        """``error`` with the way on: the command that quarantines the node."""
        node_id = int(error.key[len(_NODE_PREFIX) :])
        return CorruptRecordError(
            f"{error}; node {node_id} cannot be read. To go on without it (its record kept under "
            f"{_quarantine_key(node_id).decode()}, its slot not redone), run: python -m "
            f"evolve_jax.history --workdir={self.workdir} --quarantine={node_id}",
            error.key,
        )

    def quarantine(self, node_id: int) -> str:
        """Moves node ``node_id``'s record, whatever its bytes, from ``nodes/`` to
        ``quarantine/`` in one atomic transaction; returns the new key. Nothing else changes:
        the id is not allocated again, the (run, step, slot) it filled stays claimed (a
        resumed run does not redo it), its stage results stay where they are. Readers skip it
        from then on; ``quarantined`` lists it."""
        key, dest = _node_key(node_id), _quarantine_key(node_id)
        read = self._kv.read(key).result()
        if read.state != "value":
            if self._kv.read(dest).result().state == "value":
                raise HistoryError(f"node {node_id} is quarantined already ({dest.decode()})")
            raise HistoryError(f"no node {node_id} in the history under {self.workdir!r}")
        try:
            with ts.Transaction(atomic=True) as txn:
                kv = self._kv.with_transaction(txn)
                kv.write(dest, read.value, if_equal=storage.ABSENT)
                kv.write(key, None, if_equal=read.stamp.generation)
        except ValueError as e:
            raise HistoryError(f"could not quarantine node {node_id}: {e}") from e
        self._nodes.pop(node_id, None)
        return dest.decode()

    def quarantined(self) -> dict[int, bytes]:
        """Quarantined node id -> its record's bytes, as they were in ``nodes/``."""
        keys = sorted(
            self._kv.list(
                ts.KvStore.KeyRange(inclusive_min=_QUARANTINE_PREFIX, exclusive_max=b"quarantine0")
            ).result()
        )
        futures = [self._kv.read(k) for k in keys]
        return {
            int(k[len(_QUARANTINE_PREFIX) :]): f.result().value
            for k, f in zip(keys, futures, strict=True)
        }

    def slot_claims(self, run: str) -> dict[tuple[int, int], int]:
        """(step, slot) -> the id of the node that filled it, for every slot ``run`` claimed."""
        prefix = _SLOT_PREFIX + run.encode() + b"/"
        keys = self._kv.list(
            ts.KvStore.KeyRange(inclusive_min=prefix, exclusive_max=prefix[:-1] + b"0")
        ).result()
        futures = [(k, self._kv.read(k)) for k in sorted(keys)]
        claims = {}
        for key, future in futures:
            step, slot = key[len(prefix) :].split(b"/")
            claims[(int(step), int(slot))] = int(future.result().value)
        return claims

    def refresh_stages(self) -> None:
        """Re-reads promoted-stage results of every loaded node."""
        self._load_stages(self._nodes.values())

    def _load_stages(self, nodes: Iterable[Node]) -> None:
        ids = {n.id for n in nodes}
        if not ids:
            return
        key_range = ts.KvStore.KeyRange(
            inclusive_min=_stage_key(min(ids), 0), exclusive_max=b"stages0"
        )
        keys = [k for k in self._kv.list(key_range).result() if int(k[7:17]) in ids]
        for key, record in self._read_many(sorted(keys)):
            self._nodes[int(key[7:17])].stages[int(key[18:20])] = record

    def nodes(self, refresh: bool = True) -> list[Node]:
        """Every node, in id order; ``refresh=False`` skips reading the store."""
        if refresh:
            self.refresh()
        return [self._nodes[i] for i in sorted(self._nodes)]

    def cached(self) -> dict[int, Node]:
        """Nodes loaded so far, without touching the store."""
        return self._nodes

    def get(self, node_id: int) -> Node:
        if node_id not in self._nodes:
            self.refresh()
        return self._nodes[node_id]

    # ----------------------------------------------------------------- writing

    def append(self, **fields: Any) -> Node:
        """Allocates the next id and commits the node in one atomic transaction; returns it.

        A node whose ``origin`` names a (run, step, slot) also claims that slot in the same
        transaction: if another writer filled it first, nothing is written and ``SlotTaken``
        names the node that did.
        """
        slot = _slot_key(fields.get("origin") or {})
        for _ in range(_MAX_CAS_ATTEMPTS):
            counter = self._kv.read(_COUNTER).result()
            node_id = int(counter.value) if counter.state == "value" else 0
            node = Node(id=node_id, **fields)
            if node.status not in STATUSES:
                raise ValueError(f"status {node.status!r} is not one of {STATUSES}")
            value = json.dumps(node.to_json(), sort_keys=True, allow_nan=False).encode()
            try:
                with ts.Transaction(atomic=True) as txn:
                    kv = self._kv.with_transaction(txn)
                    kv.write(_COUNTER, b"%d" % (node_id + 1), if_equal=counter.stamp.generation)
                    kv.write(_node_key(node_id), value, if_equal=storage.ABSENT)
                    if slot is not None:
                        kv.write(slot, b"%d" % node_id, if_equal=storage.ABSENT)
            except ValueError as e:
                if "mismatch" not in str(e).lower() and "ABORTED" not in str(e):
                    raise
                taken = self._kv.read(slot).result() if slot is not None else None
                if taken is not None and taken.state == "value":
                    raise SlotTaken(slot, int(taken.value)) from None
                continue  # another writer took this id first: read the counter again
            self._nodes[node_id] = node
            return node
        raise HistoryError("could not allocate a node id: too many concurrent writers")

    def add_stage_result(self, node_id: int, stage: int, record: Mapping[str, Any]) -> bool:
        """Records a promoted node's result at ``stage`` once; False if it was already there."""
        written = self.write_once(_stage_key(node_id, stage), record)
        if node_id in self._nodes:
            self._nodes[node_id].stages[stage] = self._read_json(_stage_key(node_id, stage))
        return written

    def write_once(self, key: bytes | str, value: Any) -> bool:
        """Writes ``value`` at ``key`` unless the key exists; returns whether it was written."""
        key = key.encode() if isinstance(key, str) else key
        data = json.dumps(_finite_or_none(value), sort_keys=True, allow_nan=False).encode()
        stamp = self._kv.write(key, data, if_equal=storage.ABSENT).result()
        return bool(stamp.generation)

    def records(self, kind: str) -> list[tuple[str, Any]]:
        """Every ``records/<kind>/...`` value, sorted by key."""
        prefix = f"records/{kind}/".encode()
        keys = self._kv.list(
            ts.KvStore.KeyRange(inclusive_min=prefix, exclusive_max=prefix[:-1] + b"0")
        ).result()
        return [(k[len(prefix) :].decode(), v) for k, v in self._read_many(sorted(keys))]

    def write_record(self, kind: str, key: str, value: Any) -> bool:
        return self.write_once(f"records/{kind}/{key}", value)
