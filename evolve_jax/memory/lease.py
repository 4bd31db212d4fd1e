"""Which process drives a run: a lease in the history store, renewed while the process lives.

Two processes started with the same command on one workdir would both run the loop, design the
same slots and race to commit them. The first takes ``leases/<run>``; a second finds it held
and stops with one line naming the run and the holder. The holder renews the lease every
``renew_every`` seconds from a background thread and deletes it when the run ends. A lease is
free again when its holder is a process of this host that no longer exists, or when it has not
been renewed for ``stale_after`` seconds (a holder on another host that died: the renewal times
are the holders' wall clocks, so hosts sharing a gs:// workdir need synchronised clocks). A
killed run is therefore restarted with the same command at once on the same host, and after
``stale_after`` seconds from another.

Every write is a compare-and-swap on the key's generation, so of two processes taking a free
lease exactly one succeeds, and a holder that was presumed dead and replaced learns it at its
next renewal instead of overwriting its successor.

A renewal that fails with a storage error is retried after 1/10 of ``renew_every``, then after
twice as long each time, at most ``renew_every``, the last retry coming when the lease goes
stale. The lease is lost (``lost``, and ``reason`` says why) when another holder's record is
found in its place, or when no renewal has succeeded for ``stale_after`` seconds, after which
another process may take it; renewal then stops. The holder reads it with ``check``, which
raises ``LeaseLost`` naming the run and why; the loop calls it before each step and before
each commit. A takeover between a check and the commit after it is left to the slot claim
(history.py): each (run, step, slot) is committed once, by whichever process commits first.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import tensorstore as ts
from absl import logging

from evolve_jax import storage
from evolve_jax.memory.history import History, HistoryError


class RunIsLive(HistoryError):
    """Another live process holds the run's lease; the message names it."""


class LeaseLost(HistoryError):
    """This process no longer holds the run's lease; the message names the run and why."""


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def is_free(record: dict, stale_after: float = 60.0) -> bool:
    """Whether the holder of a lease ``record`` is gone: a dead process of this host, or one
    that has not renewed it for ``stale_after`` seconds."""
    if record.get("host") == socket.gethostname() and not _process_exists(record.get("pid", 0)):
        return True
    return time.time() - record.get("renewed", 0.0) > stale_after


def live_runs(history: History, stale_after: float = 60.0) -> list[str]:
    """The runs of ``history`` whose lease a live process holds (their search is going on)."""
    prefix = b"leases/"
    keys = history.kvstore.list(
        ts.KvStore.KeyRange(inclusive_min=prefix, exclusive_max=b"leases0")
    ).result()
    live = []
    for key in sorted(keys):
        read = history.kvstore.read(key).result()
        if read.state != "value":
            continue  # released between the listing and the read
        try:
            record = json.loads(read.value)
        except ValueError:
            continue
        if isinstance(record, dict) and not is_free(record, stale_after):
            live.append(key[len(prefix) :].decode())
    return live


class Lease:
    def __init__(
        self,
        history: History,
        run: str,
        *,
        renew_every: float = 10.0,
        stale_after: float = 60.0,
    ):
        if not 0 < renew_every < stale_after:
            raise ValueError("a lease must be renewed more often than it goes stale")
        self._kv = history.kvstore
        self._key = f"leases/{run}".encode()
        self.run = run
        self.renew_every = renew_every
        self.stale_after = stale_after
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self._generation: bytes | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewed = 0.0  # time.time() of the last write of the lease that succeeded
        self.lost = False
        self.reason: str | None = None  # why the lease was lost

    def _record(self) -> bytes:
        return json.dumps({**self.holder, "renewed": time.time()}, sort_keys=True).encode()

    def _free(self, record: dict) -> bool:
        """Whether a lease held by ``record`` may be taken."""
        return is_free(record, self.stale_after)

    def acquire(self) -> None:
        """Takes the lease and starts renewing it; RunIsLive if a live process holds it."""
        while True:
            current = self._kv.read(self._key).result()
            if current.state == "value":
                record = json.loads(current.value)
                if not self._free(record):
                    age = time.time() - record.get("renewed", 0.0)
                    raise RunIsLive(
                        f"run {self.run!r} is live: process {record.get('pid')} on "
                        f"{record.get('host')} renewed its lease {age:.0f} s ago. Wait for it to "
                        "end (or stop it), or give this search another --run_name"
                    )
                expected = current.stamp.generation
            else:
                expected = storage.ABSENT
            record = self._record()
            stamp = self._kv.write(self._key, record, if_equal=expected).result()
            if stamp.generation:  # empty: another process wrote first; look again
                self._generation = stamp.generation
                self._renewed = json.loads(record)["renewed"]
                break
        self._thread = threading.Thread(target=self._renew, name="lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        delay, retry = self.renew_every, 0.0
        while not self._stop.wait(delay):
            try:
                held = self._renew_once()
            except Exception as e:  # a storage error: retried until the lease goes stale
                stale_in = self._renewed + self.stale_after - time.time()
                if stale_in <= 0:
                    self._lose(
                        f"its renewal has failed for {self.stale_after:g} s, after which "
                        f"another process may take it (last error: {e})"
                    )
                    return
                retry = min(retry * 2 or self.renew_every / 10, self.renew_every)
                delay = min(retry, stale_in)
                logging.warning(
                    "could not renew the lease of run %r (%s); retrying in %.1f s", self.run, e,
                    delay,
                )  # fmt: skip
                continue
            if not held:
                return
            delay, retry = self.renew_every, 0.0

    def _renew_once(self) -> bool:
        """Renews the lease once; False if another holder has it (then it is lost)."""
        record = self._record()
        stamp = self._kv.write(self._key, record, if_equal=self._generation).result()
        if stamp.generation:
            self._generation = stamp.generation
            self._renewed = json.loads(record)["renewed"]
            return True
        current = self._kv.read(self._key).result()
        if current.state != "value":
            self._lose("its record was deleted by another process")
            return False
        holder = json.loads(current.value)
        if holder.get("token") == self.holder["token"]:
            # An earlier write of ours landed though it reported an error: still ours.
            self._generation = current.stamp.generation
            self._renewed = holder.get("renewed", self._renewed)
            return True
        self._lose(
            f"process {holder.get('pid')} on {holder.get('host')} took it over, this process "
            "presumed dead"
        )
        return False

    def _lose(self, reason: str) -> None:
        self.reason = reason
        self.lost = True
        logging.error("lost the lease of run %r: %s", self.run, reason)

    def check(self, before: str) -> None:
        """Raises LeaseLost, naming the run, why, and ``before`` (what is not done), if the
        lease is lost."""
        if self.lost:
            raise LeaseLost(
                f"run {self.run!r} lost its lease: {self.reason}. This process stopped before "
                f"{before}"
            )

    def release(self) -> None:
        """Stops renewing and deletes the lease if this process still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._generation is not None and not self.lost:
            self._kv.write(self._key, None, if_equal=self._generation).result()
        self._generation = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
