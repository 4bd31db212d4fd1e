"""Runs a trusted harness ``module:function`` in a child process that may import untrusted code.

The harness talks to this process over a ``sandbox_channel.Channel`` (a JSON header and numpy
arrays per message). On Linux a :class:`Sandbox` guarantees:

- Time: at ``Limits.timeout_s`` the child's process tree is SIGKILLed.
- Memory: every child process has RLIMIT_DATA = ``memory_bytes`` (past it, Python raises
  MemoryError), and a thread here kills the tree once the RSS summed over its processes passes
  ``memory_bytes``; pages shared between processes count once per process, so the sum errs high.
  ``Report.reason`` says "memory" only when that thread killed the tree, and reports the peak
  RSS it saw (it looks every 0.1 s); an exit code is the program's, never read as a reason.
- Filesystem, where the child gets a mount namespace (``Report.isolation["fs_private"]``; always
  as root, otherwise where unprivileged user namespaces work): its working dir is a copy of the
  files it was given, in a private tmpfs /tmp of ``Limits.tmp_bytes``; /dev/shm is private too;
  every other mount is read-only. Hidden (an empty tmpfs over a directory, /dev/null over a
  file): this process's home, the files and directories named by credential variables, the
  user's /run/user dir, and whatever :func:`hide` was given; the import paths inside a hidden
  directory stay reachable, read-only. No other sandbox's working dir is visible, and the
  working dir is not on the child's ``sys.path``. The target holds no capability, so it can
  undo none of this. With a PID namespace it also gets its own /proc
  (``isolation["proc_private"]``): no process outside its tree is visible there.
- Environment: an allowlist of this process's variables, minus credential-looking names and
  JAX's persistent-cache settings.
- Identity: a parent running as root runs the child as ``nobody``, because RLIMIT_NPROC does not
  bind root; root builds the filesystem view first, so an interpreter under a directory closed
  to ``nobody`` (e.g. a 0700 /root) is bind-mounted in.
- Tasks: the child may add ``max_tasks`` processes and threads (RLIMIT_NPROC). In a user
  namespace on Linux >= 5.14 only its own tasks count; otherwise all of its uid's do, so
  sandboxes running at once share the budget left when each starts.
- Namespaces, where the kernel allows unprivileged user namespaces: new user, mount, PID and,
  unless ``Limits.network``, network ones. The network namespace has only a loopback that is
  down, so every connection fails, 127.0.0.1 included. The target is the PID namespace's init:
  when it dies, the kernel kills all it started. ``Report.isolation`` says what was in force.
- The worker and the target are made non-dumpable, so other processes of the uid (other
  sandboxes) cannot ptrace them or read their memory or environment.
- This process never unpickles what the child sends, and bounds what it buffers.

Not guaranteed:

- Without a mount namespace (not root, no user namespaces; code mode refuses this unless
  ``--allow_weak_sandbox``): no filesystem isolation at all; the child has this process's uid,
  so it writes wherever that uid may and can read this process's /proc/PID/environ.
- Files the child writes to its /tmp and /dev/shm are memory that the RSS watchdog does not
  count (each is capped at ``Limits.tmp_bytes``). Unix sockets on the filesystem stay
  connectable where their permissions let its uid. Everything not hidden stays readable as
  its uid's permissions allow.
- Without user namespaces: no network or PID isolation; the tree is found by session id and
  parentage, so a process that leaves the session and loses its parent escapes the kill.
- GPU memory and CPU time are not capped (beyond the wall clock).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from collections.abc import Mapping

import numpy as np

from evolve_jax.evaluation.sandbox_channel import (
    MAX_MESSAGE_BYTES,
    Channel,
    ChannelTimeout,
    SandboxError,
)

__all__ = ["Channel", "Limits", "Report", "Sandbox", "SandboxError", "hide", "run_once"]

_log = logging.getLogger(__name__)


def candidate_traceback(error: BaseException, lines: int = 30) -> str:
    """For a harness: the last ``lines`` of ``error``'s traceback, from the candidate's file on.

    What a repair prompt shows; the harness's own frames above the candidate's are left out.
    """
    text = "".join(traceback.format_exception(error)).rstrip().splitlines()
    start = next((i for i, line in enumerate(text) if "candidate.py" in line), None)
    if start is not None:
        text = ["Traceback (most recent call last):", *text[start:]]
    return "\n".join(text[-lines:])


_EMPTY: Mapping[str, str] = types.MappingProxyType({})
_WORKER = "evolve_jax.evaluation.sandbox_worker"
_POLL_S = 0.1  # how often the watchdog looks at the clock and the tree's memory
_KILL_WAIT_S = 5.0  # how long killing the tree may take before giving up on stragglers
_DRAIN_S = 1.0  # how long output still arriving after the exit is read
_EXIT_GRACE_S = 1.0  # how long __exit__ and run_once let a child end on its own
_READ_CHUNK = 1 << 16  # a pipe's default capacity


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one sandbox session may use."""

    timeout_s: float = 900.0  # wall clock for the whole session
    memory_bytes: int = 8 << 30  # RLIMIT_DATA per process, and the tree's summed RSS
    max_tasks: int | None = None  # processes + threads it may add; None: 512 + 8 per core
    output_bytes: int = 32_768  # stdout and stderr kept per stream: head half + tail half
    network: bool = False  # False: a new network namespace where the kernel allows one
    max_message_bytes: int = MAX_MESSAGE_BYTES
    tmp_bytes: int = 1 << 30  # size of each of the child's private tmpfs /tmp and /dev/shm

    def __post_init__(self):
        positive = (self.timeout_s, self.memory_bytes, self.max_message_bytes, self.tmp_bytes)
        if min(positive) <= 0:
            raise ValueError(f"limits must be positive: {self}")
        if self.output_bytes < 0 or (self.max_tasks is not None and self.max_tasks < 1):
            raise ValueError(f"bad output_bytes or max_tasks: {self}")

    @property
    def tasks(self) -> int:
        """``max_tasks``, or its default for this machine."""
        if self.max_tasks is not None:
            return self.max_tasks
        return 512 + 8 * (os.cpu_count() or 1)


# -------------------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class Report:
    """How a sandboxed child ended, as this process observed it (never as the child says)."""

    returncode: int | None  # negative: killed by that signal; None: could not be reaped
    seconds: float
    timed_out: bool  # the watchdog killed the tree at the deadline
    memory_exceeded: bool  # the watchdog saw the tree's summed RSS pass the cap and killed it
    stdout: str  # bounded as Limits.output_bytes
    stderr: str
    # user_ns, net_ns, pid_ns, fs_private, proc_private, uid, nproc_limit, data_limit: in force
    isolation: dict
    peak_rss_bytes: int = 0  # the highest summed RSS the watchdog saw (it looks every 0.1 s)
    memory_bytes: int = 0  # the cap on that sum (Limits.memory_bytes)

    def output_tail(self, chars: int = 2000) -> dict[str, str]:
        """The last ``chars`` of each non-empty stream: what a node records for its Analyzer."""
        streams = {"stdout": self.stdout, "stderr": self.stderr}
        return {name: text[-chars:] for name, text in streams.items() if text.strip()}

    def reason(self) -> str | None:
        """One line saying why the child failed; None if it exited 0 within its limits.

        Only what this process observed decides the kind: a timeout or "memory" only when the
        watchdog killed the tree for it; any other end reads as the exit code or signal, with
        the peak RSS seen and the last line the program wrote to stderr, labelled as such.
        """
        peak, cap = self.peak_rss_bytes / (1 << 30), self.memory_bytes / (1 << 30)
        if self.timed_out:
            return f"timeout: killed after {self.seconds:.0f} s"
        if self.memory_exceeded:
            return (
                f"memory: the process tree's RSS reached {peak:.2f} GiB, over the {cap:.1f} GiB cap"
            )
        if self.returncode == 0:
            return None
        if self.returncode is None:
            ended = "the child could not be reaped"
        elif self.returncode < 0:
            ended = f"killed by {signal.Signals(-self.returncode).name}"
        else:
            ended = f"exit code {self.returncode}"
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        said = f"; the program's stderr ends: {lines[-1][:300]}" if lines else ""
        return f"{ended} (peak RSS seen {peak:.2f} GiB of the {cap:.1f} GiB cap){said}"


class _Output:
    """The first and last ``limit // 2`` bytes of a stream, and how many were cut between."""

    def __init__(self, limit: int):
        self._head_limit = limit - limit // 2
        self._tail_limit = limit // 2
        self._head = bytearray()
        self._tail = bytearray()
        self._total = 0
        self._lock = threading.Lock()

    def add(self, data: bytes) -> None:
        with self._lock:
            self._total += len(data)
            room = self._head_limit - len(self._head)
            if room > 0:
                self._head += data[:room]
                data = data[room:]
            self._tail += data
            if len(self._tail) > 2 * self._tail_limit:  # trimmed in batches: amortised O(1)
                del self._tail[: len(self._tail) - self._tail_limit]

    def text(self) -> str:
        with self._lock:
            tail = self._tail[len(self._tail) - min(len(self._tail), self._tail_limit) :]
            cut = self._total - len(self._head) - len(tail)
            marker = f"\n[... {cut} bytes cut ...]\n".encode() if cut else b""
            return (bytes(self._head) + marker + bytes(tail)).decode("utf-8", "replace")


def _drain(fd: int, output: _Output, stop: threading.Event) -> None:
    """Copies ``fd`` into ``output`` until EOF or ``stop``; closes ``fd``."""
    # poll with a timeout rather than a blocking read: a process that escaped the kill may hold
    # the pipe open forever, and this thread must still end.
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not stop.is_set():
            if poller.poll(_POLL_S * 1000):
                data = os.read(fd, _READ_CHUNK)
                if not data:
                    return
                output.add(data)
    except OSError:
        return
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- processes


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _scan_tree(leader: int) -> tuple[set[int], int]:
    """Pids of ``leader``'s session and of their descendants, and their summed RSS in bytes."""
    parent_of, rss_of, members = {}, {}, set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        # Fields after "(comm)", which may itself hold spaces and parentheses.
        fields = stat[stat.rindex(b")") + 2 :].split()
        pid = int(name)
        parent_of[pid] = int(fields[1])
        rss_of[pid] = int(fields[21])
        if int(fields[3]) == leader or pid == leader:
            members.add(pid)
    # Descendants too: a process may leave the session with setsid yet keep its parent.
    children: dict[int, list[int]] = {}
    for pid, parent in parent_of.items():
        children.setdefault(parent, []).append(pid)
    stack = list(members)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in members:
                members.add(child)
                stack.append(child)
    return members, sum(rss_of[pid] for pid in members) * _PAGE_SIZE


def _sigkill(pid: int, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------- environment

_ALLOWED_NAMES = frozenset(
    {
        "PATH",
        "LANG",
        "LANGUAGE",
        "TZ",
        "PYTHONPATH",
        "PYTHONHASHSEED",
        "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONWARNINGS",
        "VIRTUAL_ENV",
        "LD_LIBRARY_PATH",
        "OMP_NUM_THREADS",
    }
)
_ALLOWED_PREFIXES = (
    "LC_",
    "JAX_",
    "XLA_",
    "TF_CPP_",  # XLA's C++ logging
    "CUDA_",
    "NVIDIA_",
    "NCCL_",
    "TPU_",
    "LIBTPU_",
    "MKL_",
    "OPENBLAS_",
)
_CREDENTIAL_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")


# JAX's persistent compilation cache: a directory shared by every worker would let one plant
# compiled code for the others (their view of it is read-only anyway).
_DENIED_PREFIXES = ("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE")


def _allowed(name: str) -> bool:
    if name not in _ALLOWED_NAMES and not name.startswith(_ALLOWED_PREFIXES):
        return False
    if name.startswith(_DENIED_PREFIXES):
        return False
    return not any(word in name.upper() for word in _CREDENTIAL_WORDS)


def child_environment(extra: Mapping[str, str] = _EMPTY) -> dict[str, str]:
    """The allowlisted, credential-free part of ``os.environ``, then ``extra`` added as is.

    ``Sandbox`` passes HOME and TMPDIR (its working dir) in ``extra``, before the caller's.
    """
    env = {name: value for name, value in os.environ.items() if _allowed(name)}
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------- sandbox


def _nobody() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def _write_files(workdir: str, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = os.path.normpath(os.path.join(workdir, name))
        if os.path.isabs(name) or not path.startswith(workdir + os.sep):
            raise ValueError(f"file name outside the working dir: {name!r}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


_HIDDEN: set[str] = set()
_HIDDEN_LOCK = threading.Lock()
# Variables that name a file or directory holding credentials, besides any whose name looks
# like a credential (``_CREDENTIAL_WORDS``) and holds an absolute path.
_CREDENTIAL_PATH_NAMES = (
    "AWS_CONFIG_FILE",
    "CLOUDSDK_CONFIG",
    "DOCKER_CONFIG",
    "KUBECONFIG",
    "NETRC",
    "SSH_AUTH_SOCK",
    "XDG_RUNTIME_DIR",
)


def hide(*paths: str) -> None:
    """Makes ``paths`` invisible to every Sandbox started from now on, in this process.

    A directory is covered by an empty tmpfs (import paths inside it stay reachable), a file
    by /dev/null. Idempotent and thread-safe; paths that do not exist when a sandbox starts
    are skipped for that sandbox.
    """
    with _HIDDEN_LOCK:
        _HIDDEN.update(os.path.abspath(p) for p in paths)


def protected_paths() -> list[str]:
    """What a sandbox starting now hides: ``hide``'s paths, this process's home directory,
    and the files and directories named by credential variables in its environment."""
    with _HIDDEN_LOCK:
        paths = set(_HIDDEN)
    homes = {os.environ.get("HOME", ""), os.path.expanduser("~")}
    with contextlib.suppress(KeyError):
        homes.add(pwd.getpwuid(os.getuid()).pw_dir)
    paths |= {home for home in homes if home not in ("", "/")}
    for name, value in os.environ.items():
        named = name in _CREDENTIAL_PATH_NAMES
        if (named or any(w in name.upper() for w in _CREDENTIAL_WORDS)) and value.startswith("/"):
            paths.add(value)
    paths.add(f"/run/user/{os.getuid()}")
    return sorted(p for p in paths if os.path.lexists(p))


class Sandbox:
    """One child process running ``target`` ("package.module:function") under ``limits``.

    ``files`` (relative name -> text) are written into a fresh temp dir (0700, this process's)
    that the worker copies into the child's private working dir; the working dir is not on the
    child's ``sys.path`` (a harness loads a file from it by path). ``env`` is added to the
    scrubbed environment.
    """

    def __init__(
        self,
        target: str,
        limits: Limits = Limits(),
        *,
        files: Mapping[str, str] = _EMPTY,
        env: Mapping[str, str] = _EMPTY,
        python: str = sys.executable,
    ):
        module, _, function = target.partition(":")
        if not module or not function:
            raise ValueError(f"target must be 'module:function', got {target!r}")
        self.target = target
        self.limits = limits
        self._files = dict(files)
        self._env = dict(env)
        self._python = python
        self._workdir: str | None = None
        self._process: subprocess.Popen | None = None
        self._channel: Channel | None = None
        self._report: Report | None = None
        self._isolation: dict | None = None  # from the worker's first message
        self._timed_out = False
        self._memory_exceeded = False
        self._peak_rss = 0  # bytes: the highest summed RSS the watchdog has seen
        self._exited_at: float | None = None
        self._tree_gone = False
        self._kill_lock = threading.Lock()
        self._stop = threading.Event()
        self._outputs = (_Output(limits.output_bytes), _Output(limits.output_bytes))
        self._threads: list[threading.Thread] = []

    @property
    def workdir(self) -> str:
        if self._workdir is None:
            raise RuntimeError("the sandbox has not started")
        return self._workdir

    def __enter__(self) -> Sandbox:
        if self._workdir is not None:
            raise RuntimeError("a Sandbox starts once")
        self._workdir = os.path.realpath(tempfile.mkdtemp(prefix="sandbox-"))
        try:
            self._start()
        except BaseException:
            self._close()
            raise
        return self

    def _start(self) -> None:
        workdir = self.workdir
        _write_files(workdir, self._files)
        config = {
            "target": self.target,
            "max_tasks": self.limits.tasks,
            "memory_bytes": self.limits.memory_bytes,
            "network": self.limits.network,
            "max_message_bytes": self.limits.max_message_bytes,
            "workdir": workdir,
            "hidden": protected_paths(),
            "tmp_bytes": self.limits.tmp_bytes,
        }
        if os.getuid() == 0:
            config["uid"], config["gid"] = _nobody()
        to_child, to_parent, out, err = os.pipe(), os.pipe(), os.pipe(), os.pipe()
        config["read_fd"], config["write_fd"] = to_child[0], to_parent[1]
        child_ends = (to_child[0], to_parent[1], out[1], err[1])
        try:
            self._process = subprocess.Popen(
                [self._python, "-P", "-m", _WORKER, json.dumps(config)],
                cwd=workdir,
                env=child_environment({"HOME": workdir, "TMPDIR": workdir, **self._env}),
                stdin=subprocess.DEVNULL,
                stdout=out[1],
                stderr=err[1],
                pass_fds=(to_child[0], to_parent[1]),
                start_new_session=True,  # its own process group, killed as one
            )
        except BaseException:
            for fd in (to_parent[0], to_child[1], out[0], err[0]):
                os.close(fd)
            raise
        finally:
            for fd in child_ends:
                os.close(fd)
        self._started = time.monotonic()
        self._deadline = self._started + self.limits.timeout_s
        self._channel = Channel(to_parent[0], to_child[1], self.limits.max_message_bytes)
        self._threads = [
            threading.Thread(target=_drain, args=(fd, output, self._stop), daemon=True)
            for fd, output in zip((out[0], err[0]), self._outputs, strict=True)
        ]
        self._threads.append(threading.Thread(target=self._watch, daemon=True))
        for thread in self._threads:
            thread.start()

    def _watch(self) -> None:
        """Kills the tree at the deadline or when its RSS passes the cap; ends with ``_stop``."""
        while not self._stop.wait(_POLL_S):
            if self._process.poll() is not None and self._exited_at is None:
                self._exited_at = time.monotonic()
            if time.monotonic() >= self._deadline:
                self._timed_out = True
                self._kill_tree()
                return
            pids, rss = _scan_tree(self._process.pid)
            self._peak_rss = max(self._peak_rss, rss)
            if rss > self.limits.memory_bytes:
                self._memory_exceeded = True
                self._kill_tree()
                return
            if not pids:  # exited, and nothing it started is left
                return

    def _kill_tree(self) -> None:
        """SIGKILLs every process of the tree and reaps the child; gives up after a few s."""
        leader = self._process.pid
        give_up = time.monotonic() + _KILL_WAIT_S
        with self._kill_lock:
            # Once the tree is gone, its session id may be reused by an unrelated process.
            while not self._tree_gone:
                others = _scan_tree(leader)[0] - {leader}
                for pid in others:
                    _sigkill(pid)
                if self._process.poll() is None:
                    # First a moment for the worker to reap the namespace's init killed above:
                    # orphaned, it would go to the machine's init, which need not reap it.
                    try:
                        self._process.wait(0.2)
                    except subprocess.TimeoutExpired:
                        _sigkill(leader, group=True)
                elif not others:
                    self._tree_gone = True
                if not self._tree_gone and time.monotonic() > give_up:
                    _log.warning("sandbox %s: processes survived SIGKILL: %s", leader, others)
                    break
                time.sleep(0.01)
            if self._exited_at is None and self._process.returncode is not None:
                self._exited_at = time.monotonic()

    def _remaining(self, timeout_s: float | None) -> float:
        remaining = self._deadline - time.monotonic()
        return max(0.0, remaining if timeout_s is None else min(timeout_s, remaining))

    def _expired(self) -> bool:
        return time.monotonic() >= self._deadline

    def _failure(self, error: SandboxError) -> SandboxError:
        """``error``, or the limit that caused it."""
        if isinstance(error, ChannelTimeout) and self._expired():
            self._timed_out = True
            self._kill_tree()
        if self._timed_out:
            return SandboxError(f"timeout: killed after {self.limits.timeout_s:g} s")
        if self._memory_exceeded:
            peak, cap = self._peak_rss / (1 << 30), self.limits.memory_bytes / (1 << 30)
            return SandboxError(
                f"memory: the process tree's RSS reached {peak:.2f} GiB, over the {cap:.1f} GiB cap"
            )
        return error

    def _running(self) -> Channel:
        if self._channel is None or self._report is not None:
            raise RuntimeError("the sandbox is not running")
        return self._channel

    def send(self, header: Mapping, arrays: Mapping[str, np.ndarray] | None = None) -> None:
        """Sends one message; waits at most until the deadline for the child to read it."""
        channel = self._running()
        try:
            channel.send(header, arrays, timeout_s=self._remaining(None))
        except SandboxError as e:
            raise self._failure(e) from None

    def receive(self, timeout_s: float | None = None) -> tuple[dict, dict[str, np.ndarray]]:
        """The child's next message; waits at most ``timeout_s`` and never past the deadline."""
        channel = self._running()
        end = time.monotonic() + self._remaining(timeout_s)
        try:
            if self._isolation is None:
                self._read_hello(channel, max(0.0, end - time.monotonic()))
            return channel.receive(max(0.0, end - time.monotonic()))
        except SandboxError as e:
            raise self._failure(e) from None

    def _read_hello(self, channel: Channel, timeout_s: float) -> None:
        header, _ = channel.receive(timeout_s)
        isolation = header.get("isolation")
        if not isinstance(isolation, dict):
            raise SandboxError(f"the worker's first message is not its hello: {header}")
        self._isolation = isolation

    def finish(self, timeout_s: float | None = None) -> Report:
        """Waits for the child to exit (not past the deadline), kills what is left; the report."""
        if self._report is not None:
            return self._report
        if self._process is None:
            raise RuntimeError("the sandbox has not started")
        try:
            self._process.wait(self._remaining(timeout_s))
        except subprocess.TimeoutExpired:
            if self._expired():
                self._timed_out = True
        self._kill_tree()
        self._stop_threads()
        if self._isolation is None:  # the hello may be waiting unread
            with contextlib.suppress(SandboxError):
                self._read_hello(self._channel, 0)
        self._channel.close()
        end = self._exited_at or time.monotonic()
        returncode = self._process.returncode
        stdout, stderr = (output.text() for output in self._outputs)
        self._report = Report(
            returncode=returncode,
            seconds=end - self._started,
            timed_out=self._timed_out,
            memory_exceeded=self._memory_exceeded,
            stdout=stdout,
            stderr=stderr,
            # Without the worker's hello (it died first), claim no isolation.
            isolation={
                "user_ns": False,
                "net_ns": False,
                "pid_ns": False,
                "fs_private": False,
                "proc_private": False,
                "uid": None,
                "nproc_limit": None,
                "data_limit": self.limits.memory_bytes,
                **(self._isolation or {}),
            },
            peak_rss_bytes=self._peak_rss,
            memory_bytes=self.limits.memory_bytes,
        )
        return self._report

    def _stop_threads(self) -> None:
        # The tree is dead, so readers reach EOF once the pipes are empty; but a process that
        # escaped may hold a pipe open, hence the bounded wait before telling them to stop.
        for thread in self._threads[:2]:
            thread.join(_DRAIN_S)
        self._stop.set()
        for thread in self._threads:
            thread.join(_DRAIN_S)

    def __exit__(self, *exc_info) -> None:
        try:
            if self._process is not None and self._report is None:
                self.finish(_EXIT_GRACE_S)
        except Exception:
            _log.exception("sandbox %s: finishing failed", self.target)
        finally:
            self._close()

    def _close(self) -> None:
        """Kills what may be left, stops the threads, closes the channel, removes the temp dir."""
        try:
            if self._process is not None:
                self._kill_tree()
            self._stop.set()
            if self._channel is not None:
                self._channel.close()
        finally:
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)


def run_once(
    target: str,
    header: Mapping,
    arrays: Mapping[str, np.ndarray] | None = None,
    limits: Limits = Limits(),
    *,
    files: Mapping[str, str] = _EMPTY,
    env: Mapping[str, str] = _EMPTY,
) -> tuple[tuple[dict, dict[str, np.ndarray]] | None, Report]:
    """Starts ``target``, sends one request, reads one reply; (reply or None, report)."""
    with Sandbox(target, limits, files=files, env=env) as box:
        try:
            box.send(header, arrays)
            reply = box.receive()
        except SandboxError:
            reply = None
        return reply, box.finish(_EXIT_GRACE_S)


def _probe(channel: Channel) -> None:
    channel.send({})


@functools.cache
def isolation_support() -> dict:
    """What a sandbox gets here (``Report.isolation`` of a throwaway child), probed once."""
    reply, report = run_once(f"{__name__}:_probe", {}, limits=Limits(timeout_s=60))
    if reply is None:
        _log.warning("sandbox probe failed: %s", report.reason())
    return report.isolation
