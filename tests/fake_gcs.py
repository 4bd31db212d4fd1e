"""A fake Google Cloud Storage server on 127.0.0.1 for TensorStore's real ``gcs`` driver and gcsfs.

Both clients read their settings from the environment (TensorStore once per process), so a
``gs://`` client must be a subprocess started with them (``gcs_env`` builds that environment)::

    with fake_gcs_server() as server:
        subprocess.run([sys.executable, "-c", code], env=gcs_env(server.url), check=True)
        server.read("test-bucket", "run/report.txt")

* ``TENSORSTORE_GCS_HTTP_URL``: the base URL the driver sends its JSON-API requests to.
* ``GOOGLE_AUTH_TOKEN_FOR_TESTING``: a bearer token used as is, so no credentials are looked
  up (no application-default file, no metadata server) and nothing reaches Google.

Orbax reaches ``gs://`` two ways: array data through TensorStore's ``gcs`` driver, everything
else (directories, JSON metadata, the commit marker) through ``etils.epath``, whose GCS backend
without TensorFlow is gcsfs (fsspec). gcsfs is pointed here by:

* ``STORAGE_EMULATOR_HOST``: the base URL of its JSON-API requests (google-cloud-storage's too).
* ``FSSPEC_GCS_TOKEN`` with ``FETCH_RAW_TOKEN_EXPIRY=false``: the same test token, sent as a
  bearer token as is (without the second, gcsfs would ask Google's tokeninfo for its expiry).
* ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: the plain GCSFileSystem; the default one first asks
  the Storage Control gRPC API for the bucket's type, which is not faked (it retries for 60 s).

It keeps objects in memory and speaks the part of the GCS JSON API that these clients use:

* ``GET /storage/v1/b/<bucket>/o/<object>?alt=media`` (or ``/download/storage/...``, gcsfs's
  path): the object's bytes, with its generation in ``x-goog-generation``; a
  ``Range: bytes=...`` header gets a 206 with that slice. Without ``alt=media`` the answer is
  the object's JSON metadata.
* ``POST /upload/storage/v1/b/<bucket>/o?uploadType=media&name=<object>`` (and
  ``uploadType=multipart``): stores the body under a new generation and answers its metadata.
* ``POST /upload/storage/v1/b/<bucket>/o?uploadType=resumable&name=<object>``: starts a
  resumable upload and answers its session URL in ``Location``; ``PUT`` (or ``POST``, as gcsfs
  sends) to that URL with ``Content-Range: bytes a-b/*`` adds a chunk (308, with ``Range``),
  ``bytes a-b/N`` or ``bytes */N`` ends it (the object is stored then, and its preconditions,
  given when the upload started, are checked then); ``DELETE`` cancels it (499).
* ``GET /storage/v1/b/<bucket>/o?prefix=&startOffset=&endOffset=&maxResults=&pageToken=``:
  object metadata in name order, paged with ``nextPageToken``; with a ``delimiter=``, names
  that have it after the prefix are rolled up into ``prefixes`` (each counts as one entry).
* ``DELETE /storage/v1/b/<bucket>/o/<object>``: 204.

Every object request honours ``ifGenerationMatch`` (0 means "must not exist") with a 412, and
``ifGenerationNotMatch`` with a 304 on reads and a 412 on writes. A missing object is a 404.
Errors use GCS's body ``{"error": {"code", "message", "errors": [...]}}``.

Not faked: authentication (any token is accepted; ``tokens`` records those sent), bucket
resources (every bucket exists and starts empty), metagenerations (always 1), checksums (no
``x-goog-hash``, so the client checks none), ``fields`` projections, compose/copy/rewrite, and
the gRPC APIs.
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
_CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)")

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
    # gcsfs, for Orbax's etils.epath paths (see the module docstring).
    env["STORAGE_EMULATOR_HOST"] = url
    env["FSSPEC_GCS_TOKEN"] = TOKEN
    env["FETCH_RAW_TOKEN_EXPIRY"] = "false"
    env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
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
class _Upload:
    """A resumable upload in progress: where it goes, its preconditions, the bytes so far."""

    bucket: str
    name: str
    preconditions: dict[str, str]
    content_type: str
    data: bytearray


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

    def do_PUT(self):
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
        self._uploads: dict[str, _Upload] = {}  # resumable uploads by upload_id
        self._upload_ids = itertools.count(1)
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
        if method in ("PUT", "POST", "DELETE") and "upload_id" in query and _UPLOAD.fullmatch(path):
            answer = self._resume(method, query["upload_id"], headers, body)
        elif method == "POST" and (m := _UPLOAD.fullmatch(path)):
            self._wait_for_racers(query.get("name"))
            answer = self._upload(unquote(m[1]), query, headers, body)
        elif method == "GET" and (m := _LIST.fullmatch(path)):
            answer = self._list(unquote(m[1]), query)
        elif method == "GET" and (m := _OBJECT.fullmatch(path.removeprefix("/download"))):
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
        elif query.get("uploadType") == "resumable":
            return self._start_upload(bucket, query, headers, body)
        elif query.get("uploadType") != "media":
            return 400, error_body(400, f"uploadType {query.get('uploadType')!r} is not faked")
        if not name:
            return 400, error_body(400, "Required parameter: name")
        return self._store(bucket, name, query, content_type, body)

    def _store(self, bucket: str, name: str, preconditions: dict, content_type: str, data: bytes):
        with self._lock:  # check and store together: the precondition is the whole point
            status = self._precondition(
                self._objects.get((bucket, name)), preconditions, read=False
            )
            if status is not None:
                return status, error_body(status)
            now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            obj = Object(data, next(self._generations), now, content_type)
            self._objects[(bucket, name)] = obj
            return 200, obj.metadata(bucket, name)

    def _start_upload(self, bucket: str, query: dict, headers, body: bytes):
        try:
            metadata = json.loads(body) if body else {}
        except ValueError:
            return 400, error_body(400, "Bad resumable upload metadata")
        name = metadata.get("name") or query.get("name")
        if not name:
            return 400, error_body(400, "Required parameter: name")
        content_type = headers.get("X-Upload-Content-Type") or "application/octet-stream"
        preconditions = {k: v for k, v in query.items() if k.startswith("ifGeneration")}
        with self._lock:
            upload_id = str(next(self._upload_ids))
            self._uploads[upload_id] = _Upload(
                bucket, name, preconditions, content_type, bytearray()
            )
        location = (
            f"{self.url}/upload/storage/v1/b/{bucket}/o?uploadType=resumable&upload_id={upload_id}"
        )
        return 200, b"", {"Location": location}

    def _resume(self, method: str, upload_id: str, headers, body: bytes):
        """A chunk, the end, a status query or the cancelling of a resumable upload."""
        with self._lock:
            upload = self._uploads.get(upload_id)
            if upload is None:
                return 404, error_body(404, f"No such upload: {upload_id}")
            if method == "DELETE":
                del self._uploads[upload_id]
                return 499, b""
            m = _CONTENT_RANGE.fullmatch(headers.get("Content-Range") or "bytes */*")
            if m is None:
                return 400, error_body(400, "Bad Content-Range")
            first, last, total = m[1], m[2], m[3]
            if first is not None:
                if int(first) != len(upload.data) or int(last) - int(first) + 1 != len(body):
                    return 400, error_body(400, "Chunk does not continue the upload")
                upload.data += body
            if total == "*":  # more to come: say how much has arrived
                received = {"Range": f"bytes=0-{len(upload.data) - 1}"} if upload.data else {}
                return 308, b"", received
            if int(total) != len(upload.data):
                return 400, error_body(400, f"Upload of {total} bytes has {len(upload.data)}")
            del self._uploads[upload_id]
        data = bytes(upload.data)
        return self._store(
            upload.bucket, upload.name, upload.preconditions, upload.content_type, data
        )

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
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        start, end = query.get("startOffset", ""), query.get("endOffset") or None
        try:
            limit = min(int(query.get("maxResults") or PAGE_SIZE), PAGE_SIZE)
            # A page token here is the previous page's last entry in hex (GCS's are opaque).
            after = bytes.fromhex(query.get("pageToken", "")).decode()
        except ValueError:
            return 400, error_body(400, "Invalid maxResults or pageToken")

        def entry(name: str) -> tuple[str, bool]:  # (name, False) or (its rolled-up prefix, True)
            cut = name.find(delimiter, len(prefix)) if delimiter else -1
            return (name, False) if cut < 0 else (name[: cut + len(delimiter)], True)

        with self._lock:
            entries = sorted(
                {
                    entry(n)
                    for b, n in self._objects
                    if b == bucket
                    and n.startswith(prefix)
                    and n >= start
                    and (end is None or n < end)
                }
            )
            entries = [(e, rolled) for e, rolled in entries if e > after]
            page = entries[:limit]
            items = [self._objects[(bucket, e)].metadata(bucket, e) for e, r in page if not r]
            prefixes = [e for e, rolled in page if rolled]
        result: dict = {"kind": "storage#objects"}
        if items:
            result["items"] = items
        if prefixes:
            result["prefixes"] = prefixes
        if len(entries) > limit:
            result["nextPageToken"] = page[-1][0].encode().hex()
        return 200, result


@contextlib.contextmanager
def fake_gcs_server() -> Iterator[FakeGCS]:
    """A started ``FakeGCS``, stopped (its threads joined) on exit."""
    with FakeGCS() as server:
        yield server
