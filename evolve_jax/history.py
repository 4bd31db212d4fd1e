"""Prints the experiment history: one JSON object per node (for jq or pandas.read_json(lines=True)).

python -m evolve_jax.history --workdir=W [--status=ok] [--sort=score] [--limit=10]
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
    for node in nodes:
        print(json.dumps(node.summary(), sort_keys=True))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
