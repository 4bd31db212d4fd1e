"""Sandbox targets for tests/test_sandbox.py: each takes the channel, as a real harness does."""

import errno
import importlib.util
import io
import os
import socket
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
