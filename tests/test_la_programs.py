"""The code-mode seed programs of the linear-attention space (``programs/``): each is the template
with its EVOLVE-BLOCK filled, builds a causal model of the right shapes, computes exactly what its
genome twin computes and trains to finite losses; the causality check catches programs that read
the future, and ``program_api.mix`` runs with the harness's settings."""

import importlib
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from evolve_jax import programs
from search_spaces.linear_attention import checks, genome, mixers, model, program_api, train

PROGRAMS = os.path.join(os.path.dirname(model.__file__), "programs")
SEEDS = ("linear_attention", "retnet", "mamba2", "gla", "deltanet", "gated_deltanet")
TINY = dict(d_model=32, head_dim=16, num_layers=1, mlp_ratio=2)
CHUNK = 16
FRAME = "deltanet"  # the genome whose shape and MLP genes a program's model takes (the baseline)


@pytest.fixture(autouse=True)
def _chunked_settings():
    before = program_api.settings()
    program_api.configure(CHUNK, "chunked")
    yield
    program_api.configure(before.chunk_size, before.impl)


def _read(name: str) -> str:
    with open(os.path.join(PROGRAMS, f"{name}.py"), encoding="utf-8") as f:
        return f.read()


def _mixer(name: str):
    return importlib.import_module(f"search_spaces.linear_attention.programs.{name}").TokenMixer


def _exec_module(source: str) -> types.ModuleType:
    """A program run from its text, as the harness runs a candidate."""
    module = types.ModuleType("candidate")
    exec(compile(source, "candidate.py", "exec"), module.__dict__)
    return module


def _cfg(mixer=None, name: str = FRAME, shape=TINY) -> model.ModelConfig:
    genes = genome.validate({**genome.SEEDS[name], **shape})
    return model.ModelConfig(tuple(genes.items()), 64, CHUNK, "chunked", mixer=mixer)


def _undecayed(params) -> list[str]:
    """The parameters training leaves out of weight decay, by path."""
    mask = jax.tree_util.tree_leaves_with_path(train._weight_decay_mask(params))
    return [jax.tree_util.keystr(path) for path, decayed in mask if not decayed]


def _with_block(block: str) -> str:
    template = programs.Program.parse(_read("template"))
    return template.with_blocks([block]).source


# ------------------------------------------------------------------------------ the texts


def test_there_is_one_program_per_genome_seed():
    assert sorted(SEEDS) == sorted(genome.SEEDS)
    assert sorted(f for f in os.listdir(PROGRAMS) if f.endswith(".py")) == sorted(
        [f"{name}.py" for name in SEEDS] + ["__init__.py", "template.py"]
    )


def test_template_is_a_frame_around_one_placeholder_block():
    source = _read("template")
    template = programs.Program.parse(source)
    assert len(template.blocks) == 1
    assert all(line.lstrip().startswith("#") for line in template.blocks[0].splitlines())
    assert template.frame[1].strip() == "# EVOLVE-BLOCK-END"  # nothing after the block
    assert "TokenMixer" not in vars(_exec_module(source))


@pytest.mark.parametrize("name", SEEDS)
def test_text_outside_the_block_is_the_templates(name):
    template = programs.Program.parse(_read("template"))
    program = programs.Program.parse(_read(name))
    programs.check_frame(template, program)  # raises on any changed byte outside the block
    assert program.frame == template.frame


# ------------------------------------------------------------------------------ the models


@pytest.mark.parametrize("name", SEEDS)
def test_model_and_state_shapes_at_the_frames_size(name):
    mixer = _mixer(name)
    cfg = _cfg(mixer, shape={})  # the frame genome's own shapes, as the search builds them
    g = cfg.g
    assert checks.check_shapes(cfg, 64) is None  # logits [2, 64, vocab]
    B, T, D, H, K = 2, 40, cfg.d_model, g["num_heads"], g["head_dim"]

    def call(x_BTD, state):
        return mixer(D, H, K, rngs=nnx.Rngs(params=0))(x_BTD, state)

    x = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
    y, state = jax.eval_shape(call, x, None)
    assert y.shape == (B, T, D)
    assert state.shape[:3] == (B, H, K) and len(state.shape) == 4
    y2, state2 = jax.eval_shape(call, x, state)  # a given initial state is taken
    assert (y2.shape, state2.shape) == (y.shape, state.shape)


@pytest.mark.parametrize("name", SEEDS)
def test_param_count_is_within_2x_of_the_genome_twins(name):
    code = model.param_count(_cfg(_mixer(name), shape={}))
    twin = model.param_count(_cfg(name=name, shape={}))
    assert twin / 2 <= code <= 2 * twin


@pytest.mark.parametrize("name", SEEDS)
def test_computes_what_its_genome_twin_computes(name):
    # Same layers built in the same order from the same key: the code seed is its genome twin,
    # parameter for parameter (names included, so weight decay skips the same ones), and
    # learns MQAR exactly as the twin does.
    code_cfg, twin_cfg = _cfg(_mixer(name)), _cfg(name=name)
    key = jax.random.key(0)
    code_def, code_params = model.init(code_cfg, key)
    twin_def, twin_params = model.init(twin_cfg, key)
    assert jax.tree.structure(code_params) == jax.tree.structure(twin_params)
    for a, b in zip(jax.tree.leaves(code_params), jax.tree.leaves(twin_params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _undecayed(code_params) == _undecayed(twin_params)
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, 64)  # 40: a partial chunk too
    np.testing.assert_allclose(
        nnx.merge(code_def, code_params)(tokens),
        nnx.merge(twin_def, twin_params)(tokens),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("name", SEEDS)
def test_is_causal(name):
    assert checks.check_causality(_cfg(_mixer(name)), 32) is None


# One seed, the one with every kind of parameter (beta, decay, gate): a training program costs
# ~20 s of CPU to compile, and every seed is bitwise its genome twin
# (test_computes_what_its_genome_twin_computes), so each trains as its twin does.
@pytest.mark.parametrize("name", ["gated_deltanet"])
def test_trains_to_finite_losses(name):
    (result,) = train.train_mqar(
        _cfg(_mixer(name)),
        train.MQARConfig(vocab_size=64, seq_len=CHUNK, num_pairs=(2, 4), test_examples=8),
        train.TrainConfig(steps=5, batch_size=4),
        seeds=[0],
        devices=jax.devices()[:1],
    )
    assert result.error is None
    assert np.isfinite(result.metrics["final_train_loss"])
    assert np.isfinite(result.metrics["mqar_loss"])


# A well-formed program whose mixer reads the future: shapes and cost are fine, only the
# causality probe can tell.
_SUFFIX_SUM = '''
class TokenMixer(nnx.Module):
    """o_t = sum_{s >= t} v_s: a cumulative sum run from the end of the sequence."""

    def __init__(self, d_model, num_heads, head_dim, *, rngs):
        self.H, self.K = num_heads, head_dim
        self.proj = nnx.Linear(d_model, d_model, rngs=rngs)

    def __call__(self, x_BTD, state=None):
        B, T, D = x_BTD.shape
        v_BTD = self.proj(x_BTD)
        y_BTD = jnp.cumsum(v_BTD[:, ::-1], axis=1)[:, ::-1]
        return y_BTD, jnp.zeros((B, self.H, self.K, self.K))
'''
_FLIPPED = _SUFFIX_SUM.replace(
    "jnp.cumsum(v_BTD[:, ::-1], axis=1)[:, ::-1]", "jnp.cumsum(jnp.flip(v_BTD, 1), axis=1)"
).replace("a cumulative sum run from the end", "the reversed sequence's prefix sums")


@pytest.mark.parametrize("block", [_SUFFIX_SUM, _FLIPPED], ids=["suffix_sum", "flip"])
def test_causality_check_rejects_a_program_that_reads_the_future(block):
    source = _with_block(block)
    programs.check_frame(programs.Program.parse(_read("template")), programs.Program.parse(source))
    cfg = _cfg(_exec_module(source).TokenMixer)
    assert checks.check_shapes(cfg, 32) is None
    failure = checks.check_causality(cfg, 32)
    assert failure is not None and failure.check == "causality"


# ------------------------------------------------------------------------------ program_api


def test_mix_runs_with_the_configured_chunk_size_and_impl(monkeypatch):
    seen = {}

    def record(rule, q, k, v, **kwargs):
        seen.update(kwargs, rule=rule)
        return v, None

    monkeypatch.setattr(mixers, "mix", record)
    program_api.configure(8, "recurrent")
    q = jnp.ones((1, 1, 4, 2))
    program_api.mix("delta", q, q, q, beta=jnp.ones((1, 1, 4)))
    assert seen["rule"] == "delta"
    assert (seen["chunk_size"], seen["impl"]) == (8, "recurrent")
    assert seen["g"] is None and seen["initial_state"] is None


@pytest.mark.parametrize(
    "chunk_size,impl", [(0, "chunked"), (16.0, "chunked"), (True, "chunked"), (16, "cuda")]
)
def test_configure_rejects_bad_settings(chunk_size, impl):
    with pytest.raises(ValueError):
        program_api.configure(chunk_size, impl)
    assert program_api.settings() == program_api.Settings(CHUNK, "chunked")  # unchanged


def test_api_reexports_the_models_own_parts():
    assert program_api.ShortConv is model.ShortConv
    assert program_api.feature_map is model.feature_map
    assert program_api.qk_normalise is model.qk_normalise
    assert program_api.retnet_log_decay is mixers.retnet_log_decay
    assert program_api.DT_INIT is model.DT_INIT
    assert program_api.OUTPUT_GATE_BIAS is model.OUTPUT_GATE_BIAS
    assert set(program_api.RULES) == set(mixers.UPDATE_RULES)
