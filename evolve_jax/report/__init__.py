"""What a person reads at the end of a run: the top candidates, and whether stages agree."""

from __future__ import annotations

import math
from collections.abc import Sequence

from evolve_jax import rank_stats, storage
from evolve_jax.memory.history import Node
from evolve_jax.sampling import awaiting_remeasure
from evolve_jax.search_space import TaskDescription


def clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def ranked(nodes: Sequence[Node], direction: str) -> list[Node]:
    sign = 1.0 if direction == "max" else -1.0
    return sorted((n for n in nodes if n.ok), key=lambda n: (-sign * n.score, n.id))


def stage_correlation(
    nodes: Sequence[Node], task: TaskDescription, stage: int = 1
) -> rank_stats.Agreement:
    """Spearman rank correlation (bootstrap CI) between stage 0's and ``stage``'s primary
    metrics (means over seeds, signed so higher is better) over the nodes that have both.

    Raw metrics, not scores: normalised scores saturate far from the baseline, and the ties
    that makes would hide how the stages order the nodes there.
    """
    signs = [1.0 if task.stage_metrics(s)[0].direction == "max" else -1.0 for s in (0, stage)]
    pairs = []
    for node in nodes:
        cheap, costly = _mean_metric(node, 0, task), _mean_metric(node, stage, task)
        if cheap is not None and costly is not None:
            pairs.append((signs[0] * cheap, signs[1] * costly))
    return rank_stats.agreement([a for a, _ in pairs], [b for _, b in pairs])


def _mean_metric(node: Node, stage: int, task: TaskDescription) -> float | None:
    """The stage's primary metric, mean over seeds; None if the node has no successful result
    there."""
    metric = task.stage_metrics(stage)[0]
    if stage == 0:
        by_seed = node.metrics.get(task.stages[0].name, {}) if node.ok else {}
    else:
        record = node.stages.get(stage) or {}
        by_seed = (record.get("metrics") or {}) if record.get("status") == "ok" else {}
    values = [m.get(metric.name) for m in by_seed.values()]
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def stage_metric(node: Node, stage: int, task: TaskDescription, digits: int = 4) -> str:
    """The stage's primary metric, mean over seeds, to ``digits`` significant digits, or the
    stage's status when it has none."""
    value = _mean_metric(node, stage, task)
    if value is not None:
        return f"{value:.{digits}g}"
    record = node.stages.get(stage)
    return record.get("status", "?") if stage and record else "-"


def column_digits(values: Sequence[float | None]) -> int:
    """The fewest significant digits, from 4 to 10, at which a column's distinct values print
    distinct: a reader compares rows by what is printed, and on some tasks (circle packing's
    sum of radii) candidates differ only in the sixth decimal. 10 when even that ties them."""
    distinct = {v for v in values if v is not None and math.isfinite(v)}
    for digits in range(4, 10):
        if len({f"{v:.{digits}g}" for v in distinct}) == len(distinct):
            return digits
    return 10


def implausible_note(node: Node) -> str | None:
    """What a reader should know about a node flagged implausibly good when it was recorded
    (``stats["implausible"]``, loop.py); None for a node never flagged."""
    flag = node.stats.get("implausible")
    if not flag:
        return None
    gain = flag.get("gain")
    gain = f"{gain:.3g}" if gain is not None else "inf"
    what = (
        f"implausible: {flag.get('metric')} {flag.get('value'):.4g} against the best "
        f"{flag.get('best'):.4g} (node {flag.get('best_node')}), gain {gain} > "
        f"{flag.get('threshold'):.3g}"
    )
    if awaiting_remeasure(node):
        status = (node.stages.get(1) or {}).get("status")
        return f"{what}; {status} at stage 1" if status else f"{what}; not re-measured yet"
    return f"{what}; re-measured ok at stage 1"


def render(
    nodes: Sequence[Node], direction: str, task: TaskDescription, k: int, workdir: str
) -> str:
    """A plain-text table of the top ``k`` candidates with every stage's metric (mean over
    seeds), and how well stage 0 ranks the nodes the way each later stage does."""
    counts = {s: sum(n.status == s for n in nodes) for s in ("ok", "invalid", "failed", "timeout")}
    metrics = [task.stage_metrics(s)[0].name for s in range(len(task.stages))]
    # Headed by stage, since stages may share a metric (a short and a long run of one task).
    headers = [f"s{s}:{m}" for s, m in enumerate(metrics)]
    top = ranked(nodes, direction)[:k]
    score_digits = column_digits([n.score for n in top])
    digits = [column_digits([_mean_metric(n, s, task) for n in top]) for s in range(len(metrics))]
    cells = [[stage_metric(n, s, task, d) for s, d in enumerate(digits)] for n in top]
    scores = [f"{n.score:.{score_digits}g}" for n in top]
    score_width = max([9, *map(len, scores)])
    widths = [max([9, len(h), *(len(row[s]) for row in cells)]) for s, h in enumerate(headers)]
    lines = [
        f"{task.title}: {len(nodes)} nodes ("
        + ", ".join(f"{v} {s}" for s, v in counts.items() if v)
        + f"); score is {'higher' if direction == 'max' else 'lower'}-is-better; stages "
        + ", ".join(f"s{i} {stage.name}" for i, stage in enumerate(task.stages)),
        f"{'rank':>4}  {'id':>5}  {'score':>{score_width}}  "
        + "  ".join(f"{h:>{w}}" for h, w in zip(headers, widths, strict=True))
        + f"  {'vs baseline':>22}  name",
    ]
    primary = metrics[0]
    for rank, (node, row, score) in enumerate(zip(top, cells, scores, strict=True), start=1):
        per_stage = "  ".join(f"{c:>{w}}" for c, w in zip(row, widths, strict=True))
        paired = node.stats.get("vs_baseline", {}).get(primary)
        if paired and paired.get("n", 0) >= 2 and paired["ci95"][0] is not None:
            low, high = paired["ci95"]
            vs = f"{paired['mean_diff']:+.3g} [{low:+.2g},{high:+.2g}]"
        elif paired:
            vs = f"{paired['mean_diff']:+.3g}"
        else:
            vs = "-"
        note = implausible_note(node)
        name = f"{node.name}  [{note}]" if note else node.name
        lines.append(
            f"{rank:>4}  {node.id:>5}  {score:>{score_width}}  {per_stage}  {vs:>22}  {name}"
        )
    held = [n.id for n in nodes if n.ok and awaiting_remeasure(n)]
    if held:
        lines.append(
            f"Flagged implausibly good at stage 0 and not re-measured ok at stage 1 (kept out of "
            f"parent selection and of the best): node(s) {', '.join(map(str, held))}"
            + ("; this space has one stage, so they stay out" if len(task.stages) < 2 else "")
        )
    for stage in range(1, len(task.stages)):
        agreement = stage_correlation(nodes, task, stage)
        what = (
            f"Spearman rank correlation, stage 0 ({task.stages[0].name}) vs stage {stage} "
            f"({task.stages[stage].name})"
        )
        if agreement.n >= rank_stats.MIN_MEANINGFUL:
            lines.append(f"{what}, over the promoted nodes: {agreement.text()}")
        elif agreement.n:
            # Below that, any value misleads (rank_stats.MIN_MEANINGFUL): none is printed.
            lines.append(
                f"{what}: not shown, {agreement.n} promoted node(s) measured at both stages and "
                f"{rank_stats.MIN_MEANINGFUL} needed for it to mean anything"
            )
    lines.append(f"History: {workdir} (python -m evolve_jax.history --workdir={workdir})")
    return "\n".join(lines)


def save(workdir: str, text: str) -> str:
    """Writes ``WORKDIR/report.txt`` whole, on any storage the history uses; returns its URL."""
    return storage.write_text(workdir, "report.txt", text + "\n")


def utilisation_line(history, run: str) -> str | None:
    """The run's device utilisation, per process and in all, summed over its utilisation
    records (busy over available device-seconds); None without records."""
    busy: dict[str, float] = {}
    available: dict[str, float] = {}
    for key, usage in history.records("utilisation"):
        if not key.startswith(f"{run}/"):
            continue
        for p, u in usage.get("processes", {}).items():
            busy[p] = busy.get(p, 0.0) + u["busy_device_seconds"]
            available[p] = available.get(p, 0.0) + u["available_device_seconds"]
    total = sum(available.values())
    if not total:
        return None
    per = ", ".join(
        f"process {p} {100 * busy[p] / available[p]:.0f}%"
        for p in sorted(available, key=int)
        if available[p]
    )
    return (
        f"device utilisation of run {run!r}: {100 * sum(busy.values()) / total:.0f}% "
        f"({sum(busy.values()):.1f} of {total:.1f} device-s; {per})"
    )


def cost_line(nodes: Sequence[Node], history, run: str, budget_usd: float | None) -> str:
    """The run's LLM usage: calls, tokens and estimated USD (nodes plus per-step calls)."""
    total: dict[str, float] = {}
    records = [n.stats.get("llm") for n in nodes if n.origin.get("run") == run]
    records += [v for k, v in history.records("llm_step_usage") if k.startswith(f"{run}/")]
    for record in filter(None, records):
        for key, value in record.items():
            total[key] = total.get(key, 0) + (value or 0)
    budget = f" of a ${budget_usd:.2f} budget" if budget_usd is not None else ""
    return (
        f"LLM usage of run {run!r}: {int(total.get('calls', 0))} calls, "
        f"{int(total.get('prompt_tokens', 0))} prompt tokens "
        f"({int(total.get('cached_tokens', 0))} cached), "
        f"{int(total.get('output_tokens', 0))} output and "
        f"{int(total.get('thinking_tokens', 0))} thinking tokens; "
        f"estimated ${total.get('usd', 0.0):.4f}{budget} at the prices file's rates"
    )
