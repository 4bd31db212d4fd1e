"""Text embeddings, computed once per text and kept in the workdir.

``EmbeddingStore`` is a write-once TensorStore OCDBT key-value store under ``WORKDIR/embeddings``
(its own store, opened like the history). A key names everything the vector depends on,
``<model>/<dims>/<task>/<sha256 of the text>``, and its value is the L2-normalised float32
vector, little-endian. Values never change, so a resumed run, a second process or another host
on the same gs:// workdir reuses every embedding already paid for, and racing writers are
harmless: the same text gets the same vector.

``Embedder`` puts a network call (``embed_fn``, injected) behind that store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from evolve_jax import storage

_DTYPE = np.dtype("<f4")


class EmbeddingStoreError(RuntimeError):
    """The store cannot be opened, or a stored value is unusable; the message says where."""


def _normalise(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero: its cosine with anything is 0)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.where(norms == 0, 1.0, norms)).astype(np.float32)


def key(model: str, dims: int, task: str, text: str) -> str:
    return f"{model}/{dims}/{task}/{hashlib.sha256(text.encode()).hexdigest()}"


class EmbeddingStore:
    """Embeddings of one workdir, keyed by model, dims, task and text."""

    def __init__(self, workdir: str):
        try:
            url = storage.store_url(workdir, "embeddings")
            self._kv = storage.open_kvstore(url, "embedding store")
        except storage.StorageError as e:
            raise EmbeddingStoreError(str(e)) from e
        self.url = url

    def get_many(
        self, model: str, dims: int, task: str, texts: Sequence[str]
    ) -> list[np.ndarray | None]:
        """The stored vector of each text, or None where there is none yet."""
        keys = [key(model, dims, task, t) for t in texts]
        futures = [self._kv.read(k) for k in keys]  # issued together, awaited together
        vectors: list[np.ndarray | None] = []
        for k, future in zip(keys, futures, strict=True):
            result = future.result()
            if result.state != "value":
                vectors.append(None)
                continue
            if len(result.value) != _DTYPE.itemsize * dims:
                raise EmbeddingStoreError(
                    f"corrupted embedding {k!r} in {self.url}: {len(result.value)} bytes, "
                    f"expected {_DTYPE.itemsize * dims} ({dims} float32)"
                )
            vectors.append(np.frombuffer(result.value, dtype=_DTYPE).astype(np.float32))
        return vectors

    def put_many(
        self, model: str, dims: int, task: str, texts: Sequence[str], vectors: Any
    ) -> None:
        """Stores each text's vector (normalised here) unless one is already stored."""
        matrix = np.asarray(vectors, dtype=np.float64)
        if matrix.shape != (len(texts), dims):
            raise ValueError(f"put_many: {matrix.shape} vectors for {len(texts)} texts of {dims}")
        if not np.isfinite(matrix).all():
            # A stored value is kept forever: refuse one that can never be a cosine.
            raise ValueError(f"put_many: non-finite values in embeddings of {model!r}")
        matrix = _normalise(matrix).astype(_DTYPE)
        futures = [
            self._kv.write(key(model, dims, task, t), row.tobytes(), if_equal=storage.ABSENT)
            for t, row in zip(texts, matrix, strict=True)
        ]
        for future in futures:
            # A lost race returns an empty generation rather than raising: the winner wrote
            # the vector of the same text, so there is nothing to do.
            future.result()


class Embedder:
    """Embeds texts through ``embed_fn``, paying only for texts the store does not hold yet.

    ``embed_fn(texts) -> array-like [len(texts), d]`` with ``d >= dims``; longer vectors are
    truncated to ``dims`` and re-normalised (Matryoshka embeddings such as Gemini's are only
    unit-norm at their full size). ``requests`` counts calls of ``embed_fn``; ``hits`` counts
    distinct texts of each ``embed`` call that were read from the store.
    """

    def __init__(
        self,
        embed_fn: Callable[[list[str]], Any],
        store: EmbeddingStore,
        *,
        model: str,
        dims: int,
        task: str = "SEMANTIC_SIMILARITY",
        batch_size: int = 100,
    ):
        if dims < 1 or batch_size < 1:
            raise ValueError(f"dims and batch_size must be >= 1, got {dims} and {batch_size}")
        self.embed_fn = embed_fn
        self.store = store
        self.model, self.dims, self.task, self.batch_size = model, dims, task, batch_size
        self.requests = 0
        self.hits = 0

    def embed(self, texts: Sequence[str], label: str = "") -> np.ndarray:
        """``[len(texts), dims]`` float32 unit rows, in input order.

        ``label`` names what the call is for; it is unused here (a subclass that records each
        call's outcome, ``agents.llm.RecordedEmbedder``, keys its record by it).
        """
        del label
        unique = list(dict.fromkeys(texts))
        stored = self.store.get_many(self.model, self.dims, self.task, unique)
        found = {t: v for t, v in zip(unique, stored, strict=True) if v is not None}
        self.hits += len(found)
        missing = [t for t in unique if t not in found]
        for start in range(0, len(missing), self.batch_size):
            batch = missing[start : start + self.batch_size]
            raw = self._request(batch)
            # Stored batch by batch: if a later batch fails, the next call pays only for it.
            self.store.put_many(self.model, self.dims, self.task, batch, raw)
            found.update(zip(batch, _normalise(raw), strict=True))  # what the store now holds
        if not texts:
            return np.zeros((0, self.dims), np.float32)
        return np.stack([found[t] for t in texts])

    def _request(self, batch: list[str]) -> np.ndarray:
        """The batch's vectors from the network, truncated to ``dims`` (not yet normalised)."""
        self.requests += 1
        matrix = np.asarray(self.embed_fn(batch), dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[0] != len(batch):
            raise ValueError(
                f"embedding model {self.model!r} returned an array of shape {matrix.shape} "
                f"for {len(batch)} texts: wrong vector count"
            )
        if matrix.shape[1] < self.dims:
            raise ValueError(
                f"embedding model {self.model!r} returned vectors of {matrix.shape[1]} dims, "
                f"fewer than the {self.dims} asked for"
            )
        return matrix[:, : self.dims]


def cosine_top_k(query_D: Any, matrix_ND: Any, k: int) -> list[tuple[int, float]]:
    """The ``k`` rows most similar to the query, ``(row, cosine)`` best first, ties by row.

    Rows and query are taken as unit vectors, so the dot product is the cosine.
    """
    matrix = np.asarray(matrix_ND, dtype=np.float32)
    if matrix.size == 0 or k <= 0:
        return []
    scores = matrix @ np.asarray(query_D, dtype=np.float32)
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(i), float(scores[i])) for i in order]
