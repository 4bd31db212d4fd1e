"""What the sandbox costs a candidate: worker start-up, and code mode against genome mode.

    python benchmarks/sandbox_cost.py [--repeats=3] [--mqar_steps=800]

1. Start-up: seconds from starting a sandboxed worker to its first reply, for a target that
   imports nothing heavy and for one that imports JAX and lists the devices (median).
2. The DeltaNet seed at the given MQAR budget, checked and trained (one seed) as a genome in
   this process, and as a program in sandboxed workers (a check worker, then a training
   worker), with the MQAR accuracy each reaches.

Runs on what JAX finds; the numbers quoted in the README are from a 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from evolve_jax.evaluation import sandbox


def _startup(target: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        reply, report = sandbox.run_once(target, {}, None, sandbox.Limits(timeout_s=120))
        if reply is None:
            raise RuntimeError(report.reason())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mqar_steps", type=int, default=800)
    args = parser.parse_args()
    from search_spaces.linear_attention.space import LinearAttentionSpace

    rows = {
        "startup_plain_s": _startup("evolve_jax.evaluation.workers:echo", args.repeats),
        "startup_jax_s": _startup("evolve_jax.evaluation.workers:report_devices", args.repeats),
    }
    for mode in ("genome", "code"):
        space = LinearAttentionSpace(
            mode=mode, cheap_task="mqar", mqar_steps=str(args.mqar_steps), seeds="deltanet"
        )
        candidate = space.validate(space.seeds()["deltanet"])
        failures, check_s = _timed(lambda s=space, c=candidate: s.check(c))
        [result], train_s = _timed(lambda s=space, c=candidate: s.evaluate([c], 0, [0], []))
        rows[mode] = {
            "check_s": round(check_s, 1),
            "train_s": round(train_s, 1),
            "failures": [f.reason for f in failures],
            "mqar_accuracy": result.metrics.get(0, {}).get("mqar_accuracy"),
            "error": result.error,
        }
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
