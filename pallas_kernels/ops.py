"""Public entry points: linear attention (optionally with scalar decay), the delta rule and the
gated delta rule, on Pallas kernels.

They take the arguments of the jnp references in ``search_spaces.linear_attention.mixers``:
``q, k [B, H, T, Dk]``, ``v [B, H, T, Dv]``, ``beta, g [B, H, T]`` (log-decay ``g <= 0``),
``initial_state [B, H, Dk, Dv]``; ``q`` is scaled by ``scale`` (default ``Dk ** -0.5``). They
return ``(o [B, H, T, Dv] in q's dtype, final state [B, H, Dk, Dv] float32)`` and are
differentiable in every input. Matmuls run in the inputs' dtype (bfloat16 or float32) with
float32 accumulation; the state is always float32.

The work around the kernels is plain XLA: padding T to a multiple of the chunk (no-op steps)
and the within-chunk cumsum of ``g``. The delta rules' WY transform runs on its own Pallas
kernels (``wy_kernel``), or with ``wy="xla"`` as the plain XLA code of ``wy``.

Kernel settings (keyword options of every entry point, resolved by ``kernel_config``):
``backend``: "gpu" (Triton) or "tpu" (Mosaic); by default the platform's, and "gpu" on CPU.
``interpret``: run the kernel in the Pallas interpreter; by default only where the backend is
not the platform (always on CPU, about 10x slower than jnp there).
``schedule``: "split" (the GPU default) or "fused" (the TPU's only one); see
``recurrence.KernelConfig``.
``wy``: where the delta rules' WY transform runs, "pallas" (default) or "xla".
``block_v``, ``num_warps``: tiling, for tuning.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

from pallas_kernels import wy_kernel
from pallas_kernels.recurrence import KernelConfig, chunk_recurrence
from pallas_kernels.wy import wy_transform as xla_wy_transform

DEFAULT_CHUNK_SIZE = 64


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def kernel_config(
    head_dim: int, value_dim: int, chunk_size, *, backend=None, interpret=None, schedule=None,
    wy=None, block_v=None, num_warps=None,
) -> KernelConfig:  # fmt: skip
    """Resolves and validates the static kernel settings; raises ValueError naming the problem.

    ``block_v``: value columns per program (GPU default 64, TPU 128 or the whole value dim);
    ``num_warps``: warps per GPU program (default 4); ``schedule``: "split" on GPU, "fused" on
    TPU by default. The GPU defaults are the fastest schedule and tiling measured on an H100
    (gated delta rule, 4x4096x64x128, forward+backward; ``benchmarks/kernel_bench.py``).
    See ``KernelConfig`` for the rest.
    """
    platform = jax.default_backend()
    backend = backend or ("tpu" if platform == "tpu" else "gpu")
    if backend not in ("gpu", "tpu"):
        raise ValueError(f"unknown Pallas backend {backend!r}; expected 'gpu' or 'tpu'")
    interpret = platform != backend if interpret is None else bool(interpret)
    try:
        C = operator.index(chunk_size)
    except TypeError:
        C = 0
    if backend == "gpu":
        # Triton tiles: power-of-two sizes, and at least 16 for tensor-core matmuls.
        block_v = block_v or min(value_dim, 64)
        sizes = [("chunk_size", C), ("head dim", head_dim), ("value dim", value_dim)]
        for name, size in [*sizes, ("block_v", block_v)]:
            if not (_is_pow2(size) and size >= 16):
                raise ValueError(f"GPU kernels need {name} a power of two >= 16, got {size}")
        num_warps = num_warps or 4
        if not (_is_pow2(num_warps) and num_warps <= 32):
            raise ValueError(f"num_warps must be a power of two up to 32, got {num_warps}")
    else:
        # Mosaic: (8, 128)-aligned blocks; the value dimension splits only in blocks of 128.
        block_v = block_v or (128 if value_dim % 128 == 0 else value_dim)
        if block_v != value_dim and block_v % 128:
            raise ValueError(f"TPU kernels need block_v a multiple of 128 or {value_dim}")
        if C < 8 or C % 8:
            raise ValueError(f"TPU kernels need chunk_size a multiple of 8, got {chunk_size!r}")
        if num_warps is not None:
            raise ValueError("num_warps is a GPU setting; the TPU backend has none")
    if value_dim % block_v:
        raise ValueError(f"block_v {block_v} does not divide the value dim {value_dim}")
    schedule = schedule or ("split" if backend == "gpu" else "fused")
    if schedule not in ("fused", "split") or (schedule == "split" and backend != "gpu"):
        raise ValueError(f"schedule {schedule!r}: 'fused', or 'split' on the GPU backend")
    wy = wy or "pallas"
    if wy not in ("pallas", "xla"):
        raise ValueError(f"wy {wy!r}: 'pallas' or 'xla'")
    return KernelConfig(C, block_v, backend, interpret, schedule, wy, num_warps or 0)


def _run(q, k, v, beta, g, initial_state, scale, chunk_size, options):
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"expected q, k [B, H, T, Dk] and v [B, H, T, Dv]; "
            f"got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    B, H, T, K = q.shape
    V = v.shape[-1]
    cfg = kernel_config(K, V, chunk_size, **options)
    C, dtype, f32 = cfg.chunk, q.dtype, jnp.float32
    N = -(-T // C)
    scale = K**-0.5 if scale is None else scale

    def flat(x, trailing=()):
        # [B, H, T, ...] -> [BH, N * C, ...]; padded steps are no-ops (k = v = beta = g = 0).
        x = jnp.broadcast_to(x, (B, H, T, *trailing)).reshape(B * H, T, *trailing)
        return jnp.pad(x, [(0, 0), (0, N * C - T)] + [(0, 0)] * len(trailing))

    q_ = flat((q.astype(f32) * scale).astype(dtype), (K,))
    k_, v_ = flat(k.astype(dtype), (K,)), flat(v.astype(dtype), (V,))
    G = None
    if g is not None:  # within-chunk cumulative log-decay
        G = jnp.cumsum(flat(jnp.asarray(g, f32)).reshape(B * H, N, C), axis=-1)
        G = G.reshape(B * H, N * C)
    w, u = None, v_
    if beta is not None:
        w, u = _wy(k_, v_, flat(jnp.asarray(beta, f32)), G, cfg)
    if initial_state is None:
        s0 = jnp.zeros((B * H, K, V), f32)
    else:
        s0 = jnp.broadcast_to(jnp.asarray(initial_state, f32), (B, H, K, V)).reshape(B * H, K, V)
    o, sT = chunk_recurrence(q_, k_, w, u, G, s0, cfg)
    return o[:, :T].reshape(B, H, T, V), sT.reshape(B, H, K, V)


def _wy(k, v, beta, G, cfg: KernelConfig):
    """(w, u) [BH, T, .] in k's dtype, on the Pallas kernels or in XLA as ``cfg.wy`` says."""
    if cfg.wy == "pallas":
        return wy_kernel.wy_transform(k, v, beta, G, cfg.chunk, cfg.backend, cfg.interpret)
    BH, T, K = k.shape
    N, C = T // cfg.chunk, cfg.chunk
    Precision = jax.lax.Precision
    w, u = xla_wy_transform(
        k.reshape(BH, N, C, K), v.reshape(BH, N, C, -1), beta.reshape(BH, N, C),
        None if G is None else G.reshape(BH, N, C),
        # With bfloat16 inputs, default-precision matmuls lose less than the inputs did.
        precision=Precision.HIGHEST if k.dtype == jnp.float32 else Precision.DEFAULT,
    )  # fmt: skip
    return w.reshape(k.shape).astype(k.dtype), u.reshape(v.shape).astype(k.dtype)


def linear_attention(
    q, k, v, *, g=None, initial_state=None, scale=None, chunk_size=DEFAULT_CHUNK_SIZE, **options
):
    """Linear attention, ``S_t = exp(g_t) S_{t-1} + k_t v_t^T`` (no decay when ``g`` is None).

    ``options``: kernel settings, see ``kernel_config``.
    """
    return _run(q, k, v, None, g, initial_state, scale, chunk_size, options)


def delta_rule(
    q, k, v, *, beta, initial_state=None, scale=None, chunk_size=DEFAULT_CHUNK_SIZE, **options
):
    """DeltaNet, ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``."""
    return _run(q, k, v, beta, None, initial_state, scale, chunk_size, options)


def gated_delta_rule(
    q, k, v, *, beta, g, initial_state=None, scale=None, chunk_size=DEFAULT_CHUNK_SIZE, **options
):
    """Gated DeltaNet, ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``."""
    return _run(q, k, v, beta, g, initial_state, scale, chunk_size, options)
