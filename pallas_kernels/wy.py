"""The WY (UT-transform) representation of a chunk of delta-rule steps, in plain ``jax.numpy``.

Within a chunk the delta rule's product of generalised Householder factors collapses to
``T = (I + tril(diag(beta) (K K^T * Gamma), -1))^-1 diag(beta)``; the kernels then only need
``w = T (e^G * k)`` and ``u = T v`` (Yang et al. 2024, "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length"). Computing them is parallel over chunks and matmul-bound, so it
runs as ordinary XLA code before the sequential kernel, and JAX differentiates it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def unit_lower_solve(
    A_BHCC: jax.Array, rhs_BHCx: jax.Array, block: int = 16, precision=HIGHEST
) -> jax.Array:
    """Solves (I + A) X = rhs for strictly lower-triangular A, with matmuls only.

    Within blocks of ``block`` rows the inverse is the exact product form
    (I + A)^-1 = (I - A)(I + A^2)(I + A^4)...; blocks are then joined by forward substitution.
    Small blocks keep the powers of A (path sums) far from float32 overflow, and no LAPACK
    call is involved: the same algorithm runs on CPU, GPU and TPU.
    """
    _einsum = functools.partial(jnp.einsum, precision=precision)
    C = A_BHCC.shape[-1]
    b = min(block, C)
    if C % b:
        b = C  # odd chunk sizes: a single block
    steps = max(1, (b - 1).bit_length())
    X_blocks = []
    for start in range(0, C, b):
        rows = slice(start, start + b)
        r_BHbx = rhs_BHCx[..., rows, :]
        if X_blocks:  # subtract what the solved blocks contribute
            X_done = jnp.concatenate(X_blocks, axis=-2)
            r_BHbx = r_BHbx - _einsum("bhij,bhjx->bhix", A_BHCC[..., rows, :start], X_done)
        N_BHbb = -A_BHCC[..., rows, rows]
        x_BHbx = r_BHbx
        for _ in range(steps):  # x <- (I + N^(2^m)) x, and square N
            x_BHbx = x_BHbx + _einsum("bhij,bhjx->bhix", N_BHbb, x_BHbx)
            N_BHbb = _einsum("bhij,bhjk->bhik", N_BHbb, N_BHbb)
        X_blocks.append(x_BHbx)
    return jnp.concatenate(X_blocks, axis=-2)


def ut_transform(kk_XNCC, beta_XNC, w_rhs_XNCK, v_XNCV, precision=HIGHEST):
    """Returns (w, u) = (I + A)^-1 [beta * w_rhs, beta * v], A = tril(diag(beta) kk, -1).

    This is the UT / WY representation of a chunk's product of Householder-like factors;
    solving against the unit-lower-triangular (I + A) avoids forming the inverse. ``kk`` holds
    the (decayed) key inner products; only its strictly lower triangle is read.
    """
    C, K = w_rhs_XNCK.shape[-2:]
    strict = jnp.tril(jnp.ones((C, C), dtype=bool), k=-1)
    A_XNCC = jnp.where(strict, beta_XNC[..., :, None] * kk_XNCC, 0.0)
    rhs = beta_XNC[..., None] * jnp.concatenate([w_rhs_XNCK, v_XNCV], axis=-1)
    wu = unit_lower_solve(A_XNCC, rhs, precision=precision)
    return wu[..., :K], wu[..., K:]


def wy_transform(k_XNCK, v_XNCV, beta_XNC, G_XNC=None, precision=HIGHEST):
    """Returns float32 ``(w, u)`` for chunks ``[X, N, C, .]`` (X = batch * heads, N chunks).

    ``G`` is the within-chunk cumulative log-decay (Gated DeltaNet) or None (DeltaNet).
    """
    _einsum = functools.partial(jnp.einsum, precision=precision)
    C = k_XNCK.shape[-2]
    k, v, beta = (x.astype(jnp.float32) for x in (k_XNCK, v_XNCV, beta_XNC))
    strict = jnp.tril(jnp.ones((C, C), dtype=bool), k=-1)
    kk_XNCC = _einsum("xnik,xnjk->xnij", k, k)
    k_rhs = k
    if G_XNC is not None:
        # Mask before exp: above the diagonal G_i - G_j >= 0 and could overflow.
        diff = jnp.where(strict, G_XNC[..., :, None] - G_XNC[..., None, :], -jnp.inf)
        kk_XNCC = kk_XNCC * jnp.exp(diff)
        k_rhs = k * jnp.exp(G_XNC)[..., None]
    return ut_transform(kk_XNCC, beta, k_rhs, v, precision=precision)
