"""What the HTML report shows, read from a workdir's history into one JSON-ready payload.

Nodes travel as columns (one list per field) so that 10,000 of them stay a few megabytes and
parse in milliseconds; what only the detail panel needs (candidate, motivation, analysis,
per-seed metrics, lessons) travels separately, clipped to a per-node share of a byte budget.
Everything a reader cannot be shown (a missing history, an unreadable record, a clipped or
non-Unicode candidate) becomes a notice on the page instead of an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import time
import weakref
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from evolve_jax import fitness, rank_stats
from evolve_jax.memory.history import History, HistoryError, Node
from evolve_jax.memory.lease import live_runs
from evolve_jax.report import implausible_note
from evolve_jax.search_space import Metric, Stage, TaskDescription

# The detail texts of all nodes together (candidates, diffs, motivations, analyses) are clipped
# to this many characters, shared equally, and never more than MAX_NODE_TEXT per text.
DETAIL_BUDGET = 10_000_000
MAX_NODE_TEXT = 20_000
MIN_NODE_TEXT = 600
# Sources longer than this are not diffed (difflib is quadratic in the worst case).
MAX_DIFF_SOURCE = 200_000
MAX_NOTICES = 50
# Candidates as the panel shows them, by node id, kept for as long as their history is open:
# the driver rewrites the page after every step, and diffing every program again took two
# thirds of a 10,000-program rewrite. Each is at most about twice the candidate the history
# already holds.
_CANDIDATES: weakref.WeakKeyDictionary[History, dict] = weakref.WeakKeyDictionary()
_SURROGATE = re.compile("[\ud800-\udfff]")
_STAGE_FIELDS = ("status", "reason", "metrics", "seconds")


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _round(value: Any) -> Any:
    """Floats to 5 significant digits (what the page shows), recursively; bytes stay small."""
    if isinstance(value, float):
        return float(f"{value:.5g}") if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _round(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round(v) for v in value]
    return value


def _mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None where undefined), in plain Python: numpy's
    call overhead dominated for the two to five seeds a node has."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _unicode_safe(text: str) -> tuple[str, bool]:
    """``text`` with lone surrogates (text that was never valid Unicode) replaced; whether any
    were."""
    replaced, count = _SURROGATE.subn("\ufffd", text)
    return replaced, count == 0


def _clip(text: str, limit: int) -> tuple[str, int]:
    """``text`` cut to ``limit`` characters; the length it had."""
    return (text if len(text) <= limit else text[:limit]), len(text)


# ----------------------------------------------------------------------------- the task


def task_of(history: History, nodes: Sequence[Node]) -> tuple[TaskDescription | None, dict]:
    """The task as the newest run recorded it (``records/runs``), and that run record; else
    None and {} (a history written before runs were recorded)."""
    runs = history.records("runs")
    if not runs:
        return None, {}
    _, record = max(runs, key=lambda kv: kv[1].get("started", 0))
    stages = tuple(
        Stage(
            s["name"],
            s.get("description", ""),
            tuple(Metric(**m) for m in s["metrics"]),
        )
        for s in record["task"]["stages"]
    )
    return TaskDescription(record["task"]["title"], "", stages[0].metrics, stages), record


def _inferred_task(nodes: Sequence[Node], direction: str) -> TaskDescription:
    """A task guessed from the nodes (older histories): stage names from their records, each
    stage's primary metric from its fitness means, in the score's direction."""
    names: dict[int, str] = {}
    metrics: dict[int, str] = {}
    for node in nodes:
        for name in node.metrics:
            names.setdefault(0, name)
        metrics.setdefault(0, next(iter(node.stats.get("mean") or {}), None))
        for stage, record in node.stages.items():
            names.setdefault(stage, record.get("stage_name") or f"stage{stage}")
            metrics.setdefault(
                stage, next(iter((record.get("stats") or {}).get("mean") or {}), None)
            )
    count = max(names, default=0) + 1
    stages = tuple(
        Stage(names.get(s, f"stage{s}"), "", (Metric(metrics.get(s) or "score", direction),))
        for s in range(count)
    )
    return TaskDescription("search", "", stages[0].metrics, stages)


# ----------------------------------------------------------------------------- per node


def _stage_values(node: Node, stage: int, task: TaskDescription) -> tuple[list[float], str]:
    """The stage's primary metric per seed (finite values only) and the stage's status
    ("" when the node never ran it)."""
    metric = task.stage_metrics(stage)[0].name
    if stage == 0:
        by_seed, status = (node.metrics.get(task.stages[0].name, {}), node.status)
    else:
        record = node.stages.get(stage)
        if not record:
            return [], ""
        by_seed, status = record.get("metrics") or {}, record.get("status", "?")
    if status != "ok":
        return [], status
    values = [_finite((m or {}).get(metric)) for m in by_seed.values()]
    return [v for v in values if v is not None], status


def _paired(node: Node, stage: int, task: TaskDescription) -> dict | None:
    metric = task.stage_metrics(stage)[0].name
    stats = node.stats if stage == 0 else (node.stages.get(stage) or {}).get("stats") or {}
    paired = (stats.get("vs_baseline") or {}).get(metric)
    return _round(paired) if paired else None


@dataclasses.dataclass(frozen=True)
class _Candidate:
    """A candidate as the detail panel shows it, whole: fixed once the node is written."""

    kind: str  # "genome", "diff" or "source"
    text: str  # Unicode-safe
    changed: list[list[str]]  # genes that differ from the first parent's: [gene, before, after]
    notices: tuple[str, ...]


def _candidate_view(
    node: Node, parent: Node | None, limit: int, seen: dict[int, _Candidate]
) -> dict[str, Any]:
    """The candidate for the detail panel, its text clipped to ``limit``. ``seen``: candidates
    already made, by node id (made again only for new nodes)."""
    if node.id not in seen:
        seen[node.id] = _candidate(node, parent)
    candidate = seen[node.id]
    text, length = _clip(candidate.text, limit)
    notices = list(candidate.notices)
    if length > limit:
        notices.append(
            f"the {candidate.kind} is {length:,} characters; the first {limit:,} are shown "
            f"(all of it: python -m evolve_jax.history --workdir=...)"
        )
    return {"kind": candidate.kind, "text": text, "changed": candidate.changed, "notices": notices}


def _candidate(node: Node, parent: Node | None) -> _Candidate:
    """A genome as JSON with the genes that differ from its first parent; a program as a
    unified diff from its parent's (whole if a seed, or too long to diff)."""
    candidate, notices = node.candidate, []
    changed: list[list[str]] = []
    if isinstance(candidate, Mapping) and isinstance(candidate.get("source"), str):
        source = candidate["source"]
        parent_source = (
            parent.candidate.get("source")
            if parent is not None and isinstance(parent.candidate, Mapping)
            else None
        )
        if isinstance(parent_source, str) and max(len(source), len(parent_source)) <= (
            MAX_DIFF_SOURCE
        ):
            kind = "diff"
            lines = difflib.unified_diff(
                parent_source.splitlines(keepends=True),
                source.splitlines(keepends=True),
                f"node {parent.id}",
                f"node {node.id}",
            )
            text = "".join(lines) or "(the same program as its parent)\n"
        else:
            kind = "source"
            text = source
            if isinstance(parent_source, str):
                notices.append(
                    f"the program is {len(source):,} characters: shown whole, not as a diff"
                )
    else:
        kind = "genome"
        text = json.dumps(candidate, indent=1, sort_keys=True, default=str)
        if parent is not None and isinstance(candidate, Mapping):
            before = parent.candidate if isinstance(parent.candidate, Mapping) else {}
            for key in sorted(set(candidate) | set(before), key=str):
                if candidate.get(key) != before.get(key):
                    changed.append([str(key), _short(before.get(key)), _short(candidate.get(key))])
    text, ok = _unicode_safe(text)
    if not ok:
        notices.append("the candidate holds text that is not valid Unicode: shown with U+FFFD")
    return _Candidate(kind, text, changed[:50], tuple(notices))


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:79] + "…"


def _text(value: Any, limit: int) -> str:
    text, _ = _unicode_safe(str(value or ""))
    text, length = _clip(text, limit)
    return text + (f" … ({length - limit:,} more characters)" if length > limit else "")


# ----------------------------------------------------------------------------- the payload


def collect(
    workdir: str, *, live: bool | None = None, history: History | None = None
) -> dict[str, Any]:
    """The report's payload for ``workdir``. ``live``: whether the search is going on (None:
    ask the history whether a live process holds a run's lease). ``history``: the workdir's
    history already open (the driver's), which reads only the nodes added since its last read;
    by default it is opened here and read whole."""
    payload: dict[str, Any] = {
        "workdir": workdir,
        "generated": time.time(),
        "notices": [],
        "nodes": None,
    }
    try:
        history = history or History(workdir, create=False, salvage=True)
        direction = history.direction
        nodes = history.nodes()
    except HistoryError as e:
        payload.update(live=False, title="no history")
        payload["notices"].append(f"Nothing to show: {e}.")
        return payload
    for key, problem in sorted(history.problems.items())[:MAX_NOTICES]:
        payload["notices"].append(f"Record {key}: {problem}")
    for node_id in history.quarantined():
        payload["notices"].append(
            f"Node {node_id} is quarantined (its record is kept as it was under "
            f"quarantine/{node_id:010d}; python -m evolve_jax.history --quarantined prints it): "
            "it is left out here."
        )
    if live is None:
        live = bool(live_runs(history))
    task, run_record = task_of(history, nodes)
    if task is None:
        task = _inferred_task(nodes, direction)
        payload["notices"].append(
            "This history does not record how its stages are measured (it predates the "
            "report): stage names and the primary metric are inferred from the nodes."
        )
    payload.update(
        live=live,
        title=task.title,
        search_space=history.meta.get("search_space"),
        direction=direction,
        stages=[
            {
                "name": stage.name,
                "description": stage.description,
                "metric": task.stage_metrics(i)[0].name,
                "metric_direction": task.stage_metrics(i)[0].direction,
            }
            for i, stage in enumerate(task.stages)
        ],
        settings=run_record.get("settings", {}),
    )
    if not nodes:
        payload["notices"].append("The history holds no nodes yet.")
    elif not any(n.ok for n in nodes):
        payload["notices"].append(
            f"None of the {len(nodes)} nodes succeeded: there is no fitness to plot or rank; "
            "the leaderboard lists them with their reasons."
        )
    lessons = [record for _, record in history.records("lessons")]
    payload["nodes"] = _columns(nodes, task)
    seen = _CANDIDATES.setdefault(history, {})
    payload["details"] = _details(nodes, lessons, run_record, payload["notices"], seen)
    payload["tree"] = _tree(nodes)
    payload["correlations"] = _correlations(nodes, task)
    payload["operators"] = _operators(nodes, direction)
    payload["lessons"] = [
        {
            "id": r.get("id"),
            "title": _text(r.get("title"), 300),
            "content": _text(r.get("content"), 2000),
            "tags": r.get("tags", []),
            "nodes": (r.get("provenance") or {}).get("nodes", []),
            "time": (r.get("provenance") or {}).get("time"),
            "key": r.get("key"),
        }
        for r in lessons
    ]
    payload["prior_knowledge"] = run_record.get("prior_knowledge", [])
    payload["time"] = _time_and_cost(nodes, history)
    if len(payload["notices"]) > MAX_NOTICES:
        extra = len(payload["notices"]) - MAX_NOTICES
        payload["notices"] = [*payload["notices"][:MAX_NOTICES], f"… and {extra} more notices"]
    return payload


def _columns(nodes: Sequence[Node], task: TaskDescription) -> dict[str, list]:
    columns: dict[str, list] = defaultdict(list)
    for node in nodes:
        columns["id"].append(node.id)
        columns["name"].append(_text(node.name, 200))
        columns["status"].append(node.status)
        # A success's reason is its implausible flag (report.implausible_note), if it has one.
        reason = node.reason or implausible_note(node)
        columns["reason"].append(_text(reason, 300) if reason else None)
        columns["score"].append(_round(_finite(node.score)))
        columns["parents"].append(list(node.parents))
        columns["operator"].append(node.operator)
        columns["island"].append(node.island)
        columns["created"].append(round(node.created, 2) if node.created else None)
        columns["run"].append(node.origin.get("run"))
        columns["step"].append(node.origin.get("step"))
        for stage in range(len(task.stages)):
            values, status = _stage_values(node, stage, task)
            mean, sd = _mean_sd(values)
            columns[f"s{stage}_mean"].append(_round(mean))
            columns[f"s{stage}_sd"].append(_round(sd))
            columns[f"s{stage}_n"].append(len(values))
            columns[f"s{stage}_status"].append(status)
            columns[f"s{stage}_vs"].append(_paired(node, stage, task))
            record = node.stages.get(stage) if stage else None
            columns[f"s{stage}_created"].append(
                round(record["created"], 2) if record and record.get("created") else None
            )
    return dict(columns)


def _details(
    nodes: Sequence[Node],
    lessons: Sequence[dict],
    run_record: dict,
    notices: list[str],
    seen: dict[int, _Candidate],
) -> list[dict]:
    by_id = {n.id: n for n in nodes}
    titles = {k["id"]: k["title"] for k in run_record.get("prior_knowledge", [])}
    titles.update({r.get("id"): r.get("title") for r in lessons})
    produced: dict[int, list[str]] = defaultdict(list)
    for record in lessons:
        for node_id in (record.get("provenance") or {}).get("nodes", []):
            produced[node_id].append(record.get("id"))
    limit = int(min(MAX_NODE_TEXT, max(MIN_NODE_TEXT, DETAIL_BUDGET / max(1, 3 * len(nodes)))))
    details = []
    for node in nodes:
        parent = next((by_id[p] for p in node.parents if p in by_id), None)
        view = _candidate_view(node, parent, limit, seen)
        for notice in view["notices"]:
            notices.append(f"Node {node.id}: {notice}.")
        reason = node.reason or implausible_note(node)
        details.append(
            {
                "candidate": view,
                "motivation": _text(node.motivation, limit),
                "analysis": _text(node.analysis, limit),
                "reason": _text(reason, limit) if reason else None,
                "metrics": _round(node.metrics),
                "stages": {
                    str(s): _round(
                        {k: r.get(k) for k in ("status", "reason", "metrics", "seconds")}
                    )
                    for s, r in sorted(node.stages.items())
                },
                "timings": _round(node.timings),
                "llm": _round(node.stats.get("llm")),
                "repairs": node.stats.get("repairs"),
                "used": [
                    [i, _text(titles.get(i, "(not in this history)"), 200)]
                    for i in node.cognition_ids
                ],
                "produced": [[i, _text(titles.get(i), 200)] for i in produced.get(node.id, [])],
                "origin": node.origin,
            }
        )
    return details


def _tree(nodes: Sequence[Node]) -> dict[str, list]:
    """The lineage drawn as a tree over time: x is the node id (evaluation order), y the
    node's row in a depth-first walk from each root, so a family sits on adjacent rows."""
    ids = {n.id for n in nodes}
    children: dict[int, list[int]] = defaultdict(list)
    roots = []
    for node in nodes:
        first = next((p for p in node.parents if p in ids), None)
        if first is None:
            roots.append(node.id)
        else:
            children[first].append(node.id)
    row: dict[int, int] = {}
    stack = list(reversed(roots))
    while stack:  # iterative: lineages can be deeper than Python's recursion limit
        node_id = stack.pop()
        row[node_id] = len(row)
        stack.extend(reversed(children[node_id]))
    return {"row": [row[n.id] for n in nodes]}


def _correlations(nodes: Sequence[Node], task: TaskDescription) -> list[dict]:
    """Per later stage: each node with both stages' primary metrics (means over seeds), and
    the Spearman correlation (both signed higher-is-better) with its bootstrap CI and n."""
    out = []
    for stage in range(1, len(task.stages)):
        points = []
        for node in nodes:
            cheap, _ = _stage_values(node, 0, task)
            costly, _ = _stage_values(node, stage, task)
            if cheap and costly:
                points.append([node.id, _mean_sd(cheap)[0], _mean_sd(costly)[0]])
        signs = [1.0 if task.stage_metrics(s)[0].direction == "max" else -1.0 for s in (0, stage)]
        agreement = rank_stats.agreement(
            [signs[0] * p[1] for p in points], [signs[1] * p[2] for p in points]
        )
        out.append(
            {
                "stage": stage,
                "points": _round(points),
                "spearman": _finite(agreement.value),
                "ci95": [_finite(agreement.low), _finite(agreement.high)],
                "n": agreement.n,
                "text": agreement.text(),
            }
        )
    return out


def _operators(nodes: Sequence[Node], direction: str) -> list[dict]:
    """Per operator: children made, how many ran, how many beat their first parent, and the
    mean score gain over that parent with a 95% t interval (children and parents that ran)."""
    by_id = {n.id: n for n in nodes}
    groups: dict[str, list[Node]] = defaultdict(list)
    for node in nodes:
        if node.operator:
            groups[node.operator].append(node)
    rows = []
    for name, children in sorted(groups.items()):
        pairs = [
            (c.score, by_id[c.parents[0]].score)
            for c in children
            if c.ok and c.parents and c.parents[0] in by_id and by_id[c.parents[0]].ok
        ]
        gain = fitness.paired_difference([a for a, _ in pairs], [b for _, b in pairs], direction)
        rows.append(
            {
                "operator": name,
                "uses": len(children),
                "ok": sum(c.ok for c in children),
                "wins": sum((a > b) if direction == "max" else (a < b) for a, b in pairs),
                "mean_gain": _round(_finite(gain["mean_diff"])),
                "ci95": [_round(_finite(x)) for x in gain["ci95"]],
                "n": gain["n"],
            }
        )
    return rows


def _time_and_cost(nodes: Sequence[Node], history: History) -> list[dict]:
    """Per run: seconds spent designing, evaluating (stage 0), at later stages and compiling
    (where recorded), and LLM calls, tokens and estimated USD."""
    runs: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for node in nodes:
        run = runs[str(node.origin.get("run", "?"))]
        run["nodes"] += 1
        run["design_s"] += _finite(node.timings.get("design")) or 0.0
        run["evaluate_s"] += _finite(node.timings.get("evaluate")) or 0.0
        run["later_stages_s"] += sum(_finite(r.get("seconds")) or 0.0 for r in node.stages.values())
        for key, value in (node.stats.get("llm") or {}).items():
            run[f"llm_{key}"] += _finite(value) or 0.0
    for key, record in history.records("llm_step_usage"):
        run = runs[key.split("/")[0]]
        for field, value in record.items():
            run[f"llm_{field}"] += _finite(value) or 0.0
    compiled = history.records("compile")
    for key, record in compiled:
        runs[key.split("/")[0]]["compile_s"] += _finite(record.get("seconds")) or 0.0
    rows = []
    for name, values in sorted(runs.items()):
        # Counts stay exact; seconds to the hundredth, dollars to the micro-dollar.
        row = {
            "run": name,
            **{
                k: round(v, 6 if k == "llm_usd" else 2) if k.endswith(("_s", "usd")) else int(v)
                for k, v in values.items()
            },
        }
        row["compile_recorded"] = any(k.split("/")[0] == name for k, _ in compiled)
        rows.append(row)
    return rows
