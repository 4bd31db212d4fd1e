"""Child side of ``sandbox.Sandbox``: build a private view of the filesystem, drop privileges,
enter namespaces, then run the target.

Started by the parent as ``python -P -m evolve_jax.evaluation.sandbox_worker CONFIG`` (JSON),
with the parent's prepared working dir (0700, the parent's) as its current directory. In order:

1. As root: a new mount namespace, made by root, in which ``build_view`` runs; then become
   ``nobody``. Not root: the same in a new user namespace (step 2), if the kernel allows one.
2. Unshare user, mount, PID and (unless ``network``) network namespaces; set RLIMIT_NPROC,
   RLIMIT_DATA and RLIMIT_CORE; become non-dumpable.
3. Fork the PID namespace's init, which mounts a fresh /proc, drops every capability, sends
   the hello, then imports the target and calls it with the channel.

``build_view`` leaves the child: its working dir (a copy of the parent's) in a private tmpfs
/tmp, a private tmpfs /dev/shm, every other mount read-only, and the paths in ``hidden``
covered (a directory by an empty tmpfs, a file by /dev/null) except for the import paths
inside them, which are bind-mounted back read-only. The target has no capability left, so it
can unmount or remount none of it; mounts made by root, or in a parent user namespace, are
locked by the kernel besides.

Until the fork this module imports only the standard library and starts no thread:
``unshare(CLONE_NEWUSER)`` fails in a multithreaded process, and importing numpy starts
OpenBLAS threads. ``-P`` keeps the working dir off ``sys.path``, and nothing puts it there:
files written there cannot stand in for this bootstrap or for any module.
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
PR_SET_NO_NEW_PRIVS = 38
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 0x400, 0x800, 0x200000
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (Linux >= 5.12)
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY = 0x1
CAPABILITY_V3 = 0x20080522

EXIT_ERROR = 1
TRACEBACK_LINES = 40
TRACEBACK_CHARS = 8_000

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl({option})")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    args = [None if v is None else v.encode() for v in (source, target, fstype, data)]
    _check(_libc.mount(*args[:3], ctypes.c_ulong(flags), args[3]), f"mount {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("set", "clr", "propagation", "userns_fd")]


_MOUNT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}


def _mount_points() -> list[tuple[str, int]]:
    """(mount point, its MS_* flags other than read-only) of every mount in this namespace."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            flags = sum(_MOUNT_FLAGS.get(option, 0) for option in fields[5].split(","))
            found.append((point, flags))
    return found


def set_read_only(path: str, read_only: bool, recursive: bool) -> None:
    """Makes the mount at ``path`` (and those below it, if ``recursive``) read-only or not.

    mount_setattr(2) where the kernel has it (>= 5.12); else each mount is remounted.
    """
    attr = _MountAttr(MOUNT_ATTR_RDONLY if read_only else 0, 0 if read_only else MOUNT_ATTR_RDONLY)
    flags = AT_RECURSIVE if recursive else 0
    args = (ctypes.c_long(AT_FDCWD), path.encode(), ctypes.c_uint(flags))
    if _libc.syscall(SYS_MOUNT_SETATTR, *args, ctypes.byref(attr), ctypes.sizeof(attr)) == 0:
        return
    if ctypes.get_errno() != 38:  # ENOSYS
        _check(-1, f"mount_setattr {path}")
    for point, kept in _mount_points():
        if point == path or (recursive and point.startswith(path.rstrip("/") + "/")):
            flags = MS_REMOUNT | MS_BIND | kept | (MS_RDONLY if read_only else 0)
            with contextlib.suppress(OSError):  # a mount under another one: out of reach
                _mount(None, point, None, flags)


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


def _inside(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


def _outermost(paths: list[str]) -> list[str]:
    """``paths`` less those inside another of them."""
    return [p for p in paths if not any(_inside(p, q) for q in paths)]


def _copy_tree(source_fd: int, target: str, uid: int, gid: int) -> None:
    """Copies the directory open as ``source_fd`` into ``target``, owned by ``uid``."""
    for root, dirs, names, root_fd in os.fwalk(".", dir_fd=source_fd):
        here = os.path.normpath(os.path.join(target, root))
        for name in dirs:
            os.mkdir(os.path.join(here, name), 0o700)
            os.chown(os.path.join(here, name), uid, gid)
        for name in names:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=root_fd)
            with os.fdopen(fd, "rb") as src, open(os.path.join(here, name), "wb") as dst:
                dst.write(src.read())
            os.chown(os.path.join(here, name), uid, gid)


def build_view(config: dict, uid: int, gid: int) -> None:
    """In this process's new mount namespace: the view described in the module docstring.

    ``uid``/``gid``: who the target will run as. Needs CAP_SYS_ADMIN over the namespace (root,
    or the owner of a new user namespace); changes nothing outside it.
    """
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # before any mount: none may reach the machine
    workdir = config["workdir"]
    # Opened before anything covers them; a bind source must be in this namespace.
    source = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    keep = _outermost(sorted({os.path.realpath(p) for p in import_paths() if os.path.isdir(p)}))
    hidden = [os.path.realpath(p) for p in config["hidden"]]
    writable = ["/tmp", "/dev/shm"]
    if not _inside(workdir, "/tmp"):
        writable.append(os.path.dirname(workdir))
    covers = {p for p in hidden if os.path.isdir(p)} | set(writable)
    if os.getuid() != uid:  # root, running the target as nobody
        covers |= {c for c in (_first_closed(p, uid, gid) for p in keep) if c is not None}
    handles = {p: os.open(p, os.O_PATH) for p in keep if any(_inside(p, c) for c in covers)}
    null = os.open("/dev/null", os.O_PATH)
    for cover in sorted(covers, key=lambda p: p.count("/")):
        if not os.path.isdir(cover):
            continue  # under an earlier cover, with nothing kept below it: hidden already
        if cover in writable:
            options = f"mode=1777,size={config['tmp_bytes']}"
        else:
            options = "mode=755,size=1m"
        _mount("tmpfs", cover, "tmpfs", MS_NOSUID | MS_NODEV, options)
        for path in _outermost([p for p in handles if _inside(p, cover)]):
            for depth in range(cover.count("/") + 1, path.count("/") + 1):
                directory = "/".join(path.split("/")[: depth + 1])
                if not os.path.isdir(directory):
                    os.mkdir(directory)
                    os.chmod(directory, 0o755)  # whatever the umask
            _mount(f"/proc/self/fd/{handles[path]}", path, None, MS_BIND | MS_REC)
    for path in hidden:
        if os.path.lexists(path) and not os.path.isdir(path):
            _mount(f"/proc/self/fd/{null}", path, None, MS_BIND)
    os.makedirs(workdir, 0o700)
    os.chown(workdir, uid, gid)
    _copy_tree(source, workdir, uid, gid)
    for fd in (source, null, *handles.values()):
        os.close(fd)
    set_read_only("/", True, recursive=True)
    # /proc stays writable until the init covers it with its own, read-only, /proc: as nobody
    # this process still writes its uid_map there.
    for path in [*writable, "/proc"]:
        set_read_only(path, False, recursive=False)
    os.chdir(workdir)  # the copy, not the parent's dir underneath


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


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]


def drop_capabilities() -> None:
    """Clears every capability of this process, for good (no new ones through execve)."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(_CapHeader(CAPABILITY_V3, 0)), data), "capset")


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
    """New user, mount and PID namespaces, and a network one unless ``network``; what took
    effect. The mount namespace is this user namespace's, so its init can mount a /proc."""
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | (0 if network else CLONE_NEWNET)
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
            if isolation["fs_private"]:
                # This PID namespace's own /proc over the machine's: no other process in it.
                flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
                _mount("proc", "/proc", "proc", flags)
                isolation["proc_private"] = True
            drop_capabilities()  # the user namespace gave this process all of them
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
        # numpy, through the channel: safe now, the namespaces are set.
        from evolve_jax.evaluation.sandbox_channel import Channel

        channel = Channel(config["read_fd"], config["write_fd"], config["max_message_bytes"])
        # The first message, sent before any untrusted code runs: a target cannot forge it.
        channel.send(
            {"isolation": dict(isolation, pid_ns=isolation["pid_ns"] and os.getpid() == 1)}
        )
        module_name, function_name = config["target"].split(":")
        getattr(importlib.import_module(module_name), function_name)(channel)
        code = 0
    except SystemExit as e:  # the target chose its exit status
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        text = trimmed_traceback()
        print(text, file=sys.stderr)
        if channel is not None:
            with contextlib.suppress(Exception):  # if the channel broke, stderr still has it
                channel.send({"error": text})
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    # os._exit: threads the target left behind must not keep the process alive.
    os._exit(code)


def main(argv: list[str]) -> NoReturn:
    config = json.loads(argv[1])
    isolation = {"fs_private": False, "proc_private": False}
    if os.getuid() == 0:
        # Root builds the view, in a mount namespace of its own, before becoming nobody: the
        # interpreter may sit under a directory nobody cannot search (a 0700 /root).
        _unshare(CLONE_NEWNS)
        build_view(config, config["uid"], config["gid"])
        isolation["fs_private"] = True
        drop_root(config["uid"], config["gid"])
    # Counted before unshare: inside a user namespace, /proc shows unmapped uids as nobody.
    tasks = count_tasks(os.getuid())
    isolation.update(uid=os.getuid(), **enter_namespaces(config["network"]))
    if isolation["user_ns"] and not isolation["fs_private"]:
        build_view(config, os.getuid(), os.getgid())
        isolation["fs_private"] = True
    if isolation["user_ns"] and nproc_per_namespace():
        tasks = 1  # this process: the namespace's only task yet, whatever other sandboxes run
    # Non-dumpable: other processes of this uid (other sandboxes) cannot ptrace this one or its
    # children, nor read their memory or environment through /proc.
    _prctl(PR_SET_DUMPABLE, 0)
    isolation.update(limit_resources(config["max_tasks"], config["memory_bytes"], tasks))
    if isolation["pid_ns"]:
        become_init_of(config, isolation)
    run_target(config, isolation)


if __name__ == "__main__":
    main(sys.argv)
