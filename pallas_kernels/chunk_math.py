"""The per-chunk arithmetic shared by the GPU and TPU kernels: one chunk forward, one backward.

Every rule the kernels run is one recurrence over chunks of ``C`` steps. With ``S`` the state
entering a chunk (``[K, V]``, float32) and, per chunk, ``q, k`` (``[C, K]``), the pre-transformed
writes ``u`` (``[C, V]``), for the delta rules the WY keys ``w`` (``[C, K]``), and for decaying
rules ``G``, the within-chunk cumulative log-decay (``G_i = g_1 + ... + g_i``):

    U~ = u - w S                             (delta rules; U~ = u otherwise)
    O  = (e^G * q) S + ((q k^T) * D) U~      D_ij = e^(G_i - G_j) for j <= i, else 0
    S' = e^(G_C) S + (e^(G_C - G) * k)^T U~

Linear attention is ``w = None, G = None, u = v``; scalar decay adds ``G``; DeltaNet and Gated
DeltaNet pass the WY representation ``w = T (e^G * k)``, ``u = T v`` computed outside the
kernels (``pallas_kernels.wy``), so no kernel needs a cumsum or a triangular solve.

``G`` arrives twice, as a column ``[C, 1]`` and a row ``[1, C]``: the TPU kernels cannot
transpose a vector cheaply, and the same code then serves both backends. Values are plain
arrays: the kernels load them from refs and store what these functions return. Matmul
operands are cast to the compute dtype (the inputs' dtype) and accumulate in float32, the
float32 path at full precision (TPUs otherwise round f32 operands to bf16, GPUs to TF32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def _dot(a, b, a_axis: int, b_axis: int, dtype) -> jax.Array:
    a, b = a.astype(dtype), b.astype(dtype)
    precision = jax.lax.Precision.HIGHEST if dtype == f32 else jax.lax.Precision.DEFAULT
    return jax.lax.dot_general(
        a, b, (((a_axis,), (b_axis,)), ((), ())), precision=precision, preferred_element_type=f32
    )


def mm(a, b, dtype):  # a @ b
    return _dot(a, b, 1, 0, dtype)


def mm_t(a, b, dtype):  # a @ b.T
    return _dot(a, b, 1, 1, dtype)


def t_mm(a, b, dtype):  # a.T @ b
    return _dot(a, b, 0, 0, dtype)


def _iota(shape, axis):
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


class _Chunk:
    """What forward and backward both recompute from one chunk's inputs."""

    def __init__(self, q, k, w, u, G_col, G_row, S, dtype):
        C = q.shape[0]
        self.dtype = dtype
        causal = _iota((C, C), 0) >= _iota((C, C), 1)
        self.scores = mm_t(q, k, dtype)  # q k^T, [C, C]
        self.U = u.astype(f32)
        if w is not None:
            self.U = self.U - mm(w, S, dtype)
        if G_col is None:
            self.decay = jnp.where(causal, 1.0, 0.0).astype(f32)
            self.q_in, self.k_out, self.state_decay = q.astype(f32), k.astype(f32), None
            self.q_gate = self.k_gate = None
        else:
            # Mask before exp: above the diagonal G_i - G_j >= 0 and could overflow.
            self.decay = jnp.exp(jnp.where(causal, G_col - G_row, -jnp.inf))
            last = _iota((C, 1), 0) == C - 1
            self.G_last = jnp.sum(jnp.where(last, G_col, 0.0), axis=0, keepdims=True)  # [1, 1]
            self.q_gate = jnp.exp(G_col)  # decay from the chunk start through step i
            self.k_gate = jnp.exp(self.G_last - G_col)  # decay from step j to the chunk end
            self.q_in = q.astype(f32) * self.q_gate
            self.k_out = k.astype(f32) * self.k_gate
            self.state_decay = jnp.exp(self.G_last)
        self.P = self.scores * self.decay


def forward(q, k, w, u, G_col, G_row, S, dtype):
    """Returns (o [C, V] float32, state after the chunk [K, V] float32)."""
    c = _Chunk(q, k, w, u, G_col, G_row, S, dtype)
    o = mm(c.q_in, S, dtype) + mm(c.P, c.U, dtype)
    S_next = S if c.state_decay is None else S * c.state_decay
    return o, S_next + t_mm(c.k_out, c.U, dtype)


def backward(q, k, w, u, G_col, G_row, S, dO, dS, dtype):
    """Gradients of one chunk, given ``dS``, the gradient of the state after it.

    Returns ``(dq, dk, dw, du, dG_col, dG_row, dS_in)``: ``dS_in`` is the gradient of the state
    entering the chunk; ``dw`` is None without ``w``, ``dG_col`` / ``dG_row`` None without
    ``G`` (the gradient of ``G`` is their sum, one as a column and one as a row). With the value
    dimension split into blocks, each block's ``dq, dk, dw, dG`` are partial sums over it.
    """
    c = _Chunk(q, k, w, u, G_col, G_row, S, dtype)
    dU = t_mm(c.P, dO, dtype) + mm(c.k_out, dS, dtype)  # gradient of U~
    dP = mm_t(dO, c.U, dtype) * c.decay
    dq_in = mm_t(dO, S, dtype)
    dk_out = mm_t(c.U, dS, dtype)
    dq = mm(dP, k, dtype) + (dq_in if c.q_gate is None else dq_in * c.q_gate)
    dk = t_mm(dP, q, dtype) + (dk_out if c.k_gate is None else dk_out * c.k_gate)
    dS_in = t_mm(c.q_in, dO, dtype)
    dS_in = dS_in + (dS if c.state_decay is None else dS * c.state_decay)
    dw = None
    if w is not None:
        dw = -mm_t(dU, S, dtype)
        dS_in = dS_in - t_mm(w, dU, dtype)
    dG_col = dG_row = None
    if G_col is not None:
        C = q.shape[0]
        E = dP * c.scores  # gradient through each D_ij = e^(G_i - G_j) times D_ij
        from_k = jnp.sum(c.k_out * dk_out, axis=1, keepdims=True)
        from_state = jnp.sum(
            jnp.sum(S * c.state_decay * dS, axis=1, keepdims=True), axis=0, keepdims=True
        )
        to_last = jnp.sum(from_k, axis=0, keepdims=True) + from_state  # via G_C, [1, 1]
        dG_col = (
            jnp.sum(c.q_in * dq_in, axis=1, keepdims=True)
            + jnp.sum(E, axis=1, keepdims=True)
            - from_k
            + jnp.where(_iota((C, 1), 0) == C - 1, to_last, 0.0)
        )
        dG_row = -jnp.sum(E, axis=0, keepdims=True)
    return dq, dk, dw, dU, dG_col, dG_row, dS_in
