"""What a person reads at the end of a run: the top candidates, and whether stages agree."""

from __future__ import annotations

import math
from collections.abc import Sequence

import scipy.stats

from evolve_jax import storage
from evolve_jax.memory.history import Node
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


def stage_correlation(nodes: Sequence[Node], stage: int = 1) -> tuple[float, int]:
    """Spearman rank correlation of stage-0 and ``stage`` scores over nodes that have both."""
    pairs = [
        (n.score, n.stages[stage]["score"])
        for n in nodes
        if n.ok and stage in n.stages and n.stages[stage].get("status") == "ok"
    ]
    if len(pairs) < 3:
        return math.nan, len(pairs)
    rho = scipy.stats.spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
    return float(rho), len(pairs)


def render(
    nodes: Sequence[Node], direction: str, task: TaskDescription, k: int, workdir: str
) -> str:
    """A plain-text table of the top ``k`` candidates, with the stage correlation."""
    counts = {s: sum(n.status == s for n in nodes) for s in ("ok", "invalid", "failed", "timeout")}
    lines = [
        f"{task.title}: {len(nodes)} nodes ("
        + ", ".join(f"{v} {s}" for s, v in counts.items() if v)
        + f"); score is {'higher' if direction == 'max' else 'lower'}-is-better",
        f"{'rank':>4}  {'id':>5}  {'score':>9}  {'later stages':>14}  {'vs baseline':>22}  name",
    ]
    primary = task.stage_metrics(0)[0].name
    for rank, node in enumerate(ranked(nodes, direction)[:k], start=1):
        later = " ".join(
            f"{r['score']:.4g}" if r.get("score") is not None else r.get("status", "?")
            for _, r in sorted(node.stages.items())
        )
        paired = node.stats.get("vs_baseline", {}).get(primary)
        if paired and paired.get("n", 0) >= 2 and paired["ci95"][0] is not None:
            low, high = paired["ci95"]
            vs = f"{paired['mean_diff']:+.3g} [{low:+.2g},{high:+.2g}]"
        elif paired:
            vs = f"{paired['mean_diff']:+.3g}"
        else:
            vs = "-"
        later = later or "-"
        lines.append(
            f"{rank:>4}  {node.id:>5}  {node.score:>9.4g}  {later:>14}  {vs:>22}  {node.name}"
        )
    for stage in range(1, len(task.stages)):
        rho, n = stage_correlation(nodes, stage)
        if n:
            lines.append(
                f"Spearman rank correlation, stage 0 ({task.stages[0].name}) vs stage {stage} "
                f"({task.stages[stage].name}): {rho:.3f} over {n} promoted nodes"
            )
    lines.append(f"History: {workdir} (python -m evolve_jax.history --workdir={workdir})")
    return "\n".join(lines)


def save(workdir: str, text: str) -> str:
    """Writes ``WORKDIR/report.txt`` whole, on any storage the history uses; returns its URL."""
    return storage.write_text(workdir, "report.txt", text + "\n")


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
