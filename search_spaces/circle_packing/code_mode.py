"""Code mode of circle packing: a model writes ``construct_packing``; a sandbox runs it.

The worker imports the program and calls ``construct_packing(n, seed)`` for each evaluation
seed; it sends back the arrays as returned. This process checks each packing with
``validate.score_packing`` and computes the sum, so a program that prints a score, writes a
results file or patches the checker in its own process changes nothing.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence

import numpy as np

from evolve_jax.evaluation import sandbox
from evolve_jax.search_space import CheckFailure, EvalResult
from search_spaces.circle_packing import validate

PROGRAMS = os.path.join(os.path.dirname(__file__), "programs")
TEMPLATE = os.path.join(PROGRAMS, "template.py")
SEED_PROGRAMS = ("rings", "grid")
ENTRY = "construct_packing"
_TARGET = "search_spaces.circle_packing.code_mode:worker"


def _failure(report: sandbox.Report, reply: tuple[dict, dict] | None) -> str:
    if reply is not None and "error" in reply[0]:
        return str(reply[0]["error"])
    return report.reason() or "the worker stopped without an answer"


def run_check(source: str, limits: sandbox.Limits, env) -> list[CheckFailure]:
    """Import and interface check in a sandboxed worker."""
    files = {"candidate.py": source}
    reply, report = sandbox.run_once(_TARGET, {"job": "check"}, None, limits, files=files, env=env)
    if reply is None or "failures" not in reply[0]:
        return [CheckFailure("sandbox", _failure(report, reply))]
    return [CheckFailure(str(c), str(r)) for c, r in reply[0]["failures"]]


def run_program(
    source: str, n: int, tol: float, seeds: Sequence[int], limits: sandbox.Limits, env
) -> EvalResult:
    """Runs the program once per seed in a worker; the packings are checked and summed here."""
    request = {"job": "construct", "n": n, "seeds": [int(s) for s in seeds]}
    files = {"candidate.py": source}
    reply, report = sandbox.run_once(_TARGET, request, None, limits, files=files, env=env)
    extra = {"output": report.output_tail()}
    if reply is None or "error" in reply[0]:
        error = _failure(report, reply)
        return EvalResult(error=error, timed_out=report.timed_out, extra=extra)
    arrays = reply[1]
    metrics = {}
    for seed in seeds:
        total, why = validate.score_packing(
            arrays.get(f"centers:{seed}"), arrays.get(f"radii:{seed}"), n, tol
        )
        if total is None:
            return EvalResult(error=f"invalid packing (seed {seed}): {why}", extra=extra)
        metrics[int(seed)] = {"sum_radii": total}
    return EvalResult(metrics=metrics, extra=extra)


def _load():
    import importlib.util

    spec = importlib.util.spec_from_file_location("candidate", os.path.abspath("candidate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entry() -> tuple[object | None, list[list[str]]]:
    try:
        module = _load()
    except BaseException as e:  # the program's own error, whatever it is, is the reason
        return None, [["import", sandbox.candidate_traceback(e)]]
    fn = getattr(module, ENTRY, None)
    if not callable(fn):
        return None, [["interface", f"the program defines no function {ENTRY}(n, seed)"]]
    try:
        inspect.signature(fn).bind(26, 0)
    except (TypeError, ValueError) as e:
        return None, [["interface", f"{ENTRY} cannot be called as {ENTRY}(n, seed): {e}"]]
    return fn, []


def worker(channel: sandbox.Channel) -> None:
    """Sandbox target: a ``check`` or a ``construct`` request (see the module docstring)."""
    request, _ = channel.receive()
    fn, failures = _entry()
    if request["job"] == "check":
        channel.send({"failures": failures})
        return
    if failures:
        channel.send({"error": f"{failures[0][0]}: {failures[0][1]}"})
        return
    out = {}
    for seed in request["seeds"]:
        try:
            centers, radii = fn(request["n"], seed)
            out[f"centers:{seed}"] = np.asarray(centers, dtype=np.float64)
            out[f"radii:{seed}"] = np.asarray(radii, dtype=np.float64)
        except Exception as e:
            channel.send({"error": f"{ENTRY}(n, {seed}) failed:\n{sandbox.candidate_traceback(e)}"})
            return
    channel.send({"packings": len(request["seeds"])}, out)
