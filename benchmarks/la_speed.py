"""Speed of the linear-attention search space on this machine.

    python -m benchmarks.la_speed [--candidate_seconds] [--mixer_seconds] [--space_opt=k=v ...]

1. Seconds per candidate at stage 0 (checks + training, compilation included), one seed, as
   the driver runs it on a CPU (one device; the learning rates stacked on it), for the 14
   architectures of benchmarks/proxy_fidelity.py: the six seeds and eight mutants. The stage's
   options are the space's defaults unless --space_opt says otherwise. Target: at most 60 s on
   2 cores.
2. Recurrent against chunkwise mixer time, forward and forward+backward, at T = 2,048
   (B=1, H=4, Dk=Dv=64, chunk 64), for every update rule.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.architectures import ARCHITECTURES
from search_spaces.linear_attention import mixers
from search_spaces.linear_attention.space import LinearAttentionSpace

_CANDIDATES = flags.DEFINE_bool("candidate_seconds", True, "Time stage-0 candidates.")
_MIXERS = flags.DEFINE_bool("mixer_seconds", True, "Time mixers at T=2048.")
_MODELS = flags.DEFINE_list("models", list(ARCHITECTURES), "Architectures to time.")
_SPACE_OPT = flags.DEFINE_multi_string("space_opt", [], "Search-space options (default: none).")
_OUT = flags.DEFINE_string("out", "", "Also write the candidate timings here as JSON.")


def _time(fn, *args, repeats=3) -> tuple[float, float]:
    """(first call incl. compilation, median of later calls), in seconds."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    later = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        later.append(time.perf_counter() - start)
    return first, float(np.median(later))


def candidate_seconds() -> None:
    space = LinearAttentionSpace(**dict(o.split("=", 1) for o in _SPACE_OPT.value))
    stage = space.describe().stages[0]
    metric = stage.metrics[0].name
    task, budget = space.stage_task(0)
    print(
        f"seconds per stage-0 candidate ({stage.name}: {budget.steps} steps of {budget.batch_size}"
        f" x {task.seq_len}, learning rates {budget.learning_rates}, 1 seed, "
        f"{len(jax.devices())} device(s))"
    )
    rows = []
    for name in _MODELS.value:
        genome = ARCHITECTURES[name]
        start = time.perf_counter()
        failures = space.check(genome)
        checked = time.perf_counter() - start
        [result] = space.evaluate([genome], 0, [0], jax.devices())
        total = time.perf_counter() - start
        value = result.metrics[0][metric] if not result.error else float("nan")
        rows.append({
            "arch": name, "seconds": round(total, 1), "check_seconds": round(checked, 1),
            "check_failures": len(failures), metric: value, "error": result.error,
        })  # fmt: skip
        print(
            f"  {name:>30}: {total:6.1f} s (checks {checked:.1f} s, failures {len(failures)}), "
            f"{metric} {value:.3f}",
            flush=True,
        )
    seconds = [r["seconds"] for r in rows]
    print(f"  max {max(seconds):.1f} s, median {np.median(seconds):.1f} s over {len(rows)}")
    if _OUT.value:
        record = {"options": _SPACE_OPT.value, "stage": stage.name, "candidates": rows}
        with open(_OUT.value, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)


def mixer_seconds(B=1, H=4, T=2048, K=64) -> None:
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, H, T, K)), jnp.float32)
    k = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    v = jnp.asarray(rng.normal(size=(B, H, T, K)), jnp.float32)
    extra = {
        "beta": jnp.full((B, H, T), 0.5),
        "g": -0.05 * jnp.ones((B, H, T)),
        "g_channel": -0.05 * jnp.ones((B, H, T, K)),
    }
    print(f"mixer ms at B={B} H={H} T={T} Dk=Dv={K}, chunk 64 (median after compile)")
    print(f"  {'rule':>14} {'chunk fwd':>10} {'rec fwd':>10} {'chunk f+b':>10} {'rec f+b':>10}")
    for rule, spec in mixers.UPDATE_RULES.items():
        kw = {}
        if spec.uses_beta:
            kw["beta"] = extra["beta"]
        if spec.uses_decay:
            kw["g"] = extra["g_channel"] if rule == "channel_decay" else extra["g"]
        row = []
        for impl in ("chunked", "recurrent"):

            def loss(q, k, v, impl=impl, rule=rule, kw=kw):
                return mixers.mix(rule, q, k, v, impl=impl, chunk_size=64, **kw)[0].sum()

            fwd = jax.jit(loss)
            both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
            row.append((_time(fwd, q, k, v)[1], _time(both, q, k, v)[1]))
        (cf, cb), (rf, rb) = row
        print(f"  {rule:>14} {1e3 * cf:10.1f} {1e3 * rf:10.1f} {1e3 * cb:10.1f} {1e3 * rb:10.1f}")


def main(argv):
    del argv
    if _CANDIDATES.value:
        candidate_seconds()
    if _MIXERS.value:
        mixer_seconds()


if __name__ == "__main__":
    app.run(main)
