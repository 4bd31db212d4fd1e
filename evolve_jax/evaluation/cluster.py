"""Several processes, one search: JAX's multi-controller runtime, with process 0 as the leader.

Every process runs the same command. ``initialize`` joins them with ``jax.distributed`` when a
cluster is named by flags or detected (Slurm with several tasks, a multi-host Cloud TPU slice).
Process 0 runs the agents and commits every node. At each evaluation it deals the candidates
round-robin over the processes, publishes each worker's share in JAX's distributed key-value
store, evaluates its own share on its local devices and reads the workers' results back from
the store. Workers (every other process) wait for a share, evaluate it on their local devices
with the same layout rules, and answer. Processes meet only at these exchanges, once per
evaluation round; no compiled program spans hosts.

A worker that gives no answer within ``answer_timeout_s`` fails the candidates it held, with
that reason, and is dealt nothing more: the search goes on with the others.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from absl import logging

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
    answer_timeout_s: float = 6 * 3600.0
    dead: set[int] = dataclasses.field(default_factory=set)
    _round: int = 0

    @property
    def leader(self) -> bool:
        return self.process_id == 0

    def live_workers(self) -> list[int]:
        return [p for p in range(1, self.num_processes) if p not in self.dead]

    # ------------------------------------------------------------------ leader side

    def send(self, jobs: dict[int, dict]) -> int:
        """Publishes one job per live worker; returns the round they belong to."""
        round_ = self._round
        self._round += 1
        for p, job in jobs.items():
            self.client.key_value_set(_key(round_, "job", p), json.dumps(job))
        return round_

    def receive(self, round_: int, p: int) -> dict | None:
        """Worker ``p``'s answer to ``round_``; None (and ``p`` marked dead) without one."""
        try:
            raw = self.client.blocking_key_value_get(
                _key(round_, "answer", p), int(1000 * self.answer_timeout_s)
            )
        except Exception as e:  # deadline exceeded, or the coordination service lost p
            logging.error("process %d gave no answer to round %d: %s", p, round_, e)
            self.dead.add(p)
            return None
        self.client.key_value_delete(_key(round_, "answer", p))
        return json.loads(raw)

    def stop_workers(self, wait_s: float = 60.0) -> None:
        """Tells every live worker that the search is over, and waits (up to ``wait_s``) until
        each has left the job: the coordination service lives in this process, and a worker
        whose disconnect finds it gone aborts."""
        if self.client is None or not self.leader:
            return
        workers = self.live_workers()
        self.send({p: {"stop": True} for p in workers})
        deadline = time.monotonic() + wait_s
        while workers and time.monotonic() < deadline:
            # Which of the workers the coordination service still counts as connected.
            workers = [p for p in workers if p in self.client.get_live_nodes([0, *workers])]
            if workers:
                time.sleep(0.1)
        if workers:
            logging.warning("process(es) %s did not leave the job within %.0f s", workers, wait_s)

    def leave(self) -> None:
        """A worker's last act: disconnects from the job while the leader still waits for it."""
        if self.client is not None and not self.leader:
            import jax

            jax.distributed.shutdown()
            self.client = None

    # ------------------------------------------------------------------ worker side

    def next_job(self) -> tuple[int, dict]:
        """Blocks until the leader publishes this worker's next job."""
        round_ = self._round
        self._round += 1
        key = _key(round_, "job", self.process_id)
        raw = self.client.blocking_key_value_get(key, int(1000 * self.answer_timeout_s))
        self.client.key_value_delete(key)
        return round_, json.loads(raw)

    def answer(self, round_: int, answer: dict) -> None:
        self.client.key_value_set(_key(round_, "answer", self.process_id), json.dumps(answer))


def _key(round_: int, kind: str, p: int) -> str:
    return f"{_PREFIX}/{round_:08d}/{kind}/{p}"


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
    answer_timeout_s: float = 6 * 3600.0,
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
        _CURRENT = Cluster(answer_timeout_s=answer_timeout_s)
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
        answer_timeout_s=answer_timeout_s,
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


def deal(count: int, processes: Sequence[int]) -> dict[int, list[int]]:
    """Candidate indices per process, round-robin in input order."""
    shares: dict[int, list[int]] = {p: [] for p in processes}
    for i in range(count):
        shares[processes[i % len(processes)]].append(i)
    return shares
