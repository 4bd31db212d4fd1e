"""The WY transform of the delta rules as Pallas kernels, forward and backward, for both backends.

Per chunk (``pallas_kernels.wy`` has the same transform in plain XLA, the reference here):

    A = tril(diag(beta) (k k^T * Gamma), -1)     Gamma_ij = e^(G_i - G_j) (all ones without G)
    T = (I + A)^-1
    w = T (beta * e^G * k),   u = T (beta * v)

In XLA this is a chain of small batched matmuls, each of which writes its ``[C, C]`` or
``[C, K + V]`` intermediate for every chunk to device memory. Here one program reads a chunk's
``k, v, beta, G`` and writes only ``w, u``, and when training ``T`` in the inputs' dtype (as
flash-linear-attention keeps it: the backward kernel reads it instead of inverting again).
Chunks are independent, so the grid ``(BH, N)`` is parallel on both backends and one kernel
body serves both: blocks are whole in their trailing dimensions, and the per-step scalars
``beta`` and ``G`` arrive as columns ``[BH, T, 1]`` (``G`` also as rows ``[BH, N, 1, C]``),
the layouts Mosaic accepts without an in-kernel transpose.

The inverse uses matmuls only, so no kernel needs a triangular solve: with ``D`` the 16 x 16
diagonal blocks of ``A`` and ``L = A - D``, ``I + A = (I + D)(I + M)`` for ``M = (I + D)^-1 L``.
Both ``D`` and ``M`` are nilpotent (``D^16 = 0``; ``M`` is strictly block-lower, so
``M^(C/16) = 0``), and ``(I + N)^-1 = (I - N)(I + N^2)(I + N^4)...`` is exact after
``log2`` of that index factors. Powers of ``D`` stay inside 16 x 16 blocks, far from float32
overflow. A chunk of 64 takes 10 ``[C, C]`` matmuls.

Backward, from ``dw, du``: ``dR = T^T [dw, du]`` for the right-hand sides, and since
``dT = [dw, du] R^T``, ``dA = -T^T dT T^T = -(dR_k w^T + dR_v u^T)`` on the strict lower
triangle; the rest is the chain rule through ``A`` and the right-hand sides.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt

from pallas_kernels.chunk_math import _iota, decay_matrix, g_layouts, mm, mm_t, t_mm

f32 = jnp.float32
DIAGONAL_BLOCK = 16


# ---------------------------------------------------------------------------- per-chunk math


def _mm_f32(a, b, precise: bool):
    """a @ b on float32 operands: full precision, or the hardware's fast float32 path (TF32 on
    GPUs, bfloat16 passes on TPUs) when the inputs were low precision to begin with."""
    precision = jax.lax.Precision.HIGHEST if precise else jax.lax.Precision.DEFAULT
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision)


def _nilpotent_inverse(N, index, eye, precise):
    """(I + N)^-1 for N with N^index = 0: (I - N)(I + N^2)(I + N^4)... (commuting factors)."""
    X, P, reach = eye - N, N, 2  # X = sum of (-N)^i for i < reach
    while reach < index:
        P = _mm_f32(P, P, precise)
        X = X + _mm_f32(P, X, precise)
        reach *= 2
    return X


def unit_lower_inverse(A, precise: bool = True):
    """(I + A)^-1 for a strictly lower-triangular float32 ``A`` [C, C], by matmuls only."""
    C = A.shape[0]
    b = DIAGONAL_BLOCK if C % DIAGONAL_BLOCK == 0 else C
    rows, cols = _iota((C, C), 0), _iota((C, C), 1)
    eye = jnp.where(rows == cols, 1.0, 0.0).astype(f32)
    if b == C:
        return _nilpotent_inverse(A, C, eye, precise)
    shift = b.bit_length() - 1  # i // b as a shift: Mosaic has no vector integer division
    block_of = lambda i: jax.lax.shift_right_logical(i, shift)  # noqa: E731
    D = jnp.where(block_of(rows) == block_of(cols), A, 0.0)
    X = _nilpotent_inverse(D, b, eye, precise)
    M = _mm_f32(X, A - D, precise)
    return _mm_f32(_nilpotent_inverse(M, C // b, eye, precise), X, precise)


def _decay(G_col, G_row, C):
    """(Gamma [C, C] on the strict lower triangle, e^G [C, 1] or None without decay)."""
    gamma = decay_matrix(G_col, G_row, C, diagonal=False)
    return gamma, None if G_col is None else jnp.exp(G_col)


def _gated(k, k_gate):
    return k.astype(f32) if k_gate is None else k.astype(f32) * k_gate


# The functions below order their work so that few [C, K] float32 tiles are alive at once: on
# a GPU each costs 64 registers per thread at 4 warps, and spilled registers cost memory
# traffic on every use (``benchmarks/triton_resources.py`` measures it).


def chunk_forward(k, beta, G_col, G_row, dtype):
    """Returns float32 (T [C, C], w [C, K]) for one chunk; ``beta`` and ``G_col`` are [C, 1].
    ``u = T (beta * v)`` is left to the caller, so ``v`` need not be alive meanwhile."""
    gamma, k_gate = _decay(G_col, G_row, k.shape[0])
    T = unit_lower_inverse(beta * mm_t(k, k, dtype) * gamma, precise=dtype == f32)
    return T, mm(T, beta * _gated(k, k_gate), dtype)


def value_side_backward(T, v, beta, du, dtype):
    """The value side of a chunk's backward, from the forward's ``T``: returns float32
    (dv [C, V], its share of dbeta [C, 1], its share of -dA [C, C], unmasked)."""
    dv_rhs = t_mm(T, du, dtype)  # gradient of beta * v
    dbeta = jnp.sum(dv_rhs * v.astype(f32), axis=1, keepdims=True)
    u = mm(T, beta * v.astype(f32), dtype).astype(dtype)  # a matmul operand only
    return beta * dv_rhs, dbeta, mm_t(dv_rhs, u, dtype)


def key_side_backward(k, beta, G_col, G_row, T, dw, dbeta_v, dA_v, dtype):
    """The rest of a chunk's backward, given ``value_side_backward``'s shares: returns float32
    (dk [C, K], dbeta [C, 1], dG_col [C, 1] | None, dG_row [1, C] | None); the gradient of
    ``G`` is the sum of its column and row parts.

    Since ``dT = [dw, du] R^T`` for the right-hand sides ``R``, the gradient of ``A`` is
    ``-T^T dT T^T = -(dR_k w^T + dR_v u^T)`` on the strict lower triangle."""
    C = k.shape[0]
    gamma, k_gate = _decay(G_col, G_row, C)
    k_gated = _gated(k, k_gate)
    w = mm(T, beta * k_gated, dtype).astype(dtype)  # a matmul operand only
    dk_rhs = t_mm(T, dw, dtype)  # gradient of beta * e^G * k
    strict = _iota((C, C), 0) > _iota((C, C), 1)
    dA = -jnp.where(strict, mm_t(dk_rhs, w, dtype) + dA_v, 0.0)
    through_rhs = jnp.sum(dk_rhs * k_gated, axis=1, keepdims=True)
    dbeta = dbeta_v + through_rhs
    dk = beta * dk_rhs if k_gate is None else beta * dk_rhs * k_gate
    M = mm_t(k, k, dtype) * gamma  # A = beta * M
    dbeta = dbeta + jnp.sum(dA * M, axis=1, keepdims=True)
    dM = beta * dA
    dkk = dM * gamma  # gradient of k k^T
    dk = dk + mm(dkk, k, dtype) + t_mm(dkk, k, dtype)
    if k_gate is None:
        return dk, dbeta, None, None
    E = dM * M  # gradient through each Gamma_ij = e^(G_i - G_j), times Gamma_ij
    dG_col = jnp.sum(E, axis=1, keepdims=True) + beta * through_rhs
    return dk, dbeta, dG_col, -jnp.sum(E, axis=0, keepdims=True)


# ---------------------------------------------------------------------------- kernels


def _layouts(beta, G, chunk):
    """``beta`` ([BH, T] float32) as a column [BH, T, 1], and ``G``'s ``g_layouts``."""
    return [beta[..., None], *(x for x in g_layouts(G, chunk) if x is not None)]


def _specs(arrays, chunk):
    """Per-chunk blocks on the grid (BH, N): [BH, T, x] by rows, [BH, N, 1, C] by chunk."""

    def spec(a):
        if a.ndim == 4:
            return pl.BlockSpec((1, 1, 1, chunk), lambda i, n: (i, n, 0, 0))
        return pl.BlockSpec((1, chunk, a.shape[-1]), lambda i, n: (i, n, 0))

    return [spec(a) for a in arrays]


def _call(kernel, arrays, out_shape, *, chunk, backend, interpret, name):
    BH, T = arrays[0].shape[:2]
    if backend == "tpu":
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    else:
        params = plt.CompilerParams(num_warps=4, num_stages=1)
    return pl.pallas_call(
        kernel,
        grid=(BH, T // chunk),
        in_specs=_specs(arrays, chunk),
        out_specs=_specs(out_shape, chunk),
        out_shape=out_shape,
        compiler_params=params,
        interpret=interpret,
        name=name,
    )(*arrays)


def _load(refs, has_g):
    """(k_ref, v_ref, beta, G_col, G_row) of the chunk, and the remaining refs. ``k`` and ``v``
    stay refs: the kernels load each where they first need it."""
    k_ref, v_ref, beta_ref, *refs = refs
    G_col = G_row = None
    if has_g:
        G_col_ref, G_row_ref, *refs = refs
        G_col, G_row = G_col_ref[0], G_row_ref[0, 0]
    return (k_ref, v_ref, beta_ref[0], G_col, G_row), refs


def forward(k, v, beta, G, *, chunk, backend, interpret, save_inverse=False):
    """Returns (w [BH, T, K], u [BH, T, V]) in k's dtype for ``[BH, T, .]`` inputs (T a
    multiple of ``chunk``); ``beta`` and ``G`` (within-chunk cumulative, or None) [BH, T].
    With ``save_inverse``, also each chunk's ``T`` as rows of [BH, T, chunk], for backward."""
    dtype, has_g = k.dtype, G is not None

    def kernel(*refs):
        (k_ref, v_ref, beta, G_col, G_row), (w_ref, u_ref, *inverse_ref) = _load(refs, has_g)
        T, w = chunk_forward(k_ref[0], beta, G_col, G_row, dtype)
        w_ref[0] = w.astype(dtype)
        if save_inverse:
            inverse_ref[0][0] = T.astype(dtype)
        u_ref[0] = mm(T, beta * v_ref[0].astype(f32), dtype).astype(dtype)

    arrays = [k, v, *_layouts(beta, G, chunk)]
    out_shape = [jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)]
    if save_inverse:
        out_shape.append(jax.ShapeDtypeStruct((*k.shape[:2], chunk), dtype))
    return _call(
        kernel, arrays, out_shape, chunk=chunk, backend=backend, interpret=interpret,
        name="wy_transform_fwd",
    )  # fmt: skip


def backward(k, v, beta, G, inverse, dw, du, *, chunk, backend, interpret):
    """Returns (dk, dv in k's dtype, dbeta [BH, T], dG [BH, T] | None float32) from the
    forward's saved ``inverse``."""
    dtype, has_g = k.dtype, G is not None
    BH, T = beta.shape

    def kernel(*refs):
        chunk_in, (T_ref, dw_ref, du_ref, dk_ref, dv_ref, dbeta_ref, *dG_refs) = _load(refs, has_g)
        k_ref, v_ref, beta, G_col, G_row = chunk_in
        T = T_ref[0].astype(f32)
        dv, dbeta_v, dA_v = value_side_backward(T, v_ref[0], beta, du_ref[0], dtype)
        dv_ref[0] = dv.astype(dtype)  # stored before the key side needs the registers
        dk, dbeta, dG_col, dG_row = key_side_backward(
            k_ref[0], beta, G_col, G_row, T, dw_ref[0], dbeta_v, dA_v, dtype
        )
        dk_ref[0], dbeta_ref[0] = dk.astype(dtype), dbeta
        if has_g:
            dG_refs[0][0], dG_refs[1][0, 0] = dG_col, dG_row

    arrays = [k, v, *_layouts(beta, G, chunk), inverse, dw.astype(dtype), du.astype(dtype)]
    out_shape = [jax.ShapeDtypeStruct(x.shape, dtype) for x in (k, v)]
    out_shape.append(jax.ShapeDtypeStruct((BH, T, 1), f32))
    if has_g:
        out_shape += [
            jax.ShapeDtypeStruct((BH, T, 1), f32),
            jax.ShapeDtypeStruct((BH, T // chunk, 1, chunk), f32),
        ]
    outs = _call(
        kernel, arrays, out_shape, chunk=chunk, backend=backend, interpret=interpret,
        name="wy_transform_bwd",
    )  # fmt: skip
    dk, dv, dbeta = outs[0], outs[1], outs[2][..., 0]
    dG = outs[3][..., 0] + outs[4].reshape(BH, T) if has_g else None
    return dk, dv, dbeta, dG


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def wy_transform(k, v, beta, G, chunk: int, backend: str, interpret: bool):
    """The WY transform of ``[BH, T, .]`` chunks on Pallas kernels, differentiable in
    ``k, v, beta, G``: returns ``(w, u)`` in k's dtype (see ``forward``)."""
    return forward(k, v, beta, G, chunk=chunk, backend=backend, interpret=interpret)


def _fwd(k, v, beta, G, chunk, backend, interpret):
    w, u, inverse = forward(
        k, v, beta, G, chunk=chunk, backend=backend, interpret=interpret, save_inverse=True
    )
    return (w, u), (k, v, beta, G, inverse)


def _bwd(chunk, backend, interpret, residuals, cotangents):
    return backward(*residuals, *cotangents, chunk=chunk, backend=backend, interpret=interpret)


wy_transform.defvjp(_fwd, _bwd)
