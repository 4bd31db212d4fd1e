"""GPU kernels (Pallas on Triton) for the chunk recurrence of ``chunk_math``.

Grid programs on a GPU run in parallel in no set order, so one program owns one (batch*head,
value block) pair and loops over the chunks itself, carrying the state in registers. The value
dimension is split into blocks of ``block_v`` columns: the state's columns evolve independently
under every rule here (q, k and w act on its rows), so blocks need no communication; each block
then contributes a partial ``dq, dk, dw, dG`` that the caller sums.

Arrays are flattened to ``[BH, T, .]`` with ``T`` a multiple of the chunk. ``G`` is ``[BH, T]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import chunk_math

f32 = jnp.float32


def unpack_refs(refs, has_w, has_g):
    """Unpacks (q, k, [w], u, [G], rest...) kernel refs into a dict and the remaining refs."""
    refs = list(refs)
    out = {"q": refs.pop(0), "k": refs.pop(0)}
    out["w"] = refs.pop(0) if has_w else None
    out["u"] = refs.pop(0)
    out["G"] = refs.pop(0) if has_g else None
    return out, refs


def load_chunk(r, start, C):
    """(q, k, w, u, G_col, G_row) of the chunk of C rows at ``start`` (``unpack_refs``' dict)."""
    rows = pl.ds(start, C)
    w = None if r["w"] is None else r["w"][0, rows, :]
    G_col = G_row = None
    if r["G"] is not None:
        G = r["G"][0, rows]
        G_col, G_row = G[:, None], G[None, :]
    return r["q"][0, rows, :], r["k"][0, rows, :], w, r["u"][0, rows, :], G_col, G_row


def sequence_inputs(q, k, w, u, G, block_v):
    """Arrays and block specs for (q, k, [w], u, [G]) on the grid (BH, V // block_v): whole
    sequences, which the programs walk chunk by chunk (``load_chunk``)."""
    _, T, K = q.shape
    arrays = [q, k] + ([w] if w is not None else []) + [u] + ([G] if G is not None else [])
    specs = [pl.BlockSpec((1, T, K), lambda i, j: (i, 0, 0))] * (3 if w is not None else 2)
    specs.append(pl.BlockSpec((1, T, block_v), lambda i, j: (i, 0, j)))
    if G is not None:
        specs.append(pl.BlockSpec((1, T), lambda i, j: (i, 0)))
    return arrays, specs


def forward(q, k, w, u, G, s0, *, chunk, block_v, save_states, interpret, num_warps):
    """Returns (o [BH, T, V] in q's dtype, final state [BH, K, V] f32, states or None).

    ``states[:, n]`` is the state entering chunk n, kept (in q's dtype) for the backward pass.
    """
    BH, T, K = q.shape
    V = u.shape[-1]
    N, dtype = T // chunk, q.dtype
    has_w, has_g = w is not None, G is not None

    def kernel(*refs):
        r, rest = unpack_refs(refs, has_w, has_g)
        s0_ref, o_ref, sT_ref, *states_ref = rest

        def body(n, S):
            if save_states:
                states_ref[0][0, n, :, :] = S.astype(states_ref[0].dtype)
            start = pl.multiple_of(n * chunk, chunk)
            o, S = chunk_math.forward(*load_chunk(r, start, chunk), S, dtype)
            o_ref[0, pl.ds(start, chunk), :] = o.astype(o_ref.dtype)
            return S

        sT_ref[0, :, :] = jax.lax.fori_loop(0, N, body, s0_ref[0, :, :])

    arrays, in_specs = sequence_inputs(q, k, w, u, G, block_v)
    state_spec = pl.BlockSpec((1, K, block_v), lambda i, j: (i, 0, j))
    out_shape = [jax.ShapeDtypeStruct((BH, T, V), dtype), jax.ShapeDtypeStruct((BH, K, V), f32)]
    out_specs = [pl.BlockSpec((1, T, block_v), lambda i, j: (i, 0, j)), state_spec]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((BH, N, K, V), dtype))
        out_specs.append(pl.BlockSpec((1, N, K, block_v), lambda i, j: (i, 0, 0, j)))
    outs = pl.pallas_call(
        kernel,
        grid=(BH, V // block_v),
        in_specs=[*in_specs, state_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="chunk_recurrence_fwd",
    )(*arrays, s0)
    return outs[0], outs[1], outs[2] if save_states else None


def backward(q, k, w, u, G, states, dO, dsT, *, chunk, block_v, interpret, num_warps):
    """Returns (dq, dk, dw | None, du, dG | None, ds0), summed over value blocks: du in q's
    dtype, dq, dk, dw too when a single value block makes them whole, the rest float32."""
    BH, T, K = q.shape
    V = u.shape[-1]
    N, NV, dtype = T // chunk, V // block_v, q.dtype
    has_w, has_g = w is not None, G is not None

    def kernel(*refs):
        r, rest = unpack_refs(refs, has_w, has_g)
        states_ref, dO_ref, dsT_ref, dq_ref, dk_ref, *rest = rest
        dw_ref = rest.pop(0) if has_w else None
        du_ref = rest.pop(0)
        dG_ref = rest.pop(0) if has_g else None
        [ds0_ref] = rest

        def body(i, dS):
            n = N - 1 - i  # chunks in reverse
            start = pl.multiple_of(n * chunk, chunk)
            rows = pl.ds(start, chunk)
            S = states_ref[0, n, :, :].astype(f32)
            # (ref, index) per gradient; Triton lowering takes one indexer per ref access
            outs = {
                "dq": (dq_ref, (0, 0, rows)), "dk": (dk_ref, (0, 0, rows)),
                "du": (du_ref, (0, rows)), "dw": (dw_ref, (0, 0, rows)),
            }  # fmt: skip

            def emit(name, value):
                ref, index = outs[name]
                ref[(*index, slice(None))] = value.astype(ref.dtype)

            dG_col, dG_row, dS = chunk_math.backward(
                *load_chunk(r, start, chunk), S, dO_ref[0, rows, :], dS, dtype, emit
            )
            if has_g:
                dG_ref[0, 0, rows] = dG_col.reshape(chunk) + dG_row.reshape(chunk)
            return dS

        ds0_ref[0, :, :] = jax.lax.fori_loop(0, N, body, dsT_ref[0, :, :])

    arrays, in_specs = sequence_inputs(q, k, w, u, G, block_v)
    value_spec = pl.BlockSpec((1, T, block_v), lambda i, j: (i, 0, j))
    state_spec = pl.BlockSpec((1, K, block_v), lambda i, j: (i, 0, j))
    in_specs += [
        pl.BlockSpec((1, N, K, block_v), lambda i, j: (i, 0, 0, j)),
        value_spec,
        state_spec,
    ]
    # Value blocks' partial sums add up in float32; a single block is already complete.
    per_block_k = jax.ShapeDtypeStruct((NV, BH, T, K), f32 if NV > 1 else dtype)
    per_block_k_spec = pl.BlockSpec((1, 1, T, K), lambda i, j: (j, i, 0, 0))
    out_shape = [per_block_k, per_block_k] + ([per_block_k] if has_w else [])
    out_specs = [per_block_k_spec] * len(out_shape)
    out_shape.append(jax.ShapeDtypeStruct((BH, T, V), dtype))  # du, whole per value block
    out_specs.append(value_spec)
    if has_g:
        out_shape.append(jax.ShapeDtypeStruct((NV, BH, T), f32))
        out_specs.append(pl.BlockSpec((1, 1, T), lambda i, j: (j, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((BH, K, V), f32))
    out_specs.append(state_spec)
    outs = pl.pallas_call(
        kernel,
        grid=(BH, NV),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="chunk_recurrence_bwd",
    )(*arrays, states, dO, dsT)
    outs = list(outs)
    dq, dk = outs.pop(0).sum(0), outs.pop(0).sum(0)
    dw = outs.pop(0).sum(0) if has_w else None
    du = outs.pop(0)
    dG = outs.pop(0).sum(0) if has_g else None
    return dq, dk, dw, du, dG, outs.pop(0)
