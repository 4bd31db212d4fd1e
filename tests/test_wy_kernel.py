"""The WY transform's Pallas kernels against its plain XLA form (``pallas_kernels.wy``).

The delta rules' end-to-end checks against the recurrent reference (``test_pallas_kernels``)
run through these kernels too; here they are checked on their own, with every gradient.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_ops_choose_where_the_transform_runs():
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(key, (1, 2, 40, 32)) for key in keys[:3])
    k = k * jax.lax.rsqrt(jnp.sum(k * k, -1, keepdims=True))
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (1, 2, 40)))
    g = -0.3 * jax.nn.softplus(jax.random.normal(keys[4], (1, 2, 40)))
    run = functools.partial(pk.gated_delta_rule, q, k, v, beta=beta, g=g, chunk_size=16)
    (o_pallas, s_pallas), (o_xla, s_xla) = run(wy="pallas"), run(wy="xla")
    np.testing.assert_allclose(o_pallas, o_xla, atol=1e-5)
    np.testing.assert_allclose(s_pallas, s_xla, atol=1e-5)
