"""The embedding store, the Embedder in front of it, and hybrid retrieval in Cognition.

The network is replaced by a hashed bag of words in which synonyms share a token, so a text can
be close to another in embedding space while sharing no word with it (which BM25 cannot see).
"""

import hashlib
import logging
import os
import re

import numpy as np
import pytest

from evolve_jax.memory import embeddings
from evolve_jax.memory.cognition import Cognition, Item, load_seed_file
from evolve_jax.memory.embeddings import (
    Embedder,
    EmbeddingStore,
    EmbeddingStoreError,
    cosine_top_k,
)

SEED = os.path.join(os.path.dirname(__file__), "toy_cognition.jsonl")
SYNONYMS = {"merge": "blend", "blending": "blend", "mixing": "interpolating"}
WIDTH = 256


def fake_embed(texts, width=WIDTH):
    """Hashed bag of words (synonyms mapped to one word); deterministic across processes."""
    out = np.zeros((len(texts), width))
    for row, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            word = SYNONYMS.get(word, word)
            out[row, int(hashlib.sha256(word.encode()).hexdigest(), 16) % width] += 1.0
    return out


class Recorder:
    """A fake embed_fn that records the size of every call."""

    def __init__(self, fn=fake_embed):
        self.fn = fn
        self.calls: list[int] = []

    def __call__(self, texts):
        self.calls.append(len(texts))
        return self.fn(texts)


def make(workdir, fn=fake_embed, **kwargs):
    kwargs = {"model": "fake", "dims": WIDTH, **kwargs}
    return Embedder(fn, EmbeddingStore(str(workdir)), **kwargs)


def test_store_round_trip_across_reopen(tmp_path):
    texts = ["gaussian step", "blend parents", "gaussian step"]
    first = make(tmp_path)
    vectors = first.embed(texts)
    assert vectors.shape == (3, WIDTH) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    assert first.requests == 1 and first.hits == 0
    second = make(tmp_path)  # a new process: only the store is shared
    np.testing.assert_array_equal(second.embed(texts), vectors)
    assert second.requests == 0 and second.hits == 2
    other = make(tmp_path, dims=32)  # the key names the dims: a different vector, not a hit
    other.embed(texts)
    assert other.requests == 1 and other.hits == 0


def test_dedupes_and_batches(tmp_path):
    texts = [f"text {i}" for i in range(150)]
    recorder = Recorder()
    embedder = make(tmp_path, recorder, batch_size=100)
    vectors = embedder.embed(texts + texts[:20])
    assert recorder.calls == [100, 50] and embedder.requests == 2
    np.testing.assert_array_equal(vectors[150:], vectors[:20])
    embedder.embed(texts)
    assert embedder.requests == 2 and embedder.hits == 150
    assert embedder.embed([]).shape == (0, WIDTH)


def test_truncation_renormalises(tmp_path):
    embedder = make(tmp_path, lambda texts: [[3.0, 4.0, 12.0, 84.0]] * len(texts), dims=2)
    np.testing.assert_allclose(embedder.embed(["a"])[0], [0.6, 0.8], rtol=1e-6)
    stored = EmbeddingStore(str(tmp_path)).get_many("fake", 2, "SEMANTIC_SIMILARITY", ["a"])
    np.testing.assert_allclose(stored[0], [0.6, 0.8], rtol=1e-6)


def test_bad_responses_raise_and_store_nothing(tmp_path):
    short_count = make(tmp_path, lambda texts: fake_embed(texts)[:-1])
    with pytest.raises(ValueError, match="for 3 texts: wrong vector count"):
        short_count.embed(["a", "b", "c"])
    short_vectors = make(tmp_path, lambda texts: fake_embed(texts, width=8))
    with pytest.raises(ValueError, match="vectors of 8 dims, fewer than the 256"):
        short_vectors.embed(["a"])
    assert EmbeddingStore(str(tmp_path)).get_many("fake", WIDTH, "SEMANTIC_SIMILARITY", ["a"]) == [
        None
    ]


def test_corrupt_value_names_its_key(tmp_path):
    store = EmbeddingStore(str(tmp_path))
    key = embeddings.key("fake", 64, "SEMANTIC_SIMILARITY", "a")
    store._kv.write(key, b"\0" * 12).result()
    with pytest.raises(EmbeddingStoreError, match=f"{key}.*12 bytes, expected 256"):
        store.get_many("fake", 64, "SEMANTIC_SIMILARITY", ["a"])


def test_cosine_top_k():
    matrix = np.eye(3, dtype=np.float32)[[0, 1, 1, 2]]
    assert cosine_top_k([0, 1, 0], matrix, 3) == [(1, 1.0), (2, 1.0), (0, 0.0)]
    assert cosine_top_k([0, 1, 0], np.zeros((0, 3)), 3) == []


def test_hybrid_retrieval_finds_a_paraphrase_bm25_misses(tmp_path):
    cognition = Cognition(load_seed_file(SEED))
    assert cognition.retrieve("merge mixing", k=3) == []  # no word in common with any item
    cognition.set_embedder(make(tmp_path))
    assert cognition.retrieve("merge mixing", k=1)[0].title == "Blending parents"
    # Both rankings count: BM25 alone finds only "shape"; the embedding adds "merge".
    hits = cognition.retrieve("merge shape", k=2)
    assert [h.title for h in hits] == ["Broken shapes fail", "Blending parents"]
    assert len(cognition.retrieve("merge mixing", k=9, max_chars=20)) == 3
    assert all(len(h.content) <= 20 for h in cognition.retrieve("merge", k=3, max_chars=20))
    cognition.set_embedder(None)
    assert cognition.retrieve("merge mixing", k=3) == []


def test_hybrid_ties_keep_item_order(tmp_path):
    items = [Item(id=str(i), title=f"t{i}", content=f"c{i}", source="x") for i in range(4)]
    cognition = Cognition(items)
    cognition.set_embedder(make(tmp_path, lambda texts: np.ones((len(texts), WIDTH))))
    assert [h.id for h in cognition.retrieve("nothing in common", k=4)] == ["0", "1", "2", "3"]


def test_item_embeddings_are_cached_and_refreshed_with_lessons(tmp_path):
    cognition = Cognition(load_seed_file(SEED))
    embedder = make(tmp_path)
    cognition.set_embedder(embedder)
    cognition.retrieve("merge", k=1)
    assert embedder.requests == 2  # the items, then the query
    cognition.retrieve("merge", k=1)
    assert embedder.requests == 2
    cognition.add_lesson("Mixing helps", "merge parents early", nodes=[1])
    assert cognition.retrieve("merge parents early mixing", k=1)[0].title == "Mixing helps"
    assert embedder.requests == 4  # the new lesson and the new query; old items from the store


def test_embedder_failure_falls_back_to_bm25(tmp_path, caplog):
    def down(texts):
        raise ConnectionError("API down")

    cognition = Cognition(load_seed_file(SEED))
    expected = cognition.retrieve("interpolating parents blend", k=2)
    cognition.set_embedder(make(tmp_path, down))
    with caplog.at_level(logging.WARNING):
        assert cognition.retrieve("interpolating parents blend", k=2) == expected
        assert cognition.retrieve("merge mixing", k=2) == []
        assert cognition.similar("merge mixing", 0.0) == []
    assert "API down" in caplog.text


def test_similar_threshold(tmp_path):
    cognition = Cognition(load_seed_file(SEED))
    assert cognition.similar("merge mixing", 0.0) == []  # no embedder
    cognition.set_embedder(make(tmp_path))
    close = cognition.similar("Blending parents: merge two good parents", 0.5)
    assert [item.title for item, _ in close] == ["Blending parents"]
    assert close[0][1] >= 0.5
    everything = cognition.similar("Blending parents: merge two good parents", -1.0)
    assert len(everything) == 3
    assert [c for _, c in everything] == sorted((c for _, c in everything), reverse=True)
    assert cognition.similar("Blending parents: merge two good parents", 1.01) == []
