"""Data for the linear-attention search space.

Two procedures:

* **MQAR** -- multi-query associative recall, generated as in Zoology (Arora et al. 2023,
  "Zoology: Measuring and Improving Recall in Efficient Language Models",
  ``zoology/data/associative_recall.py::multiquery_ar``). Each example is ``k1 v1 ... kD vD``
  followed by a query region in which every key appears once more, at an even offset
  ``2 * gap`` drawn from a power law ``p(gap = i - 1) ∝ i ** (power_a - 1)``; the target at a
  query key's position is its value, every other target is ``IGNORE_INDEX``. Zoology's
  per-row ``np.random.choice(..., replace=False)`` is replaced by an equivalent vectorised
  Gumbel-top-k draw on a caller-supplied ``np.random.Generator``, so the *distribution* is
  Zoology's while the exact token streams differ from Zoology's for a given seed.
* **Byte-level language modelling** on a real corpus: by default the CPython standard
  library's ``pydoc_data.topics`` (English reference documentation shipped with every Python
  install), or user text files. Batches are random windows of ``seq_len + 1`` bytes fed
  through a Grain ``MapDataset`` pipeline.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grain
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = -100
BYTE_VOCAB_SIZE = 256
CORPUS_SUFFIXES = (".txt", ".md", ".py", ".rst")
SPLITS = ("train", "validation")

# Upper bound on the elements of one [rows, items] score matrix when sampling without
# replacement; bounds memory at ~32 MiB (float64) whatever num_examples or vocab_size is.
_MAX_SCORE_ELEMS = 1 << 22


# ----------------------------------------------------------------------------------------------
# MQAR
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class MQARBatch:
    """MQAR examples: ``inputs`` and ``targets``, both ``[N, L]`` int32.

    ``targets[n, t]`` is what the model should predict from ``inputs[n, :t + 1]``;
    it is ``IGNORE_INDEX`` everywhere except the ``num_pairs`` query-key positions.
    """

    inputs: np.ndarray
    targets: np.ndarray

    @property
    def target_mask(self) -> np.ndarray:
        """``[N, L]`` bool, True where the target is supervised."""
        return self.targets != IGNORE_INDEX


def _sample_without_replacement(
    rng: np.random.Generator,
    num_rows: int,
    num_items: int,
    k: int,
    log_weights_I: np.ndarray | None = None,
) -> np.ndarray:
    """Returns ``[num_rows, k]`` int64: per row, ``k`` distinct indices into ``range(num_items)``.

    Gumbel-top-k: the top-k of ``log w + Gumbel`` ordered by decreasing score has the same
    distribution as k successive weighted draws without replacement, which is what
    ``np.random.choice(replace=False, p=w)`` does per row in Zoology.
    """
    out_RK = np.empty((num_rows, k), dtype=np.int64)
    rows_per_chunk = max(1, _MAX_SCORE_ELEMS // num_items)
    for lo in range(0, num_rows, rows_per_chunk):
        hi = min(num_rows, lo + rows_per_chunk)
        if log_weights_I is None:
            # Equal weights: any i.i.d. continuous noise gives a uniform random order.
            scores_CI = rng.random((hi - lo, num_items))
        else:
            scores_CI = log_weights_I + rng.gumbel(size=(hi - lo, num_items))
        top_CK = np.argpartition(-scores_CI, k - 1, axis=1)[:, :k]
        # argpartition leaves the top k unordered; order them as successive draws.
        order_CK = np.argsort(-np.take_along_axis(scores_CI, top_CK, axis=1), axis=1)
        out_RK[lo:hi] = np.take_along_axis(top_CK, order_CK, axis=1)
    return out_RK


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def make_mqar(
    rng: np.random.Generator,
    num_examples: int,
    *,
    vocab_size: int,
    seq_len: int,
    num_pairs: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    distinct_values: bool = True,
) -> MQARBatch:
    """Returns ``num_examples`` Zoology MQAR examples as an ``MQARBatch`` of ``[N, L]`` int32.

    Keys are distinct per example, drawn from ``[1, vocab_size // 2)``; values from
    ``[vocab_size // 2, vocab_size)`` -- distinct per example by default, as Zoology's
    ``np.random.choice(value_choices, replace=False)`` draws them; ``distinct_values=False``
    draws them with replacement instead. With ``random_non_queries`` (Zoology's default) the
    unused zero slots of the query region are filled with uniform tokens from
    ``[0, vocab_size)``; otherwise they stay 0.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    num_examples = _check_int("num_examples", num_examples, 1)
    num_pairs = _check_int("num_pairs", num_pairs, 1)
    vocab_size = _check_int("vocab_size", vocab_size, 4)
    seq_len = _check_int("seq_len", seq_len, 1)
    if not (
        isinstance(power_a, int | float | np.floating) and np.isfinite(power_a) and power_a > 0
    ):
        raise ValueError(f"power_a must be a finite number > 0, got {power_a!r}")

    half = vocab_size // 2
    num_key_choices = half - 1  # keys live in [1, half); 0 is the filler token
    if num_key_choices < num_pairs:
        raise ValueError(
            f"vocab_size={vocab_size} gives only {num_key_choices} distinct keys in "
            f"[1, {half}), fewer than num_pairs={num_pairs}; need vocab_size >= "
            f"{2 * (num_pairs + 1)}"
        )
    context_len = 2 * num_pairs
    space = (seq_len - context_len) // 2
    if space < num_pairs:
        raise ValueError(
            f"seq_len={seq_len} leaves {max(space, 0)} query slots for num_pairs={num_pairs} "
            f"(slots = (seq_len - 2 * num_pairs) // 2); need seq_len >= {4 * num_pairs}"
        )

    keys_ND = 1 + _sample_without_replacement(rng, num_examples, num_key_choices, num_pairs)
    if distinct_values:
        values_ND = half + _sample_without_replacement(
            rng, num_examples, vocab_size - half, num_pairs
        )
    else:
        values_ND = rng.integers(half, vocab_size, size=(num_examples, num_pairs))

    # Zoology: p(i) ∝ a * i^(a-1) over i = 1..space for slot i - 1; the constant a cancels.
    log_weights_S = (power_a - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))
    gaps_ND = _sample_without_replacement(rng, num_examples, space, num_pairs, log_weights_S)

    inputs_NL = np.zeros((num_examples, seq_len), dtype=np.int32)
    inputs_NL[:, 0:context_len:2] = keys_ND
    inputs_NL[:, 1:context_len:2] = values_ND
    # A query key sits at even offset 2*gap of the query region; the value is the label *at*
    # the key's position (Zoology writes it one later in an L+1 array, then shifts by one).
    query_pos_ND = context_len + 2 * gaps_ND
    np.put_along_axis(inputs_NL, query_pos_ND, keys_ND.astype(np.int32), axis=1)
    targets_NL = np.full((num_examples, seq_len), IGNORE_INDEX, dtype=np.int32)
    np.put_along_axis(targets_NL, query_pos_ND, values_ND.astype(np.int32), axis=1)

    if random_non_queries:
        # Only filler slots are 0: keys are >= 1 and values >= vocab_size // 2 >= 2.
        filler_NL = inputs_NL == 0
        inputs_NL[filler_NL] = rng.integers(
            0, vocab_size, size=int(filler_NL.sum()), dtype=np.int32
        )
    return MQARBatch(inputs=inputs_NL, targets=targets_NL)


def mqar_accuracy(logits_or_predictions, targets, ignore_index: int = IGNORE_INDEX):
    """Returns scalar ``jnp`` float32 accuracy over positions where ``targets != ignore_index``.

    Accepts logits ``[..., L, V]`` (arg-maxed over the last axis) or integer predictions of
    ``targets``' shape. jit-compatible (computed with ``jax.numpy``, so large logits need not
    leave the device); NaN when there is no supervised position.
    """
    preds = jnp.asarray(logits_or_predictions)
    targets = jnp.asarray(targets)
    if preds.ndim == targets.ndim + 1:
        preds = jnp.argmax(preds, axis=-1)
    if preds.shape != targets.shape:
        raise ValueError(
            f"predictions shape {preds.shape} (after argmax of logits) does not match "
            f"targets shape {targets.shape}"
        )
    mask = targets != ignore_index
    correct = jnp.sum((preds == targets) & mask)
    return (correct / jnp.sum(mask)).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Byte-level language modelling
# ----------------------------------------------------------------------------------------------


def default_corpus_text() -> str:
    """Returns the text of CPython's ``pydoc_data.topics``, values joined in sorted-key order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distro Pythons split pydoc_data into its own package
        raise ImportError(
            "the default byte-LM corpus needs the standard library module pydoc_data.topics; "
            "install it (e.g. the python3 docs/stdlib package) or pass corpus_paths"
        ) from err
    return "".join(topics[key] for key in sorted(topics))


def default_corpus_locations() -> list[str]:
    """The ``pydoc_data`` directories of this interpreter and of the other Pythons in the usual
    places: each holds the default corpus (or a version of it), so code mode hides them all."""
    found = set()
    try:
        import pydoc_data

        found.add(os.path.dirname(os.path.abspath(pydoc_data.__file__)))
    except ImportError:
        pass
    prefixes = {sys.base_prefix, sys.prefix, "/usr", "/usr/local", "/opt"}
    for prefix in prefixes:
        for pattern in ("lib/python3*/pydoc_data", "lib64/python3*/pydoc_data"):
            found.update(glob.glob(os.path.join(prefix, pattern)))
    return sorted(os.path.realpath(p) for p in found if os.path.isdir(p))


def _files_under(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES
        )
    return [path]


def load_corpus(paths: Sequence[str | os.PathLike] | str | os.PathLike | None = None) -> np.ndarray:
    """Returns the corpus as a 1-D uint8 byte array.

    ``None`` gives the default ``pydoc_data.topics`` corpus (UTF-8). Otherwise each path is a
    file (read as-is) or a directory (read recursively for ``*.txt``, ``*.md``, ``*.py``,
    ``*.rst`` in sorted path order); all bytes are concatenated in the order given.
    """
    if paths is None:
        data = default_corpus_text().encode("utf-8")
    else:
        if isinstance(paths, str | os.PathLike):
            # A bare string would otherwise be iterated character by character.
            paths = [paths]
        # Check every path before reading any, so the error names the first missing one.
        resolved = [Path(p) for p in paths]
        for path in resolved:
            if not path.exists():
                raise FileNotFoundError(f"corpus path does not exist: {str(path)!r}")
        data = b"".join(f.read_bytes() for path in resolved for f in _files_under(path))
        if not data:
            raise ValueError(
                f"corpus is empty: no bytes read from {[str(p) for p in resolved]} "
                f"(directories are searched for {', '.join(CORPUS_SUFFIXES)} files)"
            )
    return np.frombuffer(data, dtype=np.uint8).copy()


def _as_byte_array(corpus: bytes | bytearray | np.ndarray) -> np.ndarray:
    if isinstance(corpus, bytes | bytearray | memoryview):
        return np.frombuffer(bytes(corpus), dtype=np.uint8)
    array = np.asarray(corpus)
    if array.ndim != 1:
        raise ValueError(f"corpus must be 1-D, got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer) or (
            array.size and (array.min() < 0 or array.max() >= BYTE_VOCAB_SIZE)
        ):
            raise ValueError(f"corpus must hold bytes in [0, 256), got dtype {array.dtype}")
        array = array.astype(np.uint8)
    return array


def split_corpus(
    corpus: bytes | bytearray | np.ndarray, split: str = "train", *, val_fraction: float = 0.1
) -> np.ndarray:
    """Returns the uint8 bytes of one split: the last ``val_fraction`` is ``'validation'``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    bytes_T = _as_byte_array(corpus)
    num_val = int(len(bytes_T) * val_fraction)
    boundary = len(bytes_T) - num_val
    return bytes_T[:boundary] if split == "train" else bytes_T[boundary:]


class _GatherWindows:
    """Grain map: ``[B]`` window starts -> dict of ``inputs``/``targets`` ``[B, seq_len]`` int32.

    A class rather than a closure so the pipeline stays picklable for Grain worker processes.
    """

    def __init__(self, bytes_T: np.ndarray, seq_len: int):
        self._bytes_T = bytes_T
        self._offsets_W = np.arange(seq_len + 1)

    def __call__(self, starts_B: np.ndarray) -> dict[str, np.ndarray]:
        windows_BW = self._bytes_T[starts_B[:, None] + self._offsets_W].astype(np.int32)
        return {"inputs": windows_BW[:, :-1], "targets": windows_BW[:, 1:]}


def byte_lm_dataset(
    corpus: bytes | bytearray | np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    split: str = "train",
    val_fraction: float = 0.1,
    num_epochs: int | None = None,
) -> grain.MapDataset:
    """Returns a Grain ``MapDataset`` of dicts ``inputs``, ``targets``: ``[B, seq_len]`` int32.

    ``targets`` is ``inputs`` shifted left by one byte. An epoch visits every window start
    ``0 .. len(split) - seq_len - 1`` once, in a seeded shuffled order (reshuffled each
    epoch), in batches of ``batch_size`` with the remainder dropped; ``num_epochs=None``
    repeats forever. Iterate it, or index it (``ds[i]`` is batch ``i``) -- both are
    deterministic given ``seed``.
    """
    seq_len = _check_int("seq_len", seq_len, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_int("seed", seed, 0)
    if num_epochs is not None:
        num_epochs = _check_int("num_epochs", num_epochs, 1)
    bytes_T = split_corpus(corpus, split, val_fraction=val_fraction)
    num_windows = len(bytes_T) - seq_len
    if num_windows < batch_size:
        raise ValueError(
            f"{split} split has {len(bytes_T)} bytes: {max(num_windows, 0)} windows of "
            f"seq_len + 1 = {seq_len + 1}, fewer than batch_size={batch_size}"
        )
    # Grain reshuffles epoch e with seed + e, so seeds s and s + 1 would share epochs;
    # hashing the user seed keeps nearby seeds' streams unrelated.
    grain_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    return (
        grain.MapDataset.range(num_windows)
        .shuffle(seed=grain_seed)
        # Batch the start offsets first so slicing is one vectorised gather per batch.
        .batch(batch_size, drop_remainder=True, batch_fn=np.asarray)
        .map(_GatherWindows(bytes_T, seq_len))
        .repeat(num_epochs)
    )
