"""The real google-genai SDK against the fake Gemini server (evolve_jax/testing/fake_gemini.py):
wire format, errors, retries."""

import json
import math
import threading
import urllib.error
import urllib.request

import httpx2
import pytest
from google import genai
from google.genai import errors, types

from evolve_jax.testing.fake_gemini import FakeGemini

MODEL = "gemini-test"


def _echo(request: dict) -> str:
    return f"{request['model']} heard {request['contents'][-1]['parts'][0]['text']}"


@pytest.fixture
def fake():
    with FakeGemini(_echo) as server:
        yield server


def make_client(server: FakeGemini, **http_options) -> genai.Client:
    # Keep the returned client referenced while using it: a garbage-collected genai.Client closes
    # its HTTP client, and a request in flight then fails with RuntimeError.
    return genai.Client(
        api_key="test-key",
        http_options=types.HttpOptions(base_url=server.url, api_version="v1beta", **http_options),
    )


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.hypot(*a) / math.hypot(*b)


def test_generate_content_returns_responder_text_and_usage(fake):
    client = make_client(fake)
    response = client.models.generate_content(model=MODEL, contents="abcdefgh")
    text = f"{MODEL} heard abcdefgh"
    assert response.text == text
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    assert response.model_version == MODEL
    usage = response.usage_metadata
    assert usage.prompt_token_count == 2  # ceil(8 / 4)
    assert usage.candidates_token_count == math.ceil(len(text) / 4)
    assert usage.thoughts_token_count == 0
    assert usage.cached_content_token_count == 0
    assert usage.total_token_count == 2 + math.ceil(len(text) / 4)
    assert fake.requests == [
        {
            "method": "generateContent",
            "model": MODEL,
            "body": {"contents": [{"parts": [{"text": "abcdefgh"}], "role": "user"}]},
            "api_key": "test-key",
        }
    ]
    assert fake.count() == fake.count("generateContent") == 1
    assert fake.count("batchEmbedContents") == 0


def test_json_mode_and_system_instruction_on_the_wire(fake):
    client = make_client(fake)
    schema = {"type": "object", "properties": {"score": {"type": "number"}}}
    fake.enqueue(text='{"score": 0.5}')
    response = client.models.generate_content(
        model=MODEL,
        contents="rate it",
        config=types.GenerateContentConfig(
            system_instruction="You are a judge.",
            response_mime_type="application/json",
            response_json_schema=schema,
        ),
    )
    assert json.loads(response.text) == {"score": 0.5}
    body = fake.requests[0]["body"]
    assert body["generationConfig"]["responseJsonSchema"] == schema
    assert body["generationConfig"]["responseMimeType"] == "application/json"
    assert body["systemInstruction"]["parts"] == [{"text": "You are a judge."}]
    # The system instruction counts towards the prompt: ceil((16 + 7) / 4).
    assert response.usage_metadata.prompt_token_count == 6


def test_429_raises_client_error_without_retries(fake):
    client = make_client(fake)
    fake.enqueue(status=429)
    with pytest.raises(errors.ClientError) as info:
        client.models.generate_content(model=MODEL, contents="hi")
    assert (info.value.code, info.value.status) == (429, "RESOURCE_EXHAUSTED")
    assert info.value.message
    assert fake.count() == 1


def test_429_then_success_is_retried(fake):
    retry = types.HttpRetryOptions(attempts=3, initial_delay=0.01, max_delay=0.05)
    client = make_client(fake, retry_options=retry)
    fake.enqueue(status=429, message="slow down")
    response = client.models.generate_content(model=MODEL, contents="hi")
    assert response.text == f"{MODEL} heard hi"
    assert fake.count() == 2


def test_500_on_every_attempt_raises_server_error_after_all_attempts(fake):
    retry = types.HttpRetryOptions(attempts=3, initial_delay=0.01, max_delay=0.05)
    client = make_client(fake, retry_options=retry)
    fake.enqueue(status=500, times=5)
    with pytest.raises(errors.ServerError) as info:
        client.models.generate_content(model=MODEL, contents="hi")
    assert (info.value.code, info.value.status) == (500, "INTERNAL")
    assert fake.count() == 3


def test_custom_error_status_and_message(fake):
    client = make_client(fake)
    fake.enqueue(status=400, error_status="FAILED_PRECONDITION", message="no billing")
    with pytest.raises(errors.ClientError) as info:
        client.models.generate_content(model=MODEL, contents="hi")
    assert (info.value.code, info.value.status, info.value.message) == (
        400,
        "FAILED_PRECONDITION",
        "no billing",
    )


def test_unknown_model_is_404():
    with FakeGemini(known_models={MODEL}) as server:
        client = make_client(server)
        assert client.models.generate_content(model=MODEL, contents="hi").text == "{}"
        with pytest.raises(errors.ClientError) as info:
            client.models.generate_content(model="gemini-nope", contents="hi")
        assert (info.value.code, info.value.status) == (404, "NOT_FOUND")
        assert "models/gemini-nope is not found" in info.value.message
        with pytest.raises(errors.ClientError, match="404"):
            client.models.embed_content(model="embed-nope", contents=["hi"])


def test_max_tokens_finish_reason_and_thoughts(fake):
    client = make_client(fake)
    fake.enqueue(text="cut of", finish_reason="MAX_TOKENS", thoughts_tokens=10)
    response = client.models.generate_content(model=MODEL, contents="abcd")
    assert response.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert response.text == "cut of"
    usage = response.usage_metadata
    assert (usage.prompt_token_count, usage.candidates_token_count) == (1, 2)
    assert (usage.thoughts_token_count, usage.total_token_count) == (10, 13)


def test_scripts_are_fifo_and_per_model(fake):
    client = make_client(fake)
    fake.enqueue(text="for b", model="b")
    fake.enqueue(text="first")
    fake.enqueue(text="second")

    def ask(model):
        return client.models.generate_content(model=model, contents="q").text

    assert [ask("a"), ask("a"), ask("a"), ask("b"), ask("b")] == [
        "first",
        "second",
        "a heard q",
        "for b",
        "b heard q",
    ]


def test_embed_content(fake):
    client = make_client(fake)
    texts = ["the cat sat on the mat", "the cat sat on the mat", "the cat sat on a mat"]
    response = client.models.embed_content(
        model="text-embedding-test",
        contents=texts,
        config=types.EmbedContentConfig(task_type="SEMANTIC_SIMILARITY", output_dimensionality=32),
    )
    a, b, c = (e.values for e in response.embeddings)
    assert len(a) == 32
    assert a == b
    assert cosine(a, a) == pytest.approx(1.0)
    assert cosine(a, c) > 0.7
    (request,) = fake.requests
    assert request["method"] == "batchEmbedContents"
    assert request["model"] == "text-embedding-test"
    assert request["body"]["requests"][0] == {
        "content": {"parts": [{"text": texts[0]}], "role": "user"},
        "taskType": "SEMANTIC_SIMILARITY",
        "outputDimensionality": 32,
        "model": "models/text-embedding-test",
    }

    default = client.models.embed_content(
        model="text-embedding-test",
        contents=["the cat sat on the mat", "lattice gauge theory of quantum chromodynamics"],
    )
    x, y = (e.values for e in default.embeddings)
    assert len(x) == 64
    assert math.hypot(*x) == pytest.approx(1.0)
    assert cosine(x, y) < 0.3


def test_embed_failure_is_scripted_separately(fake):
    client = make_client(fake)
    fake.enqueue_embed(status=503)
    fake.enqueue(text="unused by embeddings")
    with pytest.raises(errors.ServerError) as info:
        client.models.embed_content(model="emb", contents=["hi"])
    assert (info.value.code, info.value.status) == (503, "UNAVAILABLE")
    assert len(client.models.embed_content(model="emb", contents=["hi"]).embeddings) == 1
    assert client.models.generate_content(model=MODEL, contents="q").text == "unused by embeddings"


def test_concurrent_requests_are_all_answered():
    # Each answer waits until all four requests are being served at once: a server that
    # answered one at a time would break the barrier (no wall-clock bound needed).
    barrier = threading.Barrier(4, timeout=10)

    def together(request):
        barrier.wait()
        return _echo(request)

    with FakeGemini(together) as server:
        client = make_client(server)
        answers = {}

        def ask(i):
            answers[i] = client.models.generate_content(model=MODEL, contents=f"q{i}").text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert answers == {i: f"{MODEL} heard q{i}" for i in range(4)}
        assert server.count() == 4


def test_client_timeout_raises_httpx2_read_timeout(fake):
    client = make_client(fake, timeout=200)  # milliseconds
    fake.enqueue(delay=5.0)  # an answer would arrive, late, if the timeout did not fire
    with pytest.raises(httpx2.ReadTimeout):
        client.models.generate_content(model=MODEL, contents="hi")


def test_stopped_server_refuses_connections():
    server = FakeGemini().start()
    client = make_client(server)
    assert client.models.generate_content(model=MODEL, contents="hi").text == "{}"
    server.stop()
    with pytest.raises(httpx2.ConnectError):
        client.models.generate_content(model=MODEL, contents="hi")


def test_unknown_path_is_404_json(fake):
    request = urllib.request.Request(
        f"{fake.url}/v1beta/models/{MODEL}:streamGenerateContent", data=b"{}", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 404
    assert json.loads(info.value.read())["error"]["status"] == "NOT_FOUND"
    assert fake.count() == 0
