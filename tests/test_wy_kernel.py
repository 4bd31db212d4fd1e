"""The WY transform's Pallas kernels against its plain XLA form (``pallas_kernels.wy``).

The delta rules' end-to-end checks against the recurrent reference (``test_pallas_kernels``)
run through these kernels too; here they are checked on their own, with every gradient.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

import pallas_kernels as pk
from pallas_kernels import wy, wy_kernel


def _inputs(BH=3, N=3, C=16, K=32, V=32, gated=True, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    k = jax.random.normal(keys[0], (BH, N * C, K))
    k = k * jax.lax.rsqrt(jnp.sum(k * k, -1, keepdims=True))
    v = jax.random.normal(keys[1], (BH, N * C, V))
    beta = jax.nn.sigmoid(jax.random.normal(keys[2], (BH, N * C)))
    G = None
    if gated:
        g = -0.3 * jax.nn.softplus(jax.random.normal(keys[3], (BH, N * C)))
        G = jnp.cumsum(g.reshape(BH, N, C), -1).reshape(BH, N * C)
    return k.astype(dtype), v.astype(dtype), beta, G


def _xla(k, v, beta, G, chunk):
    BH, T = k.shape[:2]
    N = T // chunk
    chunks = lambda x: None if x is None else x.reshape(BH, N, chunk, *x.shape[2:])  # noqa: E731
    w, u = wy.wy_transform(chunks(k), chunks(v), chunks(beta), chunks(G))
    return w.reshape(k.shape), u.reshape(v.shape)


def _loss(fn, *args):
    w, u = fn(*args)
    w, u = w.astype(jnp.float32), u.astype(jnp.float32)
    return jnp.sum(w * jnp.cos(w)) + jnp.sum(jnp.sin(u))


@pytest.mark.parametrize(
    ("backend", "chunk"), [("gpu", 16), ("gpu", 64), ("tpu", 16), ("tpu", 24), ("tpu", 64)]
)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_matches_xla_transform(backend, chunk, gated):
    # chunk 64: four 16 x 16 diagonal blocks joined; 24 (TPU only): one block, no joining.
    args = _inputs(C=chunk, gated=gated)
    kernel = functools.partial(wy_kernel.wy_transform, chunk=chunk, backend=backend, interpret=True)
    reference = functools.partial(_xla, chunk=chunk)
    argnums = (0, 1, 2, 3) if gated else (0, 1, 2)
    got = (*kernel(*args), *jax.grad(functools.partial(_loss, kernel), argnums)(*args))
    want = (*reference(*args), *jax.grad(functools.partial(_loss, reference), argnums)(*args))
    names = ("w", "u", "dk", "dv", "dbeta", "dG")
    for name, a, b in zip(names, got, want, strict=False):
        err = np.max(np.abs(a - b)) / (1.0 + np.max(np.abs(b)))
        assert err < 1e-5, f"{backend}/{chunk}: {name} off by {err:.2e} (scaled)"


def test_bfloat16_inputs():
    args = _inputs(C=64, dtype=jnp.bfloat16)
    interpret = jax.default_backend() != "gpu"
    w, u = wy_kernel.wy_transform(*args, chunk=64, backend="gpu", interpret=interpret)
    assert w.dtype == u.dtype == jnp.bfloat16
    w_ref, u_ref = _xla(*(x.astype(jnp.float32) for x in args), chunk=64)
    for a, b in ((w, w_ref), (u, u_ref)):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=3e-2 * np.max(np.abs(b)))


@pytest.mark.parametrize("C", [16, 64, 128])
def test_unit_lower_inverse_is_exact(C):
    A = jax.random.uniform(jax.random.key(C), (C, C), minval=-1.0, maxval=1.0)
    A = jnp.tril(A, -1) / 4  # path sums through a strictly lower matrix grow fast
    X = wy_kernel.unit_lower_inverse(A)
    eye = np.eye(C, dtype=np.float32)
    np.testing.assert_allclose(np.asarray((eye + A) @ X), eye, atol=1e-4)
    np.testing.assert_allclose(np.asarray(X), np.linalg.inv(eye + np.asarray(A)), atol=1e-4)


@pytest.mark.parametrize("C", [16, 64])
def test_xla_inverse_gradient_is_the_inverse_gradient(C):
    """``wy.unit_lower_inverse``'s own VJP against differentiating a dense solve, on the
    strictly lower entries it reads (its gradient elsewhere must be 0)."""
    keys = jax.random.split(jax.random.key(C), 2)
    A = jnp.tril(jax.random.uniform(keys[0], (2, C, C), minval=-1.0, maxval=1.0), -1) / 4
    probe = jax.random.normal(keys[1], (2, C, C))

    def loss(inverse, A):
        return jnp.sum(probe * inverse(A))

    def dense(A):
        return jnp.linalg.solve(jnp.eye(C) + jnp.tril(A, -1), jnp.broadcast_to(jnp.eye(C), A.shape))

    got = jax.grad(functools.partial(loss, wy.unit_lower_inverse))(A)
    want = jax.grad(functools.partial(loss, dense))(A)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    assert not np.any(np.triu(np.asarray(got)))


def _kernel_names(fn, *args):
    """Names of the ``pallas_call`` equations in ``fn``'s jaxpr, nested jaxprs included."""

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                yield eqn.params["name"]
            for sub in jax_core.jaxprs_in_params(eqn.params):
                yield from walk(sub)

    return sorted(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def test_ops_choose_where_the_transform_runs():
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(key, (1, 2, 40, 32)) for key in keys[:3])
    k = k * jax.lax.rsqrt(jnp.sum(k * k, -1, keepdims=True))
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (1, 2, 40)))
    g = -0.3 * jax.nn.softplus(jax.random.normal(keys[4], (1, 2, 40)))
    args = (q, k, v, beta, g)

    def forward(wy):
        # backend "gpu" pins the schedule ("split") whatever the platform, and so the counts.
        return lambda q, k, v, beta, g: pk.gated_delta_rule(
            q, k, v, beta=beta, g=g, chunk_size=16, backend="gpu", wy=wy
        )

    def grad(wy):
        loss = lambda *a: sum(jnp.sum(jnp.sin(x)) for x in forward(wy)(*a))  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))

    # The split recurrence runs two forward kernels (states, outputs) and, under grad, two
    # backward ones. wy="pallas" adds the WY transform's forward kernel (and under grad its
    # backward one); wy="xla" adds none. So 3 vs 2 kernels forward, 6 vs 4 with the gradient.
    recurrence = ["chunk_output_fwd", "chunk_states_fwd"]
    recurrence_bwd = ["chunk_local_grads_bwd", "chunk_state_grads_bwd"]
    assert _kernel_names(forward("pallas"), *args) == sorted([*recurrence, "wy_transform_fwd"])
    assert _kernel_names(forward("xla"), *args) == recurrence
    wy_both = ["wy_transform_bwd", "wy_transform_fwd"]
    assert _kernel_names(grad("pallas"), *args) == sorted(recurrence + recurrence_bwd + wy_both)
    assert _kernel_names(grad("xla"), *args) == sorted(recurrence + recurrence_bwd)

    (o_pallas, s_pallas), (o_xla, s_xla) = forward("pallas")(*args), forward("xla")(*args)
    np.testing.assert_allclose(o_pallas, o_xla, atol=1e-5)
    np.testing.assert_allclose(s_pallas, s_xla, atol=1e-5)
