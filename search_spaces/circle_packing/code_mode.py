"""Code mode of circle packing: a model writes ``construct_packing``; a sandbox runs it.

The worker (``evolve_jax.evaluation.harness``) imports the program and calls
``construct_packing(n, seed)`` for each evaluation seed; it sends back the arrays as returned.
This process checks each packing with ``validate.score_packing`` and computes the sum, so a
program that prints a score, writes a results file or patches the checker in its own process
changes nothing: validity is verified on the very packings that are scored.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence

import numpy as np

from evolve_jax.evaluation import harness, sandbox
from evolve_jax.search_space import EvalResult
from search_spaces.circle_packing import validate

PROGRAMS = os.path.join(os.path.dirname(__file__), "programs")
TEMPLATE = os.path.join(PROGRAMS, "template.py")
SEED_PROGRAMS = ("rings", "grid")
ENTRY = "construct_packing"
TARGET = "search_spaces.circle_packing.code_mode:worker"


def run_program(
    programs: harness.Programs, source: str, n: int, tol: float, seeds: Sequence[int]
) -> EvalResult:
    """Runs the program once per seed in a worker; the packings are checked and summed here."""
    seeds = [int(s) for s in seeds]
    with programs.session(source) as session:
        reply = session.ask({"job": "construct", "n": n, "seeds": seeds}, last=True)
    extra = session.output()
    reply.only([f"{kind}:{seed}" for seed in seeds for kind in ("centers", "radii")])
    metrics = {}
    for seed in seeds:
        centers = reply.array(f"centers:{seed}", kinds="f", finite=False)
        radii = reply.array(f"radii:{seed}", kinds="f", finite=False)
        total, why = validate.score_packing(centers, radii, n, tol)
        if total is None:
            return EvalResult(error=f"invalid packing (seed {seed}): {why}", extra=extra)
        metrics[seed] = {"sum_radii": total}
    return EvalResult(metrics=metrics, extra=extra)


def _callable_as_entry(fn) -> str | None:
    if not callable(fn):
        return f"the program defines no function {ENTRY}(n, seed)"
    try:
        inspect.signature(fn).bind(26, 0)
    except (TypeError, ValueError) as e:
        return f"{ENTRY} cannot be called as {ENTRY}(n, seed): {e}"
    return None


def _check(request: dict, arrays: dict) -> tuple[dict, dict]:
    del request, arrays
    harness.entry(ENTRY, _callable_as_entry)
    return {"failures": []}, {}


def _construct(request: dict, arrays: dict) -> tuple[dict, dict]:
    del arrays
    fn = harness.entry(ENTRY, _callable_as_entry)
    out = {}
    for seed in request["seeds"]:
        try:
            centers, radii = fn(request["n"], seed)
            out[f"centers:{seed}"] = np.asarray(centers, dtype=np.float64)
            out[f"radii:{seed}"] = np.asarray(radii, dtype=np.float64)
        except Exception as e:
            trace = sandbox.candidate_traceback(e)
            raise harness.ProgramFailure("", f"{ENTRY}(n, {seed}) failed:\n{trace}") from None
    return {"packings": len(request["seeds"])}, out


def worker(channel) -> None:
    """Sandbox target: a ``check`` or a ``construct`` request (see the module docstring)."""
    harness.serve(channel, {"check": _check, "construct": _construct})
