"""Cost of one append and one sample as the experiment history grows (100 / 1,000 / 10,000 nodes).

    python benchmarks/history_bench.py [--sizes=100,1000,10000] [--repeats=50]

Append: one node committed (counter compare-and-swap + node key, one atomic transaction).
Refresh: another reader picking up that one new node. Select: one parent choice by each sampler
over the in-memory pool. Cold load: opening the store and reading every node (done once on
resume). Medians over ``repeats``; times in milliseconds.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import numpy as np
from absl import app, flags

from evolve_jax.memory.history import History
from evolve_jax.sampling import SamplerConfig, make_sampler
from evolve_jax.search_space import DescriptorAxis

_SIZES = flags.DEFINE_list("sizes", ["100", "1000", "10000"], "History sizes to measure at.")
_REPEATS = flags.DEFINE_integer("repeats", 50, "Measurements per size.")


def _fields(i: int, rng: np.random.Generator) -> dict:
    score = float(rng.normal())
    return dict(
        parents=[int(rng.integers(max(i, 1)))],
        search_space="bench",
        name=f"node{i}",
        motivation="a realistic-length motivation " * 8,
        candidate={"genes": [float(v) for v in rng.normal(size=24)], "kind": "delta"},
        status="ok",
        reason=None,
        metrics={"cheap": {"0": {"acc": score}, "1": {"acc": score}}},
        score=score,
        stats={"mean": {"acc": score}},
        analysis="an analysis of moderate length " * 10,
        timings={"design": 0.01, "evaluate": 1.0},
        island=i % 5,
        created=time.time(),
        descriptor=[float(v) for v in rng.uniform(size=2)],
    )


def _ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def main(argv):
    del argv
    sizes = sorted(int(s) for s in _SIZES.value)
    repeats = _REPEATS.value
    rng = np.random.default_rng(0)
    axes = (DescriptorAxis("a", 0, 1, 10), DescriptorAxis("b", 0, 1, 10))
    samplers = {n: make_sampler(SamplerConfig(name=n), "max", axes) for n in ("ucb1", "map_elites")}
    with tempfile.TemporaryDirectory() as workdir:
        writer = History(workdir)
        writer.initialise("bench", "max")
        reader = History(workdir)
        count = 0
        columns = ("nodes", "append", "refresh", "ucb1", "map_el.", "cold load")
        print(" ".join(f"{c:>10}" for c in columns))
        for size in sizes:
            while count < size - repeats:
                writer.append(**_fields(count, rng))
                count += 1
            reader.refresh()
            appends, refreshes = [], []
            for _ in range(repeats):
                fields = _fields(count, rng)
                appends.append(_ms(lambda f=fields: writer.append(**f)))
                refreshes.append(_ms(reader.refresh))
                count += 1
            pool = list(reader.cached().values())
            selects = {
                name: statistics.median(
                    _ms(lambda s=s, p=pool: s.select(p, rng, 0)) for _ in range(repeats)
                )
                for name, s in samplers.items()
            }
            cold = _ms(lambda: History(workdir).nodes())
            row = (
                statistics.median(appends),
                statistics.median(refreshes),
                selects["ucb1"],
                selects["map_elites"],
                cold,
            )
            print(f"{count:>10}" + "".join(f" {v:>10.2f}" for v in row), flush=True)


if __name__ == "__main__":
    app.run(main)
