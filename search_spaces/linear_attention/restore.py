"""Restores a checkpointed candidate and re-measures it.

    python -m search_spaces.linear_attention.restore --workdir=runs/quickstart --node=ID

Checkpoints exist for candidates promoted to the byte-LM stage (``--promote_top_k``). For each
seed's checkpoint the command rebuilds the model from the genome (or, in code mode, the program:
it runs in this process, not in the sandbox) and options saved with it,
restores its weights with Orbax, and re-measures validation bits per byte on the same held-out
windows the stage measured (``train.byte_lm_validation``), so ``val_bpb`` matches the recorded
``recorded_val_bpb`` up to float round-off. One JSON line per checkpoint.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import jax
from absl import app, flags
from flax import nnx

from evolve_jax import storage
from evolve_jax.cli import parse_flags
from evolve_jax.memory.history import History, HistoryError, Node
from evolve_jax.search_space import fingerprint
from search_spaces.linear_attention import checkpoints, train
from search_spaces.linear_attention.space import LinearAttentionSpace

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (a path, file:// or gs://).")
_NODE = flags.DEFINE_integer("node", None, "Node id (see python -m evolve_jax.history).")


def space_for(meta: dict[str, Any]) -> LinearAttentionSpace:
    """The search space with the options a checkpoint was trained with."""
    options = {
        k: ",".join(map(str, v)) if isinstance(v, list) else str(v)
        for k, v in meta["options"].items()
    }
    return LinearAttentionSpace(**options)


def remeasure(node: Node, path: str) -> dict[str, Any]:
    """Restores the checkpoint at ``path`` and measures it as its stage did."""
    spaces: list[LinearAttentionSpace] = []

    def cfg_for(meta):
        spaces.append(space_for(meta))
        return spaces[-1].model_config(meta["genome"], meta["stage"])

    lm, meta = checkpoints.restore(path, cfg_for)
    loss, accuracy = train.evaluate(lm, *spaces[-1].validation_windows())
    recorded = node.stages.get(meta["stage"], {}).get("metrics", {}).get(str(meta["seed"]), {})
    return {
        "node": node.id,
        "name": node.name,
        "checkpoint": path,
        "stage": meta["stage"],
        "seed": meta["seed"],
        "params": sum(int(x.size) for x in jax.tree.leaves(nnx.state(lm, nnx.Param))),
        "val_bpb": loss / math.log(2),
        "val_byte_accuracy": accuracy,
        "recorded_val_bpb": recorded.get("val_bpb"),
    }


def main(argv):
    del argv
    if _WORKDIR.value is None or _NODE.value is None:
        print("error: --workdir and --node are required", file=sys.stderr)
        sys.exit(2)
    try:
        node = History(_WORKDIR.value, create=False).get(_NODE.value)
    except (HistoryError, KeyError) as e:
        print(f"error: no node {_NODE.value} in {_WORKDIR.value!r}: {e}", file=sys.stderr)
        sys.exit(1)
    directory = storage.join(_WORKDIR.value, "checkpoints", fingerprint(node.candidate))
    paths = checkpoints.list_checkpoints(directory)
    if not paths:
        print(
            f"error: node {node.id} ({node.name}) has no checkpoint (not promoted)", file=sys.stderr
        )
        sys.exit(1)
    for path in paths:
        print(json.dumps(remeasure(node, path)))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
