"""The shared code-mode harness: reply validation, per-candidate failures, and the suffix swap
that verifies causality on the scored outputs."""

import os

import numpy as np
import pytest

from evolve_jax.evaluation import harness, sandbox, workers
from evolve_jax.search_space import EvalResult
from search_spaces.linear_attention import code_mode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 7  # vocabulary of the toy "models" below


def _one_hot(tokens: np.ndarray) -> np.ndarray:
    logits = np.full((*tokens.shape, V), -5.0)
    np.put_along_axis(logits, tokens[..., None], 5.0, axis=-1)
    return logits


def causal(inputs_NT, positions_NT):
    """Predicts (sum of the prefix) mod V: depends on x[:t+1] only."""
    return _one_hot(np.cumsum(inputs_NT, axis=1) % V)[positions_NT]


def reads_next(inputs_NT, positions_NT):
    """Predicts x[t+1]: the cheat a byte-level LM's inputs allow."""
    return _one_hot(np.roll(inputs_NT, -1, axis=1))[positions_NT]


def reads_far_ahead(inputs_NT, positions_NT):
    """Causal except for a look 5 tokens ahead on one position in ten."""
    logits = _one_hot(np.cumsum(inputs_NT, axis=1) % V)
    logits[:, ::10] = _one_hot(np.roll(inputs_NT, -5, axis=1))[:, ::10]
    return logits[positions_NT]


def _held_out(rng, n=24, t=32):
    inputs = rng.integers(0, V, size=(n, t))
    positions = np.ones((n, t), bool)
    positions[:, :3] = False  # some positions are not scored
    return inputs, positions


def _disagreement(model, seed=0):
    rng = np.random.default_rng(seed)
    inputs, positions = _held_out(rng)
    swap = harness.SuffixSwap.draw(inputs, positions, rng)
    return swap.disagreement(
        model(inputs, positions), model(swap.inputs, swap.positions), positions
    )[0]


def test_a_causal_model_agrees_before_every_cut_and_cheats_do_not():
    assert _disagreement(causal) == 0.0
    for seed in range(5):  # whatever the secret draws
        assert _disagreement(reads_next, seed) > 1.0
        assert _disagreement(reads_far_ahead, seed) > 1.0


def test_the_swap_keeps_each_window_before_its_cut_and_replaces_it_after():
    rng = np.random.default_rng(3)
    inputs, positions = _held_out(rng)
    swap = harness.SuffixSwap.draw(inputs, positions, rng)
    assert sorted(swap.order) == list(range(len(inputs)))
    for row, i in enumerate(swap.order):
        cut = swap.cuts[i]
        assert positions[i, cut - 1], "the position just before a cut is a scored one"
        np.testing.assert_array_equal(swap.inputs[row, :cut], inputs[i, :cut])
        suffix = swap.inputs[row, cut:]
        donors = [j for j in range(len(inputs)) if np.array_equal(inputs[j, cut:], suffix)]
        assert donors and donors != [i]


def test_reply_fields_and_arrays_are_validated_by_name():
    reply = harness.Reply(
        {"n": 3, "flag": True, "bad": float("inf")},
        {"ok": np.ones((2, 3), np.float32), "ints": np.ones(2, np.int64),
         "nan": np.array([np.nan])},
    )  # fmt: skip
    assert reply.field("n", int) == 3
    with pytest.raises(harness.BadReply, match="no field 'missing'"):
        reply.field("missing", int)
    with pytest.raises(harness.BadReply, match="'flag' is a bool, not int"):
        reply.field("flag", int)
    with pytest.raises(harness.BadReply, match="'bad' is not finite"):
        reply.number("bad")
    assert reply.array("ok", (2, None)).shape == (2, 3)
    with pytest.raises(harness.BadReply, match=r"'ok' has shape \(2, 3\), expected \(3, \*\)"):
        reply.array("ok", (3, None))
    with pytest.raises(harness.BadReply, match="'ints' has dtype int64, expected floating"):
        reply.array("ints")
    with pytest.raises(harness.BadReply, match="'nan' holds non-finite values"):
        reply.array("nan")
    with pytest.raises(harness.BadReply, match="no array 'gone'"):
        reply.array("gone")
    with pytest.raises(harness.BadReply, match=r"unexpected arrays \['ints', 'nan'\]"):
        reply.only(["ok"])


def test_one_candidate_s_bad_reply_or_crash_fails_only_that_candidate():
    def evaluate(candidate):
        if candidate == "bad":
            raise harness.BadReply("outputs: no array 'logits'")
        if candidate == "broken":
            raise KeyError("seed")
        return EvalResult(metrics={0: {"m": 1.0}})

    bad, good, broken = harness.per_candidate(evaluate, ["bad", "good", "broken"])
    assert bad.error == "outputs: no array 'logits'"
    assert good.error is None and good.metrics == {0: {"m": 1.0}}
    assert broken.error == "harness: KeyError: 'seed'"


def test_returned_parameters_are_refused_unless_well_named_and_alike_for_every_seed():
    good = {"param:0:blocks/0/w": np.ones(2, np.float32), "param:1:blocks/0/w": np.ones(2)}
    assert code_mode._returned_params(harness.Reply({}, good), 2).keys() == good.keys()
    for name in ("param:x:w", "param:2:w", "param:0:../../evil", "logits"):
        with pytest.raises(harness.BadReply, match="unexpected array"):
            code_mode._returned_params(harness.Reply({}, {**good, name: np.ones(2)}), 2)
    unlike = {**good, "param:1:blocks/0/w": np.ones(3)}
    with pytest.raises(harness.BadReply, match="differ in names or shapes"):
        code_mode._returned_params(harness.Reply({}, unlike), 2)


def malformed_failures(channel):
    """Sandbox target: answers a check with failures that are not [check, reason] pairs."""
    channel.receive()
    channel.send({"failures": [["interface", 3]]})


def test_a_check_reply_that_is_not_pairs_of_strings_is_a_sandbox_failure():
    programs = harness.Programs(
        "tests.test_harness:malformed_failures",
        sandbox.Limits(timeout_s=60, memory_bytes=2 << 30),
        lambda: workers.Slots([{"PYTHONPATH": REPO}], "one slot that can import tests/"),
    )
    [failure] = programs.check("x = 1\n", {})
    assert failure.check == "sandbox" and "not [check, reason]" in failure.reason


def test_a_sandbox_that_will_not_start_is_tried_again_then_named_infrastructure(monkeypatch):
    starts = []

    def no_fork(self):
        starts.append(1)
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(sandbox.Sandbox, "__enter__", no_fork)
    monkeypatch.setattr(harness.time, "sleep", lambda s: None)
    programs = harness.Programs("x.y:z", sandbox.Limits(), lambda: workers.Slots([{}], "one"))

    def evaluate(candidate):
        with programs.session("x = 1\n"):
            raise AssertionError("never started")

    [result] = harness.per_candidate(evaluate, ["c"])
    assert len(starts) == 3
    assert result.error.startswith("infrastructure: no sandbox started in 3 attempts")
