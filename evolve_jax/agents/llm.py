"""Gemini calls for the agents: credentials, retries, usage and price, and exact replay.

Every call goes through ``LLM.generate``. Its answer (or its final error) is written once to a
TensorStore record keyed by the model, the contents, the settings and the slot, so the same
call made again, by a resumed run or by the same command over a fresh history, is answered from
the record with no network call. Usage comes from the answer's ``usage_metadata`` and is priced
with the rates in ``prices.json``; replayed answers carry the usage they were first billed.
Every embedding call goes through ``RecordedEmbedder``, whose record holds each call's charge or
its failure in the same way. A transient error (408, 429, 5xx, a timeout, a dropped connection)
that outlasted the retries fails the call but is never recorded: the next run asks again.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import numpy as np
from absl import logging
from google import genai
from google.genai import errors, types

from evolve_jax import storage
from evolve_jax.config import LLMConfig
from evolve_jax.memory.embeddings import Embedder, EmbeddingStore, EmbeddingStoreError

_API_KEY_VARS = ("GOOGLE_API_KEY", "GEMINI_API_KEY")
_EMBED_CHARS = 8000  # about the embedding models' 2,048-token input limit


class CredentialsError(ValueError):
    """No usable credentials, or contradictory ones; the message says what to set."""


class PricesError(ValueError):
    """A prices file that is missing, malformed, or lacks a model in use."""


class LLMError(RuntimeError):
    """A call that failed after its retries; the message is the reason.

    ``transient``: the error may pass (408, 429, 5xx, a timeout, a dropped connection), so it is
    not recorded and a later run asks again; otherwise the failure is recorded and replayed.
    """

    def __init__(self, reason: str, code: int | None = None, transient: bool = False):
        super().__init__(reason)
        self.code = code
        self.transient = transient


class AnswerError(ValueError):
    """An answer that arrived but cannot be used (cut off, not JSON, not the schema)."""


# ---------------------------------------------------------------- credentials


@dataclasses.dataclass(frozen=True)
class Credentials:
    api_key: str | None = None
    project: str | None = None
    location: str | None = None

    @property
    def vertex(self) -> bool:
        return self.api_key is None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def resolve_credentials(config: LLMConfig, environ: Mapping[str, str] = os.environ) -> Credentials:
    """The credentials the flags and environment name; raises CredentialsError otherwise."""
    keys = {name: environ[name] for name in _API_KEY_VARS if environ.get(name)}
    vertex = config.vertex or _truthy(environ.get("GOOGLE_GENAI_USE_VERTEXAI"))
    if vertex:
        project = config.project or environ.get("GOOGLE_CLOUD_PROJECT")
        location = config.location or environ.get("GOOGLE_CLOUD_LOCATION")
        if keys:
            raise CredentialsError(
                f"Vertex AI was asked for but {' and '.join(keys)} is also set: unset it, or drop "
                "--vertex and GOOGLE_GENAI_USE_VERTEXAI to use the Gemini API key"
            )
        if not project or not location:
            raise CredentialsError(
                "Vertex AI needs a project and a location: set --vertex_project and "
                "--vertex_location (or GOOGLE_CLOUD_PROJECT and GOOGLE_CLOUD_LOCATION)"
            )
        return Credentials(project=project, location=location)
    if not keys:
        raise CredentialsError(
            "--agents=gemini needs credentials: set GEMINI_API_KEY (or GOOGLE_API_KEY), or use "
            "Vertex AI with --vertex --vertex_project=P --vertex_location=L"
        )
    if len(set(keys.values())) > 1:
        raise CredentialsError(
            "GOOGLE_API_KEY and GEMINI_API_KEY are both set, to different keys: unset one"
        )
    return Credentials(api_key=next(iter(keys.values())))


# ---------------------------------------------------------------- usage and prices


@dataclasses.dataclass
class Usage:
    """Token counts and estimated price of one or more calls."""

    calls: int = 0
    prompt_tokens: int = 0  # includes cached_tokens, as Gemini reports it
    output_tokens: int = 0
    thinking_tokens: int = 0
    cached_tokens: int = 0
    usd: float = 0.0

    def add(self, other: Usage) -> Usage:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
        return self

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["usd"] = round(self.usd, 8)
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any] | None) -> Usage:
        record = record or {}
        return cls(**{f.name: record.get(f.name, 0) or 0 for f in dataclasses.fields(cls)})


class Prices:
    """USD per million tokens, per model, read from a JSON file."""

    def __init__(self, path: str | None = None):
        self.path = path or str(resources.files("evolve_jax.agents") / "prices.json")
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PricesError(f"prices file {self.path!r} cannot be read: {e}") from e
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, dict) or not models:
            raise PricesError(f"prices file {self.path!r} has no 'models' object")
        self.rates: dict[str, dict[str, float]] = {}
        for model, rates in models.items():
            if not isinstance(rates, dict):
                raise PricesError(f"prices file {self.path!r}: {model!r} is not an object")
            for field in ("input", "output"):
                value = rates.get(field)
                if not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                    raise PricesError(
                        f"prices file {self.path!r}: {model!r} needs a non-negative number "
                        f"{field!r} (USD per 1M tokens), got {value!r}"
                    )
            self.rates[model] = {
                "input": float(rates["input"]),
                "output": float(rates["output"]),
                "cached_input": float(rates.get("cached_input", rates["input"])),
            }

    def require(self, models: Sequence[str]) -> None:
        missing = sorted({m for m in models if m not in self.rates})
        if missing:
            raise PricesError(
                f"no price for {', '.join(missing)} in {self.path!r}: add it there "
                "(or pass --prices_file)"
            )

    def cost(self, model: str, usage: Usage) -> float:
        rate = self.rates[model]
        fresh = max(usage.prompt_tokens - usage.cached_tokens, 0)
        billed_output = usage.output_tokens + usage.thinking_tokens  # thinking bills as output
        return (
            fresh * rate["input"]
            + usage.cached_tokens * rate["cached_input"]
            + billed_output * rate["output"]
        ) / 1e6


class Ledger:
    """Usage charged to labels (a slot "step/slot", or "step/<role>"), thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_label: dict[str, Usage] = collections.defaultdict(Usage)

    def charge(self, label: str, usage: Usage) -> None:
        with self._lock:
            self._by_label[label].add(usage)

    def take(self, label: str) -> Usage:
        """The usage charged to ``label`` so far, removed from the ledger."""
        with self._lock:
            return self._by_label.pop(label, Usage())

    def take_prefix(self, prefix: str) -> Usage:
        with self._lock:
            total = Usage()
            for label in [k for k in self._by_label if k.startswith(prefix)]:
                total.add(self._by_label.pop(label))
            return total


# ---------------------------------------------------------------- the record


class CallRecord:
    """Write-once answers keyed by call digest, in a TensorStore OCDBT store."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") + "/"
        self._kv = storage.open_kvstore(self.url, "LLM call record")

    def get(self, key: str) -> dict[str, Any] | None:
        result = self._kv.read(key.encode()).result()
        if result.state != "value":
            return None
        try:
            return json.loads(result.value)
        except (UnicodeDecodeError, json.JSONDecodeError):
            logging.warning("LLM call record %s is corrupt; calling again", key)
            return None

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        data = json.dumps(value, sort_keys=True).encode()
        self._kv.write(key.encode(), data, if_equal=storage.ABSENT).result()


def call_key(request: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- the client


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str
    usage: Usage

    def json(self) -> Any:
        """The answer parsed as JSON; AnswerError names why it cannot be."""
        if self.finish_reason == "MAX_TOKENS":
            raise AnswerError(
                "the answer was cut off at the output-token limit (finish reason MAX_TOKENS)"
            )
        if self.finish_reason not in ("STOP", ""):
            raise AnswerError(f"the answer ended with finish reason {self.finish_reason}")
        try:
            parsed = json.loads(self.text)
        except json.JSONDecodeError as e:
            raise AnswerError(f"the answer is not valid JSON: {e}") from e
        bad = _not_unicode(parsed, "the answer")
        if bad is not None:
            where, char = bad
            raise AnswerError(
                f"{where} holds {char!r}, a lone surrogate, which is not a Unicode character "
                "(a JSON escape such as \\ud800 without its pair): write the characters "
                "themselves"
            )
        return parsed


def _not_unicode(value: Any, where: str) -> tuple[str, str] | None:
    """(where, character) of the first lone surrogate in a parsed JSON value's strings, or None.

    Such a string cannot be encoded as UTF-8: written into a program it stops ``compile``, and
    into a prompt, a file or a hash it raises UnicodeEncodeError.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return where, value[e.start]
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str):
            bad = _not_unicode(key, f"{where}'s key {key!r}")
            if bad is not None:
                return bad
        bad = _not_unicode(item, f"{where}[{key!r}]")
        if bad is not None:
            return bad
    return None


_TRANSIENT_NAMES = frozenset({"TimeoutException", "NetworkError", "RemoteProtocolError"})


def is_transient(error: Exception) -> bool:
    """Whether a call's error may pass if the call is made again later: HTTP 408, 429 and 5xx,
    and httpx's (or httpx2's) timeouts, network errors and connections dropped mid-answer."""
    if isinstance(error, errors.APIError):
        return error.code in (408, 429) or error.code >= 500
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    return not _TRANSIENT_NAMES.isdisjoint(c.__name__ for c in type(error).__mro__)


def _reason(error: Exception, model: str, attempts: int) -> tuple[str, int | None]:
    if isinstance(error, errors.APIError):
        if error.code == 404:
            return f"model {model!r} not found (404 {error.status}): {error.message}", 404
        tries = (
            f" after {attempts} attempt(s)" if error.code in (408, 429) or error.code >= 500 else ""
        )
        return f"Gemini API error {error.code} {error.status}{tries}: {error.message}", error.code
    name = type(error).__name__
    if "timeout" in name.lower():
        return f"Gemini API call timed out ({name}) after {attempts} attempt(s)", None
    return f"Gemini API call failed ({name}: {error})", None


class LLM:
    """One google-genai client shared by the roles, with the record, the ledger and prices."""

    def __init__(
        self,
        config: LLMConfig,
        credentials: Credentials,
        record: CallRecord,
        prices: Prices,
        ledger: Ledger | None = None,
    ):
        self.config = config
        self.record = record
        self.prices = prices
        self.ledger = ledger or Ledger()
        http = types.HttpOptions(
            base_url=config.base_url,
            timeout=int(config.timeout_s * 1000) if config.timeout_s else None,
            retry_options=types.HttpRetryOptions(
                attempts=config.attempts,
                initial_delay=config.initial_delay_s,
                max_delay=config.max_delay_s,
            ),
        )
        if credentials.vertex:
            self.client = genai.Client(
                vertexai=True,
                project=credentials.project,
                location=credentials.location,
                http_options=http,
            )
        else:
            self.client = genai.Client(api_key=credentials.api_key, http_options=http)
        self._missing_models: dict[str, str] = {}  # model -> its 404 reason: not asked again

    def _settings(self, schema: Mapping[str, Any] | None) -> dict[str, Any]:
        return {
            "max_output_tokens": self.config.max_output_tokens,
            "temperature": self.config.temperature,
            "thinking_budget": self.config.thinking_budget,
            "schema": schema,
        }

    def generate(
        self,
        *,
        model: str,
        system: str,
        turns: Sequence[tuple[str, str]],
        schema: Mapping[str, Any] | None,
        label: str,
    ) -> Answer:
        """Asks ``model`` (or the record); raises LLMError with the reason when it fails."""
        request = {
            # The label (slot) is part of the key: two slots that send the same prompt at once
            # get an answer each, whichever finishes first, so replay stays exact.
            "label": label,
            "model": model,
            "system": system,
            "turns": [list(t) for t in turns],
            **self._settings(schema),
        }
        key = call_key(request)
        stored = self.record.get(key)
        if stored is None:
            stored = self._call(model, system, turns, schema)
            if not stored.get("transient"):  # a transient error is asked again next run
                self.record.put(key, stored)
        usage = Usage.from_json(stored.get("usage"))
        self.ledger.charge(label, usage)
        if "error" in stored:
            if stored.get("code") == 404:
                self._missing_models.setdefault(model, stored["error"])
            raise LLMError(stored["error"], stored.get("code"), bool(stored.get("transient")))
        return Answer(stored["text"], stored["finish_reason"], usage)

    def _call(self, model, system, turns, schema) -> dict[str, Any]:
        if model in self._missing_models:
            return {"error": self._missing_models[model], "code": 404, "usage": {}}
        thinking = None
        if self.config.thinking_budget is not None:
            thinking = types.ThinkingConfig(thinking_budget=self.config.thinking_budget)
        config = types.GenerateContentConfig(
            system_instruction=system,
            max_output_tokens=self.config.max_output_tokens,
            temperature=self.config.temperature,
            thinking_config=thinking,
            response_mime_type="application/json" if schema is not None else None,
            response_json_schema=dict(schema) if schema is not None else None,
        )
        contents = [types.Content(role=role, parts=[types.Part(text=text)]) for role, text in turns]
        start = time.perf_counter()
        try:
            response = self.client.models.generate_content(
                model=model, contents=contents, config=config
            )
        except Exception as e:  # the run never crashes on the API: the reason is the slot's
            reason, code = _reason(e, model, self.config.attempts)
            logging.warning("LLM call to %s failed: %s", model, reason)
            if code == 404:
                self._missing_models.setdefault(model, reason)
            failure = {"error": reason, "code": code, "usage": {}, "seconds": 0.0}
            return {**failure, "transient": True} if is_transient(e) else failure
        meta = response.usage_metadata
        usage = Usage(
            calls=1,
            prompt_tokens=(meta.prompt_token_count or 0) if meta else 0,
            output_tokens=(meta.candidates_token_count or 0) if meta else 0,
            thinking_tokens=(meta.thoughts_token_count or 0) if meta else 0,
            cached_tokens=(meta.cached_content_token_count or 0) if meta else 0,
        )
        usage.usd = self.prices.cost(model, usage)
        candidate = response.candidates[0] if response.candidates else None
        finish = candidate.finish_reason if candidate and candidate.finish_reason else None
        finish_reason = getattr(finish, "value", str(finish)) if finish else ""
        if candidate is None:
            block = response.prompt_feedback.block_reason if response.prompt_feedback else None
            return {
                "error": f"no answer from {model} (prompt blocked: {block})",
                "usage": usage.to_json(),
            }
        text = "".join(
            p.text for p in (candidate.content.parts if candidate.content else None) or []
            if p.text and not p.thought
        )  # fmt: skip
        return {
            "text": text,
            "finish_reason": finish_reason,
            "usage": usage.to_json(),
            "seconds": round(time.perf_counter() - start, 3),
        }

    def embed_texts(self, texts: list[str]) -> tuple[np.ndarray, Usage]:
        """Vectors of ``texts`` through ``embed_content``, and the usage to charge (chars/4
        tokens: the embedding endpoint reports no usage); raises LLMError."""
        model, dims = self.config.embedding_model, self.config.embedding_dims
        try:
            response = self.client.models.embed_content(
                model=model,
                contents=[t[:_EMBED_CHARS] for t in texts],
                config=types.EmbedContentConfig(
                    task_type="SEMANTIC_SIMILARITY", output_dimensionality=dims
                ),
            )
        except Exception as e:
            reason, code = _reason(e, model, self.config.attempts)
            raise LLMError(reason, code, is_transient(e)) from e
        tokens = sum(math.ceil(min(len(t), _EMBED_CHARS) / 4) for t in texts)
        usage = Usage(calls=1, prompt_tokens=tokens)
        usage.usd = self.prices.cost(model, usage)
        return np.asarray([e.values for e in response.embeddings or []], np.float32), usage


class RecordedEmbedder(Embedder):
    """An Embedder whose every call's outcome is in the call record, so a replay is exact.

    A call is named by its label (the slot or step it serves; a call without one, such as the
    cognition base's, by the step under way, ``step``), its texts, and how many times this
    process made the same call before. Its record holds what it was charged (the texts the
    embedding store did not hold yet, priced) or its failure. A recorded call is answered from
    the record: the same charge to the ledger (under ``charge_label``), the same failure, and the
    vectors from the store, with no network call. A call that fails transiently (408, 429,
    5xx, a timeout, a dropped connection) is not recorded, so a later run makes it again.
    """

    def __init__(self, llm: LLM, store: EmbeddingStore, record: CallRecord, charge_label: str):
        super().__init__(
            self._fetch, store, model=llm.config.embedding_model, dims=llm.config.embedding_dims
        )
        self.llm, self.record, self.charge_label = llm, record, charge_label
        self._made: collections.Counter[str] = collections.Counter()
        self._lock = threading.RLock()
        self._usage: Usage | None = None  # what the call in progress has cost; None: replayed
        self.step = 0  # the step under way (the gemini backend's Meter moves it on)

    def _fetch(self, texts: list[str]) -> np.ndarray:
        vectors, usage = self.llm.embed_texts(texts)
        if self._usage is not None:
            self._usage.add(usage)
        return vectors

    def embed(self, texts: Sequence[str], label: str = "") -> np.ndarray:
        texts = list(texts)
        request = {
            "embed": self.model, "dims": self.dims, "task": self.task,
            "label": label or f"{self.step}/step", "texts": texts,
        }  # fmt: skip
        with self._lock:  # calls are counted, and their usage kept apart, one at a time
            name = call_key(request)
            key = call_key({"call": name, "occurrence": self._made[name]})
            self._made[name] += 1
            stored = self.record.get(key)
            if stored is not None:
                self.llm.ledger.charge(self.charge_label, Usage.from_json(stored.get("usage")))
                if "error" in stored:
                    raise LLMError(stored["error"], stored.get("code"))
                self._usage = None
                return super().embed(texts)
            usage = self._usage = Usage()
            try:
                vectors = super().embed(texts)
            except EmbeddingStoreError:
                self.llm.ledger.charge(self.charge_label, usage)
                raise  # the store failed, not the call: nothing to record
            except Exception as e:
                self.llm.ledger.charge(self.charge_label, usage)
                transient = isinstance(e, LLMError) and e.transient
                reason = str(e) if isinstance(e, LLMError) else f"{type(e).__name__}: {e}"
                code = e.code if isinstance(e, LLMError) else None
                if not transient:
                    self.record.put(key, {"error": reason, "code": code, "usage": usage.to_json()})
                raise LLMError(reason, code, transient) from e
            finally:
                self._usage = None
            self.llm.ledger.charge(self.charge_label, usage)
            self.record.put(key, {"usage": usage.to_json()})
            return vectors


def record_url(config: LLMConfig, workdir: str) -> str:
    """Where calls (``calls/``) and embeddings (``embeddings/``) are recorded."""
    if config.record_dir:
        return storage.to_url(config.record_dir)
    return storage.join(workdir, "llm_record")
