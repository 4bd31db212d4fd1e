"""A fake Gemini API server on 127.0.0.1 that the real ``google.genai.Client`` can talk to.

Point the SDK at it with::

    with FakeGemini(lambda req: '{"ok": true}') as server:
        client = genai.Client(
            api_key="test-key",
            http_options=types.HttpOptions(base_url=server.url, api_version="v1beta"),
        )

It speaks the Gemini Developer API's REST protocol for two methods:

* ``POST /{version}/models/{model}:generateContent`` answers with one candidate whose text comes
  from a scripted response (``enqueue``) or else from the ``responder``.
* ``POST /{version}/models/{model}:batchEmbedContents`` (what ``models.embed_content`` sends)
  answers with deterministic hashed bag-of-words vectors, L2-normalised, so identical texts have
  cosine 1 and texts sharing most words have a high cosine. An empty text gets the zero vector.

Errors use Gemini's body ``{"error": {"code", "message", "status"}}``, which the SDK turns into
``errors.ClientError`` (4xx) or ``errors.ServerError`` (5xx). Any other path gets a 404.

Token counts in ``usageMetadata`` are ceil(characters / 4): a stand-in for tests, not Gemini's
tokenizer. The prompt count covers the text parts of ``systemInstruction`` and ``contents``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

GENERATE = "generateContent"
EMBED = "batchEmbedContents"


def answer_for_analyzer_or_judge(system: str, digest: bytes) -> str | None:
    """A fixed-shape answer for the Analyzer (an analysis, or lessons) and the judge, chosen by
    the role's system instruction, varied by ``digest``; None for any other role."""
    if system.startswith("You are the Analyzer of an automated research loop. Given"):
        return json.dumps({"analysis": f"analysis {digest[0]}"})
    if system.startswith("You are the Analyzer"):
        return json.dumps(
            {"lessons": [{"title": "Bowls near the target win", "content": "Scores rise.",
                          "tags": ["bowl"], "nodes": [3]}]}
        )  # fmt: skip
    if system.startswith("You are a reviewer"):
        return json.dumps({"score": 7, "reason": "sound"})
    return None


_ROUTE = re.compile(rf"/(v1\w*)/models/([^/:]+):({GENERATE}|{EMBED})")
_WORD = re.compile(r"\w+")

# Canonical google.rpc status names and messages, as the real API sends them.
_STATUS = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    404: ("NOT_FOUND", "Requested entity was not found."),
    408: ("DEADLINE_EXCEEDED", "Deadline exceeded."),
    429: ("RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    500: ("INTERNAL", "An internal error has occurred."),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
}


def error_body(code: int, message: str | None = None, status: str | None = None) -> dict:
    """Gemini's JSON error body for HTTP status ``code``."""
    name, default = _STATUS.get(code, ("UNKNOWN", "Unknown error."))
    return {"error": {"code": code, "message": message or default, "status": status or name}}


def tokens(text: str) -> int:
    """The fake's token count: ceil(len / 4)."""
    return math.ceil(len(text) / 4)


def embed_text(text: str, dims: int) -> list[float]:
    """Hashed bag of lowercase words: each word adds ±1 at a stable index, then L2-normalise."""
    vec = [0.0] * dims
    for word in _WORD.findall(text.lower()):
        # hashlib, not hash(): Python's str hash is salted per process.
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        vec[int.from_bytes(digest[:4], "little") % dims] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vec))
    return [v / norm for v in vec] if norm else vec


def _texts(content: dict | None) -> list[str]:
    return [p["text"] for p in (content or {}).get("parts", []) if "text" in p]


@dataclass
class _Script:
    method: str
    model: str | None = None
    text: str | None = None
    status: int = 200
    error_status: str | None = None
    message: str | None = None
    finish_reason: str = "STOP"
    delay: float = 0.0
    thoughts_tokens: int = 0

    def fits(self, method: str, model: str) -> bool:
        return self.method == method and self.model in (None, model)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0 (the default) closes each connection after its answer, so once the server stops
    # no pooled client connection can still reach a handler thread.
    server: _Server

    def do_POST(self):
        path, _, query = self.path.partition("?")
        route = _ROUTE.fullmatch(path)
        if route is None:
            return self._send(404, error_body(404, f"Unknown path: POST {path}"))
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or "{}")
        except ValueError as e:
            return self._send(400, error_body(400, f"Invalid JSON payload: {e}"))
        version, model, method = route.groups()
        api_key = self.headers.get("x-goog-api-key") or parse_qs(query).get("key", [None])[0]
        self._send(*self.server.fake._handle(version, model, method, body, api_key))

    def do_GET(self):
        self._send(404, error_body(404, f"Unknown path: GET {self.path}"))

    def _send(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except ConnectionError:
            pass  # The client gave up (e.g. its timeout fired during a delay); nothing to tell.

    def log_message(self, format, *args):
        pass  # Keep test output clean.


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeGemini


class FakeGemini:
    """Fake Gemini REST server; see the module docstring. Thread-safe."""

    def __init__(
        self,
        responder: Callable[[dict], str] | None = None,
        *,
        known_models: set[str] | None = None,
        embedding_dims: int = 64,
    ):
        self.responder = responder or (lambda request: "{}")
        self.known_models = None if known_models is None else set(known_models)
        self.embedding_dims = embedding_dims
        self.requests: list[dict] = []
        self.url = ""
        self._queue: list[_Script] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._server: _Server | None = None

    def start(self) -> FakeGemini:
        self._stopped.clear()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        # A short poll interval keeps stop() (which waits for the serving loop to notice) fast.
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self):
        self._stopped.set()  # Cuts short any delayed answer still sleeping.
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeGemini:
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def count(self, method: str | None = None) -> int:
        with self._lock:
            return sum(method in (None, r["method"]) for r in self.requests)

    def enqueue(
        self,
        *,
        text: str | None = None,
        status: int = 200,
        error_status: str | None = None,
        message: str | None = None,
        finish_reason: str = "STOP",
        delay: float = 0.0,
        model: str | None = None,
        thoughts_tokens: int = 0,
        times: int = 1,
    ):
        """Scripts the next ``times`` generateContent answers (for ``model`` only, if given)."""
        script = _Script(
            GENERATE, model, text, status, error_status, message, finish_reason, delay,
            thoughts_tokens,
        )  # fmt: skip
        with self._lock:
            self._queue.extend([script] * times)

    def enqueue_embed(
        self,
        *,
        status: int = 200,
        error_status: str | None = None,
        message: str | None = None,
        delay: float = 0.0,
        model: str | None = None,
        times: int = 1,
    ):
        """Scripts the next ``times`` batchEmbedContents answers; a 200 means the usual vectors."""
        script = _Script(
            EMBED, model, status=status, error_status=error_status, message=message, delay=delay
        )
        with self._lock:
            self._queue.extend([script] * times)

    def _handle(
        self, version: str, model: str, method: str, body: dict, api_key: str | None
    ) -> tuple[int, dict]:
        with self._lock:
            record = {"method": method, "model": model, "body": body, "api_key": api_key}
            self.requests.append(record)
            if self.known_models is not None and model not in self.known_models:
                return 404, error_body(
                    404,
                    f"models/{model} is not found for API version {version}, or is not supported"
                    f" for {method}. Call ListModels to see the list of available models and"
                    " their supported methods.",
                )
            i = next((i for i, s in enumerate(self._queue) if s.fits(method, model)), None)
            script = _Script(method) if i is None else self._queue.pop(i)
        if script.delay:
            self._stopped.wait(script.delay)
        if script.status != 200:
            return script.status, error_body(script.status, script.message, script.error_status)
        if method == EMBED:
            return 200, self._embeddings(body)
        text = script.text
        if text is None:
            try:
                text = self.responder({**body, "model": model})
            except Exception as e:
                # Surfaces a broken responder in the test as a ServerError carrying its message.
                return 500, error_body(500, f"responder raised {e!r}")
        return 200, self._generation(model, body, text, script)

    def _embeddings(self, body: dict) -> dict:
        embeddings = []
        for request in body.get("requests", []):
            dims = request.get("outputDimensionality") or self.embedding_dims
            text = " ".join(_texts(request.get("content")))
            embeddings.append({"values": embed_text(text, dims)})
        return {"embeddings": embeddings}

    @staticmethod
    def _generation(model: str, body: dict, text: str, script: _Script) -> dict:
        prompt = _texts(body.get("systemInstruction"))
        for content in body.get("contents", []):
            prompt += _texts(content)
        p, c, t = tokens("".join(prompt)), tokens(text), script.thoughts_tokens
        return {
            "candidates": [
                {
                    "content": {"role": "model", "parts": [{"text": text}]},
                    "finishReason": script.finish_reason,
                    "index": 0,
                }
            ],
            "usageMetadata": {
                "promptTokenCount": p,
                "candidatesTokenCount": c,
                "thoughtsTokenCount": t,
                "cachedContentTokenCount": 0,
                "totalTokenCount": p + c + t,
            },
            "modelVersion": model,
        }
