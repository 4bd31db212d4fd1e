"""A fake Google Cloud Storage server on 127.0.0.1 that TensorStore's real ``gcs`` driver can use.

TensorStore reads two environment variables once per process, so a ``gs://`` client must be a
subprocess started with them (``gcs_env`` builds that environment)::

    with fake_gcs_server() as server:
        subprocess.run([sys.executable, "-c", code], env=gcs_env(server.url), check=True)
        server.read("test-bucket", "run/report.txt")

* ``TENSORSTORE_GCS_HTTP_URL``: the base URL the driver sends its JSON-API requests to.
* ``GOOGLE_AUTH_TOKEN_FOR_TESTING``: a bearer token used as is, so no credentials are looked
  up (no application-default file, no metadata server) and nothing reaches Google.

It keeps objects in memory and speaks the part of the GCS JSON API that the driver uses:

* ``GET /storage/v1/b/<bucket>/o/<object>?alt=media``: the object's bytes, with its generation
  in ``x-goog-generation``; a ``Range: bytes=...`` header gets a 206 with that slice. Without
  ``alt=media`` the answer is the object's JSON metadata.
* ``POST /upload/storage/v1/b/<bucket>/o?uploadType=media&name=<object>`` (and
  ``uploadType=multipart``): stores the body under a new generation and answers its metadata.
* ``GET /storage/v1/b/<bucket>/o?prefix=&startOffset=&endOffset=&maxResults=&pageToken=``:
  object metadata in name order, paged with ``nextPageToken``.
* ``DELETE /storage/v1/b/<bucket>/o/<object>``: 204.

Every object request honours ``ifGenerationMatch`` (0 means "must not exist") with a 412, and
``ifGenerationNotMatch`` with a 304 on reads and a 412 on writes. A missing object is a 404.
Errors use GCS's body ``{"error": {"code", "message", "errors": [...]}}``.

Not faked: authentication (any token is accepted; ``tokens`` records those sent), bucket
resources (every bucket exists and starts empty), metagenerations (always 1), checksums (no
``x-goog-hash``, so the client checks none), resumable uploads, ``fields`` projections,
``delimiter`` listing, compose/copy/rewrite, and the gRPC API.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

TOKEN = "fake-gcs-token"
PAGE_SIZE = 1000  # GCS's largest page; a smaller maxResults wins

# Object names are percent-encoded into one path segment ('/' as %2F), so match before unquoting.
_OBJECT = re.compile(r"/storage/v1/b/([^/]+)/o/(.+)")
_LIST = re.compile(r"/storage/v1/b/([^/]+)/o/?")
_UPLOAD = re.compile(r"/upload/storage/v1/b/([^/]+)/o/?")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")

_REASONS = {
    304: ("notModified", "Not Modified"),
    400: ("invalid", "Invalid argument."),
    404: ("notFound", "Not Found"),
    412: ("conditionNotMet", "At least one of the pre-conditions you specified did not hold."),
    416: ("requestedRangeNotSatisfiable", "The requested range cannot be satisfied."),
}


def error_body(code: int, message: str | None = None) -> dict:
    """GCS's JSON error body for HTTP status ``code``."""
    reason, default = _REASONS.get(code, ("backendError", "Backend error."))
    message = message or default
    return {
        "error": {
            "code": code,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
        }
    }


def gcs_env(url: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a subprocess whose ``gs://`` storage is the fake server at ``url``."""
    env = dict(os.environ if base is None else base)
    env["TENSORSTORE_GCS_HTTP_URL"] = url
    env["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = TOKEN
    # Real credentials must not be the ones that make a test pass.
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    return env


def _split_multipart(content_type: str, body: bytes) -> tuple[dict, str, bytes]:
    """(metadata, content type, data) of a multipart/related upload: a JSON part, then data."""
    boundary = re.search(r'boundary="?([^";]+)"?', content_type)
    if boundary is None:
        raise ValueError("no boundary")
    # Split by hand rather than with email.parser, which may rewrite line ends in binary data.
    parts = body.split(b"--" + boundary[1].encode())[1:-1]
    if len(parts) != 2:
        raise ValueError(f"{len(parts)} parts, not 2")
    (_, meta), (data_headers, data) = (p[2:-2].split(b"\r\n\r\n", 1) for p in parts)
    data_type = re.search(rb"(?im)^content-type:\s*(\S+)", data_headers)
    content = data_type[1].decode() if data_type else "application/octet-stream"
    return json.loads(meta), content, data


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    status: int


@dataclass
class Object:
    data: bytes
    generation: int
    updated: str
    content_type: str = "application/octet-stream"

    def metadata(self, bucket: str, name: str) -> dict:
        # GCS sends int64 fields as JSON strings.
        return {
            "kind": "storage#object",
            "id": f"{bucket}/{name}/{self.generation}",
            "name": name,
            "bucket": bucket,
            "generation": str(self.generation),
            "metageneration": "1",
            "contentType": self.content_type,
            "size": str(len(self.data)),
            "md5Hash": base64.b64encode(hashlib.md5(self.data).digest()).decode(),
            "timeCreated": self.updated,
            "updated": self.updated,
            "storageClass": "STANDARD",
        }


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0 (the default) closes each connection after its answer, so no pooled client
    # connection keeps a handler thread alive and stop() can join them all.
    server: _Server

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def _dispatch(self):
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        answer = self.server.fake._answer(self.command, url.path, query, self.headers, body)
        self._send(*answer)

    def _send(self, status: int, payload: dict | bytes | None, headers: dict | None = None):
        data = json.dumps(payload).encode() if isinstance(payload, dict) else payload or b""
        try:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if isinstance(payload, dict):
                self.send_header("Content-Type", "application/json; charset=UTF-8")
            if status not in (204, 304):  # these answers have no body
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if status not in (204, 304):
                self.wfile.write(data)
        except ConnectionError:
            pass  # The client gave up (a cancelled read); nothing to tell.

    def log_message(self, format, *args):
        pass  # Keep test output clean; ``requests`` has the log.


class _Server(ThreadingHTTPServer):
    # Non-daemon handler threads are joined by server_close(): a stopped fake leaves none.
    daemon_threads = False
    fake: FakeGCS


class FakeGCS:
    """In-memory GCS JSON-API server; see the module docstring. Thread-safe."""

    def __init__(self):
        self.url = ""
        # Every request with the status it got: what a client sent, for tests and debugging.
        self.requests: list[Request] = []
        self.tokens: set[str] = set()  # bearer tokens seen
        self._objects: dict[tuple[str, str], Object] = {}
        # One counter for every object: a rewritten or re-created object never reuses a
        # generation, which is all GCS promises (it uses microsecond timestamps).
        self._generations = itertools.count(1_000_001)
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._race: tuple[str, threading.Barrier] | None = None  # see race_uploads
        self._racers_left = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeGCS:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        # A short poll interval keeps stop() (which waits for the serving loop to notice) fast.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-gcs", daemon=True
        )
        self._thread.start()
        return self

    def stop(self):
        if self._race is not None:
            self._race[1].abort()  # frees any upload still waiting for a racer
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    def __enter__(self) -> FakeGCS:
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # ------------------------------------------------------------------ direct access for tests

    def read(self, bucket: str, name: str) -> bytes | None:
        """An object's bytes, or None if there is none."""
        with self._lock:
            obj = self._objects.get((bucket, name))
            return None if obj is None else obj.data

    def names(self, bucket: str, prefix: str = "") -> list[str]:
        """The names of a bucket's objects under ``prefix``, sorted."""
        with self._lock:
            return sorted(n for b, n in self._objects if b == bucket and n.startswith(prefix))

    def count(self, method: str, status: int | None = None, **query: str) -> int:
        """How many ``method`` requests got ``status`` (any if None) and had these query values."""
        with self._lock:
            return sum(
                r.method == method
                and status in (None, r.status)
                and query.items() <= r.query.items()
                for r in self.requests
            )

    def race_uploads(self, name: str, writers: int = 2, timeout: float = 30.0) -> None:
        """Holds the next ``writers`` uploads of object ``name`` until all have arrived.

        Each writer has then read the object before any of them replaced it, so they race on
        the same generation: a lost update shows up unless the server enforces their
        ``ifGenerationMatch``.
        """
        with self._lock:
            self._race = (name, threading.Barrier(writers, timeout=timeout))
            self._racers_left = writers

    def _wait_for_racers(self, name: str | None) -> None:
        with self._lock:  # claim a place in the race, or pass (later uploads, other names)
            if self._race is None or name != self._race[0] or self._racers_left == 0:
                return
            self._racers_left -= 1
            barrier = self._race[1]
        # Stopped or timed out: let the upload through; the test reports the rest.
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()

    # ------------------------------------------------------------------ the API

    def _answer(self, method: str, path: str, query: dict, headers, body: bytes) -> tuple:
        """(status, body, headers) for one request, which is logged with its status."""
        if method == "POST" and (m := _UPLOAD.fullmatch(path)):
            self._wait_for_racers(query.get("name"))
            answer = self._upload(unquote(m[1]), query, headers, body)
        elif method == "GET" and (m := _LIST.fullmatch(path)):
            answer = self._list(unquote(m[1]), query)
        elif method == "GET" and (m := _OBJECT.fullmatch(path)):
            answer = self._get(unquote(m[1]), unquote(m[2]), query, headers.get("Range"))
        elif method == "DELETE" and (m := _OBJECT.fullmatch(path)):
            answer = self._delete(unquote(m[1]), unquote(m[2]), query)
        else:
            answer = (404, error_body(404, f"Unknown path: {method} {path}"))
        with self._lock:
            self.requests.append(Request(method, path, query, answer[0]))
            self.tokens.add((headers.get("Authorization") or "").removeprefix("Bearer "))
        return answer

    @staticmethod
    def _precondition(obj: Object | None, query: dict[str, str], *, read: bool) -> int | None:
        """The error status the generation preconditions in ``query`` call for, if any."""
        generation = obj.generation if obj is not None else 0  # 0: "does not exist"
        try:
            match = query.get("ifGenerationMatch")
            not_match = query.get("ifGenerationNotMatch")
            if match is not None and int(match) != generation:
                return 412
            if not_match is not None and int(not_match) == generation:
                return 304 if read and obj is not None else 412
        except ValueError:
            return 400
        return None

    def _get(self, bucket: str, name: str, query: dict, range_header: str | None):
        with self._lock:
            obj = self._objects.get((bucket, name))
        if (status := self._precondition(obj, query, read=True)) is not None:
            return status, None if status == 304 else error_body(status)
        if obj is None:
            return 404, error_body(404, f"No such object: {bucket}/{name}")
        if query.get("alt") != "media":
            return 200, obj.metadata(bucket, name)
        headers = {
            "Content-Type": obj.content_type,
            "x-goog-generation": str(obj.generation),
            "x-goog-metageneration": "1",
            "x-goog-stored-content-length": str(len(obj.data)),
            "x-goog-stored-content-encoding": "identity",
        }
        m = _RANGE.fullmatch(range_header or "")
        if m is None or m[1] == m[2] == "":
            return 200, obj.data, headers
        size = len(obj.data)
        if m[1] == "":  # bytes=-N: the last N bytes
            start, end = max(size - int(m[2]), 0), size - 1
        else:
            start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
        if start >= size or start > end:
            return 416, error_body(416), {"Content-Range": f"bytes */{size}"}
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return 206, obj.data[start : end + 1], headers

    def _upload(self, bucket: str, query: dict, headers, body: bytes):
        content_type = headers.get("Content-Type") or "application/octet-stream"
        name = query.get("name")
        if query.get("uploadType") == "multipart":
            try:
                metadata, content_type, body = _split_multipart(content_type, body)
            except ValueError as e:
                return 400, error_body(400, f"Bad multipart upload: {e}")
            name = metadata.get("name", name)
        elif query.get("uploadType") != "media":
            return 400, error_body(400, f"uploadType {query.get('uploadType')!r} is not faked")
        if not name:
            return 400, error_body(400, "Required parameter: name")
        with self._lock:  # check and store together: the precondition is the whole point
            status = self._precondition(self._objects.get((bucket, name)), query, read=False)
            if status is not None:
                return status, error_body(status)
            now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            obj = Object(body, next(self._generations), now, content_type)
            self._objects[(bucket, name)] = obj
            return 200, obj.metadata(bucket, name)

    def _delete(self, bucket: str, name: str, query: dict):
        with self._lock:
            obj = self._objects.get((bucket, name))
            if (status := self._precondition(obj, query, read=False)) is not None:
                return status, error_body(status)
            if obj is None:
                return 404, error_body(404, f"No such object: {bucket}/{name}")
            del self._objects[(bucket, name)]
            return 204, None

    def _list(self, bucket: str, query: dict):
        prefix = query.get("prefix", "")
        start, end = query.get("startOffset", ""), query.get("endOffset") or None
        try:
            limit = min(int(query.get("maxResults") or PAGE_SIZE), PAGE_SIZE)
            # A page token here is the previous page's last name in hex (GCS's are opaque).
            after = bytes.fromhex(query.get("pageToken", "")).decode()
        except ValueError:
            return 400, error_body(400, "Invalid maxResults or pageToken")
        with self._lock:
            names = sorted(
                n
                for b, n in self._objects
                if b == bucket
                and n.startswith(prefix)
                and n >= start
                and (end is None or n < end)
                and n > after
            )
            items = [self._objects[(bucket, n)].metadata(bucket, n) for n in names[:limit]]
        result: dict = {"kind": "storage#objects"}
        if items:
            result["items"] = items
        if len(names) > limit:
            result["nextPageToken"] = names[limit - 1].encode().hex()
        return 200, result


@contextlib.contextmanager
def fake_gcs_server() -> Iterator[FakeGCS]:
    """A started ``FakeGCS``, stopped (its threads joined) on exit."""
    with FakeGCS() as server:
        yield server
