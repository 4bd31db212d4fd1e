"""GPU kernels (Pallas on Triton) with the recurrence split from the per-chunk work.

``gpu.py`` does each chunk completely inside the sequential loop, so one program per
(batch*head, value block) carries all the arithmetic. Here, as in flash-linear-attention, the
loop keeps only what depends on the previous chunk (``chunk_math.state_step`` forward,
``state_grad_step`` backward) and writes every chunk's state; the outputs and the inputs'
gradients (``output``, ``local_grads_from``) then run with one program per chunk, N times more
parallel work for the GPU to schedule. That program walks the value blocks itself: ``q k^T``
and the decay are computed once per chunk, and the gradients' contractions over the value
dimension accumulate in registers (``chunk_math.LocalSums``), so each gradient is written once,
complete, instead of as partial sums per value block.

Forward: states kernel (sequential) -> output kernel (parallel over chunks).
Backward: state-gradient kernel (sequential, reverse) -> local-gradient kernel (parallel).
Extra memory against ``gpu.py``: the writes ``U`` ([BH, T, V], kept from forward) and the state
gradients ([BH, N, K, V]) during backward, both in the inputs' dtype: the matmuls that read
them round their operands to it anyway.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import chunk_math
from pallas_kernels.gpu import load_chunk, sequence_inputs, unpack_refs

f32 = jnp.float32
# Key columns per local-gradient program: its accumulators are [C, block_k] float32 tiles.
LOCAL_GRAD_BLOCK_K = 64


def _params(num_warps):
    return plt.CompilerParams(num_warps=num_warps, num_stages=2)


def _chunk_inputs(arrays, chunk, block_k=None):
    """Specs for whole-chunk blocks on the grid (BH, N), or (BH, N, K // block_k), for arrays
    named in ``arrays``.

    ``arrays`` maps a role to an array: "rows" [BH, T, K or V], "g" [BH, T], "state"
    [BH, N, K, V], or "key_rows" / "key_state", the same split along K into ``block_k``-wide
    blocks by the grid's third axis; None entries are dropped.
    """
    kb = lambda j: j[0] if j else 0  # noqa: E731  (the key block, on a 3-axis grid)
    specs = {
        "rows": lambda a: pl.BlockSpec((1, chunk, a.shape[-1]), lambda i, n, *j: (i, n, 0)),
        "g": lambda a: pl.BlockSpec((1, chunk), lambda i, n, *j: (i, n)),
        "state": lambda a: pl.BlockSpec((1, 1, *a.shape[2:]), lambda i, n, *j: (i, n, 0, 0)),
        "key_rows": lambda a: pl.BlockSpec((1, chunk, block_k), lambda i, n, *j: (i, n, kb(j))),
        "key_state": lambda a: pl.BlockSpec(
            (1, 1, block_k, a.shape[3]), lambda i, n, *j: (i, n, kb(j), 0)
        ),
    }
    kept = [(role, a) for role, a in arrays if a is not None]
    return [a for _, a in kept], [specs[role](a) for role, a in kept]


def _fold_value_blocks(num_blocks, block_v, fn, combine=None):
    """Applies ``fn(cols)`` to each value block's columns (``pl.ds``) in turn and folds the
    results with ``combine``; without it they are discarded. Block 0 runs with a static start,
    the rest in a loop."""
    acc = fn(pl.ds(0, block_v))
    if num_blocks > 1:

        def body(j, acc):
            out = fn(pl.ds(pl.multiple_of(j * block_v, block_v), block_v))
            return acc if combine is None else combine(acc, out)

        acc = jax.lax.fori_loop(1, num_blocks, body, acc)
    return acc


def _g_views(G_ref):
    if G_ref is None:
        return None, None
    G = G_ref[0, :]
    return G[:, None], G[None, :]


def forward(q, k, w, u, G, s0, *, chunk, block_v, interpret, num_warps):
    """Returns (o [BH, T, V] in q's dtype, final state [BH, K, V] f32, residual for backward)."""
    BH, T, K = q.shape
    V = u.shape[-1]
    N, NV, dtype = T // chunk, V // block_v, q.dtype
    has_w, has_g = w is not None, G is not None

    def states_kernel(*refs):
        r, (s0_ref, states_ref, U_ref, sT_ref) = unpack_refs(refs, has_w, has_g)

        def body(n, S):
            states_ref[0, n, :, :] = S.astype(states_ref.dtype)
            start = pl.multiple_of(n * chunk, chunk)
            _, k, w, u, G_col, _ = load_chunk(r, start, chunk)
            c = chunk_math.Chunk(None, k, G_col, None, dtype)  # the state update reads no q
            U, S = chunk_math.state_step(c, w, u, S)
            U_ref[0, pl.ds(start, chunk), :] = U.astype(U_ref.dtype)
            return S

        sT_ref[0, :, :] = jax.lax.fori_loop(0, N, body, s0_ref[0, :, :])

    arrays, in_specs = sequence_inputs(q, k, w, u, G, block_v)
    state_spec = pl.BlockSpec((1, K, block_v), lambda i, j: (i, 0, j))
    states, U, sT = pl.pallas_call(
        states_kernel,
        grid=(BH, NV),
        in_specs=[*in_specs, state_spec],
        out_specs=[
            pl.BlockSpec((1, N, K, block_v), lambda i, j: (i, 0, 0, j)),
            pl.BlockSpec((1, T, block_v), lambda i, j: (i, 0, j)),
            state_spec,
        ],
        out_shape=[
            jax.ShapeDtypeStruct((BH, N, K, V), dtype),
            jax.ShapeDtypeStruct((BH, T, V), dtype),
            jax.ShapeDtypeStruct((BH, K, V), f32),
        ],
        compiler_params=_params(num_warps),
        interpret=interpret,
        name="chunk_states_fwd",
    )(*arrays, s0)

    def output_kernel(q_ref, k_ref, U_ref, *refs):
        G_ref = refs[0] if has_g else None
        S_ref, o_ref = refs[-2:]
        G_col, G_row = _g_views(G_ref)
        c = chunk_math.Chunk(q_ref[0], k_ref[0], G_col, G_row, dtype)

        def block_output(cols):  # q k^T and the decay are shared by the value blocks
            o = chunk_math.output(c, U_ref[0, :, cols], S_ref[0, 0, :, cols].astype(f32))
            o_ref[0, :, cols] = o.astype(o_ref.dtype)

        _fold_value_blocks(NV, block_v, block_output)

    arrays, in_specs = _chunk_inputs(
        [("rows", q), ("rows", k), ("rows", U), ("g", G), ("state", states)], chunk
    )
    o = pl.pallas_call(
        output_kernel,
        grid=(BH, N),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((1, chunk, V), lambda i, n: (i, n, 0)),
        out_shape=jax.ShapeDtypeStruct((BH, T, V), dtype),
        compiler_params=_params(num_warps),
        interpret=interpret,
        name="chunk_output_fwd",
    )(*arrays)
    return o, sT, (states, U)


def backward(q, k, w, u, G, residual, dO, dsT, *, chunk, block_v, interpret, num_warps):
    """Returns (dq, dk, dw | None, du in q's dtype, dG | None, ds0 float32), whole."""
    del u  # the forward's U replaces it
    states, U = residual
    BH, T, K = q.shape
    V = U.shape[-1]
    N, NV, dtype = T // chunk, V // block_v, q.dtype
    has_w, has_g = w is not None, G is not None

    def state_grad_kernel(*refs):
        r, (dO_ref, dsT_ref, dS_ref, dU_ref, ds0_ref) = unpack_refs(refs, has_w, has_g)

        def body(i, dS):
            n = N - 1 - i  # chunks in reverse
            dS_ref[0, n, :, :] = dS.astype(dS_ref.dtype)
            start = pl.multiple_of(n * chunk, chunk)
            rows = pl.ds(start, chunk)
            q, k, w, _, G_col, G_row = load_chunk(r, start, chunk)
            c = chunk_math.Chunk(q, k, G_col, G_row, dtype)
            dU, dS = chunk_math.state_grad_step(c, w, dO_ref[0, rows, :], dS)
            dU_ref[0, rows, :] = dU.astype(dU_ref.dtype)
            return dS

        ds0_ref[0, :, :] = jax.lax.fori_loop(0, N, body, dsT_ref[0, :, :])

    # The state kernel's input list has a ``u`` slot; U (same shape) fills it, unused.
    arrays, in_specs = sequence_inputs(q, k, w, U, G, block_v)
    value_spec = pl.BlockSpec((1, T, block_v), lambda i, j: (i, 0, j))
    state_spec = pl.BlockSpec((1, K, block_v), lambda i, j: (i, 0, j))
    dS_after, dU, ds0 = pl.pallas_call(
        state_grad_kernel,
        grid=(BH, NV),
        in_specs=[*in_specs, value_spec, state_spec],
        out_specs=[
            pl.BlockSpec((1, N, K, block_v), lambda i, j: (i, 0, 0, j)),
            value_spec,
            state_spec,
        ],
        out_shape=[
            jax.ShapeDtypeStruct((BH, N, K, V), dtype),
            jax.ShapeDtypeStruct((BH, T, V), dtype),
            jax.ShapeDtypeStruct((BH, K, V), f32),
        ],
        compiler_params=_params(num_warps),
        interpret=interpret,
        name="chunk_state_grads_bwd",
    )(*arrays, dO, dsT)

    def local_grad_kernel(*refs):
        refs = list(refs)
        q_ref, k_ref = refs.pop(0), refs.pop(0)
        w_ref = refs.pop(0) if has_w else None
        U_ref = refs.pop(0)
        G_ref = refs.pop(0) if has_g else None
        S_ref, dS_ref, dO_ref, dU_ref, dq_ref, dk_ref, *outs = refs
        G_col, G_row = _g_views(G_ref)
        c = chunk_math.Chunk(q_ref[0], k_ref[0], G_col, G_row, dtype)
        w = None if w_ref is None else w_ref[0]

        def block_sums(cols):  # one value block's share of the contractions over V
            S, dS = S_ref[0, 0, :, cols].astype(f32), dS_ref[0, 0, :, cols].astype(f32)
            return chunk_math.local_sums(
                c, w, U_ref[0, :, cols], S, dO_ref[0, :, cols], dU_ref[0, :, cols], dS
            )

        # Accumulated here, so each gradient is written once, complete.
        sums = _fold_value_blocks(NV, block_v, block_sums, chunk_math.LocalSums.add)
        grads = {"dq": dq_ref, "dk": dk_ref, "dw": outs.pop(0) if has_w else None}

        def emit(name, value):
            grads[name][0, :, :] = value.astype(dtype)

        dG_col, dG_row = chunk_math.local_grads_from(c, sums, emit)
        if has_g:
            outs.pop(0)[0, 0, :] = dG_col.reshape(chunk) + dG_row.reshape(chunk)

    # Key blocks: every term is a sum over K's blocks or lives in one of them (``chunk_math``).
    block_k = min(K, LOCAL_GRAD_BLOCK_K)
    NK = K // block_k
    arrays, in_specs = _chunk_inputs(
        [("key_rows", q), ("key_rows", k), ("key_rows", w), ("rows", U), ("g", G),
         ("key_state", states), ("key_state", dS_after), ("rows", dO), ("rows", dU)],
        chunk, block_k,
    )  # fmt: skip
    key_spec = pl.BlockSpec((1, chunk, block_k), lambda i, n, j: (i, n, j))
    out_shape = [jax.ShapeDtypeStruct((BH, T, K), dtype)] * (3 if has_w else 2)
    out_specs = [key_spec] * len(out_shape)
    if has_g:  # partial sums per key block
        out_shape.append(jax.ShapeDtypeStruct((NK, BH, T), f32))
        out_specs.append(pl.BlockSpec((1, 1, chunk), lambda i, n, j: (j, i, n)))
    outs = list(
        pl.pallas_call(
            local_grad_kernel,
            grid=(BH, N, NK),
            in_specs=in_specs,
            out_specs=out_specs,
            out_shape=out_shape,
            compiler_params=_params(num_warps),
            interpret=interpret,
            name="chunk_local_grads_bwd",
        )(*arrays)
    )
    dq, dk = outs.pop(0), outs.pop(0)
    dw = outs.pop(0) if has_w else None
    dG = outs.pop(0).sum(0) if has_g else None
    return dq, dk, dw, dU, dG, ds0
