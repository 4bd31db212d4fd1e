"""Scientific sanity of stage 0: do the seeds rank as published at a given budget?

    python benchmarks/la_sanity.py --seeds=0,1,2 [--space_opt=cheap_task=mqar ...]

Trains the named seed architectures at stage 0 with the search space's own options (byte-level
LM by default, MQAR with cheap_task=mqar) and prints the stage metric per seed, the mean, and
the paired difference against vanilla linear attention with its 95% confidence interval (in
the metric's better direction). The published ordering is delta-rule models well above vanilla
linear attention.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

from evolve_jax.fitness import paired_difference
from search_spaces.linear_attention.space import LinearAttentionSpace

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Evaluation seeds (paired across models).")
_MODELS = flags.DEFINE_list(
    "models", ["linear_attention", "deltanet", "gated_deltanet"], "Seed architectures to train."
)
_SPACE_OPT = flags.DEFINE_multi_string("space_opt", [], "key=value search-space options.")


def main(argv):
    del argv
    options = dict(opt.split("=", 1) for opt in _SPACE_OPT.value)
    space = LinearAttentionSpace(**options)
    seeds = [int(s) for s in _SEEDS.value]
    print(f"options: {space.options}")
    metric = space.describe().stages[0].metrics[0]
    values_by_model = {}
    for name in _MODELS.value:
        start = time.perf_counter()
        [result] = space.evaluate([space.seeds()[name]], 0, seeds, jax.devices())
        seconds = time.perf_counter() - start
        if result.error:
            print(f"{name:>18}: {result.error}")
            continue
        values_by_model[name] = [result.metrics[s][metric.name] for s in seeds]
        values = " ".join(f"{a:.3f}" for a in values_by_model[name])
        print(f"{name:>18}: {values}  mean {np.mean(values_by_model[name]):.3f}  ({seconds:.0f} s)")
    if "linear_attention" in values_by_model:
        for name, values in values_by_model.items():
            if name == "linear_attention":
                continue
            d = paired_difference(values, values_by_model["linear_attention"], metric.direction)
            print(
                f"{name} - linear_attention: {d['mean_diff']:+.3f} "
                f"95% CI [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] over {d['n']} seeds"
            )


if __name__ == "__main__":
    app.run(main)
