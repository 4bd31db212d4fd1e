"""Device groups against one candidate at a time: wall time and device utilisation of a step.

    python -m benchmarks.layout_bench [--repeats=3]

Eight linear-attention candidates (the six seeds and two mutants, at a small width so a CPU
run takes minutes) of two seeds each are evaluated at stage 0, on 8 CPU devices (unless
XLA_FLAGS names a count):

* one at a time: the whole step handed to ``evaluate`` with every device, as the Engineer did
  before device groups: each candidate's 2 runs padded to the device count;
* grouped: the Engineer's layout (``evolve_jax/evaluation/layout.py``), disjoint groups each
  training its own candidates at the same time.

Utilisation is busy device-seconds (padding excluded) over available device-seconds. On a CPU
the "devices" share the host's cores, so the wall-time gain is what the avoided duplicate runs
and overlapped compilations are worth there; on accelerators each device is its own chip.
"""

from __future__ import annotations

import os
import time

# Eight CPU devices, set before JAX starts (importing the search space starts it).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax
import numpy as np
from absl import app, flags

from evolve_jax.agents.engineer import RuleEngineer
from search_spaces.linear_attention import genome
from search_spaces.linear_attention.space import LinearAttentionSpace

_REPEATS = flags.DEFINE_integer("repeats", 3, "Repetitions of each layout (alternating).")

SEEDS = (0, 1)
SMALL = dict(d_model=32, head_dim=16, num_layers=1)
OPTIONS = dict(
    cheap_task="mqar", mqar_steps="100", mqar_batch="8", vocab_size="64", seq_len="32",
    num_pairs="4", learning_rates="1e-2", chunk_size="16",
)  # fmt: skip


def _candidates() -> list[dict]:
    seeds = [dict(g, **SMALL) for g in genome.SEEDS.values()]
    mutants = [
        dict(genome.SEEDS["deltanet"], **SMALL, short_conv=False),
        dict(genome.SEEDS["linear_attention"], **SMALL, feature_map="silu", qk_norm="l2"),
    ]
    return [genome.validate(g) for g in seeds + mutants]


def _one_at_a_time(space, candidates, devices) -> tuple[float, float]:
    start = time.perf_counter()
    results = space.evaluate(candidates, 0, list(SEEDS), devices)
    wall = time.perf_counter() - start
    assert all(r.error is None for r in results), [r.error for r in results]
    fill = len(SEEDS) / (-(-len(SEEDS) // len(devices)) * len(devices))
    return wall, fill  # busy the whole time, at the fill of each padded population


def _grouped(space, candidates, devices) -> tuple[float, float]:
    engineer = RuleEngineer(space, devices)
    start = time.perf_counter()
    outcomes = engineer.run(candidates, {}, 0, list(SEEDS))
    wall = time.perf_counter() - start
    assert all(o.status == "ok" for o in outcomes), [o.reason for o in outcomes]
    return wall, engineer.take_usage()["utilisation"]


def main(argv):
    del argv
    devices = jax.devices()
    candidates = _candidates()
    print(f"{len(candidates)} candidates x {len(SEEDS)} seeds on {len(devices)} CPU devices")
    rows = {"one at a time": [], "grouped": []}
    for _ in range(_REPEATS.value):
        for name, fn in (("one at a time", _one_at_a_time), ("grouped", _grouped)):
            space = LinearAttentionSpace(**OPTIONS)  # fresh: nothing compiled carries over
            rows[name].append(fn(space, candidates, devices))
            print(f"{name:>14}: {rows[name][-1][0]:.1f} s, utilisation {rows[name][-1][1]:.2f}")
    for name, values in rows.items():
        walls = np.array([w for w, _ in values])
        spread = walls.std(ddof=1) if len(walls) > 1 else float("nan")
        print(
            f"{name:>14}: wall {walls.mean():.1f} s ± {spread:.1f} (n={len(walls)}), "
            f"utilisation {np.mean([u for _, u in values]):.2f}"
        )


if __name__ == "__main__":
    app.run(main)
