"""TPU kernels (Pallas on Mosaic) for the chunk recurrence of ``chunk_math``.

A TPU core runs the grid in order, one step at a time, so the chunk axis is the grid's last
axis, marked "arbitrary", and the state lives in a VMEM scratch buffer that persists from one
chunk to the next; (batch*head, value block) axes are "parallel" (split across cores).

Block shapes follow Mosaic's rule that a block's last two dimensions are multiples of (8, 128)
or the whole array dimension: chunks are ``[C, K]`` with the feature dimension whole, ``G`` is
fed as a column ``[BH, T, 1]`` and as rows ``[BH, N, 1, C]`` (whole trailing dimensions, no
in-kernel transpose), and the value dimension is split only in blocks of 128.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import chunk_math

f32 = jnp.float32
_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _inputs(q, k, w, u, G, chunk, block_v, chunk_index):
    """Arrays and specs for (q, k, [w], u, [G_col, G_row]) on the grid (BH, NV, N).

    ``chunk_index(n)`` maps the grid's chunk step to the chunk it reads (reversed for backward).
    """
    K = q.shape[-1]
    G_col, G_row = chunk_math.g_layouts(G, chunk)
    arrays = [q, k] + ([w] if w is not None else []) + [u]
    feature = pl.BlockSpec((1, chunk, K), lambda i, j, n: (i, chunk_index(n), 0))
    specs = [feature] * (len(arrays) - 1)
    specs.append(pl.BlockSpec((1, chunk, block_v), lambda i, j, n: (i, chunk_index(n), j)))
    if G is not None:
        arrays += [G_col, G_row]
        specs += [
            pl.BlockSpec((1, chunk, 1), lambda i, j, n: (i, chunk_index(n), 0)),
            pl.BlockSpec((1, 1, 1, chunk), lambda i, j, n: (i, chunk_index(n), 0, 0)),
        ]
    return arrays, specs


def _load_chunk(refs, has_w, has_g):
    refs = list(refs)
    q, k = refs.pop(0)[0], refs.pop(0)[0]
    w = refs.pop(0)[0] if has_w else None
    u = refs.pop(0)[0]
    G_col = G_row = None
    if has_g:
        G_col, G_row = refs.pop(0)[0], refs.pop(0)[0, 0]
    return (q, k, w, u, G_col, G_row), refs


def forward(q, k, w, u, G, s0, *, chunk, block_v, save_states, interpret):
    """Same contract as ``pallas_kernels.gpu.forward``."""
    BH, T, K = q.shape
    V = u.shape[-1]
    N, dtype = T // chunk, q.dtype
    has_w, has_g = w is not None, G is not None

    def kernel(*refs):
        chunk_in, rest = _load_chunk(refs, has_w, has_g)
        s0_ref, o_ref, sT_ref, *rest = rest
        states_ref = rest.pop(0) if save_states else None
        [S_scratch] = rest
        n = pl.program_id(2)

        @pl.when(n == 0)
        def _():
            S_scratch[...] = s0_ref[0]

        S = S_scratch[...]
        if save_states:
            states_ref[0, 0] = S.astype(states_ref.dtype)
        o, S = chunk_math.forward(*chunk_in, S, dtype)
        o_ref[0] = o.astype(o_ref.dtype)
        S_scratch[...] = S

        @pl.when(n == N - 1)
        def _():
            sT_ref[0] = S

    arrays, in_specs = _inputs(q, k, w, u, G, chunk, block_v, lambda n: n)
    state_spec = pl.BlockSpec((1, K, block_v), lambda i, j, n: (i, 0, j))
    out_shape = [jax.ShapeDtypeStruct((BH, T, V), dtype), jax.ShapeDtypeStruct((BH, K, V), f32)]
    out_specs = [pl.BlockSpec((1, chunk, block_v), lambda i, j, n: (i, n, j)), state_spec]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((BH, N, K, V), dtype))
        out_specs.append(pl.BlockSpec((1, 1, K, block_v), lambda i, j, n: (i, n, 0, j)))
    outs = pl.pallas_call(
        kernel,
        grid=(BH, V // block_v, N),
        in_specs=[*in_specs, state_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((K, block_v), f32)],
        compiler_params=_SEMANTICS,
        interpret=interpret,
        name="chunk_recurrence_fwd",
    )(*arrays, s0)
    return outs[0], outs[1], outs[2] if save_states else None


def backward(q, k, w, u, G, states, dO, dsT, *, chunk, block_v, interpret):
    """Same contract as ``pallas_kernels.gpu.backward``."""
    BH, T, K = q.shape
    V = u.shape[-1]
    N, NV, dtype = T // chunk, V // block_v, q.dtype
    has_w, has_g = w is not None, G is not None
    rev = functools.partial(jnp.subtract, N - 1)  # grid step n reads chunk N - 1 - n

    def kernel(*refs):
        chunk_in, rest = _load_chunk(refs, has_w, has_g)
        states_ref, dO_ref, dsT_ref, dq_ref, dk_ref, *rest = rest
        dw_ref = rest.pop(0) if has_w else None
        du_ref = rest.pop(0)
        dG_col_ref, dG_row_ref = (rest.pop(0), rest.pop(0)) if has_g else (None, None)
        ds0_ref, dS_scratch = rest
        n = pl.program_id(2)

        @pl.when(n == 0)
        def _():
            dS_scratch[...] = dsT_ref[0]

        S = states_ref[0, 0].astype(f32)
        outs = {
            "dq": (dq_ref, (0, 0)), "dk": (dk_ref, (0, 0)), "du": (du_ref, (0,)),
            "dw": (dw_ref, (0, 0)),
        }  # fmt: skip

        def emit(name, value):
            ref, index = outs[name]
            ref[(*index, slice(None), slice(None))] = value.astype(ref.dtype)

        dG_col, dG_row, dS = chunk_math.backward(
            *chunk_in, S, dO_ref[0], dS_scratch[...], dtype, emit
        )
        if has_g:
            dG_col_ref[0, 0] = dG_col
            dG_row_ref[0, 0, 0] = dG_row
        dS_scratch[...] = dS

        @pl.when(n == N - 1)
        def _():
            ds0_ref[0] = dS

    arrays, in_specs = _inputs(q, k, w, u, G, chunk, block_v, rev)
    value_spec = pl.BlockSpec((1, chunk, block_v), lambda i, j, n: (i, rev(n), j))
    state_spec = pl.BlockSpec((1, K, block_v), lambda i, j, n: (i, 0, j))
    in_specs += [
        pl.BlockSpec((1, 1, K, block_v), lambda i, j, n: (i, rev(n), 0, j)),
        value_spec,
        state_spec,
    ]
    # Value blocks' partial sums add up in float32; a single block is already complete.
    per_block_k = jax.ShapeDtypeStruct((NV, BH, T, K), f32 if NV > 1 else dtype)
    per_block_k_spec = pl.BlockSpec((1, 1, chunk, K), lambda i, j, n: (j, i, rev(n), 0))
    out_shape = [per_block_k, per_block_k] + ([per_block_k] if has_w else [])
    out_specs = [per_block_k_spec] * len(out_shape)
    out_shape.append(jax.ShapeDtypeStruct((BH, T, V), dtype))  # du, whole per value block
    out_specs.append(value_spec)
    if has_g:
        out_shape += [
            jax.ShapeDtypeStruct((NV, BH, T, 1), f32),
            jax.ShapeDtypeStruct((NV, BH, N, 1, chunk), f32),
        ]
        out_specs += [
            pl.BlockSpec((1, 1, chunk, 1), lambda i, j, n: (j, i, rev(n), 0)),
            pl.BlockSpec((1, 1, 1, 1, chunk), lambda i, j, n: (j, i, rev(n), 0, 0)),
        ]
    out_shape.append(jax.ShapeDtypeStruct((BH, K, V), f32))
    out_specs.append(state_spec)
    outs = list(
        pl.pallas_call(
            kernel,
            grid=(BH, NV, N),
            in_specs=in_specs,
            out_specs=out_specs,
            out_shape=out_shape,
            scratch_shapes=[pltpu.VMEM((K, block_v), f32)],
            compiler_params=_SEMANTICS,
            interpret=interpret,
            name="chunk_recurrence_bwd",
        )(*arrays, states, dO, dsT)
    )
    dq, dk = outs.pop(0).sum(0), outs.pop(0).sum(0)
    dw = outs.pop(0).sum(0) if has_w else None
    du = outs.pop(0)
    dG = None
    if has_g:
        dG = outs.pop(0).sum(0)[..., 0] + outs.pop(0).sum(0).reshape(BH, T)
    return dq, dk, dw, du, dG, outs.pop(0)
