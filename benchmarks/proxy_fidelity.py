"""Does the cheap stage rank architectures the way a costly stage does?

    python -m benchmarks.proxy_fidelity                       # both stages, resumable
    python -m benchmarks.proxy_fidelity --analyze_only        # the table from saved results

The architectures below were fixed before any result was seen: the six named seeds and eight
mutants, some deliberately weak. Each goes through

* two cheap stages, seeds ``CHEAP_SEEDS``, every learning rate trained and the best kept:
  ``cheap_lm``, 200 steps of byte-level LM at the base width (declared before its results; the
  search space's stage 0 ships this recipe since), and ``mqar``, the MQAR stage 0 the space
  shipped before (``cheap_task=mqar``, several numbers of pairs);
* the costly stage: byte-level LM on held-out bits per byte, trained longer and on longer
  windows than the search's stage 1 (``COSTLY_OPTIONS``), four seeds; its two halves of two
  seeds give the noise ceiling.

Every (stage, architecture) result is appended to ``--out`` as soon as it is known, so an
interrupted run resumes where it stopped. The report: each architecture's mean and seed
spread per stage; Spearman and Kendall between the stages' means with bootstrap 95% CIs over
architectures; the costly stage's noise ceiling (Spearman between its two seed sets' means);
the costly rank of the cheap stage's top 3; and the published ordering at the costly stage
(DeltaNet and Gated DeltaNet against vanilla linear attention and RetNet, paired by seed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks.architectures import ARCHITECTURES
from evolve_jax.fitness import paired_difference
from evolve_jax.rank_stats import agreement
from search_spaces.linear_attention.space import LinearAttentionSpace

_OUT = flags.DEFINE_string(
    "out", "benchmarks/results/proxy_fidelity.json", "Results file (read and appended)."
)
_STAGES = flags.DEFINE_list("stages", ["costly", "cheap_lm", "mqar"], "Stages to run, in order.")
_ANALYZE_ONLY = flags.DEFINE_bool("analyze_only", False, "Only print the saved results.")
_MAX_MINUTES = flags.DEFINE_float("max_minutes", 0, "Stop starting new work after this (0: none).")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 2, "Split the CPU into N devices, one per core here (0: leave it)."
)


CHEAP_SEEDS = (0, 1, 2)
# One evaluation of four seeds (one compilation); halves (0, 1) and (2, 3) give the noise ceiling.
COSTLY_SEEDS = (0, 1, 2, 3)
COSTLY_SEED_SETS = ((0, 1), (2, 3))
# 400 steps of 8 windows of 256 bytes at twice the width: 2.7x the bytes of the default stage 1
# (300 x 16 x 128) and 10x the quickstart's. One learning rate: two would double a run that
# already takes about 5 minutes per architecture on 2 CPU cores.
COSTLY_OPTIONS = dict(
    lm_width=2, lm_seq_len=256, lm_batch=8, lm_steps=400, lm_learning_rates="3e-3"
)


@dataclasses.dataclass(frozen=True)
class StageSpec:
    space_options: dict
    index: int  # the search space's stage index
    seeds: tuple[int, ...]
    metric: str
    direction: str  # "max" or "min"


STAGES = {
    # Declared before any of its results, as a candidate cheap stage: byte-level LM at the base
    # width, 200 steps of 8 windows of 128 bytes, both learning rates stacked. It runs through
    # stage 1 with these options, as declared; the space's default stage 0 is the same
    # computation (tests/test_proxy_fidelity.py checks that).
    "cheap_lm": StageSpec(
        dict(lm_width=1, lm_seq_len=128, lm_batch=8, lm_steps=200, lm_learning_rates="3e-3,1e-2"),
        1, CHEAP_SEEDS, "val_bpb", "min",
    ),
    # MQAR, the space's stage 0 before cheap_lm replaced it (cheap_task=mqar).
    "mqar": StageSpec(dict(cheap_task="mqar"), 0, CHEAP_SEEDS, "mqar_accuracy", "max"),
    "costly": StageSpec(COSTLY_OPTIONS, 1, COSTLY_SEEDS, "val_bpb", "min"),
}  # fmt: skip
STRONG, WEAK = ("deltanet", "gated_deltanet"), ("linear_attention", "retnet")


def _load(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _run(stage: str, results: list[dict], deadline: float | None) -> None:
    done = {(r["stage"], r["arch"]) for r in results}
    spec = STAGES[stage]
    space = LinearAttentionSpace(**spec.space_options)
    seeds, metric = spec.seeds, spec.metric
    for name, g in ARCHITECTURES.items():
        if (stage, name) in done:
            continue
        if deadline is not None and time.time() > deadline:
            print("time budget spent; run again to continue")
            return
        start = time.perf_counter()
        [result] = space.evaluate([g], spec.index, list(seeds), jax.devices())
        record = {
            "stage": stage, "arch": name, "seeds": list(seeds), "metric": metric,
            "seconds": round(time.perf_counter() - start, 1), "error": result.error,
            "values": [result.metrics[s][metric] for s in seeds] if not result.error else [],
            "learning_rates": [result.metrics[s]["learning_rate"] for s in seeds]
            if not result.error else [],
            "options": {k: str(v) for k, v in vars(space.options).items()},
        }  # fmt: skip
        results.append(record)
        with open(_OUT.value, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{stage} {name:>30} seeds {seeds}: {record['values'] or record['error']} "
              f"({record['seconds']:.0f} s)", flush=True)  # fmt: skip


def _values(results, stage, seeds=None) -> dict[str, list[float]]:
    """Per architecture, the stage's values in seed order (only ``seeds`` when given)."""
    out: dict[str, dict[int, float]] = {}
    for r in results:
        if r["stage"] == stage and not r["error"]:
            for seed, value in zip(r["seeds"], r["values"], strict=True):
                if seeds is None or seed in seeds:
                    out.setdefault(r["arch"], {})[seed] = value
    return {a: [v[s] for s in sorted(v)] for a, v in out.items()}


def _signed_means(values: dict[str, list[float]], stage: str) -> dict[str, float]:
    """Per architecture, the stage's mean with higher always better (bits per byte negated)."""
    sign = 1.0 if STAGES[stage].direction == "max" else -1.0
    return {a: sign * float(np.mean(v)) for a, v in values.items()}


def _cell(values: list[float] | None) -> str:
    if not values:
        return "-"
    sd = np.std(values, ddof=1) if len(values) > 1 else float("nan")
    return f"{np.mean(values):.4f} ± {sd:.4f} (n={len(values)})"


def report(results: list[dict]) -> str:
    values = {stage: _values(results, stage) for stage in STAGES}
    header = "".join(f"  {f'{stage} {spec.metric}':>26}" for stage, spec in STAGES.items())
    lines = [f"{'architecture':>30}{header}"]
    for name in ARCHITECTURES:
        lines.append(
            f"{name:>30}" + "".join(f"  {_cell(values[stage].get(name)):>26}" for stage in STAGES)
        )
    costly = values["costly"]
    for stage in STAGES:
        sds = [np.std(v, ddof=1) for v in values[stage].values() if len(v) > 1]
        if sds:
            lines.append(f"{stage} seed-to-seed sd: mean {np.mean(sds):.4f}, max {np.max(sds):.4f}")
    halves = [_signed_means(_values(results, "costly", s), "costly") for s in COSTLY_SEED_SETS]
    shared = [a for a in ARCHITECTURES if all(a in h for h in halves)]
    if shared:
        ceiling = agreement([halves[0][a] for a in shared], [halves[1][a] for a in shared])
        lines.append(f"costly-stage noise ceiling (seeds 0,1 vs 2,3): {ceiling.text()}")
    y = _signed_means(costly, "costly")
    for stage in STAGES:
        if stage == "costly" or not values[stage]:
            continue
        x = _signed_means(values[stage], stage)
        both = [a for a in ARCHITECTURES if a in x and a in y]
        for kind in ("spearman", "kendall"):
            got = agreement([x[a] for a in both], [y[a] for a in both], kind)
            lines.append(f"{kind} {stage} vs costly: {got.text()}")
        by_costly = sorted(both, key=lambda a: -y[a])
        top = sorted(both, key=lambda a: -x[a])[:3]
        ranks = ", ".join(f"{a} -> {by_costly.index(a) + 1}" for a in top)
        lines.append(f"costly rank (of {len(both)}) of the {stage} stage's top 3: {ranks}")
        cheap = values[stage]
        if "deltanet" in cheap and "linear_attention" in cheap:
            gap = abs(np.mean(cheap["deltanet"]) - np.mean(cheap["linear_attention"]))
            sd = np.mean([np.std(v, ddof=1) for v in cheap.values() if len(v) > 1])
            lines.append(
                f"{stage}: |DeltaNet - linear attention| {gap:.4f} = {gap / sd:.1f}x the mean "
                "seed sd"
            )
    for strong in STRONG:
        for weak in WEAK:
            if strong in costly and weak in costly:
                d = paired_difference(costly[strong], costly[weak], "min")
                lo, hi = d["ci95"]
                lines.append(
                    f"costly {strong} better than {weak} by {d['mean_diff']:+.4f} bpb, "
                    f"paired 95% CI [{lo:+.4f}, {hi:+.4f}], n={d['n']}"
                )
    return "\n".join(lines)


def main(argv):
    del argv
    results = _load(_OUT.value)
    if _CPU_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
    if not _ANALYZE_ONLY.value:
        os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
        deadline = time.time() + 60 * _MAX_MINUTES.value if _MAX_MINUTES.value else None
        for stage in _STAGES.value:
            _run(stage, results, deadline)
    print(report(results))


if __name__ == "__main__":
    app.run(main)
