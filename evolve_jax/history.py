"""Prints the experiment history: one JSON object per node (for jq or pandas.read_json(lines=True)),
or a table to read.

python -m evolve_jax.history --workdir=W [--status=ok] [--sort=score] [--limit=10]
python -m evolve_jax.history --workdir=W --format=table [--fields=id,name,score,reason]
python -m evolve_jax.history --workdir=W --quarantine=ID   # set an unreadable node aside
python -m evolve_jax.history --workdir=W --quarantined     # the nodes set aside, as JSON lines
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from evolve_jax.cli import parse_flags
from evolve_jax.memory.history import History, HistoryError
from evolve_jax.memory.lease import live_runs
from evolve_jax.report import ranked

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (a path or gs:// URL).")
_STATUS = flags.DEFINE_multi_enum(
    "status", [], ["ok", "invalid", "failed", "timeout"], "Only nodes with this status."
)
_SORT = flags.DEFINE_enum("sort", "id", ["id", "score"], "Order: node id, or best score first.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Print at most this many nodes (0: all).", lower_bound=0)
_RUN = flags.DEFINE_string("run_name", None, "Only nodes of this run.")
_QUARANTINE = flags.DEFINE_integer(
    "quarantine",
    None,
    "Move this node's record (one that cannot be read) to quarantine/<id>, kept as it was; the "
    "driver, the report and this listing then leave the node out, its slot stays claimed (a "
    "resumed run does not redo it) and its id is not reused. Refused while a run is live.",
    lower_bound=0,
)
_FORMAT = flags.DEFINE_enum(
    "format", "jsonl", ["jsonl", "table"], "jsonl: a JSON object per node; table: a row each."
)
_FIELDS = flags.DEFINE_list(
    "fields",
    None,
    "The node fields to print, dotted into objects (origin.step, stages.1.score); default: "
    "all (jsonl) or id,origin.step,name,status,score,reason (table).",
)
_TABLE_FIELDS = ["id", "origin.step", "name", "status", "score", "reason"]
_CELL = 48  # characters a table cell shows; longer values end in "…"
_QUARANTINED = flags.DEFINE_bool(
    "quarantined", False, "Print the quarantined records instead: {id, key, record} per line."
)


def main(argv: list[str]) -> None:
    del argv
    if not _WORKDIR.value:
        print("error: --workdir is required", file=sys.stderr)
        sys.exit(2)
    try:
        history = History(_WORKDIR.value, create=False)
        direction = history.direction
        if _QUARANTINE.value is not None:
            if live := live_runs(history):
                raise HistoryError(f"run {live[0]!r} is live in this history: stop it first")
            key = history.quarantine(_QUARANTINE.value)
            print(f"node {_QUARANTINE.value} quarantined: its record is now {key}")
            return
        quarantined = history.quarantined()
        if _QUARANTINED.value:
            for node_id, raw in quarantined.items():
                record = raw.decode("utf-8", "replace")
                print(json.dumps({"id": node_id, "key": f"quarantine/{node_id:010d}",
                                  "record": record}, sort_keys=True))  # fmt: skip
            return
        nodes = history.nodes()
    except HistoryError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if quarantined:
        ids = ", ".join(map(str, quarantined))
        print(f"note: quarantined, left out: node(s) {ids} (--quarantined)", file=sys.stderr)
    if _STATUS.value:
        nodes = [n for n in nodes if n.status in _STATUS.value]
    if _RUN.value:
        nodes = [n for n in nodes if n.origin.get("run") == _RUN.value]
    if _SORT.value == "score":
        nodes = ranked(nodes, direction) + [n for n in nodes if not n.ok]
    if _LIMIT.value:
        nodes = nodes[: _LIMIT.value]
    records = [node.summary() for node in nodes]
    fields = _FIELDS.value or (_TABLE_FIELDS if _FORMAT.value == "table" else None)
    if fields:
        known = sorted(records[0]) if records else []
        for name in fields:
            if records and name.split(".")[0] not in records[0]:
                print(f"error: --fields: unknown field {name!r} (fields: {', '.join(known)})",
                      file=sys.stderr)  # fmt: skip
                sys.exit(2)
        records = [{name: _get(r, name) for name in fields} for r in records]
    if _FORMAT.value == "table":
        _print_table(records, fields or [])
        return
    for record in records:
        print(json.dumps(record, sort_keys=fields is None))


def _get(record: dict, dotted: str):
    """``record``'s value at a dotted path (None where the path ends early)."""
    value = record
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= _CELL else text[: _CELL - 1] + "…"


def _print_table(records: list[dict], fields: list[str]) -> None:
    rows = [[_cell(r[f]) for f in fields] for r in records]
    widths = [max([len(f)] + [len(row[i]) for row in rows]) for i, f in enumerate(fields)]
    print("  ".join(f.ljust(w) for f, w in zip(fields, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
