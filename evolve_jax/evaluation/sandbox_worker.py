"""Child side of ``sandbox.Sandbox``: drop privileges, enter namespaces, then run the target.

Started by the parent as ``python -P -m evolve_jax.evaluation.sandbox_worker CONFIG`` (JSON).
In order: as root, make the interpreter's directories reachable (``expose``) and become
``nobody``; unshare user, PID and network namespaces; set RLIMIT_NPROC, RLIMIT_DATA and
RLIMIT_CORE; fork the PID namespace's init, which sends the hello, then imports the target and
calls it with the channel.

Until that fork this module imports only the standard library and starts no thread:
``unshare(CLONE_NEWUSER)`` fails in a multithreaded process, and importing numpy starts
OpenBLAS threads. ``-P`` keeps the working dir off ``sys.path`` until the target's import, so
files written there cannot stand in for this bootstrap.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import re
import resource
import signal
import stat
import sys
import traceback
from typing import NoReturn

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000

EXIT_ERROR = 1
EXIT_MEMORY = 3  # the target raised MemoryError (RLIMIT_DATA); the parent reports it as memory
TRACEBACK_LINES = 40
TRACEBACK_CHARS = 8_000

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> None:
    if _libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}): {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    args = [None if v is None else v.encode() for v in (source, target, fstype, data)]
    if _libc.mount(*args[:3], ctypes.c_ulong(flags), args[3]) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {target}: {os.strerror(errno)}")


def _searchable(path: str, uid: int, gid: int) -> bool:
    info = os.stat(path)
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid == gid:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def _first_closed(path: str, uid: int, gid: int) -> str | None:
    """The first directory above ``path`` that ``uid`` may not search, if any."""
    parts = path.strip("/").split("/")
    for depth in range(len(parts)):
        directory = "/" + "/".join(parts[:depth])
        if not _searchable(directory, uid, gid):
            return directory
    return None


def expose(paths: list[str], uid: int, gid: int) -> None:
    """Lets ``uid`` reach ``paths`` where a directory above them is closed to it.

    Python installed under a 0700 /root is the case in point. In a private mount namespace,
    each closed directory is covered by an empty tmpfs into which only ``paths`` are bind-mounted:
    the rest of it stays hidden. Needs root; changes nothing outside this process tree.
    """
    covers: dict[str, list[str]] = {}
    exposed: list[str] = []
    for path in sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)}):
        if any(path.startswith(outer + "/") for outer in exposed):
            continue  # inside a path already exposed: nothing may be created there
        closed = _first_closed(path, uid, gid)
        if closed is not None:
            covers.setdefault(closed, []).append(path)
            exposed.append(path)
    if not covers:
        return
    if _libc.unshare(CLONE_NEWNS) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare(CLONE_NEWNS): {os.strerror(errno)}")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # before any mount: none may reach the machine
    # Opened in the new namespace (a bind source must be in it), before the tmpfs hides them.
    handles = {path: os.open(path, os.O_PATH) for kept in covers.values() for path in kept}
    for closed, kept in covers.items():
        _mount("tmpfs", closed, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
        for path in kept:
            for depth in range(closed.count("/") + 1, path.count("/") + 1):
                directory = "/".join(path.split("/")[: depth + 1])
                if not os.path.isdir(directory):
                    os.mkdir(directory)
                    os.chmod(directory, 0o755)  # whatever the umask
            _mount(f"/proc/self/fd/{handles[path]}", path, None, MS_BIND | MS_REC)
    for handle in handles.values():
        os.close(handle)


def import_paths() -> list[str]:
    """Directories the child imports from: the interpreter's, sys.path and this package's."""
    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return [sys.base_prefix, sys.prefix, *sys.path, package]


def drop_root(uid: int, gid: int) -> None:
    """Becomes ``uid``/``gid`` with no supplementary groups."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    # setuid left the process non-dumpable, which makes /proc/self/uid_map root's to write.
    _prctl(PR_SET_DUMPABLE, 1)


def count_tasks(uid: int) -> int:
    """Processes plus threads whose real uid is ``uid``: what RLIMIT_NPROC counts."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":\t", 1) for line in f if ":\t" in line)
        except OSError:  # the process ended meanwhile
            continue
        if int(fields["Uid"].split()[0]) == uid:
            total += int(fields["Threads"])
    return total


def _set_limit(kind: int, value: int) -> int:
    """Sets soft and hard limit to ``value`` (at most the current hard limit); returns it."""
    hard = resource.getrlimit(kind)[1]
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))
    return value


def nproc_per_namespace() -> bool:
    """Whether RLIMIT_NPROC counts a user namespace's tasks apart from the uid's others."""
    found = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return found is not None and tuple(map(int, found.groups())) >= (5, 14)


def limit_resources(max_tasks: int, memory_bytes: int, tasks: int) -> dict:
    """Lets ``max_tasks`` tasks be added to the ``tasks`` counted now; caps memory, no core."""
    nproc = _set_limit(resource.RLIMIT_NPROC, tasks + max_tasks)
    data = _set_limit(resource.RLIMIT_DATA, memory_bytes)
    _set_limit(resource.RLIMIT_CORE, 0)
    return {"nproc_limit": nproc, "data_limit": data}


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enter_namespaces(network: bool) -> dict:
    """New user and PID namespaces, and a network one unless ``network``; what took effect."""
    flags = CLONE_NEWUSER | CLONE_NEWPID | (0 if network else CLONE_NEWNET)
    uid, gid = os.getuid(), os.getgid()
    if _libc.unshare(flags) != 0:
        errno = ctypes.get_errno()
        print(f"sandbox: unshare failed ({os.strerror(errno)}): no namespaces", file=sys.stderr)
        return {"user_ns": False, "net_ns": False, "pid_ns": False}
    # An identity map keeps the uid the same inside; unmapped, files could not be created.
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")
    return {"user_ns": True, "net_ns": not network, "pid_ns": True}


def _exit_as(status: int) -> NoReturn:
    """Exits with the wait ``status`` of a child: its exit code, or death by its signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # only if the signal did not end this process
    os._exit(os.waitstatus_to_exitcode(status))


def become_init_of(config: dict, isolation: dict) -> NoReturn:
    """Forks the PID namespace's init, which runs the target; exits as it does."""
    pid = os.fork()
    if pid == 0:
        try:
            # If this worker dies, so does the namespace. (Until here, the parent's SIGKILL of
            # the process group reaches both.)
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            traceback.print_exc()
            os._exit(EXIT_ERROR)
        run_target(config, isolation)
    # Only the target's tree may hold the channel, so the parent sees EOF when that tree ends.
    os.close(config["read_fd"])
    os.close(config["write_fd"])
    _, status = os.waitpid(pid, 0)
    _exit_as(status)


def trimmed_traceback() -> str:
    """The last lines of the current exception's traceback, bounded in size."""
    lines = traceback.format_exc().rstrip().splitlines()
    text = "\n".join(lines[-TRACEBACK_LINES:])
    return text[-TRACEBACK_CHARS:]


def run_target(config: dict, isolation: dict) -> NoReturn:
    """Sends the hello, imports ``module:function``, calls it with the channel; exits."""
    code, channel = EXIT_ERROR, None
    try:
        # Line buffering: what the target printed before a kill still reaches the report.
        sys.stdout.reconfigure(line_buffering=True)
        from evolve_jax.evaluation.sandbox import Channel  # numpy: safe now, namespaces are set

        channel = Channel(config["read_fd"], config["write_fd"], config["max_message_bytes"])
        # The first message, sent before any untrusted code runs: a target cannot forge it.
        channel.send(
            {"isolation": dict(isolation, pid_ns=isolation["pid_ns"] and os.getpid() == 1)}
        )
        sys.path.insert(0, os.getcwd())  # the working dir's files (e.g. candidate.py)
        module_name, function_name = config["target"].split(":")
        getattr(importlib.import_module(module_name), function_name)(channel)
        code = 0
    except SystemExit as e:  # the target chose its exit status
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException as e:
        text = trimmed_traceback()
        print(text, file=sys.stderr)
        if channel is not None:
            with contextlib.suppress(Exception):  # if the channel broke, stderr still has it
                channel.send({"error": text})
        if isinstance(e, MemoryError):
            code = EXIT_MEMORY
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    # os._exit: threads the target left behind must not keep the process alive.
    os._exit(code)


def main(argv: list[str]) -> NoReturn:
    config = json.loads(argv[1])
    if os.getuid() == 0:
        expose(import_paths(), config["uid"], config["gid"])
        drop_root(config["uid"], config["gid"])
    # Counted before unshare: inside a user namespace, /proc shows unmapped uids as nobody.
    tasks = count_tasks(os.getuid())
    isolation = {"uid": os.getuid(), **enter_namespaces(config["network"])}
    if isolation["user_ns"] and nproc_per_namespace():
        tasks = 1  # this process: the namespace's only task yet, whatever other sandboxes run
    # Non-dumpable: other processes of this uid (other sandboxes) cannot ptrace this one or its
    # children, nor read their memory through /proc.
    _prctl(PR_SET_DUMPABLE, 0)
    isolation.update(limit_resources(config["max_tasks"], config["memory_bytes"], tasks))
    if isolation["pid_ns"]:
        become_init_of(config, isolation)
    run_target(config, isolation)


if __name__ == "__main__":
    main(sys.argv)
