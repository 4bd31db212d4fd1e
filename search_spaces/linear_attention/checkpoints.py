"""Orbax checkpoints of trained candidates: parameters plus the genome and options that built them.

Layout: ``WORKDIR/checkpoints/<candidate fingerprint>/stage<k>_seed<s>/`` (an Orbax composite
checkpoint with items ``params`` and ``meta``), on any workdir evolve_jax.storage resolves
(a local path, ``file://`` or ``gs://``).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from flax import nnx

from evolve_jax import storage
from search_spaces.linear_attention import model


class _QuietOrbax(logging.Filter):
    """Drops Orbax's INFO lines (about twenty per checkpoint) from the run log; keeps warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


absl_logging.get_absl_logger().addFilter(_QuietOrbax())


_NAME = re.compile(r"stage\d+_seed-?\d+")


def _path(directory: str, stage: int, seed: int):
    # storage.epath makes local paths absolute: Orbax refuses relative ones.
    return storage.epath(storage.join(directory, f"stage{stage}_seed{seed}"))


def save(
    directory: str, genome: dict, stage: int, params_by_seed: dict[int, Any], options: dict
) -> list[str]:
    """Saves each seed's parameters; returns the checkpoint paths (existing ones are kept).

    ``params_by_seed`` holds nnx parameter states, or their ``nnx.to_pure_dict`` nested dicts
    (what a code-mode worker sends back).

    ``directory`` is a path or URL (see evolve_jax.storage).
    """
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    paths = []
    for seed, params in params_by_seed.items():
        path = _path(directory, stage, seed)
        if not path.exists():
            meta = {"genome": genome, "stage": stage, "seed": seed, "options": options}
            checkpointer.save(
                path,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(
                        params if isinstance(params, dict) else nnx.to_pure_dict(params)
                    ),
                    meta=ocp.args.JsonSave(meta),
                ),
            )
        paths.append(str(path))
    return paths


def restore(path: str, cfg_for: Any) -> tuple[nnx.Module, dict]:
    """Rebuilds the model saved at ``path``; ``cfg_for(meta)`` gives its ModelConfig."""
    path = storage.epath(path)
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    meta = checkpointer.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    cfg: model.ModelConfig = cfg_for(meta)
    graphdef, abstract_params = model.abstract(cfg)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(abstract_params)
    )
    restored = checkpointer.restore(
        path, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
    )["params"]
    nnx.replace_by_pure_dict(abstract_params, restored)
    return nnx.merge(graphdef, abstract_params), meta


def list_checkpoints(directory: str) -> list[str]:
    """The checkpoints under ``directory`` (a path or URL), sorted."""
    path = storage.epath(directory)
    if not path.is_dir():
        return []
    # Orbax finishes a save by renaming its temporary directory: skip unfinished ones.
    return sorted(str(p) for p in path.iterdir() if _NAME.fullmatch(p.name))
