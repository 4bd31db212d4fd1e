"""Checkpoints of candidates promoted in a job of two processes (jax.distributed), on tiny settings.

Each process checkpoints the candidates it trained; every promoted node's checkpoint is then
restored here and its weights give the stage-1 val_bpb the run recorded.
"""

import math

import jax

from evolve_jax.memory.history import History
from evolve_jax.search_space import fingerprint
from search_spaces.linear_attention import checkpoints, train
from search_spaces.linear_attention.space import LinearAttentionSpace
from tests.test_cluster import _free_port, _start

TINY = {
    "seeds": "deltanet,gla", "short_lm_steps": "2", "short_lm_batch": "2",
    "short_lm_seq_len": "32", "learning_rates": "1e-2", "chunk_size": "16", "lm_steps": "2",
    "lm_batch": "2", "lm_seq_len": "32", "lm_width": "1",
}  # fmt: skip


def test_two_processes_checkpoint_every_promoted_candidate(tmp_path):
    workdir = str(tmp_path / "run")
    job = (
        "--search_space=linear_attention", f"--workdir={workdir}", "--steps=0", "--eval_seeds=1",
        "--promote_top_k=2", f"--coordinator_address=127.0.0.1:{_free_port()}",
        "--num_processes=2", "--answer_timeout_s=120",
        *(f"--space_opt={k}={v}" for k, v in TINY.items()),
    )  # fmt: skip
    procs = [_start(*job, f"--process_id={p}") for p in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
    # Process 1 trained one seed at stage 0 and one promoted candidate at stage 1.
    worker = outs[1][0].strip().splitlines()[-1]
    assert worker.startswith("process 1 of 2: evaluated 2 "), worker
    history = History(workdir)
    history.refresh_stages()
    promoted = [n for n in history.nodes() if 1 in n.stages]
    # Both seeds were promoted.
    assert sorted(n.name for n in promoted) == ["deltanet", "gla"]
    assert all(n.stages[1]["status"] == "ok" for n in promoted), [n.stages for n in promoted]
    space = LinearAttentionSpace(**TINY)
    for node in promoted:
        directory = f"{workdir}/checkpoints/{fingerprint(node.candidate)}"
        [path] = checkpoints.list_checkpoints(directory)
        lm, meta = checkpoints.restore(path, lambda m: space.model_config(m["genome"], m["stage"]))
        assert meta["genome"] == node.candidate
        loss, _ = train.evaluate(lm, *space.validation_windows())
        recorded = node.stages[1]["metrics"][str(meta["seed"])]["val_bpb"]
        assert math.isclose(loss / math.log(2), recorded, rel_tol=1e-4), node.name


def test_a_checkpoint_that_cannot_be_saved_fails_only_its_candidate(tmp_path, monkeypatch):
    space = LinearAttentionSpace(**TINY)
    space.bind(str(tmp_path))
    seeds = space.seeds()
    real = checkpoints.save

    def save(directory, genome, *args):
        if genome["update_rule"] == seeds["gla"]["update_rule"]:
            raise OSError("disk full")
        return real(directory, genome, *args)

    monkeypatch.setattr(checkpoints, "save", save)
    gla, deltanet = space.evaluate(
        [seeds["gla"], seeds["deltanet"]], 1, [0], jax.local_devices()[:1]
    )
    assert gla.error == "checkpoint not saved: OSError: disk full" and not gla.metrics
    assert deltanet.error is None and deltanet.metrics[0]["val_bpb"] > 0
    directory = f"{tmp_path}/checkpoints/{fingerprint(seeds['deltanet'])}"
    assert len(checkpoints.list_checkpoints(directory)) == 1
