"""The per-chunk arithmetic shared by the GPU and TPU kernels.

Every rule the kernels run is one recurrence over chunks of ``C`` steps. With ``S`` the state
entering a chunk (``[K, V]``, float32) and, per chunk, ``q, k`` (``[C, K]``), the pre-transformed
writes ``u`` (``[C, V]``), for the delta rules the WY keys ``w`` (``[C, K]``), and for decaying
rules ``G``, the within-chunk cumulative log-decay (``G_i = g_1 + ... + g_i``):

    U  = u - w S                             (delta rules; U = u otherwise)
    S' = e^(G_C) S + (e^(G_C - G) * k)^T U   the only sequential dependence
    O  = (e^G * q) S + ((q k^T) * D) U       D_ij = e^(G_i - G_j) for j <= i, else 0

Linear attention is ``w = None, G = None, u = v``; scalar decay adds ``G``; DeltaNet and Gated
DeltaNet pass the WY representation ``w = T (e^G * k)``, ``u = T v`` computed outside the
kernels (``pallas_kernels.wy``), so no kernel needs a cumsum or a triangular solve.

The math is split the way the kernels can schedule it: ``state_step`` and ``state_grad_step``
carry the recurrence (forward, and its gradient backward through the chunks); ``output`` and
``local_grads`` need only the state entering the chunk and its gradient, so they can run for
all chunks in parallel. ``forward`` and ``backward`` chain them for kernels that do one chunk
completely per step.

``G`` arrives twice, as a column ``[C, 1]`` and a row ``[1, C]``: the TPU kernels cannot
transpose a vector cheaply, and the same code then serves both backends. Values are plain
arrays: the kernels load them from refs and store what these functions return. Matmul
operands are cast to the compute dtype (the inputs' dtype) and accumulate in float32, the
float32 path at full precision (TPUs otherwise round f32 operands to bf16, GPUs to TF32).
"""

from __future__ import annotations

import dataclasses

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


@dataclasses.dataclass
class Gates:
    """The decay factors of one chunk; all None (no decay) when the rule has none."""

    q_gate: jax.Array | None = None  # [C, 1] e^(G_i): chunk start through step i
    k_gate: jax.Array | None = None  # [C, 1] e^(G_C - G_j): step j to the chunk end
    state: jax.Array | None = None  # [1, 1] e^(G_C): the whole chunk

    @staticmethod
    def of(G_col, C) -> Gates:
        if G_col is None:
            return Gates()
        last = _iota((C, 1), 0) == C - 1
        G_last = jnp.sum(jnp.where(last, G_col, 0.0), axis=0, keepdims=True)
        return Gates(jnp.exp(G_col), jnp.exp(G_last - G_col), jnp.exp(G_last))


def _scale(x, gate):
    return x if gate is None else x * gate


def _decay_matrix(G_col, G_row, C):
    """[C, C] D: causal mask, times e^(G_i - G_j) for decaying rules."""
    causal = _iota((C, C), 0) >= _iota((C, C), 1)
    if G_col is None:
        return jnp.where(causal, 1.0, 0.0).astype(f32)
    # Mask before exp: above the diagonal G_i - G_j >= 0 and could overflow.
    return jnp.exp(jnp.where(causal, G_col - G_row, -jnp.inf))


def writes(w, u, S, dtype):
    """U [C, V] float32: what each step writes once the incoming state's recall is removed."""
    return u.astype(f32) if w is None else u.astype(f32) - mm(w, S, dtype)


def state_step(k, w, u, G_col, S, dtype):
    """Returns (U [C, V] float32, state after the chunk [K, V] float32)."""
    gates = Gates.of(G_col, k.shape[0])
    U = writes(w, u, S, dtype)
    k_out = _scale(k.astype(f32), gates.k_gate)
    return U, _scale(S, gates.state) + t_mm(k_out, U, dtype)


def output(q, k, U, G_col, G_row, S, dtype):
    """Returns o [C, V] float32 from the state entering the chunk and its U."""
    C = q.shape[0]
    gates = Gates.of(G_col, C)
    P = mm_t(q, k, dtype) * _decay_matrix(G_col, G_row, C)
    return mm(_scale(q.astype(f32), gates.q_gate), S, dtype) + mm(P, U, dtype)


def state_grad_step(q, k, w, G_col, G_row, dO, dS, dtype):
    """Backward through one chunk's recurrence, given ``dS``, the gradient of the state after it.

    Returns (dU [C, V] float32, the gradient of the state entering the chunk [K, V] float32).
    """
    C = q.shape[0]
    gates = Gates.of(G_col, C)
    P = mm_t(q, k, dtype) * _decay_matrix(G_col, G_row, C)
    dU = t_mm(P, dO, dtype) + mm(_scale(k.astype(f32), gates.k_gate), dS, dtype)
    dS_in = _scale(dS, gates.state) + t_mm(_scale(q.astype(f32), gates.q_gate), dO, dtype)
    if w is not None:
        dS_in = dS_in - t_mm(w, dU, dtype)
    return dU, dS_in


def local_grads(q, k, w, U, G_col, G_row, S, dO, dU, dS, dtype):
    """Gradients of one chunk's inputs from the states around it and the gradients of U and S.

    ``S`` enters the chunk, ``dS`` is the gradient of the state after it. Returns
    ``(dq, dk, dw, dG_col, dG_row)``: ``dw`` is None without ``w``, ``dG_col`` / ``dG_row`` None
    without ``G`` (the gradient of ``G`` is their sum, one as a column and one as a row). With the
    value dimension split into blocks, each block's results are partial sums over it.
    """
    C = q.shape[0]
    gates = Gates.of(G_col, C)
    decay = _decay_matrix(G_col, G_row, C)
    scores = mm_t(q, k, dtype)
    dP = mm_t(dO, U, dtype) * decay
    dq_in = mm_t(dO, S, dtype)
    dk_out = mm_t(U, dS, dtype)
    dq = mm(dP, k, dtype) + _scale(dq_in, gates.q_gate)
    dk = t_mm(dP, q, dtype) + _scale(dk_out, gates.k_gate)
    dw = None if w is None else -mm_t(dU, S, dtype)
    if G_col is None:
        return dq, dk, dw, None, None
    E = dP * scores  # gradient through each D_ij = e^(G_i - G_j), times D_ij
    from_k = jnp.sum(k.astype(f32) * gates.k_gate * dk_out, axis=1, keepdims=True)
    from_state = jnp.sum(
        jnp.sum(S * gates.state * dS, axis=1, keepdims=True), axis=0, keepdims=True
    )
    to_last = jnp.sum(from_k, axis=0, keepdims=True) + from_state  # via G_C, [1, 1]
    dG_col = (
        jnp.sum(q.astype(f32) * gates.q_gate * dq_in, axis=1, keepdims=True)
        + jnp.sum(E, axis=1, keepdims=True)
        - from_k
        + jnp.where(_iota((C, 1), 0) == C - 1, to_last, 0.0)
    )
    dG_row = -jnp.sum(E, axis=0, keepdims=True)
    return dq, dk, dw, dG_col, dG_row


def forward(q, k, w, u, G_col, G_row, S, dtype):
    """One chunk completely: returns (o [C, V] float32, state after the chunk)."""
    U, S_next = state_step(k, w, u, G_col, S, dtype)
    return output(q, k, U, G_col, G_row, S, dtype), S_next


def backward(q, k, w, u, G_col, G_row, S, dO, dS, dtype):
    """One chunk's gradients completely, given ``dS``, the gradient of the state after it.

    Returns ``(dq, dk, dw, du, dG_col, dG_row, dS_in)``, see ``local_grads``.
    """
    U = writes(w, u, S, dtype)
    dU, dS_in = state_grad_step(q, k, w, G_col, G_row, dO, dS, dtype)
    dq, dk, dw, dG_col, dG_row = local_grads(q, k, w, U, G_col, G_row, S, dO, dU, dS, dtype)
    return dq, dk, dw, dU, dG_col, dG_row, dS_in
