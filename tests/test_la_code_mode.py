"""The linear-attention space in code mode, end to end on tiny settings.

A scripted model (the fake Gemini server, the real google-genai client) edits the DeltaNet
program; the check and the training run in sandboxed workers; the metrics are computed here
from the logits a worker returns on held-out inputs it receives only after training.
"""

import json
import math

import numpy as np
from flax import nnx

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
    cfg, [trained] = code_mode._train(space._request("train", 0, [5]))
    assert trained.error is None and trained.metrics["learning_rate"] == 1e-2
    task, _ = space.stage_task(0)
    held = code_mode.held_out_mqar(task, [5])
    logits = code_mode._logits_at(cfg, trained.params, held.inputs[0], held.positions[0])
    [(_, accuracy, per_group)] = code_mode.score_logits(logits[None], held, 64)[0].values()

    graphdef, _ = model.abstract(cfg)
    lm = nnx.merge(graphdef, trained.params)
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
