"""Orbax checkpoints of trained candidates: parameters plus the genome and options that built them.

Layout: ``WORKDIR/checkpoints/<candidate fingerprint>/stage<k>_seed<s>/`` (an Orbax composite
checkpoint with items ``params`` and ``meta``), on any workdir evolve_jax.storage resolves
(a local path, ``file://`` or ``gs://``).

Orbax's save (orbax-checkpoint 0.12) is a collective over every process of a ``jax.distributed``
job, writes numpy arrays only on process 0, and refuses arrays held by one process's devices. A
candidate is checkpointed by the one process that trained it, so in a job of several processes
``save`` hands the parameters (as numpy arrays) to a child Python process of its own, outside the
job and on CPU, which writes the same checkpoint alone.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import subprocess
import sys
from typing import Any

import jax
import numpy as np
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

    ``directory`` is a path or URL (see evolve_jax.storage). In a job of several processes the
    checkpoints are written by a child process (see the module's docstring): RuntimeError, with
    its last line of stderr, when it fails; subprocess.TimeoutExpired after 30 minutes.
    """
    pure = {
        seed: params if isinstance(params, dict) else nnx.to_pure_dict(params)
        for seed, params in params_by_seed.items()
    }
    if jax.process_count() > 1:
        on_host = {seed: jax.tree.map(np.asarray, params) for seed, params in pure.items()}
        return _save_in_child(directory, genome, stage, on_host, options)
    return _save_here(directory, genome, stage, pure, options)


def _save_here(
    directory: str, genome: dict, stage: int, params_by_seed: dict[int, Any], options: dict
) -> list[str]:
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    paths = []
    for seed, params in params_by_seed.items():
        path = _path(directory, stage, seed)
        if not path.exists():
            meta = {"genome": genome, "stage": stage, "seed": seed, "options": options}
            checkpointer.save(
                path,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)
                ),
            )
        paths.append(str(path))
    return paths


_CHILD_TIMEOUT_S = 1800.0


def _save_in_child(
    directory: str, genome: dict, stage: int, params_by_seed: dict[int, Any], options: dict
) -> list[str]:
    """Runs ``_save_here`` in ``python -m search_spaces.linear_attention.checkpoints``, a
    single-process JAX on CPU; the arguments go over its stdin (pickled), the paths come back as
    its last stdout line (JSON)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "search_spaces.linear_attention.checkpoints"],
        input=pickle.dumps((directory, genome, stage, params_by_seed, options)),
        capture_output=True, env=env, timeout=_CHILD_TIMEOUT_S, check=False,
    )  # fmt: skip
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    if done.returncode != 0 or not lines:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(
            f"checkpoint writer (child process) exited {done.returncode}: "
            f"{err[-1] if err else 'no output'}"
        )
    return json.loads(lines[-1])


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


if __name__ == "__main__":  # the child process of _save_in_child
    print(json.dumps(_save_here(*pickle.loads(sys.stdin.buffer.read()))))
