"""Tests for search_spaces/linear_attention/data.py: Zoology MQAR and the byte-LM Grain pipeline."""

import re

import numpy as np
import pytest

from search_spaces.linear_attention import data

V, L, D = 64, 48, 4


def _mqar(seed=0, n=32, **kw):
    args = dict(vocab_size=V, seq_len=L, num_pairs=D) | kw
    return data.make_mqar(np.random.default_rng(seed), n, **args)


# ----------------------------------------------------------------------------------------------
# MQAR
# ----------------------------------------------------------------------------------------------


def test_mqar_shapes_and_dtypes():
    batch = _mqar(n=5)
    assert batch.inputs.shape == batch.targets.shape == (5, L)
    assert batch.inputs.dtype == batch.targets.dtype == np.int32
    assert batch.inputs.min() >= 0 and batch.inputs.max() < V


@pytest.mark.parametrize("distinct_values", [True, False])
def test_mqar_context_keys_and_values(distinct_values):
    batch = _mqar(distinct_values=distinct_values)
    keys_ND, values_ND = batch.inputs[:, 0 : 2 * D : 2], batch.inputs[:, 1 : 2 * D : 2]
    assert all(len(set(row)) == D for row in keys_ND)
    assert keys_ND.min() >= 1 and keys_ND.max() < V // 2
    assert values_ND.min() >= V // 2 and values_ND.max() < V
    if distinct_values:
        assert all(len(set(row)) == D for row in values_ND)
    # Nothing is supervised inside the context.
    assert (batch.targets[:, : 2 * D] == data.IGNORE_INDEX).all()


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_mqar_queries_recall_their_values(random_non_queries):
    batch = _mqar(random_non_queries=random_non_queries)
    assert (batch.target_mask.sum(axis=1) == D).all()
    for inputs_L, targets_L in zip(batch.inputs, batch.targets, strict=True):
        pairs = dict(zip(inputs_L[0 : 2 * D : 2], inputs_L[1 : 2 * D : 2], strict=True))
        positions = np.flatnonzero(targets_L != data.IGNORE_INDEX)
        assert ((positions - 2 * D) % 2 == 0).all() and (positions >= 2 * D).all()
        # Every context key is queried exactly once, and its target is its paired value.
        assert sorted(inputs_L[positions]) == sorted(pairs)
        for pos in positions:
            assert targets_L[pos] == pairs[inputs_L[pos]]
        if not random_non_queries:
            query_L = inputs_L[2 * D :].copy()
            query_L[positions - 2 * D] = 0
            assert (query_L == 0).all()


def test_mqar_deterministic_by_seed():
    a, b, c = _mqar(seed=3), _mqar(seed=3), _mqar(seed=4)
    np.testing.assert_array_equal(a.inputs, b.inputs)
    np.testing.assert_array_equal(a.targets, b.targets)
    assert not np.array_equal(a.inputs, c.inputs)


def test_mqar_gaps_follow_power_law():
    seq_len, num_pairs = 128, 4
    batch = data.make_mqar(
        np.random.default_rng(0), 3000, vocab_size=V, seq_len=seq_len, num_pairs=num_pairs
    )
    positions = np.nonzero(batch.target_mask)[1]
    gaps = (positions - 2 * num_pairs) // 2
    space = (seq_len - 2 * num_pairs) // 2
    uniform_mean = (space - 1) / 2
    assert gaps.mean() < 0.6 * uniform_mean
    counts = np.bincount(gaps, minlength=space)
    assert counts[:10].sum() > counts[-10:].sum() * 2
    # power_a = 1 is uniform: the mean gap comes back to the middle.
    uniform = data.make_mqar(
        np.random.default_rng(0),
        3000,
        vocab_size=V,
        seq_len=seq_len,
        num_pairs=num_pairs,
        power_a=1.0,
    )
    uniform_gaps = (np.nonzero(uniform.target_mask)[1] - 2 * num_pairs) // 2
    assert abs(uniform_gaps.mean() - uniform_mean) < 0.05 * uniform_mean


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(seq_len=4 * D - 1), "seq_len"),
        (dict(vocab_size=2 * D + 1), "vocab_size"),
        (dict(num_pairs=0), "num_pairs"),
        (dict(power_a=0.0), "power_a"),
        (dict(n=0), "num_examples"),
    ],
)
def test_mqar_bad_args(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _mqar(**kwargs)


def test_mqar_smallest_valid_args():
    batch = data.make_mqar(
        np.random.default_rng(0), 3, vocab_size=2 * D + 2, seq_len=4 * D, num_pairs=D
    )
    assert (batch.target_mask.sum(axis=1) == D).all()


def test_mqar_accuracy():
    batch = _mqar(n=4)
    assert float(data.mqar_accuracy(batch.targets, batch.targets)) == 1.0
    preds = batch.targets.copy()
    rows, cols = np.nonzero(batch.target_mask)
    preds[rows[0], cols[0]] += 1  # one wrong answer out of 4 * D
    # Predictions at ignored positions do not count.
    preds[~batch.target_mask] = 0
    assert float(data.mqar_accuracy(preds, batch.targets)) == pytest.approx(1 - 1 / (4 * D))
    logits = np.eye(V, dtype=np.float32)[np.maximum(batch.targets, 0)]
    assert float(data.mqar_accuracy(logits, batch.targets)) == 1.0
    with pytest.raises(ValueError, match="shape"):
        data.mqar_accuracy(preds[:, :-1], batch.targets)


# ----------------------------------------------------------------------------------------------
# Byte LM
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_corpus():
    return data.load_corpus()


def test_default_corpus(default_corpus):
    assert default_corpus.dtype == np.uint8 and default_corpus.ndim == 1
    assert default_corpus.size > 100_000
    text = default_corpus.tobytes().decode("utf-8")  # English documentation, valid UTF-8
    assert text.count(" the ") > 1000


def test_split_is_last_tenth(default_corpus):
    train = data.split_corpus(default_corpus, "train")
    val = data.split_corpus(default_corpus, "validation")
    assert len(train) + len(val) == len(default_corpus)
    assert len(val) == int(len(default_corpus) * 0.1)
    np.testing.assert_array_equal(np.concatenate([train, val]), default_corpus)


def test_byte_lm_batches(default_corpus):
    ds = data.byte_lm_dataset(default_corpus, seq_len=32, batch_size=4, seed=0)
    it = iter(ds)
    for _ in range(3):
        batch = next(it)
        assert set(batch) == {"inputs", "targets"}
        for value in batch.values():
            assert value.shape == (4, 32) and value.dtype == np.int32
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        assert batch["inputs"].min() >= 0 and batch["inputs"].max() < 256
    # Iteration and random access agree.
    np.testing.assert_array_equal(next(iter(ds))["inputs"], ds[0]["inputs"])


def test_byte_lm_windows_come_from_the_split(default_corpus):
    val = data.split_corpus(default_corpus, "validation").tobytes()
    ds = data.byte_lm_dataset(default_corpus, seq_len=16, batch_size=2, seed=1, split="validation")
    batch = ds[0]
    for inputs_S, targets_S in zip(batch["inputs"], batch["targets"], strict=True):
        window = bytes(inputs_S.astype(np.uint8)) + bytes(targets_S[-1:].astype(np.uint8))
        assert window in val


def test_byte_lm_deterministic_by_seed(default_corpus):
    def first(seed):
        return data.byte_lm_dataset(default_corpus, seq_len=16, batch_size=8, seed=seed)[0]

    np.testing.assert_array_equal(first(0)["inputs"], first(0)["inputs"])
    assert not np.array_equal(first(0)["inputs"], first(1)["inputs"])


def test_byte_lm_epochs_cover_every_window_and_reshuffle():
    corpus = np.arange(40, dtype=np.uint8)  # train split: 36 bytes -> 36 - 4 = 32 windows
    ds = data.byte_lm_dataset(corpus, seq_len=4, batch_size=5, seed=0)
    starts = [int(b["inputs"][i, 0]) for k in range(6) for b in [ds[k]] for i in range(5)]
    assert len(set(starts)) == 30  # 6 batches of 5, remainder 2 dropped, no repeats
    epoch2 = [int(b["inputs"][i, 0]) for k in range(6, 12) for b in [ds[k]] for i in range(5)]
    assert starts != epoch2
    finite = data.byte_lm_dataset(corpus, seq_len=4, batch_size=5, seed=0, num_epochs=2)
    assert len(list(finite)) == 12


def test_user_corpus_from_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bbbb" * 50)
    (tmp_path / "a.md").write_text("aaaa" * 50)
    (tmp_path / "sub" / "c.py").write_text("cccc" * 50)
    (tmp_path / "skip.bin").write_bytes(b"\x00" * 100)
    corpus = data.load_corpus([str(tmp_path)])
    assert corpus.tobytes() == b"aaaa" * 50 + b"bbbb" * 50 + b"cccc" * 50
    batch = data.byte_lm_dataset(corpus, seq_len=8, batch_size=2, seed=0)[0]
    assert batch["inputs"].shape == (2, 8)
    # A single path string is one path, and explicit files of any suffix are read.
    assert data.load_corpus(str(tmp_path / "skip.bin")).size == 100


def test_missing_and_empty_corpus(tmp_path):
    missing = tmp_path / "no_such_file.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        data.load_corpus([str(missing)])
    with pytest.raises(ValueError, match="empty"):
        data.load_corpus([str(tmp_path)])


def test_byte_lm_bad_args():
    with pytest.raises(ValueError, match="batch_size"):
        data.byte_lm_dataset(b"x" * 100, seq_len=8, batch_size=500, seed=0)
    with pytest.raises(ValueError, match="split"):
        data.byte_lm_dataset(b"x" * 100, seq_len=8, batch_size=2, seed=0, split="test")
