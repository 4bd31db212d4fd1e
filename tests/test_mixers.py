"""Tests for search_spaces.linear_attention.mixers: chunked == recurrent == literal formulas."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from search_spaces.linear_attention import mixers
from search_spaces.linear_attention.mixers import UPDATE_RULES, mix

RULES = sorted(UPDATE_RULES)
DELTA_RULES = [r for r in RULES if UPDATE_RULES[r].uses_beta]
B, H, DK, DV = 2, 2, 8, 4

# Jitted so each test compiles one program instead of dispatching many small eager ops.
jit_mix = jax.jit(mix, static_argnames=("rule", "chunk_size", "impl"))


def make_inputs(rule, seed=0, T=16, beta_max=1.0, with_state=False, dtype=jnp.float32):
    """Random (q, k, v) and the keyword inputs ``rule`` needs; k is L2-normalised.

    Drawn with numpy: eager jax.random would compile a new kernel for every shape.
    """
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, T, DK))
    k = rng.standard_normal((B, H, T, DK))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, H, T, DV))
    kw = {}
    spec = UPDATE_RULES[rule]
    if spec.uses_beta:
        kw["beta"] = beta_max / (1.0 + np.exp(-rng.standard_normal((B, H, T))))
    if spec.uses_decay:
        g_shape = (B, H, T, DK) if rule == "channel_decay" else (B, H, T)
        # log-sigmoid of N(1, 1.5^2): per-step decays from ~0.99 down to ~0.01.
        kw["g"] = -np.logaddexp(0.0, -(1.0 + 1.5 * rng.standard_normal(g_shape)))
    if with_state:
        kw["initial_state"] = 0.5 * rng.standard_normal((B, H, DK, DV))
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    kw = {
        name: jnp.asarray(x, jnp.float32 if name == "initial_state" else dtype)
        for name, x in kw.items()
    }
    return (q, k, v), kw


def assert_close(actual, expected, rtol=1e-4, atol=1e-5):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


@pytest.mark.parametrize("rule", RULES)
# (100, 64): channel decay splits its chunks into sub-chunks of 16 (CHANNEL_DECAY_SUBCHUNK).
@pytest.mark.parametrize(("T", "chunk"), [(5, 8), (16, 8), (37, 16), (100, 64)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_recurrent(rule, T, chunk, with_state):
    (q, k, v), kw = make_inputs(rule, T=T, with_state=with_state)
    o_ref, s_ref = jit_mix(rule, q, k, v, impl="recurrent", **kw)
    o, s = jit_mix(rule, q, k, v, chunk_size=chunk, **kw)
    assert o.shape == (B, H, T, DV) and o.dtype == jnp.float32
    assert s.shape == (B, H, DK, DV) and s.dtype == jnp.float32
    assert_close(o, o_ref)
    assert_close(s, s_ref)


@pytest.mark.parametrize("rule", DELTA_RULES)
def test_negative_eigenvalue_beta(rule):
    (q, k, v), kw = make_inputs(rule, seed=1, T=29, beta_max=2.0, with_state=True)
    assert float(kw["beta"].max()) > 1.0
    o_ref, s_ref = jit_mix(rule, q, k, v, impl="recurrent", **kw)
    o, s = jit_mix(rule, q, k, v, chunk_size=8, **kw)
    assert_close(o, o_ref)
    assert_close(s, s_ref)


@pytest.mark.parametrize("rule", [r for r in RULES if UPDATE_RULES[r].uses_decay])
@pytest.mark.parametrize("chunk", [16, 64])
def test_strong_decay_is_stable(rule, chunk):
    # Decays down to ~e^-300 per step: a chunk's cumulative log-decay reaches the thousands,
    # where differencing cumsums (G_i - G_j) would lose precision and exp(-G) would overflow.
    (q, k, v), kw = make_inputs(rule, seed=12, T=37, with_state=True)
    kw["g"] = 50.0 * kw["g"]
    o_ref, s_ref = jit_mix(rule, q, k, v, impl="recurrent", **kw)
    o, s = jit_mix(rule, q, k, v, chunk_size=chunk, **kw)
    assert bool(jnp.all(jnp.isfinite(o))) and bool(jnp.all(jnp.isfinite(s)))
    assert_close(o, o_ref)
    assert_close(s, s_ref)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("chunk", [8, 64])
def test_gradients_match(rule, chunk):
    (q, k, v), kw = make_inputs(rule, seed=2, T=21, with_state=True)
    args = {"q": q, "k": k, "v": v, **kw}
    rng = np.random.default_rng(3)
    o_cot = jnp.asarray(rng.standard_normal((B, H, 21, DV)), jnp.float32)
    s_cot = jnp.asarray(rng.standard_normal((B, H, DK, DV)), jnp.float32)

    def loss(fn, args):
        o, s = fn(**args)
        return jnp.sum(o * o_cot) + jnp.sum(s * s_cot)

    spec = UPDATE_RULES[rule]
    grad = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
    g_ref = grad(spec.recurrent, args)
    g_chk = grad(functools.partial(spec.chunked, chunk_size=chunk), args)
    assert set(g_ref) == set(args)
    for name in args:
        assert bool(jnp.all(jnp.isfinite(g_chk[name]))), name
        np.testing.assert_allclose(g_chk[name], g_ref[name], rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("rule", RULES)
def test_chunked_is_causal(rule):
    T, t = 20, 11  # t is mid-way through the second chunk of 8
    (q, k, v), kw = make_inputs(rule, seed=4, T=T, with_state=True)
    fn = UPDATE_RULES[rule].chunked
    o, _ = fn(q, k, v, chunk_size=8, **kw)

    def bump(x):
        return x.at[:, :, t].add(0.7)

    kw2 = {name: (bump(x) if name in ("beta", "g") else x) for name, x in kw.items()}
    if "g" in kw2:
        kw2["g"] = jnp.minimum(kw2["g"], 0.0)
    o2, _ = fn(bump(q), bump(k), bump(v), chunk_size=8, **kw2)
    np.testing.assert_allclose(o2[:, :, :t], o[:, :, :t], rtol=0, atol=1e-6)
    assert float(jnp.abs(o2[:, :, t] - o[:, :, t]).max()) > 1e-3


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_zero_decay_reduces_to_undecayed_rule(impl):
    (q, k, v), kw = make_inputs("gated_delta", seed=5, T=19, with_state=True)
    zeros = jnp.zeros((B, H, 19))
    common = dict(initial_state=kw["initial_state"], chunk_size=8, impl=impl)
    for decayed, plain, extra in [
        ("scalar_decay", "linear", {}),
        ("gated_delta", "delta", {"beta": kw["beta"]}),
    ]:
        o, s = mix(decayed, q, k, v, g=zeros, **extra, **common)
        o_ref, s_ref = mix(plain, q, k, v, **extra, **common)
        assert_close(o, o_ref)
        assert_close(s, s_ref)


def test_channel_decay_with_shared_gate_equals_scalar_decay():
    (q, k, v), kw = make_inputs("scalar_decay", seed=6, T=19, with_state=True)
    o_ref, s_ref = mix("scalar_decay", q, k, v, chunk_size=8, **kw)
    g_BHTK = jnp.broadcast_to(kw["g"][..., None], (B, H, 19, DK))
    o, s = mix("channel_decay", q, k, v, chunk_size=8, g=g_BHTK, initial_state=kw["initial_state"])
    assert_close(o, o_ref)
    assert_close(s, s_ref)


def _naive_numpy(rule, q, k, v, beta=None, g=None, initial_state=None):
    """The update rules exactly as written in the module docstring, in float64 numpy."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    q = q * q.shape[-1] ** -0.5
    b_, h_, t_, dk = q.shape
    S = np.zeros((b_, h_, dk, v.shape[-1])) if initial_state is None else np.array(initial_state)
    o = np.zeros(v.shape)
    eye = np.eye(dk)
    for b in range(b_):
        for h in range(h_):
            for t in range(t_):
                kt, vt = k[b, h, t], v[b, h, t]
                if rule == "channel_decay":
                    decay = np.diag(np.exp(g[b, h, t]))
                elif g is not None:
                    decay = np.exp(g[b, h, t]) * eye
                else:
                    decay = eye
                if beta is not None:
                    bt = beta[b, h, t]
                    S[b, h] = decay @ (eye - bt * np.outer(kt, kt)) @ S[b, h]
                    S[b, h] += bt * np.outer(kt, vt)
                else:
                    S[b, h] = decay @ S[b, h] + np.outer(kt, vt)
                o[b, h, t] = q[b, h, t] @ S[b, h]
    return o, S


@pytest.mark.parametrize("rule", RULES)
def test_recurrent_matches_literal_formula(rule):
    (q, k, v), kw = make_inputs(rule, seed=7, T=6, with_state=True)
    o, s = UPDATE_RULES[rule].recurrent(q, k, v, **kw)
    o_ref, s_ref = _naive_numpy(rule, q, k, v, **{n: np.asarray(x) for n, x in kw.items()})
    assert_close(o, o_ref)
    assert_close(s, s_ref)


@pytest.mark.parametrize("rule", RULES)
def test_bf16_inputs(rule):
    (q, k, v), kw = make_inputs(rule, seed=8, T=21, with_state=True)
    (qb, kb, vb), kwb = make_inputs(rule, seed=8, T=21, with_state=True, dtype=jnp.bfloat16)
    o_ref, s_ref = UPDATE_RULES[rule].chunked(q, k, v, chunk_size=8, **kw)
    o, s = UPDATE_RULES[rule].chunked(qb, kb, vb, chunk_size=8, **kwb)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert_close(o.astype(jnp.float32), o_ref, rtol=5e-2, atol=5e-2)
    assert_close(s, s_ref, rtol=5e-2, atol=5e-2)


def test_jit_with_static_chunk_size():
    (q, k, v), kw = make_inputs("gated_delta", seed=9, T=13)
    jitted = jax.jit(mix, static_argnames=("rule", "chunk_size", "impl"))
    o, s = jitted("gated_delta", q, k, v, chunk_size=4, **kw)
    o_ref, s_ref = mix("gated_delta", q, k, v, impl="recurrent", **kw)
    assert_close(o, o_ref)
    assert_close(s, s_ref)


def test_explicit_scale():
    (q, k, v), _ = make_inputs("linear", seed=10, T=7)
    o, _ = mix("linear", q, k, v, scale=1.0, impl="recurrent")
    o_ref, _ = mix("linear", q * DK**-0.5, k, v, scale=DK**0.5, impl="recurrent")
    assert_close(o, o_ref)


def test_unknown_rule_and_impl_raise():
    (q, k, v), _ = make_inputs("linear", T=4)
    with pytest.raises(ValueError, match="no_such_rule"):
        mix("no_such_rule", q, k, v)
    with pytest.raises(ValueError, match="fancy"):
        mix("linear", q, k, v, impl="fancy")


def test_bad_chunk_size_raises():
    (q, k, v), _ = make_inputs("linear", T=4)
    with pytest.raises(ValueError, match="chunk_size"):
        mix("linear", q, k, v, chunk_size=0)


def test_missing_or_unexpected_inputs_raise():
    (q, k, v), _ = make_inputs("linear", T=4)
    with pytest.raises(ValueError, match="requires beta"):
        mix("delta", q, k, v)
    with pytest.raises(ValueError, match="requires g"):
        mix("scalar_decay", q, k, v)
    with pytest.raises(ValueError, match="does not take beta"):
        mix("linear", q, k, v, beta=jnp.ones((B, H, 4)))


def test_registry_flags():
    assert set(UPDATE_RULES) == {"linear", "scalar_decay", "channel_decay", "delta", "gated_delta"}
    assert [r for r in RULES if UPDATE_RULES[r].uses_beta] == ["delta", "gated_delta"]
    decayed = [r for r in RULES if UPDATE_RULES[r].uses_decay]
    assert decayed == ["channel_decay", "gated_delta", "scalar_decay"]


def test_retnet_log_decay():
    log_gamma = mixers.retnet_log_decay(40)
    assert log_gamma.shape == (40,) and log_gamma.dtype == jnp.float32
    expected = np.log1p(-(2.0 ** (-5.0 - np.arange(40))))
    np.testing.assert_allclose(log_gamma, expected, rtol=1e-5)
    assert bool(jnp.all(log_gamma < 0))
