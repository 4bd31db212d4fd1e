"""Checkpoints of candidates promoted in a job of two processes (jax.distributed), on tiny settings.

Each process checkpoints the candidates it trained; every promoted node's checkpoint is then
restored here and its weights give the stage-1 val_bpb the run recorded.
"""

import math

import jax

from evolve_jax.loop import same_history
from evolve_jax.memory.history import History
from evolve_jax.search_space import fingerprint
from search_spaces.linear_attention import checkpoints, train
from search_spaces.linear_attention.space import LinearAttentionSpace
from tests.conftest import run_cli
from tests.test_cluster import _free_port, _start, _worker_stages

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
        "--num_processes=2", *(f"--space_opt={k}={v}" for k, v in TINY.items()),
    )  # fmt: skip
    procs = [_start(*job, f"--process_id={p}") for p in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
    # Process 1 trained a promoted candidate at stage 1 (and checkpointed it).
    assert 1 in _worker_stages(outs[1][1]), outs[1][1]
    # The same search in one process with as many devices: the same history, to the last bit
    # of every val_bpb (the group size depends on the devices per process, not on the dealing).
    alone = str(tmp_path / "alone")
    single = [a for a in job if not a.startswith(("--coordinator_address", "--num_processes"))]
    single = [a.replace(workdir, alone) for a in single]
    done = run_cli("evolve_jax.main", *single)
    assert done.returncode == 0, done.stderr
    assert same_history(History(alone).nodes(), History(workdir).nodes())

    def stage_metrics(path):
        history = History(path)
        history.refresh_stages()
        return {n.id: {s: r["metrics"] for s, r in n.stages.items()} for n in history.nodes()}

    assert stage_metrics(alone) == stage_metrics(workdir)
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
