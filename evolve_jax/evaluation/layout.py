"""How candidates share a process's devices: disjoint device groups, no duplicate work.

A candidate is a population of ``runs`` independent training runs (its seeds, times its
learning rates where the search space stacks them). It is evaluated on one *group* of devices
whose size divides the device count, its runs sharded over the group (``population.py``); the
other groups evaluate other candidates at the same time. ``plan`` chooses the group size that
minimises the time of a batch of candidates, counted in rounds of one run per device:

    time(g) = ceil(candidates / (devices / g)) * ceil(runs / g)

with ties going to the layout with fewer padded slots (duplicate runs), then to the larger group
(fewer programs in flight, each candidate done sooner).
Padding is what ``ceil(runs / g) * g - runs`` counts, and idle groups what the last round leaves
over; ``fill`` is the fraction of device time that is real work. The work queue
(``scheduler.py``) uses ``queue_group_size``: the plan for one candidate per device, whatever
is queued.

Example, 8 devices and 8 candidates of 2 runs: groups of 2 take 2 rounds with every slot used;
one candidate at a time over all 8 devices takes 8 rounds at 25% fill.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Layout:
    groups: tuple[tuple[Any, ...], ...]  # disjoint device groups of equal size
    runs: int  # runs per candidate
    candidates: int

    @property
    def group_size(self) -> int:
        return len(self.groups[0])

    @property
    def rounds(self) -> int:
        """Time of the step in rounds of one run per device (the quantity minimised)."""
        waves = math.ceil(self.candidates / len(self.groups))
        return waves * math.ceil(self.runs / self.group_size)

    @property
    def padding(self) -> int:
        """Duplicate runs per candidate that fill its group's last round."""
        return math.ceil(self.runs / self.group_size) * self.group_size - self.runs

    @property
    def fill(self) -> float:
        """Real runs over the run slots the devices offer in that time (1.0: nothing idle)."""
        slots = self.rounds * len(self.groups) * self.group_size
        return self.candidates * self.runs / slots if slots else 0.0

    def describe(self) -> dict[str, Any]:
        return {
            "devices": len(self.groups) * self.group_size,
            "groups": len(self.groups),
            "group_size": self.group_size,
            "runs_per_candidate": self.runs,
            "candidates": self.candidates,
            "fill": round(self.fill, 4),
        }


def plan(devices: Sequence[Any], runs: int, candidates: int) -> Layout:
    """The layout of ``candidates`` populations of ``runs`` runs over ``devices``."""
    if not devices:
        raise ValueError("no devices to lay candidates out on")
    if runs < 1 or candidates < 0:
        raise ValueError(f"runs must be >= 1 and candidates >= 0, got {runs} and {candidates}")
    count = len(devices)
    best = None
    for size in range(count, 0, -1):  # larger groups first: they win ties
        if count % size:
            continue
        groups = tuple(tuple(devices[i : i + size]) for i in range(0, count, size))
        layout = Layout(groups, runs, max(candidates, 1))
        if best is None or (layout.rounds, layout.padding) < (best.rounds, best.padding):
            best = layout
    return dataclasses.replace(best, candidates=candidates)


def queue_group_size(devices: int, runs: int) -> int:
    """The group size of the work queue (``scheduler.py``) on a process with ``devices``
    devices, for candidates of ``runs`` runs: ``plan``'s choice for a host's worth of
    candidates (one per device), so that it depends on neither how much work is queued nor
    which process takes a candidate."""
    return plan(list(range(devices)), runs, devices).group_size
