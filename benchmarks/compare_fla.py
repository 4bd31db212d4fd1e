"""The issue's goal as one table: our fastest Pallas variant against flash-linear-attention.

    python benchmarks/compare_fla.py gpu_check/goal.json --fla=gpu_check/fla.json

Reads the JSON of ``kernel_bench.py`` (any number of runs: the default settings and tiling
sweeps) and of ``fla_bench.py`` from the same machine, and prints, per shape and rule, the
fastest Pallas forward and forward+backward (with the variant that gave each) next to fla's,
and the ratio ours / fla (below 1: we are faster).
"""

from __future__ import annotations

import json
import os

from absl import app, flags

_FLA = flags.DEFINE_string("fla", None, "fla_bench.py's JSON.", required=True)


def _variant(row) -> str:
    tiling = f"[{row['block_v']}:{row['num_warps']}]" if "block_v" in row else ""
    return row["impl"] + tiling


def _load(path):
    with open(path) as f:
        data = json.load(f)
    return data["device"], [row for row in data["rows"] if "error" not in row]


def fastest(rows, key):
    """{(shape, rule): (ms, variant)}: the fastest whole-op Pallas row for ``key``."""
    best = {}
    for row in rows:
        if not row["impl"].startswith("pallas") or row.get(key) is None:
            continue
        case = (f"{row['B']}x{row['T']}x{row['H']}x{row['D']}", row["rule"])
        if case not in best or row[key] < best[case][0]:
            best[case] = (row[key], _variant(row))
    return best


def main(argv):
    devices, ours = set(), []
    for path in argv[1:]:
        if not os.path.exists(path):  # a run cut short by its timeout may have written none
            print(f"warning: no {path}")
            continue
        device, rows = _load(path)
        devices.add(device)
        ours += rows
    fla_device, fla_rows = _load(_FLA.value)
    print(f"device: {fla_device} (fla), {', '.join(sorted(devices))} (ours)")
    if len(devices | {fla_device}) > 1:  # names differ between PyTorch and JAX: check by eye
        print("warning: the device names differ; compare only runs from the same machine")
    print(f"{'BxTxHxD':>14} {'rule':>12} {'pass':>8} {'ours ms':>9} {'fla ms':>8} "
          f"{'ratio':>6}  variant")  # fmt: skip
    fla = {(f"{r['B']}x{r['T']}x{r['H']}x{r['D']}", r["rule"]): r for r in fla_rows}
    for key, name in (("fwd_ms", "fwd"), ("fwdbwd_ms", "fwd+bwd")):
        for case, (ms, variant) in sorted(fastest(ours, key).items()):
            theirs = fla.get(case, {}).get(key)
            ratio = f"{ms / theirs:6.2f}" if theirs else "     -"
            theirs_text = f"{theirs:8.2f}" if theirs else "       -"
            print(f"{case[0]:>14} {case[1]:>12} {name:>8} {ms:9.2f} {theirs_text} {ratio}  "
                  f"{variant}")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
