"""Sandbox targets for tests/test_sandbox.py: each takes the channel, as a real harness does."""

import errno
import importlib.util
import io
import os
import socket
import sys
import time
import zipfile

import numpy as np

from evolve_jax.evaluation import sandbox_channel


def echo(channel):
    """Replies with the request's arrays transformed by candidate.py from the working dir."""
    spec = importlib.util.spec_from_file_location("candidate", os.path.abspath("candidate.py"))
    candidate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(candidate)

    header, arrays = channel.receive()
    channel.send(
        {"echo": header, "cwd": os.getcwd()},
        {"scaled": candidate.scale(arrays["x"]), "shifted": arrays["n"] + 1},
    )


def reply(channel):
    channel.send({"ok": True})


def reply_with_jax(channel):
    import jax.numpy as jnp

    channel.send({"sum": float(jnp.ones(3).sum())})


def spin(channel):
    while True:
        pass


def allocate(channel):
    """Touches memory in 16 MiB chunks until something stops it."""
    chunks = []
    while True:
        chunks.append(b"\x01" * (16 << 20))


def allocate_in_children(channel):
    """Forks children that each hold 200 MiB: under the per-process limit, not in sum."""
    for _ in range(8):
        if os.fork() == 0:
            held = b"\x01" * (200 << 20)  # noqa: F841 (kept alive by the sleep)
            time.sleep(60)
            os._exit(0)
    time.sleep(60)


def fork_bomb(channel):
    """Forks sleeping children until fork fails; reports how many it made and why it stopped."""
    forks = 0
    while True:
        try:
            pid = os.fork()
        except OSError as e:
            channel.send({"forks": forks, "errno": errno.errorcode.get(e.errno, str(e.errno))})
            time.sleep(60)
            return
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        forks += 1


def environment(channel):
    channel.send({"environ": dict(os.environ)})


def connect(channel):
    """Connects to the port in the request; reports the error, if any."""
    header, _ = channel.receive()
    try:
        with socket.create_connection(("127.0.0.1", header["port"]), timeout=2):
            channel.send({"connected": True})
    except OSError as e:
        channel.send({"connected": False, "error": f"{type(e).__name__}: {e}"})


def print_lines(channel):
    """About 10 MB of numbered lines on stdout."""
    for i in range(100_000):
        print(f"line {i:06d} " + "x" * 88)
    channel.send({"done": True})


def exit_3(channel):
    """Exits with the status the worker once used for MemoryError, allocating nothing."""
    os._exit(3)


def fail(channel):
    raise ValueError("candidate exploded")


def garbage(channel):
    os.write(channel.write_fd, b"this is not a frame, only text\n" * 4)


def send_pickled_array(channel):
    """A well-formed frame whose arrays hold an object array: numpy can load it only by pickle."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, archive.open("x.npy", "w") as member:
        np.lib.format.write_array(member, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    payload = buffer.getvalue()
    header = b"{}"
    os.write(channel.write_fd, sandbox_channel.frame_head(header, payload) + payload)


def daemonize(channel):
    """Leaves a grandchild in a session of its own whose parent has exited, then returns."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(60)
        os._exit(0)
    os.wait()
    channel.send({"ok": True})


def send_deflated_array(channel):
    """A well-formed frame whose .npz member is deflated: small on the wire, any size loaded."""
    buffer = io.BytesIO()
    deflated = zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED)
    with deflated as archive, archive.open("x.npy", "w") as member:
        np.lib.format.write_array(member, np.zeros(1 << 16), allow_pickle=False)
    payload = buffer.getvalue()
    os.write(channel.write_fd, sandbox_channel.frame_head(b"{}", payload) + payload)


def _attempt(action) -> str:
    """ "ok" and what ``action`` returned, or the error it raised."""
    try:
        return f"ok {action()!r}"[:200]
    except Exception as e:
        return f"{type(e).__name__}: {e}"[:200]


def _write(path: str, text: str) -> int:
    with open(path, "w") as f:
        return f.write(text)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def plant(channel):
    """Looks for the sibling sandbox's working dir named in the request and plants a module
    there (also in its own dir and in /tmp); reports what it saw and what each write did."""
    header, _ = channel.receive()
    victim = header["victim"]
    parent = os.path.dirname(victim)
    source = "import os\nos.environ['PLANTED'] = 'yes'\n"
    channel.send(
        {
            "listed": _attempt(lambda: sorted(os.listdir(parent))),
            "seen": os.path.exists(victim),
            "writes": {
                path: _attempt(lambda p=path: _write(p, source))
                for path in (f"{victim}/planted_by_a.py", f"{parent}/planted_by_a.py")
            },
        }
    )


def import_planted(channel):
    """Waits for a request, then imports ``planted_by_a`` if anything put it within reach."""
    channel.receive()
    imported = _attempt(lambda: __import__("planted_by_a").__name__)
    channel.send({"imported": imported, "cwd_on_path": os.getcwd() in sys.path})


def write_everywhere(channel):
    """Writes a file at each path of the request; reports what each write did."""
    header, _ = channel.receive()
    channel.send({path: _attempt(lambda p=path: _write(p, "x")) for path in header["paths"]})


def read_everywhere(channel):
    """Reads each path of the request (a directory: lists it); reports what it got."""
    header, _ = channel.receive()

    def read(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else _read(path)

    channel.send(
        {
            "read": {path: _attempt(lambda p=path: read(p)) for path in header["paths"]},
            "imports": {
                name: _attempt(lambda n=name: importlib.import_module(n).__name__)
                for name in header["imports"]
            },
            "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        }
    )


def wait(channel):
    """Replies to one request, then waits for the next."""
    channel.receive()
    channel.send({"pid": os.getpid()})
    channel.receive()
