import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from evolve_jax.config import RunConfig
from evolve_jax.loop import run
from evolve_jax.search_space import GenomeError, fingerprint
from search_spaces.linear_attention import checkpoints, checks, genome, model, train
from search_spaces.linear_attention.space import LinearAttentionSpace
from tests.conftest import REPO, run_cli

SEED_NAMES = ["linear_attention", "retnet", "gla", "mamba2", "deltanet", "gated_deltanet"]
TINY = dict(d_model=32, head_dim=16, num_layers=1, mlp_ratio=2)


def _tiny(name):
    return genome.validate({**genome.SEEDS[name], **TINY})


def _cfg(g, impl="chunked", vocab=64, chunk=16):
    return model.ModelConfig(tuple(g.items()), vocab, chunk, impl)


# ------------------------------------------------------------------------------ genome


def test_seeds_are_named_and_valid():
    assert list(genome.SEEDS) == SEED_NAMES
    rules = {n: g["update_rule"] for n, g in genome.SEEDS.items()}
    assert rules == {
        "linear_attention": "linear",
        "retnet": "retention",
        "gla": "channel_decay",
        "mamba2": "scalar_decay",
        "deltanet": "delta",
        "gated_deltanet": "gated_delta",
    }
    for g in genome.SEEDS.values():
        assert genome.validate(g) == g


def test_unknown_field_is_named():
    with pytest.raises(GenomeError, match=r"unknown genome field\(s\) \['colour'\]"):
        genome.validate({"colour": "red"})


@pytest.mark.parametrize(
    "field,value",
    [("num_heads", 3), ("update_rule", "softmax"), ("short_conv", 1), ("d_model", True)],
)
def test_out_of_range_value_is_named(field, value):
    with pytest.raises(GenomeError, match=f"genome field '{field}' = {value!r} is out of range"):
        genome.validate({field: value})


def test_inactive_genes_are_canonical():
    a = genome.validate({"update_rule": "linear", "beta": "sigmoid_x2", "decay": "logsigmoid"})
    b = genome.validate({"update_rule": "linear"})
    assert a == b


def test_json_schema_lists_every_gene():
    schema = genome.json_schema()
    assert set(schema["properties"]) == {g.name for g in genome.GENES}
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("name", sorted(genome.OPERATORS))
def test_operators_only_produce_valid_genomes(name):
    op = genome.OPERATORS[name]
    rng = np.random.default_rng(0)
    parents = [genome.SEEDS["deltanet"], genome.SEEDS["gla"]]
    changed = 0
    for _ in range(100):
        child = op.fn(rng, parents[: op.arity])
        assert genome.validate(child) == child
        changed += child != parents[0]
    assert changed > 0


# ------------------------------------------------------------------------------ model


@pytest.mark.parametrize("name", SEED_NAMES)
def test_every_seed_builds_and_chunked_equals_recurrent(name):
    g = _tiny(name)
    tokens = jax.random.randint(jax.random.key(0), (2, 21), 0, 64)
    outs = {}
    for impl in ("chunked", "recurrent"):
        graphdef, params = model.init(_cfg(g, impl), jax.random.key(1))
        outs[impl] = nnx.merge(graphdef, params)(tokens)
    assert outs["chunked"].shape == (2, 21, 64)
    assert bool(jnp.isfinite(outs["chunked"]).all())
    np.testing.assert_allclose(outs["chunked"], outs["recurrent"], rtol=1e-4, atol=1e-4)


def test_param_count_matches_initialised_model():
    cfg = _cfg(_tiny("gated_deltanet"))
    _, params = model.init(cfg, jax.random.key(0))
    assert model.param_count(cfg) == sum(x.size for x in jax.tree.leaves(params))


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="unknown mixer implementation 'pallas2'"):
        _cfg(_tiny("deltanet"), impl="pallas2")


# ------------------------------------------------------------------------------ checks


@pytest.mark.parametrize("name", ["linear_attention", "gated_deltanet"])
def test_seeds_pass_every_check(name):
    cfg = _cfg(_tiny(name))
    assert checks.check_shapes(cfg, 32) is None
    assert checks.check_causality(cfg, 32) is None
    assert checks.check_subquadratic(cfg, 64) is None
    assert checks.check_param_budget(cfg, 10**7) is None


def test_causality_probe_catches_a_look_ahead():
    x = jax.random.normal(jax.random.key(0), (1, 16, 4))
    future, _ = checks.future_dependence(lambda x: jnp.cumsum(x[:, ::-1], 1)[:, ::-1], x, 8)
    assert future > 0.5
    future, _ = checks.future_dependence(lambda x: jnp.cumsum(x, 1), x, 8)
    assert future == 0.0


def test_causality_probe_sees_a_look_ahead_hidden_from_gradients():
    x = jax.random.normal(jax.random.key(0), (1, 16, 4))
    hidden = lambda x: x + jax.lax.stop_gradient(jnp.cumsum(x[:, ::-1], 1)[:, ::-1])  # noqa: E731
    future, _ = checks.future_dependence(hidden, x, 8)
    assert future > 0.5


def test_subquadratic_check_catches_softmax_attention():
    def attention(x):
        return jax.nn.softmax(x @ x.T) @ x

    low = checks.flops(attention, jax.ShapeDtypeStruct((128, 16), jnp.float32))
    high = checks.flops(attention, jax.ShapeDtypeStruct((256, 16), jnp.float32))
    failure = checks.growth_failure(low, high, 128, 2.6)
    assert failure is not None and failure.check == "subquadratic"


def test_param_budget_failure_is_named():
    failure = checks.check_param_budget(_cfg(_tiny("deltanet")), 1000)
    assert failure.check == "param_budget" and "exceed the budget of 1,000" in failure.reason


# ------------------------------------------------------------------------------ space

# One learning rate: stacking is tested on its own below, and compiling costs the suite time.
TINY_OPTIONS = dict(
    short_lm_steps="6", short_lm_batch="2", short_lm_seq_len="32", mqar_steps="6",
    mqar_batch="4", vocab_size="64", seq_len="32", num_pairs="4", lm_steps="4", lm_batch="2",
    lm_seq_len="48", chunk_size="16", learning_rates="1e-2",
)  # fmt: skip


def test_bad_options_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown linear_attention option 'layers'"):
        LinearAttentionSpace(layers="2")
    with pytest.raises(ValueError, match="mqar_steps='many'"):
        LinearAttentionSpace(mqar_steps="many")
    missing = str(tmp_path / "no_such_corpus")
    with pytest.raises(ValueError, match="no_such_corpus"):
        LinearAttentionSpace(corpus=missing)
    with pytest.raises(ValueError, match="baseline 'transformer' is not a seed"):
        LinearAttentionSpace(baseline="transformer")


def test_evaluate_both_stages_and_a_diverging_candidate():
    space = LinearAttentionSpace(**TINY_OPTIONS)
    assert [s.name for s in space.describe().stages] == ["byte_lm_short", "byte_lm"]
    tiny = _tiny("deltanet")
    assert space.check(tiny) == []
    [cheap] = space.evaluate([tiny], 0, [0, 1], jax.devices())
    assert cheap.error is None and set(cheap.metrics) == {0, 1}
    assert 0 < cheap.metrics[0]["val_bpb"] < 10
    # Seeds differ in initialisation and data order, not in the held-out windows.
    assert cheap.metrics[0]["val_bpb"] != cheap.metrics[1]["val_bpb"]
    [costly] = space.evaluate([tiny], 1, [0], jax.devices())
    assert costly.error is None and 0 < costly.metrics[0]["val_bpb"] < 10
    diverging = LinearAttentionSpace(**{**TINY_OPTIONS, "learning_rates": "1e30"})
    [blown] = diverging.evaluate([tiny], 0, [0], jax.devices())
    assert blown.error is not None and blown.error.startswith("finite_loss")


def test_stacked_learning_rates_keep_the_best_and_train_as_if_alone():
    tiny = _tiny("deltanet")
    options = {**TINY_OPTIONS, "cheap_task": "mqar", "num_pairs": "2,4", "mqar_batch": "4"}
    del options["learning_rates"]
    # A learning rate that blows up beside one that trains: the sane one is kept, no error.
    mixed = LinearAttentionSpace(**options, learning_rates="1e30,3e-3")
    [kept] = mixed.evaluate([tiny], 0, [0, 1], jax.devices())
    assert kept.error is None
    assert {m["learning_rate"] for m in kept.metrics.values()} == {3e-3}
    # Two sane ones: whichever is kept trained exactly as it would have alone.
    both = LinearAttentionSpace(**options, learning_rates="1e-3,1e-2")
    [stacked] = both.evaluate([tiny], 0, [0], jax.devices())
    chosen = stacked.metrics[0]["learning_rate"]
    alone = LinearAttentionSpace(**options, learning_rates=str(chosen))
    [single] = alone.evaluate([tiny], 0, [0], jax.devices())
    for name, value in single.metrics[0].items():
        assert stacked.metrics[0][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    # The recall score is the mean over the numbers of pairs.
    m = stacked.metrics[0]
    assert m["mqar_accuracy"] == pytest.approx((m["mqar_accuracy_p2"] + m["mqar_accuracy_p4"]) / 2)


def test_quick_search_on_a_url_workdir_checkpoints_reports_and_restores(tmp_path):
    """A file:// workdir takes the gs:// code path: history, report and checkpoints all land."""
    workdir = str(tmp_path / "la")
    # Two seeds (each full-size seed costs a compilation); every seed trains in test_la_programs.
    options = (*TINY_OPTIONS.items(), ("seeds", "linear_attention,deltanet"))
    config = RunConfig(
        search_space="linear_attention", workdir="file://" + workdir, steps=1,
        samples_per_step=2, promote_top_k=1, space_options=options,
    )  # fmt: skip
    summary = run(config)
    names = [n.name for n in summary.nodes]
    # The baseline is recorded first: every other score is normalised against it.
    assert names[0] == "deltanet" and sorted(names[:2]) == ["deltanet", "linear_attention"]
    assert len(names) == 4
    base = summary.nodes[0]
    assert base.score == pytest.approx(0.5)
    promoted = [n for n in summary.nodes if 1 in n.stages]
    assert base in promoted and len(promoted) >= 2
    assert all(math.isfinite(n.stages[1]["metrics"]["0"]["val_bpb"]) for n in promoted)
    with open(os.path.join(workdir, "report.txt")) as f:
        assert "rank" in f.read()
    for node in promoted:
        assert os.listdir(os.path.join(workdir, "checkpoints", fingerprint(node.candidate)))

    node = next(n for n in promoted if n is not base)
    relative = os.path.relpath(workdir, REPO)  # as a user types it, e.g. runs/quickstart
    for where in ("file://" + workdir, relative):
        done = run_cli(
            "search_spaces.linear_attention.restore", f"--workdir={where}", f"--node={node.id}"
        )
        assert done.returncode == 0, done.stderr
        record = json.loads(done.stdout.splitlines()[0])
        assert record["node"] == node.id and record["seed"] == 0
        # Re-measured on the windows the stage measured: equal up to float round-off.
        recorded = node.stages[1]["metrics"]["0"]["val_bpb"]
        assert record["recorded_val_bpb"] == recorded
        assert record["val_bpb"] == pytest.approx(recorded, rel=1e-5)


def test_checkpoint_restores_the_trained_parameters_exactly(tmp_path):
    space = LinearAttentionSpace(**TINY_OPTIONS)
    g = _tiny("gated_deltanet")
    cfg = space.model_config(g, 1)
    task, budget = space.stage_task(1)
    [trained] = train.train_byte_lm(cfg, task, budget, [3], jax.devices(), space.corpus())
    _, initial = model.init(cfg, jax.random.key(3))
    saved = nnx.to_pure_dict(trained.params)
    # Training moved the weights: restoring the initial ones could not pass the check below.
    pairs = zip(jax.tree.leaves(saved), jax.tree.leaves(nnx.to_pure_dict(initial)), strict=True)
    assert any(not np.array_equal(a, b) for a, b in pairs)
    directory = "file://" + str(tmp_path / "ckpt")
    [path] = checkpoints.save(directory, g, 1, {3: trained.params}, {"note": "test"})
    assert checkpoints.list_checkpoints(directory) == [path]
    lm, meta = checkpoints.restore(path, lambda meta: space.model_config(meta["genome"], 1))
    assert meta == {"genome": g, "stage": 1, "seed": 3, "options": {"note": "test"}}
    restored = nnx.to_pure_dict(nnx.state(lm, nnx.Param))
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(a, b)
    loss, _ = train.evaluate(lm, *space.validation_windows())
    assert loss / math.log(2) == pytest.approx(trained.metrics["val_bpb"], rel=1e-5)


def test_a_model_structure_is_compiled_once_per_process():
    from evolve_jax.evaluation import population

    space = LinearAttentionSpace(**TINY_OPTIONS)
    tiny = _tiny("retnet")
    [first] = space.evaluate([tiny], 0, [0], jax.devices()[:1])
    before = population._compiled.cache_info()
    [again] = space.evaluate([dict(tiny)], 0, [0], jax.devices()[:1])
    after = population._compiled.cache_info()
    # The same program object, so JAX's cache holds its compilation; the same numbers too.
    assert after.misses == before.misses and after.hits == before.hits + 1
    assert again.metrics == first.metrics
