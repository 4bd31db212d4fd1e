"""Code mode's harness, shared by every search space: a model-written program runs in a
sandboxed worker, and the controller validates every reply and computes every score itself.

A space writes only its task: a worker function (built on ``serve``) with its checks and jobs,
the requests it sends, and how it scores the replies. This module does the rest.

* Worker side: ``load_program`` loads the program from its file (the working dir is never on
  ``sys.path``, so a file the program writes cannot stand in for a module); ``serve`` answers
  requests by their ``job`` (with the program's traceback if it raises) until the last one.
* Controller side: ``Programs`` runs a space's worker on a program in a sandbox lent by
  ``workers.Slots``; ``Reply`` validates what comes back (a field or an array that is missing,
  of the wrong type, shape or dtype, or not finite is a ``BadReply`` naming it);
  ``per_candidate`` turns whatever goes wrong with one candidate into that candidate's failure,
  never its siblings'.
* Scoring verification for causal sequence models (``SuffixSwap``): the outputs scored on the
  held-out windows must equal, before a secret cut, the outputs that a fresh worker gives for
  the same windows with everything after the cut replaced.

Nothing computed in a worker is trusted. A program shares its worker's process, so it can patch
the harness code there: the checks a worker runs are a cheap filter for honest mistakes, and
reasons such as "timeout" or "memory" come only from what the sandbox observed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import logging
import os
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from evolve_jax.evaluation import sandbox, workers
from evolve_jax.search_space import CheckFailure, EvalResult

_log = logging.getLogger(__name__)

PROGRAM_FILE = "candidate.py"
_START_ATTEMPTS = 3  # a sandbox that cannot start (fork, disk) is infrastructure: try again

# ------------------------------------------------------------------------------ worker side


def load_program(path: str = PROGRAM_FILE) -> types.ModuleType:
    """The program's module, executed from ``path`` under the name ``candidate``; once per
    path in a process, whatever the jobs that ask for it."""
    return _load(os.path.abspath(path))


@functools.cache
def _load(path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("candidate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ProgramFailure(Exception):
    """A check or job that the program failed: ``check`` names it (may be empty), the
    message says why."""

    def __init__(self, check: str, reason: str):
        super().__init__(f"{check}: {reason}" if check else reason)
        self.check = check
        self.reason = reason


def entry(name: str, accepts: Callable[[Any], str | None]) -> Any:
    """The program's ``name`` if ``accepts(value)`` returns None; else ProgramFailure.

    The program's own import error becomes the "import" failure, with its traceback.
    """
    try:
        module = load_program()
    except BaseException as e:  # whatever the program raises, it is the reason
        raise ProgramFailure("import", sandbox.candidate_traceback(e)) from None
    value = getattr(module, name, None)
    problem = accepts(value)  # None too: ``accepts`` words what is missing
    if problem is not None:
        raise ProgramFailure("interface", problem)
    return value


Job = Callable[[dict, dict[str, np.ndarray]], tuple[dict, Mapping[str, np.ndarray]]]


def serve(channel: sandbox.Channel, jobs: Mapping[str, Job]) -> None:
    """Answers requests with ``jobs[request["job"]]`` until one marked ``last`` (or an error).

    A job returns (header, arrays). A ProgramFailure is answered ``{"failures": [[check,
    reason]]}`` for a "check" job and ``{"error": ...}`` otherwise; any other exception is
    answered with the program's traceback.
    """
    while True:
        try:
            request, arrays = channel.receive()
        except sandbox.SandboxError:
            return  # the controller closed the channel: nothing more to do
        job = jobs.get(request.get("job"))
        if job is None:
            channel.send({"error": f"harness: no job {request.get('job')!r}"})
            return
        try:
            header, out = job(request, arrays)
        except ProgramFailure as e:
            if request["job"] == "check":
                header, out = {"failures": [[e.check, e.reason]]}, {}
            else:
                header, out = {"error": str(e)}, {}
        except Exception as e:
            header, out = {"error": sandbox.candidate_traceback(e)}, {}
        channel.send(header, out)
        if "error" in header or request.get("last"):
            return


# -------------------------------------------------------------------------- controller side


class BadReply(ValueError):
    """A reply the controller refuses; the message, naming the field, is the node's reason."""


class InfrastructureError(RuntimeError):
    """The machine failed the evaluation (no sandbox could start), not the program."""


class JobFailed(Exception):
    """A job that ended without a usable reply: the program's error, or what the sandbox saw."""

    def __init__(self, reason: str, report: sandbox.Report | None = None):
        super().__init__(reason)
        self.reason = reason
        self.report = report

    @property
    def timed_out(self) -> bool:
        return bool(self.report and self.report.timed_out)


_KINDS = {"f": "floating-point", "i": "integer", "u": "unsigned integer", "b": "boolean"}


@dataclasses.dataclass(frozen=True)
class Reply:
    """One message from a worker, read through validating accessors."""

    header: Mapping[str, Any]
    arrays: Mapping[str, np.ndarray]

    def field(self, name: str, kind: type | tuple[type, ...]) -> Any:
        """``header[name]``, which must be an instance of ``kind`` (bool is not an int here)."""
        value = self.header.get(name)
        if value is None and name not in self.header:
            raise BadReply(f"reply: no field {name!r}")
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            wanted = " or ".join(k.__name__ for k in kinds)
            raise BadReply(f"reply: field {name!r} is a {type(value).__name__}, not {wanted}")
        return value

    def number(self, name: str) -> float:
        """A finite number field."""
        value = float(self.field(name, (int, float)))
        if not np.isfinite(value):
            raise BadReply(f"reply: field {name!r} is not finite")
        return value

    def array(
        self,
        name: str,
        shape: Sequence[int | None] | None = None,
        kinds: str = "f",
        finite: bool = True,
    ) -> np.ndarray:
        """``arrays[name]`` with this shape (None: any size on that axis), a dtype of one of
        ``kinds`` (numpy kind letters) and, for floats, only finite values."""
        if name not in self.arrays:
            raise BadReply(f"outputs: no array {name!r}")
        array = self.arrays[name]
        if array.dtype.kind not in kinds:
            wanted = " or ".join(_KINDS.get(k, k) for k in kinds)
            raise BadReply(f"outputs: {name!r} has dtype {array.dtype}, expected {wanted}")
        if shape is not None and (
            array.ndim != len(shape)
            or any(w is not None and g != w for g, w in zip(array.shape, shape, strict=True))
        ):
            expected = ", ".join("*" if s is None else str(s) for s in shape)
            raise BadReply(f"outputs: {name!r} has shape {array.shape}, expected ({expected})")
        if finite and array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise BadReply(f"outputs: {name!r} holds non-finite values")
        return array

    def only(self, names: Sequence[str]) -> None:
        """Refuses arrays other than ``names``."""
        extra = sorted(set(self.arrays) - set(names))
        if extra:
            raise BadReply(f"outputs: unexpected arrays {extra[:5]}")


def failure_reason(report: sandbox.Report, header: Mapping | None) -> str:
    """Why a worker gave no usable reply: what the sandbox observed (timeout, memory, a
    signal) first, then the program's own error text, then its exit."""
    observed = report.reason()
    error = str(header["error"]) if header and header.get("error") else None
    if report.timed_out or report.memory_exceeded:
        return observed
    return error or observed or "the worker stopped without an answer"


class Session:
    """A worker running one program: requests and replies until it is closed."""

    def __init__(self, box: sandbox.Sandbox):
        self._box = box
        self.report: sandbox.Report | None = None

    def ask(
        self,
        header: Mapping,
        arrays: Mapping[str, np.ndarray] | None = None,
        *,
        last: bool = False,
    ) -> Reply:
        """Sends one request and returns the reply; JobFailed if there is none, or it is the
        program's error. After the ``last`` request the worker exits."""
        try:
            self._box.send({**header, "last": last}, arrays)
            reply_header, reply_arrays = self._box.receive()
        except sandbox.SandboxError as e:
            report = self.close()
            raise JobFailed(report.reason() or f"sandbox: {e}", report) from None
        if "error" in reply_header:
            report = self.close()
            raise JobFailed(failure_reason(report, reply_header), report)
        return Reply(reply_header, reply_arrays)

    def close(self) -> sandbox.Report:
        if self.report is None:
            self.report = self._box.finish(1.0)
        return self.report

    def output(self) -> dict:
        """The tails of the worker's stdout and stderr, for the node (``stats.output``)."""
        return {"output": self.report.output_tail()} if self.report else {}


class Programs:
    """Runs a space's worker ``target`` on programs, each in a fresh sandbox lent a slot."""

    def __init__(
        self,
        target: str,
        limits: sandbox.Limits,
        slots: Callable[[], workers.Slots],
    ):
        module, _, function = target.partition(":")
        if not module or not function:
            raise ValueError(f"target must be 'module:function', got {target!r}")
        self.target = target
        self.limits = limits
        self._slots = slots

    @contextlib.contextmanager
    def session(self, source: str) -> Iterator[Session]:
        """A worker that has ``source`` as its program, closed on exit."""
        with self._slots().acquire() as env:
            box = self._start(source, env)  # started: closed below, whatever happens
            try:
                session = Session(box)
                try:
                    yield session
                finally:
                    session.close()
            finally:
                box.__exit__(None, None, None)

    def _start(self, source: str, env: Mapping[str, str]) -> sandbox.Sandbox:
        for attempt in range(_START_ATTEMPTS):
            box = sandbox.Sandbox(self.target, self.limits, files={PROGRAM_FILE: source}, env=env)
            try:
                box.__enter__()
                return box
            except OSError as e:  # the machine's (fork, disk), not the program's
                if attempt + 1 == _START_ATTEMPTS:
                    raise InfrastructureError(
                        f"infrastructure: no sandbox started in {_START_ATTEMPTS} attempts: {e}"
                    ) from e
                _log.warning("sandbox did not start (%s); trying again", e)
                time.sleep(2.0**attempt)
        raise AssertionError("unreachable")

    def check(self, source: str, request: Mapping) -> list[CheckFailure]:
        """The worker's checks: its ``failures`` reply, or one "sandbox" failure saying why
        there is none."""
        try:
            with self.session(source) as session:
                reply = session.ask({**request, "job": "check"}, last=True)
                failures = reply.field("failures", list)
        except JobFailed as e:
            return [CheckFailure("sandbox", e.reason)]
        except BadReply as e:
            return [CheckFailure("sandbox", str(e))]
        out = []
        for item in failures[:20]:
            if not (
                isinstance(item, list) and len(item) == 2 and all(isinstance(s, str) for s in item)
            ):
                return [CheckFailure("sandbox", "reply: a failure is not [check, reason]")]
            out.append(CheckFailure(item[0][:100], item[1][:8000]))
        return out


def per_candidate(
    evaluate: Callable[[Any], EvalResult], candidates: Sequence[Any]
) -> list[EvalResult]:
    """``evaluate`` for each candidate, whatever goes wrong with one of them staying its own:
    a JobFailed or BadReply is that candidate's failure with its reason; a sandbox that would
    not start comes back marked ``extra["infrastructure"]`` (the Engineer runs it again, it is
    not the candidate's failure); any other exception is logged as a harness error and
    recorded as that candidate's failure."""
    results = []
    for candidate in candidates:
        try:
            results.append(evaluate(candidate))
        except JobFailed as e:
            extra = {"output": e.report.output_tail()} if e.report else {}
            results.append(EvalResult(error=e.reason, timed_out=e.timed_out, extra=extra))
        except BadReply as e:
            results.append(EvalResult(error=str(e)))
        except InfrastructureError as e:
            results.append(EvalResult(error=str(e), extra={"infrastructure": True}))
        except Exception as e:
            _log.exception("harness error on one candidate")
            results.append(EvalResult(error=f"harness: {type(e).__name__}: {e}"))
    return results


# ---------------------------------------------------------------- verification: causality


@dataclasses.dataclass(frozen=True)
class SuffixSwap:
    """Held-out windows with everything after a secret cut replaced, for a second worker.

    ``inputs`` [N, T] are the swapped windows in a secret order (``order[k]`` is the held-out
    window in row k); in window i, positions ``>= cuts[i]`` hold another window's bytes. A
    causal model's outputs at the positions before the cut are the same with and without the
    swap; a program that read the future when scored (a non-causal mixer, or a patched harness
    that looks one token ahead) changes them, in a way it cannot undo without the true suffix,
    which that worker never sees.
    """

    inputs: np.ndarray  # [N, T], rows in ``order``
    positions: np.ndarray  # [N, T] bool: where outputs are returned, rows in ``order``
    order: np.ndarray  # [N]
    cuts: np.ndarray  # [N], by held-out window

    @classmethod
    def draw(
        cls, inputs: np.ndarray, positions: np.ndarray, rng: np.random.Generator
    ) -> SuffixSwap:
        """Cuts right after a random returned position of each window (so the position just
        before each cut is compared); each suffix comes from another window."""
        n, t = inputs.shape
        if n < 2:
            raise ValueError("a suffix swap needs two windows or more")
        cuts = np.zeros(n, np.int64)
        for i in range(n):
            returned = np.flatnonzero(positions[i][: t - 1])
            cuts[i] = rng.choice(returned) + 1 if len(returned) else t
        donors = (np.arange(n) + rng.integers(1, n, size=n)) % n  # never the window itself
        swapped = inputs.copy()
        later = np.arange(t)[None, :] >= cuts[:, None]
        swapped[later] = inputs[donors][later]
        order = rng.permutation(n)
        return cls(swapped[order], positions[order], order, cuts)

    def disagreement(
        self, scored: np.ndarray, swapped: np.ndarray, positions: np.ndarray
    ) -> tuple[float, int]:
        """(largest change in log-probabilities before a cut, the window where it is), from
        ``scored`` [M, V] outputs on the held-out windows and ``swapped`` [M, V] on these
        rows, both at ``positions`` (the held-out windows' returned positions, row-major)."""
        n, t = positions.shape
        index = np.full((n, t), -1)
        index[positions] = np.arange(int(positions.sum()))
        swapped_index = np.full((n, t), -1)
        swapped_index[self.positions] = np.arange(int(self.positions.sum()))
        worst, where = 0.0, -1
        for row, i in enumerate(self.order):
            before = np.flatnonzero(positions[i][: self.cuts[i]])
            if not len(before):
                continue
            a = log_softmax(scored[index[i, before]])
            b = log_softmax(swapped[swapped_index[row, before]])
            change = float(np.abs(a - b).max())
            change = change if np.isfinite(change) else np.inf
            if change > worst:
                worst, where = change, int(i)
        return worst, where


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
