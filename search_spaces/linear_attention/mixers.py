"""Linear-attention token mixers in pure ``jax.numpy``: recurrent references and chunkwise forms.

Every mixer carries a matrix-valued state ``S`` of shape ``[Dk, Dv]`` per (batch, head) and
reads it with the scaled query, ``o_t = q_t^T S_t``, where ``S_t`` already includes step ``t``
(causal, inclusive). Update rules (names are the keys of ``UPDATE_RULES``):

* ``linear`` -- linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"):
  ``S_t = S_{t-1} + k_t v_t^T``.
* ``scalar_decay`` -- one log-decay ``g_t <= 0`` per head and step:
  ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``. A fixed per-head decay is RetNet (Sun et al. 2023,
  "Retentive Network"; see ``retnet_log_decay``); a data-dependent one is Mamba-2 / SSD
  (Dao & Gu 2024, "Transformers are SSMs").
* ``channel_decay`` -- a log-decay per key channel, ``S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T``
  (GLA: Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient
  Training").
* ``delta`` -- DeltaNet (Schlag et al. 2021, "Linear Transformers Are Secretly Fast Weight
  Programmers"): ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``. The chunkwise form
  is the WY / UT-transform algorithm of Yang et al. 2024, "Parallelizing Linear Transformers
  with the Delta Rule over Sequence Length".
* ``gated_delta`` -- Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025, "Gated Delta Networks"):
  ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``.

With L2-normalised keys, ``beta`` in (0, 2) instead of (0, 1) gives the negative-eigenvalue
variant of the delta rules (Grazzi et al. 2025, "Unlocking State-Tracking in Linear RNNs
Through Negative Eigenvalues"); nothing here changes for it.

Each rule has two implementations that agree up to float32 round-off:

* ``<rule>_recurrent`` -- the reference: ``jax.lax.scan`` over time, one rank-1 update per step.
* ``<rule>_chunked`` -- the chunkwise-parallel form: ``jax.lax.scan`` over chunks of
  ``chunk_size`` steps, with dense intra-chunk attention and the state carried across chunk
  boundaries. T is padded up to a multiple of ``chunk_size`` with no-op steps
  (q = k = v = 0, beta = 0, g = 0) and the outputs are sliced back.

All functions share one keyword signature, ``fn(q, k, v, *, beta=None, g=None,
initial_state=None, scale=None[, chunk_size=64])`` with ``q, k: [B, H, T, Dk]``,
``v: [B, H, T, Dv]``, ``beta: [B, H, T]``, ``g: [B, H, T]`` (``[B, H, T, Dk]`` for
``channel_decay``; anything broadcastable to that shape is accepted) and
``initial_state: [B, H, Dk, Dv]``. Passing ``beta`` / ``g`` to a rule that does not use it, or
omitting one a rule needs, raises ``ValueError``. ``q`` is multiplied by ``scale``
(default ``Dk ** -0.5``). Everything is computed in float32 with HIGHEST matmul precision; ``o``
is returned in ``q``'s dtype and the final state in float32. Feature maps, key normalisation,
``beta = sigmoid(.)`` and the like belong to the caller. Every function is jit-compatible with
``chunk_size`` static.

Axis letters in variable names:
    B batch, H heads, T time, K key/query features (Dk), V value features (Dv), N chunks,
    C position within a chunk (``CC`` is [query position, key position]).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels.wy import ut_transform

__all__ = [
    "IMPLS",
    "PALLAS_KERNELS",
    "UPDATE_RULES",
    "UpdateRule",
    "channel_decay_chunked",
    "channel_decay_recurrent",
    "delta_chunked",
    "delta_recurrent",
    "gated_delta_chunked",
    "gated_delta_recurrent",
    "linear_chunked",
    "linear_recurrent",
    "mix",
    "resolve_impl",
    "retnet_log_decay",
    "scalar_decay_chunked",
    "scalar_decay_recurrent",
]

DEFAULT_CHUNK_SIZE = 64

_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)

# rule -> (uses_beta, decay kind: None, "scalar" ([B,H,T]) or "channel" ([B,H,T,Dk])).
_INPUT_SPEC: dict[str, tuple[bool, str | None]] = {
    "linear": (False, None),
    "scalar_decay": (False, "scalar"),
    "channel_decay": (False, "channel"),
    "delta": (True, None),
    "gated_delta": (True, "scalar"),
}

# Per-chunk arrays handed to a chunk step: q_BHCK, k_BHCK, v_BHCV, beta_BHC | None,
# g_BHC | g_BHCK | None.
_ChunkInputs = tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array | None]


# ----------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------


def _validate(rule, q, k, v, beta, g) -> None:
    """Raises ValueError on shapes or optional inputs that do not fit ``rule``."""
    uses_beta, decay = _INPUT_SPEC[rule]
    q, k, v = jnp.shape(q), jnp.shape(k), jnp.shape(v)
    if len(q) != 4 or k != q or len(v) != 4 or v[:3] != q[:3]:
        raise ValueError(
            f"{rule}: expected q, k [B, H, T, Dk] and v [B, H, T, Dv]; got q {q}, k {k}, v {v}"
        )
    if uses_beta != (beta is not None):
        raise ValueError(f"{rule}: {'requires' if uses_beta else 'does not take'} beta")
    if (decay is not None) != (g is not None):
        raise ValueError(f"{rule}: {'requires' if decay else 'does not take'} g (log-decay)")


def _prepare(rule, q, k, v, beta, g, initial_state, scale):
    """Validates and casts inputs; returns float32 ``(q_BHTK * scale, k, v, beta, g, S0_BHKV)``."""
    _validate(rule, q, k, v, beta, g)
    decay = _INPUT_SPEC[rule][1]
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    B, H, T, K = q.shape
    V = v.shape[-1]
    f32 = jnp.float32
    scale = K**-0.5 if scale is None else scale
    q_BHTK = q.astype(f32) * scale
    k_BHTK = k.astype(f32)
    v_BHTV = v.astype(f32)
    beta_BHT = None if beta is None else jnp.broadcast_to(jnp.asarray(beta, f32), (B, H, T))
    g_shape = (B, H, T, K) if decay == "channel" else (B, H, T)
    g_BHTx = None if g is None else jnp.broadcast_to(jnp.asarray(g, f32), g_shape)
    if initial_state is None:
        S0_BHKV = jnp.zeros((B, H, K, V), f32)
    else:
        S0_BHKV = jnp.broadcast_to(jnp.asarray(initial_state, f32), (B, H, K, V))
    return q_BHTK, k_BHTK, v_BHTV, beta_BHT, g_BHTx, S0_BHKV


def _causal_mask(size: int, *, strict: bool = False) -> jax.Array:
    """[size, size] bool, True where key position j <= (or <, if strict) query position i."""
    return jnp.tril(jnp.ones((size, size), dtype=bool), k=-1 if strict else 0)


def _decay_matrix(g_BHCX: jax.Array) -> jax.Array:
    """[B, H, C, C, X]: exp(G_i - G_j) = exp(sum_{j < s <= i} g_s) for j <= i, 0 for j > i.

    ``G`` is the within-chunk cumsum of the log-decay ``g_BHCX`` (X = 1 or Dk). Its row C - 1
    is the decay from each step to the chunk end, exp(G_end - G_j).
    """
    C = g_BHCX.shape[-2]
    strict_CC1 = _causal_mask(C, strict=True)[:, :, None]
    # Sum each segment directly instead of differencing cumsums: G_i - G_j loses about
    # eps * |G| absolute precision once a chunk decays strongly (|G| in the hundreds), which
    # would perturb even the near-diagonal, barely-decayed entries. Above the diagonal the
    # sums are empty (0), so exp cannot overflow there and the mask can come after it.
    seg_BHCCX = jnp.cumsum(jnp.where(strict_CC1, g_BHCX[..., :, None, :], 0.0), axis=-3)
    return jnp.where(_causal_mask(C)[:, :, None], jnp.exp(seg_BHCCX), 0.0)


# ----------------------------------------------------------------------------------------------
# Recurrent reference
# ----------------------------------------------------------------------------------------------


def _run_recurrent(rule, q, k, v, beta, g, initial_state, scale):
    """Step-by-step scan covering all rules; returns (o [B,H,T,Dv], final state [B,H,Dk,Dv])."""
    q_BHTK, k_BHTK, v_BHTV, beta_BHT, g_BHTx, S0_BHKV = _prepare(
        rule, q, k, v, beta, g, initial_state, scale
    )
    if g_BHTx is not None and g_BHTx.ndim == 3:
        g_BHTx = g_BHTx[..., None]  # a scalar decay is a channel decay shared by all channels

    def step(S_BHKV, xs):
        q_BHK, k_BHK, v_BHV, beta_BH, g_BHx = xs
        if g_BHx is not None:
            S_BHKV = S_BHKV * jnp.exp(g_BHx)[..., None]
        if beta_BH is not None:
            # (I - b k k^T) S + b k v^T  ==  S + k (b (v - S^T k))^T: write only the error
            # between the new value and what S (already decayed) recalls for k.
            recalled_BHV = _einsum("bhk,bhkv->bhv", k_BHK, S_BHKV)
            v_BHV = beta_BH[..., None] * (v_BHV - recalled_BHV)
        S_BHKV = S_BHKV + k_BHK[..., :, None] * v_BHV[..., None, :]
        o_BHV = _einsum("bhk,bhkv->bhv", q_BHK, S_BHKV)
        return S_BHKV, o_BHV

    time_major = jax.tree.map(
        lambda x: jnp.moveaxis(x, 2, 0), (q_BHTK, k_BHTK, v_BHTV, beta_BHT, g_BHTx)
    )
    S_BHKV, o_TBHV = jax.lax.scan(step, S0_BHKV, time_major)
    return jnp.moveaxis(o_TBHV, 0, 2).astype(jnp.asarray(q).dtype), S_BHKV


# ----------------------------------------------------------------------------------------------
# Chunkwise-parallel form
# ----------------------------------------------------------------------------------------------


def _run_chunked(rule, chunk_step, q, k, v, beta, g, initial_state, scale, chunk_size):
    """Pads T, scans ``chunk_step`` over chunks; returns (o [B,H,T,Dv], final state)."""
    try:
        C = operator.index(chunk_size)
    except TypeError:
        C = 0
    if C < 1:
        raise ValueError(f"chunk_size must be a positive (static) int, got {chunk_size!r}")
    q_BHTK, k_BHTK, v_BHTV, beta_BHT, g_BHTx, S0_BHKV = _prepare(
        rule, q, k, v, beta, g, initial_state, scale
    )
    B, H, T, _ = q_BHTK.shape
    V = v_BHTV.shape[-1]
    N = -(-T // C)

    def to_chunks(x_BHTx):
        # Zero padding is a no-op step for every rule: k = v = 0 writes nothing, beta = 0
        # erases nothing and g = 0 decays nothing, so the final state is unaffected.
        pad = [(0, 0), (0, 0), (0, N * C - T)] + [(0, 0)] * (x_BHTx.ndim - 3)
        x_BHNCx = jnp.pad(x_BHTx, pad).reshape(B, H, N, C, *x_BHTx.shape[3:])
        return jnp.moveaxis(x_BHNCx, 2, 0)

    chunks = jax.tree.map(to_chunks, (q_BHTK, k_BHTK, v_BHTV, beta_BHT, g_BHTx))
    S_BHKV, o_NBHCV = jax.lax.scan(chunk_step, S0_BHKV, chunks)
    o_BHTV = jnp.moveaxis(o_NBHCV, 0, 2).reshape(B, H, N * C, V)[:, :, :T]
    return o_BHTV.astype(jnp.asarray(q).dtype), S_BHKV


def _linear_chunk(S_BHKV: jax.Array, xs: _ChunkInputs):
    """One chunk of linear attention; returns (state after the chunk, o_BHCV)."""
    q_BHCK, k_BHCK, v_BHCV, _, _ = xs
    C = q_BHCK.shape[-2]
    attn_BHCC = jnp.where(_causal_mask(C), _einsum("bhik,bhjk->bhij", q_BHCK, k_BHCK), 0.0)
    o_BHCV = _einsum("bhck,bhkv->bhcv", q_BHCK, S_BHKV) + _einsum(
        "bhij,bhjv->bhiv", attn_BHCC, v_BHCV
    )
    S_BHKV = S_BHKV + _einsum("bhck,bhcv->bhkv", k_BHCK, v_BHCV)
    return S_BHKV, o_BHCV


def _scalar_decay_chunk(S_BHKV: jax.Array, xs: _ChunkInputs):
    """One chunk of scalar decay; returns (state after the chunk, o_BHCV)."""
    q_BHCK, k_BHCK, v_BHCV, _, g_BHC = xs
    G_BHC = jnp.cumsum(g_BHC, axis=-1)  # log of the decay from the chunk start through step i
    decay_BHCC = _decay_matrix(g_BHC[..., None])[..., 0]
    attn_BHCC = _einsum("bhik,bhjk->bhij", q_BHCK, k_BHCK) * decay_BHCC
    o_BHCV = _einsum("bhck,bhkv->bhcv", q_BHCK * jnp.exp(G_BHC)[..., None], S_BHKV) + _einsum(
        "bhij,bhjv->bhiv", attn_BHCC, v_BHCV
    )
    k_to_end_BHCK = k_BHCK * decay_BHCC[..., -1, :, None]
    S_BHKV = jnp.exp(G_BHC[..., -1])[..., None, None] * S_BHKV + _einsum(
        "bhck,bhcv->bhkv", k_to_end_BHCK, v_BHCV
    )
    return S_BHKV, o_BHCV


# Sub-chunk length of the channel-decay chunk step (fla's chunk_gla splits its chunks the same
# way): only the diagonal sub-blocks pay for the [Cs, Cs, Dk] pairwise decay tensor.
CHANNEL_DECAY_SUBCHUNK = 16


def _channel_decay_chunk(S_BHKV: jax.Array, xs: _ChunkInputs):
    """One chunk of channel decay; returns (state after the chunk, o_BHCV).

    The chunk is split into sub-chunks of ``Cs`` steps. Between sub-chunks, the decay from key
    j to query i factors through r, the step before query i's sub-chunk:
    exp(G_i - G_j) = exp(G_i - G_r) exp(G_r - G_j), both exponents <= 0, so the scores are
    plain matmuls of rescaled q and k with nothing that can overflow. Inside a sub-chunk the
    full pairwise [Cs, Cs, Dk] decay is used (a single factorisation (q e^G)(k e^-G)^T would
    overflow once a channel decays by more than ~e^88 within it).
    """
    q_BHCK, k_BHCK, v_BHCV, _, g_BHCK = xs
    B, H, C, K = q_BHCK.shape
    Cs = CHANNEL_DECAY_SUBCHUNK if C % CHANNEL_DECAY_SUBCHUNK == 0 else C
    n = C // Cs
    G_BHCK = jnp.cumsum(g_BHCK, axis=-2)
    # Inter-sub-chunk scores: query sub-chunk m against every key before it, through r_m.
    G_ref_BHnK = jnp.concatenate(
        [jnp.zeros_like(G_BHCK[..., :1, :]), G_BHCK[..., Cs - 1 : C - 1 : Cs, :]], axis=-2
    )
    q_BHnSK = q_BHCK.reshape(B, H, n, Cs, K) * jnp.exp(
        G_BHCK.reshape(B, H, n, Cs, K) - G_ref_BHnK[..., None, :]
    )
    before_nC = jnp.arange(C)[None, :] < (jnp.arange(n) * Cs)[:, None]  # key j before sub-chunk m
    k_exp_BHnCK = jnp.where(
        before_nC[..., None], G_ref_BHnK[..., :, None, :] - G_BHCK[..., None, :, :], -jnp.inf
    )
    k_BHnCK = k_BHCK[..., None, :, :] * jnp.exp(k_exp_BHnCK)
    attn_BHnSC = _einsum("bhmsk,bhmjk->bhmsj", q_BHnSK, k_BHnCK)
    # Intra-sub-chunk scores with the pairwise decay, placed on the block diagonal.
    decay_BHnSSK = _decay_matrix(g_BHCK.reshape(B, H, n, Cs, K))
    q_BHnSK, k_BHnSK = q_BHCK.reshape(B, H, n, Cs, K), k_BHCK.reshape(B, H, n, Cs, K)
    diag_BHnSS = _einsum("bhmik,bhmjk,bhmijk->bhmij", q_BHnSK, k_BHnSK, decay_BHnSSK)
    eye_nn = jnp.eye(n, dtype=diag_BHnSS.dtype)
    attn_BHnSC = attn_BHnSC + _einsum("bhmij,mp->bhmipj", diag_BHnSS, eye_nn).reshape(
        B, H, n, Cs, C
    )
    attn_BHCC = attn_BHnSC.reshape(B, H, C, C)
    o_BHCV = _einsum("bhck,bhkv->bhcv", q_BHCK * jnp.exp(G_BHCK), S_BHKV) + _einsum(
        "bhij,bhjv->bhiv", attn_BHCC, v_BHCV
    )
    k_to_end_BHCK = k_BHCK * jnp.exp(G_BHCK[..., -1:, :] - G_BHCK)
    S_BHKV = jnp.exp(G_BHCK[..., -1, :])[..., None] * S_BHKV + _einsum(
        "bhck,bhcv->bhkv", k_to_end_BHCK, v_BHCV
    )
    return S_BHKV, o_BHCV


def _delta_chunk(S_BHKV: jax.Array, xs: _ChunkInputs):
    """One chunk of DeltaNet; returns (state after the chunk, o_BHCV)."""
    q_BHCK, k_BHCK, v_BHCV, beta_BHC, _ = xs
    C = q_BHCK.shape[-2]
    kk_BHCC = _einsum("bhik,bhjk->bhij", k_BHCK, k_BHCK)
    W_BHCK, U_BHCV = ut_transform(kk_BHCC, beta_BHC, k_BHCK, v_BHCV)
    # The effective per-step writes once the incoming state's recall is subtracted.
    U_BHCV = U_BHCV - _einsum("bhck,bhkv->bhcv", W_BHCK, S_BHKV)
    attn_BHCC = jnp.where(_causal_mask(C), _einsum("bhik,bhjk->bhij", q_BHCK, k_BHCK), 0.0)
    o_BHCV = _einsum("bhck,bhkv->bhcv", q_BHCK, S_BHKV) + _einsum(
        "bhij,bhjv->bhiv", attn_BHCC, U_BHCV
    )
    S_BHKV = S_BHKV + _einsum("bhck,bhcv->bhkv", k_BHCK, U_BHCV)
    return S_BHKV, o_BHCV


def _gated_delta_chunk(S_BHKV: jax.Array, xs: _ChunkInputs):
    """One chunk of Gated DeltaNet; returns (state after the chunk, o_BHCV)."""
    q_BHCK, k_BHCK, v_BHCV, beta_BHC, g_BHC = xs
    G_BHC = jnp.cumsum(g_BHC, axis=-1)
    gamma_BHCC = _decay_matrix(g_BHC[..., None])[..., 0]
    kk_BHCC = _einsum("bhik,bhjk->bhij", k_BHCK, k_BHCK) * gamma_BHCC
    # The incoming state is seen by step i decayed by exp(G_i), hence exp(G) on the W side.
    decay_BHC1 = jnp.exp(G_BHC)[..., None]
    W_BHCK, U_BHCV = ut_transform(kk_BHCC, beta_BHC, decay_BHC1 * k_BHCK, v_BHCV)
    U_BHCV = U_BHCV - _einsum("bhck,bhkv->bhcv", W_BHCK, S_BHKV)
    attn_BHCC = _einsum("bhik,bhjk->bhij", q_BHCK, k_BHCK) * gamma_BHCC
    o_BHCV = _einsum("bhck,bhkv->bhcv", decay_BHC1 * q_BHCK, S_BHKV) + _einsum(
        "bhij,bhjv->bhiv", attn_BHCC, U_BHCV
    )
    k_to_end_BHCK = k_BHCK * gamma_BHCC[..., -1, :, None]
    S_BHKV = jnp.exp(G_BHC[..., -1])[..., None, None] * S_BHKV + _einsum(
        "bhck,bhcv->bhkv", k_to_end_BHCK, U_BHCV
    )
    return S_BHKV, o_BHCV


# ----------------------------------------------------------------------------------------------
# Public per-rule functions
# ----------------------------------------------------------------------------------------------


def linear_recurrent(q, k, v, *, beta=None, g=None, initial_state=None, scale=None):
    """Linear attention, step by step. Returns (o [B,H,T,Dv], final state [B,H,Dk,Dv] f32)."""
    return _run_recurrent("linear", q, k, v, beta, g, initial_state, scale)


def linear_chunked(
    q, k, v, *, beta=None, g=None, initial_state=None, scale=None, chunk_size=DEFAULT_CHUNK_SIZE
):
    """Linear attention, chunkwise. Returns (o [B,H,T,Dv], final state [B,H,Dk,Dv] f32)."""
    args = (q, k, v, beta, g, initial_state, scale, chunk_size)
    return _run_chunked("linear", _linear_chunk, *args)


def scalar_decay_recurrent(q, k, v, *, beta=None, g=None, initial_state=None, scale=None):
    """Per-head scalar decay (RetNet / Mamba-2), step by step. ``g: [B,H,T]`` log-decay.

    Returns (o [B,H,T,Dv], final state [B,H,Dk,Dv] f32).
    """
    return _run_recurrent("scalar_decay", q, k, v, beta, g, initial_state, scale)


def scalar_decay_chunked(
    q, k, v, *, beta=None, g=None, initial_state=None, scale=None, chunk_size=DEFAULT_CHUNK_SIZE
):
    """Per-head scalar decay (RetNet / Mamba-2 SSD), chunkwise. ``g: [B,H,T]`` log-decay.

    Returns (o [B,H,T,Dv], final state [B,H,Dk,Dv] f32).
    """
    args = (q, k, v, beta, g, initial_state, scale, chunk_size)
    return _run_chunked("scalar_decay", _scalar_decay_chunk, *args)


def channel_decay_recurrent(q, k, v, *, beta=None, g=None, initial_state=None, scale=None):
    """Per-key-channel decay (GLA), step by step. ``g: [B,H,T,Dk]`` log-decay.

    Returns (o [B,H,T,Dv], final state [B,H,Dk,Dv] f32).
    """
    return _run_recurrent("channel_decay", q, k, v, beta, g, initial_state, scale)


def channel_decay_chunked(
    q, k, v, *, beta=None, g=None, initial_state=None, scale=None, chunk_size=DEFAULT_CHUNK_SIZE
):
    """Per-key-channel decay (GLA), chunkwise. ``g: [B,H,T,Dk]`` log-decay.

    Splits each chunk into sub-chunks of ``CHANNEL_DECAY_SUBCHUNK`` steps (see
    ``_channel_decay_chunk``); every exponent stays <= 0.
    Returns (o [B,H,T,Dv], final state [B,H,Dk,Dv] f32).
    """
    args = (q, k, v, beta, g, initial_state, scale, chunk_size)
    return _run_chunked("channel_decay", _channel_decay_chunk, *args)


def delta_recurrent(q, k, v, *, beta=None, g=None, initial_state=None, scale=None):
    """DeltaNet, step by step. ``beta: [B,H,T]`` write strength.

    Returns (o [B,H,T,Dv], final state [B,H,Dk,Dv] f32).
    """
    return _run_recurrent("delta", q, k, v, beta, g, initial_state, scale)


def delta_chunked(
    q, k, v, *, beta=None, g=None, initial_state=None, scale=None, chunk_size=DEFAULT_CHUNK_SIZE
):
    """DeltaNet, chunkwise via the UT / WY transform. ``beta: [B,H,T]`` write strength.

    Returns (o [B,H,T,Dv], final state [B,H,Dk,Dv] f32).
    """
    args = (q, k, v, beta, g, initial_state, scale, chunk_size)
    return _run_chunked("delta", _delta_chunk, *args)


def gated_delta_recurrent(q, k, v, *, beta=None, g=None, initial_state=None, scale=None):
    """Gated DeltaNet, step by step. ``beta: [B,H,T]``, ``g: [B,H,T]`` log-decay.

    Returns (o [B,H,T,Dv], final state [B,H,Dk,Dv] f32).
    """
    return _run_recurrent("gated_delta", q, k, v, beta, g, initial_state, scale)


def gated_delta_chunked(
    q, k, v, *, beta=None, g=None, initial_state=None, scale=None, chunk_size=DEFAULT_CHUNK_SIZE
):
    """Gated DeltaNet, chunkwise via the gated UT transform. ``beta, g: [B,H,T]``.

    Returns (o [B,H,T,Dv], final state [B,H,Dk,Dv] f32).
    """
    args = (q, k, v, beta, g, initial_state, scale, chunk_size)
    return _run_chunked("gated_delta", _gated_delta_chunk, *args)


# ----------------------------------------------------------------------------------------------
# Registry and dispatch
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UpdateRule:
    """One update rule's two implementations and which optional inputs it takes."""

    recurrent: Callable[..., tuple[jax.Array, jax.Array]]
    chunked: Callable[..., tuple[jax.Array, jax.Array]]
    uses_beta: bool
    uses_decay: bool


def _rule(name: str, recurrent, chunked) -> UpdateRule:
    uses_beta, decay = _INPUT_SPEC[name]
    return UpdateRule(recurrent, chunked, uses_beta=uses_beta, uses_decay=decay is not None)


UPDATE_RULES: dict[str, UpdateRule] = {
    "linear": _rule("linear", linear_recurrent, linear_chunked),
    "scalar_decay": _rule("scalar_decay", scalar_decay_recurrent, scalar_decay_chunked),
    "channel_decay": _rule("channel_decay", channel_decay_recurrent, channel_decay_chunked),
    "delta": _rule("delta", delta_recurrent, delta_chunked),
    "gated_delta": _rule("gated_delta", gated_delta_recurrent, gated_delta_chunked),
}

IMPLS = ("auto", "chunked", "recurrent", "pallas")

# Rules with a Pallas kernel (GLA's per-channel decay has none: it runs chunked jnp).
PALLAS_KERNELS = {
    "linear": pallas_kernels.linear_attention,
    "scalar_decay": pallas_kernels.linear_attention,
    "delta": pallas_kernels.delta_rule,
    "gated_delta": pallas_kernels.gated_delta_rule,
}


def resolve_impl(impl: str, rule: str, head_dim: int, value_dim: int, chunk_size: int) -> str:
    """The implementation ``impl`` means for this rule and shape on the current platform.

    "auto" is Pallas on TPU and GPU where the rule has a kernel and the shapes suit it, and
    chunked jnp otherwise (on CPU the kernels would only run interpreted). "pallas" on a rule
    without a kernel runs chunked; on unsuitable shapes it raises the kernel's error.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {list(IMPLS)}")
    if impl in ("chunked", "recurrent"):
        return impl
    if rule not in PALLAS_KERNELS:
        return "chunked"
    if impl == "auto":
        if jax.default_backend() not in ("gpu", "tpu"):
            return "chunked"
        try:
            pallas_kernels.kernel_config(head_dim, value_dim, chunk_size)
        except ValueError:
            return "chunked"
    return "pallas"


def mix(
    rule: str,
    q,
    k,
    v,
    *,
    beta=None,
    g=None,
    initial_state=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    impl: str = "chunked",
    scale: float | None = None,
):
    """Runs update rule ``rule`` with ``impl`` (see ``IMPLS`` and ``resolve_impl``).

    Returns (o [B,H,T,Dv], final state [B,H,Dk,Dv]). Under ``jax.jit``, ``rule``, ``impl`` and
    ``chunk_size`` must be static.
    """
    if rule not in UPDATE_RULES:
        raise ValueError(f"unknown update rule {rule!r}; expected one of {sorted(UPDATE_RULES)}")
    impl = resolve_impl(impl, rule, jnp.shape(q)[-1], jnp.shape(v)[-1], chunk_size)
    spec = UPDATE_RULES[rule]
    kwargs = dict(beta=beta, g=g, initial_state=initial_state, scale=scale)
    if impl == "pallas":
        _validate(rule, q, k, v, beta, g)  # the references' input checks
        if not spec.uses_decay:
            del kwargs["g"]
        if not spec.uses_beta:
            del kwargs["beta"]
        o, state = PALLAS_KERNELS[rule](q, k, v, chunk_size=chunk_size, **kwargs)
        return o.astype(jnp.asarray(q).dtype), state
    if impl == "chunked":
        return spec.chunked(q, k, v, chunk_size=chunk_size, **kwargs)
    return spec.recurrent(q, k, v, **kwargs)


def retnet_log_decay(num_heads: int) -> jax.Array:
    """[num_heads] float32 log(gamma_h) with RetNet's gamma_h = 1 - 2^(-5 - h).

    Broadcast it as ``g = log_decay[None, :, None]`` for ``scalar_decay``.
    """
    h = jnp.arange(num_heads, dtype=jnp.float32)
    # log1p keeps gamma_h distinguishable from 1 for many heads (1 - 2^-30 rounds to 1 in f32).
    return jnp.log1p(-jnp.exp2(-5.0 - h))
