"""Who owns the accelerators in code mode: the sandboxed workers, not the controller.

Model-written programs run in sandboxed child processes (``sandbox.py``). A TPU VM lets one
process open its chips, and each process that starts JAX on a GPU reserves memory there, so in
code mode the controller (agents, history, harness arithmetic) keeps JAX on the CPU and every
evaluation is a fresh worker process that is lent one slot:

* GPU: one slot per GPU (``CUDA_VISIBLE_DEVICES``); evaluations run side by side.
* TPU: one slot holding every chip; evaluations take turns.
* CPU: one slot per core; the Engineer's ``--concurrency`` threads bound how many are used.

The platform is found by a sandboxed probe (``jax.devices()`` in a throwaway child) rather than
by the controller, which would otherwise open the devices itself.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterator, Mapping

from absl import logging

from evolve_jax.evaluation import sandbox


def keep_controller_off_accelerators() -> bool:
    """Makes this process's JAX use the CPU only; False if its backends had already started."""
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        if jax.default_backend() != "cpu":
            logging.warning(
                "code mode: this process already holds the %s devices; sandboxed workers may "
                "find them busy", jax.default_backend(),
            )  # fmt: skip
            return False
        return True
    jax.config.update("jax_platforms", "cpu")
    return True


def report_devices(channel: sandbox.Channel) -> None:
    """Sandbox target: what JAX finds in a worker."""
    import jax

    devices = jax.devices()
    channel.send(
        {
            "platform": jax.default_backend(),
            "count": len(devices),
            "kinds": sorted({d.device_kind for d in devices}),
        }
    )


def echo(channel: sandbox.Channel) -> None:
    """Sandbox target: sends back what it receives (start-up measurements)."""
    channel.send(*channel.receive())


def probe(limits: sandbox.Limits) -> dict:
    """The platform a worker sees; raises RuntimeError with the worker's reason if none starts."""
    reply, report = sandbox.run_once(
        "evolve_jax.evaluation.workers:report_devices", {}, None, limits
    )
    if reply is None or "platform" not in reply[0]:
        raise RuntimeError(f"the device probe failed: {report.reason() or reply}")
    return reply[0]


class Slots:
    """Environment variables lent to each worker; ``acquire`` blocks until one is free."""

    def __init__(self, envs: list[Mapping[str, str]], description: str):
        self.description = description
        self._free: queue.Queue = queue.Queue()
        for env in envs:
            self._free.put(dict(env))

    @classmethod
    def for_jax(cls, limits: sandbox.Limits) -> Slots:
        found = probe(limits)
        platform, count = found["platform"], found["count"]
        if platform == "gpu":
            envs = [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(count)]
        elif platform == "tpu":
            envs = [{}]
        else:
            envs = [{"JAX_PLATFORMS": "cpu"} for _ in range(os.cpu_count() or 1)]
        text = f"{len(envs)} worker slot(s) on {platform} ({', '.join(found['kinds'])})"
        logging.info("code mode: %s", text)
        return cls(envs, text)

    @classmethod
    def cpu(cls) -> Slots:
        """Slots for programs that do not use JAX (no probe): one per core."""
        count = os.cpu_count() or 1
        return cls([{} for _ in range(count)], f"{count} CPU worker slot(s)")

    @contextlib.contextmanager
    def acquire(self) -> Iterator[dict[str, str]]:
        env = self._free.get()
        try:
            yield env
        finally:
            self._free.put(env)


class LazySlots:
    """Builds its ``Slots`` at first use (the probe costs a worker start), once, thread-safely."""

    def __init__(self, build):
        self._build = build
        self._slots: Slots | None = None
        self._lock = threading.Lock()

    def get(self) -> Slots:
        with self._lock:
            if self._slots is None:
                self._slots = self._build()
            return self._slots
