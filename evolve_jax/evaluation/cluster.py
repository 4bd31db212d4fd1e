"""Several processes, one search: JAX's multi-controller runtime, with process 0 as the leader.

Every process runs the same command. ``initialize`` joins them with ``jax.distributed`` when a
cluster is named by flags or detected (Slurm with several tasks, a multi-host Cloud TPU slice).
Process 0 runs the agents, keeps the work queue (``scheduler.py``) and commits every node.
Each worker (every other process) says how many devices it has, then takes evaluations one by
one from JAX's distributed key-value store as process 0 deals them, runs each on the device
group it names, in a thread, and writes the result back as soon as it is done; process 0 polls
for results. No compiled program spans hosts.

Two waits, two bounds: a worker waits for work as long as process 0 lives (the coordination
service, in process 0, answers it); process 0 counts a worker dead once the counter the worker
bumps every second in the store has not moved for ``--heartbeat_timeout_s`` (measured on
process 0's clock, so no clocks need agree) and re-deals what it held. How long one
evaluation may run is the queue's ``--eval_timeout_s``. (JAX's own ``get_live_nodes`` is a
barrier across the processes it names, so it cannot serve as a probe.)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

from evolve_jax.evaluation.scheduler import Evaluation, Executor, run_evaluation
from evolve_jax.search_space import EvalResult

_PREFIX = "evolve_jax"


class ClusterError(RuntimeError):
    """The processes could not be joined as asked (one line, said before any work)."""


@dataclasses.dataclass
class Cluster:
    """This process's place in the job, and the store the processes exchange work through."""

    process_id: int = 0
    num_processes: int = 1
    client: Any = None  # jax's DistributedRuntimeClient; None for a single process
    join_timeout_s: float = 300.0
    heartbeat_timeout_s: float = 100.0
    _executors: list[RemoteExecutor] | None = None

    @property
    def leader(self) -> bool:
        return self.process_id == 0

    # ------------------------------------------------------------------ leader side

    def executors(self) -> list[RemoteExecutor]:
        """One executor per worker, built once: each waits (up to the join timeout) for its
        worker's hello; a worker that never says it is counted dead from the start."""
        if self._executors is None:
            self._executors = []
            if self.client is not None and self.leader:
                inbox = _Inbox(self.client, self.heartbeat_timeout_s)
                self._executors = [
                    RemoteExecutor(self.client, p, inbox, self.join_timeout_s)
                    for p in range(1, self.num_processes)
                ]
        return self._executors

    def stop_workers(self, wait_s: float = 60.0) -> None:
        """Tells every live worker that the search is over, and waits (up to ``wait_s``) until
        each has left the job: the coordination service lives in this process, and a worker
        whose disconnect finds it gone aborts."""
        if self.client is None or not self.leader:
            return
        workers = [e.process for e in self.executors() if e.alive()]
        for executor in self.executors():
            executor.stop()
        # Each worker says it is leaving, then disconnects; the disconnect needs this process.
        deadline = time.monotonic() + wait_s
        while workers and time.monotonic() < deadline:
            left = {int(k.rsplit("/", 1)[-1]) for k, _ in _dir(self.client, f"{_PREFIX}/left/")}
            workers = [p for p in workers if p not in left and self._heard_from(p)]
            if workers:
                time.sleep(0.1)
        if workers:
            logging.warning("process(es) %s did not leave the job within %.0f s", workers, wait_s)
        time.sleep(1.0)  # their disconnects, which reach the coordination service here

    def _heard_from(self, p: int) -> bool:
        return any(e.process == p and e.alive() for e in self.executors())

    def leave(self) -> None:
        """A worker's last act: disconnects from the job while the leader still waits for it."""
        if self.client is not None and not self.leader:
            import jax

            with contextlib.suppress(Exception):  # process 0 is gone: nothing to tell
                self.client.key_value_set(_key("left", self.process_id), "1")
            jax.distributed.shutdown()
            self.client = None

    # ------------------------------------------------------------------ worker side

    def serve(
        self,
        evaluate: Callable[[Any, int, Sequence[int], Sequence[int]], tuple[EvalResult, float]],
        devices: int,
        lanes: int,
    ) -> int:
        """A worker's loop: runs the evaluations process 0 deals until it says stop (or is
        gone); returns how many it finished."""
        client, p = self.client, self.process_id
        client.key_value_set(_key("hello", p), json.dumps({"devices": devices, "lanes": lanes}))
        finished = 0
        lock = threading.Lock()
        stopped = threading.Event()

        def beat() -> None:  # the counter process 0 watches
            count = 0
            while not stopped.wait(1.0):
                count += 1
                try:
                    client.key_value_set(_key("alive", p), str(count), allow_overwrite=True)
                except Exception:  # process 0 is gone; the loop below finds out too
                    return

        threading.Thread(target=beat, name="evolve_jax-heartbeat", daemon=True).start()

        def work(task: dict) -> None:
            nonlocal finished
            result, seconds = run_evaluation(
                evaluate, task["genome"], task["stage"], tuple(task["seeds"]), task["block"]
            )
            answer = json.dumps({"key": task["key"], **result_to_json(result, seconds)})
            client.key_value_set(_key("done", p, task["key"]), answer)
            with lock:
                finished += 1

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=devices * lanes)
        n = 0
        try:
            while True:
                key = _key("task", p, n)
                try:
                    raw = client.blocking_key_value_get(key, 10_000)
                except Exception as e:  # no work for 10 s, or the coordination service is gone
                    try:
                        client.key_value_try_get(_key("hello", p))  # answered while 0 lives
                    except Exception:
                        logging.error("process 0 is gone (%s); this worker stops", e)
                        break
                    continue
                client.key_value_delete(key)
                n += 1
                task = json.loads(raw)
                if task.get("stop"):
                    break
                logging.info(
                    "process %d: evaluation %d (stage %d) on device(s) %s",
                    p, task["key"], task["stage"], task["block"],
                )  # fmt: skip
                pool.submit(work, task)
        finally:
            stopped.set()
            pool.shutdown(wait=False, cancel_futures=True)
        return finished


class _Inbox:
    """Process 0's view of the workers: one directory read each of their answers and of their
    heartbeat counters serves every worker."""

    def __init__(self, client: Any, heartbeat_timeout_s: float, min_interval_s: float = 0.02):
        self._client = client
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._min_interval_s = min_interval_s
        self._read = -float("inf")
        self._by_process: dict[int, list[tuple[str, str]]] = {}
        self._beats: dict[int, tuple[str, float]] = {}  # process -> (counter, when it moved)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._read < self._min_interval_s:
            return
        self._read = now
        for key, value in _dir(self._client, f"{_PREFIX}/done/"):
            process = int(key.rstrip("/").split("/")[-2])
            self._by_process.setdefault(process, []).append((key, value))
        for key, value in _dir(self._client, f"{_PREFIX}/alive/"):
            process = int(key.rsplit("/", 1)[-1])
            if self._beats.get(process, ("", 0.0))[0] != value:
                self._beats[process] = (value, now)

    def take(self, p: int) -> list[tuple[str, str]]:
        self._refresh()
        return self._by_process.pop(p, [])

    def heard(self, p: int, since: float) -> bool:
        """Whether worker ``p``'s counter moved within the heartbeat timeout (counting from
        ``since``, when it said hello, until its first beat)."""
        self._refresh()
        moved = self._beats.get(p, ("", since))[1]
        return time.monotonic() - max(moved, since) < self._heartbeat_timeout_s


class RemoteExecutor(Executor):
    """A worker process, as process 0's work queue sees it."""

    def __init__(self, client: Any, process: int, inbox: _Inbox, join_timeout_s: float):
        self.process = process
        self._client = client
        self._inbox = inbox
        self._sent = 0
        self._gone = False
        try:
            hello = json.loads(
                client.blocking_key_value_get(_key("hello", process), int(1000 * join_timeout_s))
            )
        except Exception as e:  # never said hello: left out from the start
            logging.error("process %d never said hello (%s); it is left out", process, e)
            hello, self._gone = {"devices": 1, "lanes": 1}, True
        self.devices, self.lanes = int(hello["devices"]), int(hello["lanes"])
        self._hello = time.monotonic()

    def start(self, evaluation: Evaluation, block: Sequence[int]) -> None:
        task = {
            "key": evaluation.key,
            "genome": evaluation.genome,
            "stage": evaluation.stage,
            "seeds": list(evaluation.seeds),
            "block": list(block),
        }
        self._send(task)

    def _send(self, task: dict) -> None:
        self._client.key_value_set(_key("task", self.process, self._sent), json.dumps(task))
        self._sent += 1

    def poll(self) -> list[tuple[int, EvalResult, float]]:
        out = []
        for key, raw in self._inbox.take(self.process):
            self._client.key_value_delete(key)
            record = json.loads(raw)
            result, seconds = result_from_json(record)
            out.append((int(record["key"]), result, seconds))
        return out

    def alive(self) -> bool:
        if not self._gone:
            self._gone = not self._inbox.heard(self.process, self._hello)
        return not self._gone

    def stop(self) -> None:
        if not self._gone:
            self._send({"stop": True})


def _dir(client: Any, prefix: str) -> list[tuple[str, str]]:
    """The store's entries under ``prefix`` (none if the store cannot be read)."""
    try:
        return client.key_value_dir_get(prefix)
    except Exception:  # the coordination service is going away
        return []


def _key(kind: str, p: int, n: int | None = None) -> str:
    return f"{_PREFIX}/{kind}/{p}" + ("" if n is None else f"/{n:010d}")


# ---------------------------------------------------------------------- wire format


def result_to_json(result: EvalResult, seconds: float) -> dict:
    return {
        "metrics": {str(s): m for s, m in result.metrics.items()},
        "error": result.error,
        "timed_out": result.timed_out,
        "extra": result.extra,
        "seconds": seconds,
    }


def result_from_json(record: dict) -> tuple[EvalResult, float]:
    metrics = {int(s): m for s, m in record["metrics"].items()}
    result = EvalResult(
        metrics=metrics,
        error=record["error"],
        timed_out=record["timed_out"],
        extra=record["extra"],
    )
    return result, float(record["seconds"])


# ---------------------------------------------------------------------- joining


_CURRENT = Cluster()


def current() -> Cluster:
    """The cluster this process joined (a single process unless ``initialize`` joined one)."""
    return _CURRENT


def detected_process_count() -> int | None:
    """The process count a scheduler announces: Slurm's tasks, or a TPU slice's workers."""
    for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        if os.environ.get(name):
            return len(os.environ[name].split(","))
    return None


def initialize(
    mode: str,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    init_timeout_s: int = 300,
    heartbeat_timeout_s: int = 100,
) -> Cluster:
    """Joins this process to the job (``mode``: "auto", "on" or "off"); raises ClusterError.

    "auto" joins when flags name a coordinator or a scheduler announces more than one process;
    "on" always calls ``jax.distributed.initialize`` (JAX then finds what the flags leave out);
    "off" never does. Must run before JAX starts its backends.
    """
    global _CURRENT
    if mode not in ("auto", "on", "off"):
        raise ClusterError(f"--distributed={mode!r} (auto, on, off)")
    announced = detected_process_count()
    explicit = coordinator_address is not None or num_processes is not None
    if mode == "off" or (mode == "auto" and not explicit and (announced or 1) <= 1):
        _CURRENT = Cluster()
        return _CURRENT
    if num_processes is not None and announced is not None and num_processes != announced:
        raise ClusterError(
            f"--num_processes={num_processes} but the scheduler announces {announced} processes"
        )
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ClusterError(f"--process_id={process_id} is not in [0, {num_processes})")
    if coordinator_address is not None and process_id not in (None, 0):
        # JAX aborts the process (not an exception) when the coordinator never answers.
        _wait_for(coordinator_address, init_timeout_s)
    import jax
    from jax._src import distributed

    # A worker that dies must not take the others down with it (JAX's default for a lost task).
    jax.config.update("jax_enable_recoverability", True)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=init_timeout_s,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
        )
    except Exception as e:  # unreachable coordinator, unknown cluster, bad ids
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        ident = "auto" if process_id is None else process_id
        raise ClusterError(
            f"jax.distributed.initialize failed (coordinator {coordinator_address or 'auto'}, "
            f"{num_processes or 'auto'} processes, id {ident}): {first}"
        ) from e
    _CURRENT = Cluster(
        process_id=jax.process_index(),
        num_processes=jax.process_count(),
        client=distributed.global_state.client,
        join_timeout_s=init_timeout_s,
        heartbeat_timeout_s=heartbeat_timeout_s,
    )
    logging.info(
        "process %d of %d joined; %d local device(s)",
        _CURRENT.process_id, _CURRENT.num_processes, jax.local_device_count(),
    )  # fmt: skip
    return _CURRENT


def _wait_for(address: str, timeout_s: float) -> None:
    """Returns once ``host:port`` accepts a TCP connection; ClusterError after ``timeout_s``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--coordinator_address={address!r}: expected host:port")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"coordinator {address} not reachable within {timeout_s:g} s ({e}); is "
                    "process 0 running, and is the address one every host can reach?"
                ) from e
            time.sleep(0.5)
