"""The linear-attention space's static checks reject real models built to fail them, and the
training loss and accuracy (``train._masked_xent``) count only the target positions."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from search_spaces.linear_attention import checks, data, genome, mixers, model, train

TINY = dict(d_model=32, head_dim=16, num_layers=1, mlp_ratio=2)
# At the space's own length for chunk 16 (4 * chunk = 64) softmax attention in this tiny model
# grows the FLOPs only ~2.4x as T doubles (under the 2.6x limit): the T-linear projections, MLP
# and head still dominate. At 256 (the space's length at its default chunk of 64) the T^2 scores
# do: ~3.15x.
QUADRATIC_SEQ_LEN = 256


def _cfg():
    g = genome.validate({**genome.SEEDS["deltanet"], **TINY})
    return model.ModelConfig(tuple(g.items()), vocab_size=64, chunk_size=16, impl="chunked")


def _anti_causal_mix(rule, q, k, v, *, chunk_size, impl, **kwargs):
    """Linear attention over the present and the future: o_t = q_t^T sum_{s >= t} k_s v_s^T."""
    kv = jnp.einsum("bhtk,bhtv->bhtkv", k, v)
    states = jnp.cumsum(kv[:, :, ::-1], axis=2)[:, :, ::-1]
    return jnp.einsum("bhtk,bhtkv->bhtv", q, states), states[:, :, 0]


def _softmax_attention_mix(rule, q, k, v, *, chunk_size, impl, **kwargs):
    """Causal softmax attention: every T x T score, so O(T^2) work."""
    T = q.shape[2]
    scores = jnp.einsum("bhtk,bhsk->bhts", q, k) * q.shape[-1] ** -0.5
    scores = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, -jnp.inf)
    o = jnp.einsum("bhts,bhsv->bhtv", jax.nn.softmax(scores, axis=-1), v)
    return o, jnp.zeros((*q.shape[:2], q.shape[-1], v.shape[-1]), jnp.float32)


def test_the_real_model_passes_both_checks():
    cfg = _cfg()
    assert checks.check_causality(cfg, 32) is None
    assert checks.check_subquadratic(cfg, 64) is None
    assert checks.check_subquadratic(cfg, QUADRATIC_SEQ_LEN) is None


def test_causality_rejects_a_model_that_reads_the_future(monkeypatch):
    # The Mixer looks up mixers.mix when called, so the patch reaches the built model.
    monkeypatch.setattr(mixers, "mix", _anti_causal_mix)
    failure = checks.check_causality(_cfg(), 32)
    assert failure is not None and failure.check == "causality"
    assert "depends on later inputs" in failure.reason


def test_subquadratic_rejects_a_model_with_softmax_attention(monkeypatch):
    monkeypatch.setattr(mixers, "mix", _softmax_attention_mix)
    cfg = _cfg()
    assert checks.check_causality(cfg, 32) is None  # causal: only the cost check can catch it
    failure = checks.check_subquadratic(cfg, QUADRATIC_SEQ_LEN)
    assert failure is not None and failure.check == "subquadratic"
    assert "FLOPs grow" in failure.reason


# ------------------------------------------------------------------------------ _masked_xent

IGNORE = data.IGNORE_INDEX


def test_masked_xent_averages_over_target_positions_only():
    probs = [
        [1 / 3, 1 / 3, 1 / 3],  # target 1: -log(1/3); argmax 0 (first of ties), wrong
        [1 / 4, 1 / 2, 1 / 4],  # target 1: -log(1/2); right
        [1 / 4, 1 / 4, 1 / 2],  # target 0: -log(1/4); wrong
        [1.0, 1.0, 1.0],  # ignored; replaced below
    ]
    logits = jnp.log(jnp.array([probs]))
    # Ignored and confidently wrong, yet its argmax 0 matches the 0 standing in for its target.
    logits = logits.at[0, 3].set(jnp.array([1e4, -1e4, 0.0]))
    targets = jnp.array([[1, 1, 0, IGNORE]])
    loss, accuracy = train._masked_xent(logits, targets)
    np.testing.assert_allclose(loss, (math.log(3) + math.log(2) + math.log(4)) / 3, rtol=1e-6)
    np.testing.assert_allclose(accuracy, 1 / 3, rtol=1e-6)


def test_masked_xent_of_an_all_ignored_batch_is_zero_not_nan():
    logits = 1e4 * jax.random.normal(jax.random.key(0), (2, 3, 5))
    loss, accuracy = train._masked_xent(logits, jnp.full((2, 3), IGNORE))
    assert float(loss) == 0.0 and float(accuracy) == 0.0
