"""The linear-attention space in code mode, end to end on tiny settings.

A scripted model (the fake Gemini server, the real google-genai client) edits the DeltaNet
program; the check and the training run in sandboxed workers; the metrics are computed here
from the logits a worker returns on held-out inputs it receives only after training.
"""

import json
import math

import numpy as np
from flax import nnx

from benchmarks import hostile_programs
from evolve_jax import loop
from evolve_jax.memory.history import History
from evolve_jax.search_space import fingerprint
from search_spaces.linear_attention import checkpoints, code_mode, data, model, train
from search_spaces.linear_attention.space import LinearAttentionSpace
from tests.test_code_mode import keys, prices, server  # noqa: F401 (fixtures)
from tests.test_gemini import RESEARCHER, _config

TINY = {
    "mode": "code", "seeds": "deltanet", "short_lm_steps": "12", "short_lm_batch": "4",
    "short_lm_seq_len": "32", "mqar_steps": "12", "mqar_batch": "8", "vocab_size": "64",
    "seq_len": "32", "num_pairs": "2,4", "chunk_size": "16", "lm_steps": "4", "lm_batch": "4",
    "lm_seq_len": "48", "sandbox_timeout_s": "600", "sandbox_memory_gb": "8",
    "learning_rates": "1e-2",
}  # fmt: skip
BETA = "beta_BHT = jax.nn.sigmoid(self.b_proj(x_BTD)).transpose(0, 2, 1)"


def test_code_mode_run_edits_trains_promotes_and_checkpoints(tmp_path, server, prices):  # noqa: F811
    edit = {"search": BETA, "replace": BETA.replace("= jax.nn", "= 2.0 * jax.nn")}
    answer = {"name": "negative eigenvalues", "motivation": "beta in (0, 2)", "edits": [edit]}
    server.enqueue(text=json.dumps(answer), model=RESEARCHER)
    config = _config(
        tmp_path, server, prices, search_space="linear_attention", steps=1, samples_per_step=1,
        promote_top_k=2, llm={"concurrency": 1, "edit_mix": "diff=1", "novelty_retries": 0},
    )  # fmt: skip
    space = LinearAttentionSpace(**TINY)
    summary = loop.run(config, space)
    seed, child = sorted(summary.nodes, key=lambda n: n.id)
    assert seed.name == "deltanet" and seed.ok, seed.reason
    assert child.ok and child.operator == "gemini_diff", child.reason
    assert "2.0 * jax.nn.sigmoid" in child.candidate["source"]
    assert 0 < child.metrics["byte_lm_short"]["0"]["val_bpb"] < 10
    assert "vs_baseline" in child.stats
    # Promotion: the byte-LM stage ran in a worker; its parameters came back and were saved.
    history = History(summary.workdir)
    history.refresh_stages()
    promoted = [n for n in history.nodes() if 1 in n.stages]
    assert len(promoted) == 2 and all(n.stages[1]["status"] == "ok" for n in promoted)
    node = promoted[-1]
    recorded = node.stages[1]["metrics"]["0"]["val_bpb"]
    directory = f"{summary.workdir}/checkpoints/{fingerprint(node.candidate)}"
    [path] = checkpoints.list_checkpoints(directory)
    # Restored here (the program runs in this process), the weights give the recorded val_bpb.
    lm, meta = checkpoints.restore(path, lambda m: space.model_config(m["genome"], m["stage"]))
    assert meta["genome"] == node.candidate
    loss, _ = train.evaluate(lm, *space.validation_windows())
    assert math.isclose(loss / math.log(2), recorded, rel_tol=1e-4)


def test_worker_trains_mqar_and_the_controller_scores_it_as_genome_mode_would(
    tmp_path, monkeypatch
):
    """cheap_task=mqar in code mode: the worker trains from the request alone, and the
    controller's score of its logits equals genome mode's sparse evaluation of the same weights."""
    space = LinearAttentionSpace(**{**TINY, "cheap_task": "mqar"})
    (tmp_path / "candidate.py").write_text(space.seeds()["deltanet"]["source"])
    monkeypatch.chdir(tmp_path)  # where a worker finds its program
    state = {}
    reply, params = code_mode._train(state, space._request("train", 0, [5]), {})
    assert reply["learning_rate"] == [1e-2] and all(k.startswith("param:0:") for k in params)
    task, _ = space.stage_task(0)
    held = code_mode.held_out_mqar(task, [5])  # genome mode's test set, to compare with it
    _, out = code_mode._outputs(state, {}, {"inputs": held.inputs, "positions": held.positions})
    [(_, accuracy, per_group)] = code_mode.score_logits(out["logits"], held, 64)[0].values()

    cfg, [trained] = state["cfg"], state["params"]
    graphdef, _ = model.abstract(cfg)
    lm = nnx.merge(graphdef, trained)
    expected = {}
    for pairs, (inputs, positions, targets) in zip(
        task.num_pairs, train.mqar_examples(task, 5, 1, task.test_examples), strict=True
    ):
        supervised = targets != data.IGNORE_INDEX
        hits = np.asarray(lm.logits_at(inputs, positions)).argmax(-1) == targets
        expected[f"mqar_accuracy_p{pairs}"] = hits[supervised].mean()
    assert per_group.keys() == expected.keys()
    for name, value in expected.items():
        assert math.isclose(per_group[name], value, abs_tol=1e-6), name
    assert math.isclose(accuracy, np.mean(list(expected.values())), abs_tol=1e-6)
    # The verify job rebuilds the model from the returned arrays: the same logits.
    _, again = code_mode._verify_job(
        space._request("verify", 0, [5]),
        {**params, "inputs": held.inputs, "positions": held.positions},
    )
    np.testing.assert_allclose(again["logits"], out["logits"], atol=1e-5)


def test_code_mode_scores_mqar_on_a_secret_split_kept_in_the_workdir(tmp_path):
    """Genome mode's MQAR test set is a function of the seed that a program could regenerate
    with its answers; code mode draws its held-out examples from a split only the controller
    knows, the same for a resumed run."""
    first = LinearAttentionSpace(**{**TINY, "cheap_task": "mqar"})
    first.bind(str(tmp_path))
    again = LinearAttentionSpace(**{**TINY, "cheap_task": "mqar"})
    again.bind(str(tmp_path))
    other = LinearAttentionSpace(**{**TINY, "cheap_task": "mqar"})
    other.bind(str(tmp_path / "another_run"))
    task, _ = first.stage_task(0)
    secret = code_mode.held_out_mqar(task, [0], first._held_out_split)
    assert first._held_out_split == again._held_out_split
    assert first._held_out_split != other._held_out_split
    public = code_mode.held_out_mqar(task, [0])
    assert not np.array_equal(secret.inputs, public.inputs)


def test_the_controller_scores_logits_and_refuses_bad_ones():
    held = code_mode.HeldOut(
        inputs=np.zeros((1, 2, 4), np.int32),
        positions=np.array([[[0, 1, 0, 1], [0, 0, 1, 1]]], bool),
        targets=np.array([[3, 1, 2, 0]], np.int32),
    )
    perfect = np.full((1, 4, 5), -10.0, np.float32)
    perfect[0, np.arange(4), held.targets[0]] = 10.0
    scores, error = code_mode.score_logits(perfect, held, 5)
    assert error is None and scores[0][1] == 1.0 and scores[0][0] < 1e-6
    _, error = code_mode.score_logits(perfect[:, :3], held, 5)
    assert error.startswith("outputs: logits of shape (1, 3, 5), expected (1, 4, 5)")
    perfect[0, 0, 0] = np.nan
    _, error = code_mode.score_logits(perfect, held, 5)
    assert error == "outputs: the logits hold non-finite values"


# ---------------------------------------------------------------- hostile programs

# An honest DeltaNet that fails if any array but its training windows is in sight while the
# train job runs (its import runs inside that job): held-out data must come only later.
_SPY = """
import sys as _sys

_frame, _seen = _sys._getframe(), set()
while _frame is not None:
    _request, _arrays = _frame.f_locals.get("request"), _frame.f_locals.get("arrays")
    if isinstance(_request, dict) and _request.get("job") == "train" and isinstance(_arrays, dict):
        _seen |= set(_arrays)
    _frame = _frame.f_back
if _seen - {"windows"}:
    raise RuntimeError(f"the train job could see {sorted(_seen)}")
"""


def _deltanet_with(prelude: str) -> str:
    return hostile_programs._with(hostile_programs._seed_source(), prelude=prelude)


def test_a_program_that_reads_later_tokens_when_scored_fails_and_its_siblings_do_not():
    """Issue 27, holes 1, 2 and 6: a mixer that reads x[t+1] once it has switched the worker's
    causality check off, a program that patches the worker's logits function to predict the
    next input, and one that adds a bogus array to its replies each fail with their own
    reason; the honest program evaluated in the same call scores, and it never saw held-out
    data while training."""
    hostile = hostile_programs.programs()
    names = ("patches_the_check", "patches_the_logits", "tampers_with_replies")
    batch = [{"source": hostile[name][1]} for name in names]
    batch.append({"source": _deltanet_with(_SPY)})
    results = LinearAttentionSpace(**TINY).evaluate(batch, 0, [0], None)
    reasons = dict(zip(names, (r.error or "" for r in results), strict=False))
    assert reasons["patches_the_check"].startswith("non-causal when scored"), reasons
    assert reasons["patches_the_logits"].startswith("non-causal when scored"), reasons
    assert "unexpected array 'param:x:../../evil'" in reasons["tampers_with_replies"], reasons
    honest = results[-1]
    assert honest.error is None, honest.error
    assert 0 < honest.metrics[0]["val_bpb"] < 8


def test_a_mixer_causal_only_at_batch_one_fails_the_check_at_the_training_batch():
    space = LinearAttentionSpace(**TINY)
    [failure] = space.check({"source": hostile_programs.programs()["future_when_batched"][1]})
    assert failure.check == "causality" and "batch 4, length 32" in failure.reason, failure


def test_the_corpus_is_out_of_the_program_s_sight():
    space = LinearAttentionSpace(**TINY)
    locations = space.options.corpus_locations()
    assert locations, "the default corpus's module was not found on this machine"
    probe = f"""
import importlib, os
_seen = [p for p in {locations!r} if os.path.exists(p) and os.listdir(p)]
try:
    importlib.import_module("pydoc_data.topics")
    _seen.append("pydoc_data.topics imports")
except ImportError:
    pass
raise RuntimeError(f"corpus visible: {{_seen}}" if _seen else "corpus hidden")
"""
    [failure] = space.check({"source": _deltanet_with(probe)})
    # The traceback quotes the source line too: what counts is the exception's own line.
    assert failure.reason.splitlines()[-1] == "RuntimeError: corpus hidden", failure.reason
