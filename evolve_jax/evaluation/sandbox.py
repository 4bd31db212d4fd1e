"""Runs a trusted harness ``module:function`` in a child process that may import untrusted code.

The harness talks to this process over a :class:`Channel` (a JSON header and numpy arrays per
message). On Linux a :class:`Sandbox` guarantees:

- Time: at ``Limits.timeout_s`` the child's process tree is SIGKILLed.
- Memory: every child process has RLIMIT_DATA = ``memory_bytes`` (past it, Python raises
  MemoryError), and a thread here kills the tree once the RSS summed over its processes passes
  ``memory_bytes``; pages shared between processes count once per process, so the sum errs high.
- Environment: an allowlist of this process's variables, minus credential-looking names.
- Identity: a parent running as root runs the child as ``nobody``, because RLIMIT_NPROC does not
  bind root. Where a directory closed to ``nobody`` (e.g. a 0700 /root) holds the interpreter,
  ``sys.path`` entries or this package, the child sees an empty tmpfs over it with just those
  bind-mounted in, in a mount namespace of its own.
- Tasks: the child may add ``max_tasks`` processes and threads (RLIMIT_NPROC). In a user
  namespace on Linux >= 5.14 only its own tasks count; otherwise all of its uid's do, so
  sandboxes running at once share the budget left when each starts.
- Namespaces, where the kernel allows unprivileged user namespaces: new user, PID and, unless
  ``Limits.network``, network ones. The network namespace has only a loopback that is down, so
  every connection fails, 127.0.0.1 included. The target is the PID namespace's init: when it
  dies, the kernel kills all it started. ``Report.isolation`` says what was in force.
- The worker and the target are made non-dumpable, so other processes of the uid (other
  sandboxes) cannot ptrace them or read their memory.
- This process never unpickles what the child sends, and bounds what it buffers.

Not guaranteed:

- Filesystem: the child reads and writes whatever its uid may, disk use is not capped, and Unix
  sockets on the filesystem are reachable. Its temp dir (under ``tempfile.gettempdir()``) must
  be reachable by that uid.
- Without user namespaces: no network or PID isolation; the tree is found by session id and
  parentage, so a process that leaves the session and loses its parent escapes the kill.
- GPU memory and CPU time are not capped (beyond the wall clock).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import os
import pwd
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import zipfile
from collections.abc import Mapping

import numpy as np

from evolve_jax.evaluation import sandbox_worker

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


class SandboxError(RuntimeError):
    """A protocol failure: EOF, a malformed or oversized message, a timeout, a dead child."""


class _ChannelTimeout(SandboxError):
    pass


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one sandbox session may use."""

    timeout_s: float = 900.0  # wall clock for the whole session
    memory_bytes: int = 8 << 30  # RLIMIT_DATA per process, and the tree's summed RSS
    max_tasks: int | None = None  # processes + threads it may add; None: 512 + 8 per core
    output_bytes: int = 32_768  # stdout and stderr kept per stream: head half + tail half
    network: bool = False  # False: a new network namespace where the kernel allows one
    max_message_bytes: int = 256 << 20

    def __post_init__(self):
        if self.timeout_s <= 0 or self.memory_bytes <= 0 or self.max_message_bytes <= 0:
            raise ValueError(f"limits must be positive: {self}")
        if self.output_bytes < 0 or (self.max_tasks is not None and self.max_tasks < 1):
            raise ValueError(f"bad output_bytes or max_tasks: {self}")

    @property
    def tasks(self) -> int:
        """``max_tasks``, or its default for this machine."""
        if self.max_tasks is not None:
            return self.max_tasks
        return 512 + 8 * (os.cpu_count() or 1)


# ------------------------------------------------------------------------------------- channel

# A frame: magic, header length, arrays length; then the JSON header; then an .npz (or nothing).
_FRAME = struct.Struct("<4sQQ")
_MAGIC = b"EJX1"


def _frame_head(header: bytes, payload: bytes) -> bytes:
    """A frame up to its arrays."""
    return _FRAME.pack(_MAGIC, len(header), len(payload)) + header


def _encode_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def _decode_arrays(payload: bytes) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            for info in archive.infolist():
                # Stored only: a small deflated member could expand without bound.
                if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                    raise SandboxError(f"malformed arrays: member {info.filename!r} refused")
        with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except SandboxError:
        raise
    except Exception as e:  # whatever the child's bytes make numpy or zipfile raise
        raise SandboxError(f"malformed arrays: {type(e).__name__}: {e}") from None


def _wait_for(fd: int, event: int, deadline: float | None, what: str) -> None:
    poller = select.poll()
    poller.register(fd, event)
    timeout_ms = None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
    if not poller.poll(timeout_ms):
        raise _ChannelTimeout(f"timeout: {what}")


class Channel:
    """Messages over a pair of pipe fds: length-prefixed frames of JSON header + .npz arrays."""

    def __init__(
        self, read_fd: int, write_fd: int, max_message_bytes: int = Limits.max_message_bytes
    ):
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.max_message_bytes = max_message_bytes
        self._pending = bytearray()  # bytes read but not yet returned (a frame read in parts)
        self._broken: SandboxError | None = None
        for fd in (read_fd, write_fd):
            os.set_blocking(fd, False)  # so that every wait can be bounded by poll

    def send(
        self,
        header: Mapping,
        arrays: Mapping[str, np.ndarray] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> None:
        """Writes one message. Object arrays raise ValueError: they would need pickle."""
        text = json.dumps(dict(header)).encode()
        payload = _encode_arrays(arrays) if arrays else b""
        size = len(text) + len(payload)
        if size > self.max_message_bytes:
            raise SandboxError(f"message of {size} bytes over the {self.max_message_bytes} limit")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._write_all(_frame_head(text, payload), deadline)
        self._write_all(payload, deadline)

    def _write_all(self, data: bytes, deadline: float | None) -> None:
        view = memoryview(data)
        while view:
            _wait_for(self.write_fd, select.POLLOUT, deadline, "the other side is not reading")
            try:
                view = view[os.write(self.write_fd, view) :]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                raise SandboxError("channel closed by the other side") from None

    def receive(self, timeout_s: float | None = None) -> tuple[dict, dict[str, np.ndarray]]:
        """The next message: (header, arrays). Raises SandboxError on any protocol failure."""
        if self._broken is not None:
            raise self._broken
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._fill(_FRAME.size, deadline)
        magic, header_size, payload_size = _FRAME.unpack_from(self._pending)
        if magic != _MAGIC:
            raise self._break("malformed frame: bad magic")
        if header_size + payload_size > self.max_message_bytes:
            size = header_size + payload_size
            raise self._break(f"message of {size} bytes over the {self.max_message_bytes} limit")
        end = _FRAME.size + header_size + payload_size
        self._fill(end, deadline)
        with memoryview(self._pending) as view:
            text = bytes(view[_FRAME.size : _FRAME.size + header_size])
            payload = bytes(view[_FRAME.size + header_size : end])
        del self._pending[:end]
        try:
            header = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise self._break(f"malformed header: {e}") from None
        if not isinstance(header, dict):
            raise self._break(f"malformed header: a JSON {type(header).__name__}, not an object")
        return header, (_decode_arrays(payload) if payload else {})

    def _fill(self, size: int, deadline: float | None) -> None:
        """Reads until ``size`` bytes are pending; kept on timeout, so a later call resumes."""
        while len(self._pending) < size:
            _wait_for(self.read_fd, select.POLLIN, deadline, "no message in time")
            try:
                chunk = os.read(self.read_fd, _READ_CHUNK)
            except BlockingIOError:
                continue
            if not chunk:
                raise self._break("channel closed by the other side")
            self._pending += chunk

    def _break(self, message: str) -> SandboxError:
        # After a bad frame the stream cannot be resynchronised: every later receive fails.
        self._broken = SandboxError(message)
        self._pending = bytearray()
        return self._broken

    def close(self) -> None:
        for fd in {self.read_fd, self.write_fd}:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.read_fd = self.write_fd = -1


# -------------------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class Report:
    """How a sandboxed child ended."""

    returncode: int | None  # negative: killed by that signal; None: could not be reaped
    seconds: float
    timed_out: bool
    memory_exceeded: bool
    stdout: str  # bounded as Limits.output_bytes
    stderr: str
    isolation: dict  # user_ns, net_ns, pid_ns, uid, nproc_limit, data_limit: what was in force

    def output_tail(self, chars: int = 2000) -> dict[str, str]:
        """The last ``chars`` of each non-empty stream: what a node records for its Analyzer."""
        streams = {"stdout": self.stdout, "stderr": self.stderr}
        return {name: text[-chars:] for name, text in streams.items() if text.strip()}

    def reason(self) -> str | None:
        """One line saying why the child failed; None if it exited 0 within its limits."""
        if self.timed_out:
            return f"timeout: killed after {self.seconds:.0f} s"
        if self.memory_exceeded:
            gib = self.isolation["data_limit"] / (1 << 30)
            if self.returncode == sandbox_worker.EXIT_MEMORY:
                return f"memory: MemoryError under the {gib:.1f} GiB data limit"
            return f"memory: the process tree exceeded {gib:.1f} GiB"
        if self.returncode == 0:
            return None
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        last = f": {lines[-1][:300]}" if lines else ""
        if self.returncode is None:
            return f"the child could not be reaped{last}"
        if self.returncode < 0:
            return f"killed by {signal.Signals(-self.returncode).name}{last}"
        return f"exit code {self.returncode}{last}"


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


def _allowed(name: str) -> bool:
    if name not in _ALLOWED_NAMES and not name.startswith(_ALLOWED_PREFIXES):
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


def _chown_tree(path: str, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, names in os.walk(path):
        for name in dirs + names:
            os.chown(os.path.join(root, name), uid, gid)


class Sandbox:
    """One child process running ``target`` ("package.module:function") under ``limits``.

    ``files`` (relative name -> text) are written into the child's fresh temp working dir,
    which is on its ``sys.path``; ``env`` is added to the scrubbed environment.
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
        self._workdir = tempfile.mkdtemp(prefix="sandbox-")
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
        }
        if os.getuid() == 0:
            config["uid"], config["gid"] = _nobody()
            _chown_tree(workdir, config["uid"], config["gid"])
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
        if isinstance(error, _ChannelTimeout) and self._expired():
            self._timed_out = True
            self._kill_tree()
        if self._timed_out:
            return SandboxError(f"timeout: killed after {self.limits.timeout_s:g} s")
        if self._memory_exceeded:
            gib = self.limits.memory_bytes / (1 << 30)
            return SandboxError(f"memory: the process tree exceeded {gib:.1f} GiB")
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
            memory_exceeded=self._memory_exceeded or returncode == sandbox_worker.EXIT_MEMORY,
            stdout=stdout,
            stderr=stderr,
            # Without the worker's hello (it died first), claim no isolation.
            isolation={
                "user_ns": False,
                "net_ns": False,
                "pid_ns": False,
                "uid": None,
                "nproc_limit": None,
                "data_limit": self.limits.memory_bytes,
                **(self._isolation or {}),
            },
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
