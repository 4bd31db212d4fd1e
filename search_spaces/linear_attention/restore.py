"""Restores a checkpointed candidate and re-measures it.

    python -m search_spaces.linear_attention.restore --workdir=runs/quickstart --node=ID

Checkpoints exist for candidates promoted to the byte-LM stage (``--promote_top_k``). The
command rebuilds the model from the node's genome, restores its weights with Orbax, and prints
its parameter count and validation bits per byte on the corpus it was trained on.
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from evolve_jax.cli import parse_flags
from evolve_jax.memory.history import History, HistoryError
from evolve_jax.search_space import fingerprint
from search_spaces.linear_attention import checkpoints, data
from search_spaces.linear_attention.space import LinearAttentionSpace

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.")
_NODE = flags.DEFINE_integer("node", None, "Node id (see python -m evolve_jax.history).")


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
    directory = os.path.join(_WORKDIR.value, "checkpoints", fingerprint(node.candidate))
    paths = checkpoints.list_checkpoints(directory)
    if not paths:
        print(
            f"error: node {node.id} ({node.name}) has no checkpoint (not promoted)", file=sys.stderr
        )
        sys.exit(1)
    spaces: list[LinearAttentionSpace] = []

    def cfg_for(meta):
        # The options the checkpoint was trained with, in --space_opt form.
        options = {
            k: ",".join(v) if isinstance(v, list) else str(v) for k, v in meta["options"].items()
        }
        spaces.append(LinearAttentionSpace(**options))
        return spaces[-1].model_config(meta["genome"], meta["stage"])

    for path in paths:
        lm, meta = checkpoints.restore(path, cfg_for)
        space = spaces[-1]
        corpus = data.split_corpus(space.corpus(), "validation")
        seq = space.options.lm_seq_len
        starts = range(0, 8 * seq, seq)
        windows = np.stack([corpus[i : i + seq + 1] for i in starts]).astype(np.int32)
        logp = jax.nn.log_softmax(lm(jnp.asarray(windows[:, :-1])))
        nll = -jnp.take_along_axis(logp, jnp.asarray(windows[:, 1:, None]), -1).mean()
        params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(lm, nnx.Param)))
        record = {
            "node": node.id,
            "name": node.name,
            "checkpoint": path,
            "stage": meta["stage"],
            "seed": meta["seed"],
            "params": params,
            "val_bpb": float(nll) / math.log(2),
        }
        print(json.dumps(record))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
