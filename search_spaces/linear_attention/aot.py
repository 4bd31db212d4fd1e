"""Will a candidate's training fit in memory? Compile it ahead of time for the target chips.

    python -m search_spaces.linear_attention.aot --topology=v5e:4x4 \
        --config=configs/tpu_pod.flags --architecture=gated_deltanet --stage=1

Builds the training program of one candidate exactly as the search space runs it (its seeds
times the stage's learning rates, stacked and sharded over a device group with shard_map, the
whole run one compiled program, the stage's data included), compiles it for the topology's
chips without any chip present (``jax.experimental.topologies``; a TPU topology needs the tpu
extra's libtpu, not a TPU), and prints XLA's memory analysis per device as one JSON line. Exits
1 with one line when the program needs more than a chip's HBM (``--hbm_gib``, default by chip
generation). ``--topology=cpu`` compiles for this machine's CPU devices instead.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defines the command's flags (only when run as a program: the driver's flags share
    absl's registry with them in one process, as in the tests)."""
    flags.DEFINE_string("topology", "cpu", "A TPU topology (v5e:2x2, v4:2x2x2, ...) or cpu.")
    flags.DEFINE_string(
        "config", None, "A driver flagfile: its --space_opt and --eval_seeds lines are used."
    )
    flags.DEFINE_multi_string("space_opt", [], "key=value space options (after --config).")
    flags.DEFINE_string("architecture", "gated_deltanet", "A named seed.")
    flags.DEFINE_integer("stage", 1, "The stage to compile (byte-LM stages).", lower_bound=0)
    flags.DEFINE_integer("eval_seeds", None, "Seeds per candidate (default: --config's).")
    flags.DEFINE_integer(
        "group_size",
        None,
        "Devices the candidate is sharded over (default: one host's).",
        lower_bound=1,
    )
    flags.DEFINE_float("hbm_gib", None, "Memory per device (default: by chip generation).")


class OutOfMemory(Exception):
    """The compiler found the program larger than the target's memory."""


# HBM per chip, by the device kind JAX reports.
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32}


def _config_lines(path: str) -> tuple[list[str], int | None]:
    options, seeds = [], None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("--space_opt="):
                options.append(line.split("=", 1)[1])
            elif line.startswith("--eval_seeds="):
                seeds = int(line.split("=", 1)[1])
    return options, seeds


def devices_of(topology: str) -> list:
    """The first host's devices of ``topology`` (no chip needed), or this machine's CPUs."""
    import jax

    if topology == "cpu":
        return jax.local_devices(backend="cpu")
    from jax.experimental import topologies

    try:
        described = topologies.get_topology_desc(topology, "tpu")
    except Exception as e:  # no libtpu, or an unknown topology name
        raise ValueError(f"topology {topology!r}: {str(e).strip().splitlines()[0]}") from e
    return [d for d in described.devices if d.process_index == 0]


def analyse(space, architecture: str, stage: int, seeds: int, devices) -> dict:
    """Compiles the candidate's training program for ``devices``; returns its memory numbers."""
    from evolve_jax.evaluation.population import lower_population
    from search_spaces.linear_attention import train

    task, budget = space.stage_task(stage)
    if not isinstance(task, train.ByteLMConfig):
        raise ValueError(f"stage {stage} is not byte-level LM; compile a byte-LM stage")
    cfg = space.model_config(space.seeds()[architecture], stage)
    fn, population, data = train.abstract_byte_lm_population(cfg, task, budget, seeds)
    runs = seeds * len(budget.learning_rates)
    lowered = lower_population(fn, population, devices, *data)
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA refuses a program over the chip's memory at compile time
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise OutOfMemory(str(e).strip().splitlines()[-1]) from e
    memory = compiled.memory_analysis()
    used = (
        memory.argument_size_in_bytes + memory.output_size_in_bytes
        + memory.temp_size_in_bytes - memory.alias_size_in_bytes
    )  # fmt: skip
    return {
        "architecture": architecture, "stage": stage, "devices": len(devices),
        "device_kind": devices[0].device_kind, "runs": runs,
        "runs_per_device": -(-runs // len(devices)),
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes, "bytes_per_device": used,
    }  # fmt: skip


def main(argv):
    del argv
    from search_spaces.linear_attention.space import LinearAttentionSpace

    options, seeds = _config_lines(FLAGS.config) if FLAGS.config else ([], None)
    options += FLAGS.space_opt
    if FLAGS.topology != "cpu" and not any(o.startswith("impl=") for o in options):
        options.append("impl=pallas")  # what impl=auto picks on a TPU
    seeds = FLAGS.eval_seeds or seeds or 1
    try:
        space = LinearAttentionSpace(**dict(o.split("=", 1) for o in options))
        if FLAGS.architecture not in space.seeds():
            raise ValueError(f"--architecture={FLAGS.architecture!r} is not a named seed")
        devices = devices_of(FLAGS.topology)
        if FLAGS.group_size:
            if FLAGS.group_size > len(devices):
                raise ValueError(f"--group_size={FLAGS.group_size}: a host has {len(devices)}")
            devices = devices[: FLAGS.group_size]
        report = analyse(space, FLAGS.architecture, FLAGS.stage, seeds, devices)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OutOfMemory as e:
        print(
            f"error: {FLAGS.architecture} at stage {FLAGS.stage} does not fit: {e}",
            file=sys.stderr,
        )
        sys.exit(1)
    hbm = FLAGS.hbm_gib or HBM_GIB.get(report["device_kind"])
    report["hbm_bytes"] = int(hbm * 2**30) if hbm else None
    print(json.dumps(report))
    if hbm and report["bytes_per_device"] > report["hbm_bytes"]:
        need = report["bytes_per_device"] / 2**30
        print(
            f"error: {report['architecture']} at stage {report['stage']} needs {need:.2f} GiB per "
            f"device, over the {hbm:g} GiB of a {report['device_kind']}: fewer steps or seeds per "
            "device, a smaller batch, or a larger group",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
