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
``local_grads_from`` need only the state entering the chunk and its gradient, so they can run for
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
import functools
from typing import NamedTuple

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


def decay_matrix(G_col, G_row, C, diagonal: bool = True):
    """[C, C] D: the causal mask (strictly lower without ``diagonal``), times e^(G_i - G_j)
    for decaying rules."""
    rows, cols = _iota((C, C), 0), _iota((C, C), 1)
    mask = rows >= cols if diagonal else rows > cols
    if G_col is None:
        return jnp.where(mask, 1.0, 0.0).astype(f32)
    # Mask before exp: above the diagonal G_i - G_j >= 0 and could overflow.
    return jnp.exp(jnp.where(mask, G_col - G_row, -jnp.inf))


def g_layouts(G, chunk):
    """``G`` [BH, T] as the kernels' column [BH, T, 1] and rows [BH, N, 1, chunk] (None, None
    without decay): the layouts Mosaic takes without an in-kernel transpose."""
    if G is None:
        return None, None
    BH, T = G.shape
    return G[:, :, None], G.reshape(BH, T // chunk, 1, chunk)


class Chunk:
    """One chunk's inputs and what every step below derives from them, each computed once."""

    def __init__(self, q, k, G_col, G_row, dtype):
        self.q, self.k, self.G_col, self.G_row, self.dtype = q, k, G_col, G_row, dtype
        self.size = k.shape[0]
        self.gates = Gates.of(G_col, self.size)

    @functools.cached_property
    def scores(self):  # q k^T, [C, C]
        return mm_t(self.q, self.k, self.dtype)

    @functools.cached_property
    def decay(self):
        return decay_matrix(self.G_col, self.G_row, self.size)

    @functools.cached_property
    def P(self):  # the intra-chunk attention (q k^T) * D
        return self.scores * self.decay

    # Both are matmul operands, rounded to the compute dtype there anyway: kept in it, they
    # take half the registers of float32 tiles when the inputs are bfloat16.
    @functools.cached_property
    def q_in(self):  # e^G * q: the query as it reads the incoming state
        return _scale(self.q.astype(f32), self.gates.q_gate).astype(self.dtype)

    @functools.cached_property
    def k_out(self):  # e^(G_C - G) * k: the key as its write reaches the chunk end
        return _scale(self.k.astype(f32), self.gates.k_gate).astype(self.dtype)


def writes(w, u, S, dtype):
    """U [C, V] float32: what each step writes once the incoming state's recall is removed."""
    return u.astype(f32) if w is None else u.astype(f32) - mm(w, S, dtype)


def state_step(c: Chunk, w, u, S):
    """Returns (U [C, V] float32, state after the chunk [K, V] float32). Reads no ``c.q``."""
    U = writes(w, u, S, c.dtype)
    return U, _scale(S, c.gates.state) + t_mm(c.k_out, U, c.dtype)


def output(c: Chunk, U, S):
    """Returns o [C, V] float32 from the state entering the chunk and its U."""
    return mm(c.q_in, S, c.dtype) + mm(c.P, U, c.dtype)


def state_grad_step(c: Chunk, w, dO, dS):
    """Backward through one chunk's recurrence, given ``dS``, the gradient of the state after it.

    Returns (dU [C, V] float32, the gradient of the state entering the chunk [K, V] float32).
    """
    dU = t_mm(c.P, dO, c.dtype) + mm(c.k_out, dS, c.dtype)
    dS_in = _scale(dS, c.gates.state) + t_mm(c.q_in, dO, c.dtype)
    if w is not None:
        dS_in = dS_in - t_mm(w, dU, c.dtype)
    return dU, dS_in


class LocalSums(NamedTuple):
    """The products ``local_grads_from`` contracts over the value dimension. With the value
    dimension split into blocks, each block's sums add up to the whole's (``add``)."""

    dP: jax.Array  # [C, C] dO U^T
    dq_in: jax.Array  # [C, K] dO S^T
    dk_out: jax.Array  # [C, K] U dS^T
    dw: jax.Array | None  # [C, K] -dU S^T, delta rules only
    state: jax.Array | None  # [1, 1] sum(S * dS), decaying rules only

    def add(self, other: LocalSums) -> LocalSums:
        return jax.tree.map(jnp.add, self, other)


def local_sums(c: Chunk, w, U, S, dO, dU, dS, *, lazy: bool = False) -> LocalSums:
    """One value block's share of the contractions the input gradients need: ``S`` enters the
    chunk, ``dS`` is the gradient of the state after it, ``dU`` that of the writes.

    ``lazy``: each field is a function computing it, so that ``local_grads_from`` computes
    each where it first needs it and few of them are alive at once.
    """
    dtype = c.dtype

    def state():
        return jnp.sum(jnp.sum(S * dS, axis=1, keepdims=True), axis=0, keepdims=True)

    terms = LocalSums(
        dP=lambda: mm_t(dO, U, dtype),
        dq_in=lambda: mm_t(dO, S, dtype),
        dk_out=lambda: mm_t(U, dS, dtype),
        dw=None if w is None else (lambda: -mm_t(dU, S, dtype)),
        state=None if c.G_col is None else state,
    )
    return terms if lazy else LocalSums(*(None if t is None else t() for t in terms))


def _force(term):
    return term() if callable(term) else term


def local_grads_from(c: Chunk, sums: LocalSums, emit):
    """Gradients of one chunk's inputs from the value dimension's sums (whole, or one value
    block's share, then partial sums over the blocks; computed or lazy, see ``local_sums``).

    Calls ``emit(name, value)`` for "dw" (delta rules), "dq" and "dk" as each is final, so a
    kernel can store it and free its registers before the next. Returns ``(dG_col, dG_row)``,
    None without ``G`` (the gradient of ``G`` is their sum, one as a column and one as a row).
    """
    dtype, gates, has_g = c.dtype, c.gates, c.G_col is not None
    if sums.dw is not None:
        emit("dw", _force(sums.dw))
    dP = _force(sums.dP) * c.decay
    dq_in = _force(sums.dq_in)
    from_q = jnp.sum(c.q_in * dq_in, axis=1, keepdims=True) if has_g else None
    emit("dq", mm(dP, c.k, dtype) + _scale(dq_in, gates.q_gate))
    dk_out = _force(sums.dk_out)
    from_k = jnp.sum(c.k_out * dk_out, axis=1, keepdims=True) if has_g else None
    emit("dk", t_mm(dP, c.q, dtype) + _scale(dk_out, gates.k_gate))
    if not has_g:
        return None, None
    E = dP * c.scores  # gradient through each D_ij = e^(G_i - G_j), times D_ij
    to_last = jnp.sum(from_k, axis=0, keepdims=True) + _force(sums.state) * gates.state
    dG_col = (
        from_q
        + jnp.sum(E, axis=1, keepdims=True)
        - from_k
        + jnp.where(_iota((c.size, 1), 0) == c.size - 1, to_last, 0.0)
    )
    return dG_col, -jnp.sum(E, axis=0, keepdims=True)


def forward(q, k, w, u, G_col, G_row, S, dtype):
    """One chunk completely: returns (o [C, V] float32, state after the chunk)."""
    c = Chunk(q, k, G_col, G_row, dtype)
    U, S_next = state_step(c, w, u, S)
    return output(c, U, S), S_next


def backward(q, k, w, u, G_col, G_row, S, dO, dS, dtype, emit):
    """One chunk's gradients completely, given ``S``, the state entering it, and ``dS``, the
    gradient of the state after it.

    Emits "du", then as ``local_grads_from`` "dw", "dq", "dk"; returns
    ``(dG_col, dG_row, dS_in)``, ``dS_in`` the gradient of the state entering the chunk.
    """
    c = Chunk(q, k, G_col, G_row, dtype)
    U = writes(w, u, S, dtype)
    dU, dS_in = state_grad_step(c, w, dO, dS)
    emit("du", dU)
    sums = local_sums(c, w, U, S, dO, dU, dS, lazy=True)
    return *local_grads_from(c, sums, emit), dS_in
