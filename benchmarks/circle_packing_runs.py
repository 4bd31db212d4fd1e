"""Circle packing n = 26: the flagfile's search run once per seed, and the table of results.

    python benchmarks/circle_packing_runs.py --seeds=1,2,3 --base=runs/circle_packing_bench

Runs ``python -m evolve_jax.main --flagfile=configs/circle_packing.flags --seed=S`` one seed
after another (never in parallel: each uses the flagfile's worker processes), each into a fresh
workdir BASE/seed_S, and times it. Then, per run: the best sum of radii, the node (in commit
order) and the evaluation at which it was first reached (within 1e-9), the first node at or
above the peers' published sums, and the wall time; then mean and range over the runs. The best
packing of each run is recomputed from its genome and evaluation seed, checked again with
``validate.score_packing`` (tol 1e-9, and 0) and written to BASE/seed_S/best_packing.json.
``--analyze_only`` prints the table from existing workdirs (wall times read from wall_s.txt).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from evolve_jax.memory.history import History

_SEEDS = flags.DEFINE_list("seeds", ["1", "2", "3"], "Run seeds (--seed of each run).")
_BASE = flags.DEFINE_string("base", "runs/circle_packing_bench", "Parent of the workdirs.")
_FLAGFILE = flags.DEFINE_string("flagfile_path", "configs/circle_packing.flags", "The search.")
_ANALYZE_ONLY = flags.DEFINE_bool("analyze_only", False, "Only read existing workdirs.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete an existing workdir first.")

PEERS = {"OpenEvolve": 2.634292, "AlphaEvolve": 2.63586, "ShinkaEvolve": 2.635983}
SAME = 1e-9  # two sums this close are the same optimum


def _run(seed: int, workdir: str) -> float:
    if os.path.exists(workdir):
        if not _OVERWRITE.value:
            sys.exit(f"error: {workdir} exists (--overwrite to replace it)")
        shutil.rmtree(workdir)
    cmd = [
        sys.executable, "-m", "evolve_jax.main", f"--flagfile={_FLAGFILE.value}",
        f"--seed={seed}", f"--workdir={workdir}",
    ]  # fmt: skip
    os.makedirs(os.path.dirname(workdir) or ".", exist_ok=True)
    start = time.perf_counter()
    with open(f"{workdir}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    with open(os.path.join(workdir, "wall_s.txt"), "w") as f:
        f.write(f"{wall:.1f}\n")
    return wall


def _analyze(workdir: str) -> dict:
    from search_spaces.circle_packing.space import make
    from search_spaces.circle_packing.validate import score_packing

    nodes = sorted(History(workdir, create=False).nodes(), key=lambda n: n.id)
    evaluated = [n for n in nodes if n.status != "invalid"]  # invalid ones never ran
    ok = [n for n in nodes if n.ok]
    best = max(ok, key=lambda n: (n.score, -n.id))

    def first(threshold: float) -> tuple[int, int] | None:
        for k, node in enumerate(nodes):
            if node.ok and node.score >= threshold:
                return k + 1, evaluated.index(node) + 1
        return None

    (seed_text, metrics), *_ = best.metrics["packing"].items()
    space = make(n="26", workers="1")
    try:
        centers, radii = space.packing(best.candidate, int(seed_text))
    finally:
        space.close()
    strict, why = score_packing(centers, radii, 26, tol=1e-9)
    _, why0 = score_packing(centers, radii, 26, tol=0.0)
    if why or why0 or strict != metrics["sum_radii"]:
        raise RuntimeError(f"{workdir}: best node {best.id} does not reproduce: {why or why0}")
    with open(os.path.join(workdir, "best_packing.json"), "w") as f:
        json.dump(
            {"node": best.id, "sum_radii": strict, "genome": best.candidate,
             "eval_seed": int(seed_text), "centers": centers.tolist(), "radii": radii.tolist()},
            f, indent=1,
        )  # fmt: skip
    wall = float("nan")
    if os.path.exists(wall_file := os.path.join(workdir, "wall_s.txt")):
        with open(wall_file) as f:
            wall = float(f.read())
    return {
        "best": strict,
        "node": best.id,
        "first": first(best.score - SAME),
        "peers": {name: first(value) for name, value in PEERS.items()},
        "nodes": len(nodes),
        "evaluations": len(evaluated),
        "seeds_best": max(n.score for n in nodes[:4] if n.ok),
        "wall": wall,
    }


def main(argv):
    del argv
    rows = {}
    for text in _SEEDS.value:
        seed = int(text)
        workdir = os.path.join(_BASE.value, f"seed_{seed}")
        if not _ANALYZE_ONLY.value:
            print(f"seed {seed}: running into {workdir} ...", flush=True)
            _run(seed, workdir)
        rows[seed] = _analyze(workdir)

    print()
    print(
        "| seed | best sum of radii | first reached: node (evaluation) | seeds' best "
        "| >= OpenEvolve | >= AlphaEvolve | >= ShinkaEvolve | nodes (evaluated) | wall |"
    )
    print("|---|---|---|---|---|---|---|---|---|")

    def at(pair):
        return "never" if pair is None else f"{pair[0]} ({pair[1]})"

    for seed, r in rows.items():
        peers = " | ".join(at(r["peers"][p]) for p in PEERS)
        print(
            f"| {seed} | {r['best']:.10f} | {at(r['first'])} | {r['seeds_best']:.6f} | {peers} "
            f"| {r['nodes']} ({r['evaluations']}) | {r['wall'] / 60:.1f} min |"
        )
    best = np.array([r["best"] for r in rows.values()])
    first = np.array([r["first"][0] for r in rows.values()])
    wall = np.array([r["wall"] for r in rows.values()])
    print()
    print(f"best sum: mean {best.mean():.10f}, range {best.min():.10f} to {best.max():.10f}")
    print(f"first reached at node: mean {first.mean():.1f}, range {first.min()} to {first.max()}")
    print(f"wall time: mean {wall.mean() / 60:.1f} min, range {wall.min() / 60:.1f} to "
          f"{wall.max() / 60:.1f} min")  # fmt: skip
    print("peers: " + ", ".join(f"{k} {v}" for k, v in PEERS.items()))


if __name__ == "__main__":
    app.run(main)
