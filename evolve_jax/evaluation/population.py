"""Population batching: one run per slot of a leading axis, sharded over the devices given.

A population of P runs (in the linear-attention space, one candidate's seeds times learning
rates, their parameters stacked on axis 0) is padded to a multiple of the device count, laid
out over a 1-D mesh named ``pop`` and mapped with ``jax.shard_map`` of a ``vmap``-ed per-run
function: each device evaluates its slice, with no communication. The devices are one group of
a host's (``layout.py``): other groups evaluate other candidates at the same time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

POP = "pop"


@functools.cache
def population_mesh(devices: tuple[Any, ...]) -> Mesh:
    """The 1-D mesh over ``devices`` (built once per device set)."""
    return Mesh(np.asarray(devices), (POP,))


def _pad(tree, multiple: int):
    size = jax.tree.leaves(tree)[0].shape[0]
    extra = (-size) % multiple
    if extra == 0:
        return tree
    # Padding repeats the last candidate: real values keep numerics (no NaN from zeros) sane.
    return jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]), tree)


def evaluate_population(
    fn: Callable[..., Any], population: Any, devices: Sequence[Any] | None = None, *args: Any
) -> Any:
    """Applies ``fn(candidate, *args)`` to every candidate of ``population`` (leading axis P).

    ``args`` are broadcast (replicated) to every device. Returns outputs with leading axis P.
    """
    devices = tuple(devices or jax.local_devices())
    size = jax.tree.leaves(population)[0].shape[0]
    mesh = population_mesh(devices)
    padded = _pad(jax.tree.map(np.asarray, population), len(devices))
    sharded = jax.device_put(padded, NamedSharding(mesh, PartitionSpec(POP)))
    replicated = jax.device_put(args, NamedSharding(mesh, PartitionSpec()))
    per_device = jax.tree.leaves(padded)[0].shape[0] // len(devices)
    mapped = _compiled(fn, mesh, len(args), per_device == 1)
    out = mapped(sharded, *replicated)
    return jax.tree.map(lambda x: np.asarray(x)[:size], out)


def lower_population(
    fn: Callable[..., Any], population: Any, devices: Sequence[Any], *args: Any
) -> jax.stages.Lowered:
    """The program ``evaluate_population`` would run, lowered for abstract inputs.

    ``population`` and ``args`` are ``jax.ShapeDtypeStruct`` trees (leading axis P on the
    population); ``devices`` may be those of a topology with no chips here (ahead-of-time
    compilation), so nothing is placed on them.
    """
    devices = tuple(devices)
    mesh = population_mesh(devices)
    size = jax.tree.leaves(population)[0].shape[0]
    padded = -(-size // len(devices)) * len(devices)
    pop_sharding = NamedSharding(mesh, PartitionSpec(POP))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((padded, *x.shape[1:]), x.dtype, sharding=pop_sharding),
        population,
    )
    replicated = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(mesh, PartitionSpec())
        ),
        args,
    )
    mapped = _compiled(fn, mesh, len(args), padded // len(devices) == 1)
    return mapped.lower(abstract, *replicated)


@functools.lru_cache(maxsize=64)  # one entry per (function, mesh): bounded, not per run
def _compiled(fn, mesh: Mesh, num_args: int, one_per_device: bool):
    def per_device(pop, *args):
        if one_per_device:  # no vmap of size 1: it costs compile time and runs slower on CPU
            out = fn(jax.tree.map(lambda x: x[0], pop), *args)
            return jax.tree.map(lambda x: x[None], out)
        return jax.vmap(lambda c: fn(c, *args))(pop)

    return jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(PartitionSpec(POP),) + (PartitionSpec(),) * num_args,
            out_specs=PartitionSpec(POP),
            # Candidates never communicate; without this, every scan whose carry starts as a
            # constant (zeros state, fresh optimiser) would need an explicit pcast.
            check_vma=False,
        )
    )
