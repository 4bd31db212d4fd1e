"""The pipe protocol between ``sandbox.Sandbox`` and its child: JSON headers and .npz arrays.

A frame is a magic, the header's and the arrays' lengths, the JSON header, then the arrays as
an uncompressed .npz (or nothing). Neither side unpickles: object arrays are refused on
sending and on receiving, deflated members on receiving. Imported by both ``sandbox`` (the
parent) and ``sandbox_worker`` (the child), which do not import each other.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import struct
import time
import zipfile
from collections.abc import Mapping

import numpy as np

MAX_MESSAGE_BYTES = 256 << 20  # the default bound on one message's header + arrays
_READ_CHUNK = 1 << 16  # a pipe's default capacity


class SandboxError(RuntimeError):
    """A protocol failure: EOF, a malformed or oversized message, a timeout, a dead child."""


class ChannelTimeout(SandboxError):
    """No message, or no room to write one, before the deadline."""


# A frame: magic, header length, arrays length; then the JSON header; then an .npz (or nothing).
_FRAME = struct.Struct("<4sQQ")
_MAGIC = b"EJX1"


def frame_head(header: bytes, payload: bytes) -> bytes:
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
        raise ChannelTimeout(f"timeout: {what}")


class Channel:
    """Messages over a pair of pipe fds: length-prefixed frames of JSON header + .npz arrays."""

    def __init__(self, read_fd: int, write_fd: int, max_message_bytes: int = MAX_MESSAGE_BYTES):
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
        self._write_all(frame_head(text, payload), deadline)
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
