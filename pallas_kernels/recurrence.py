"""The chunk recurrence as one differentiable function: Pallas forward and backward kernels
joined by ``jax.custom_vjp`` (``pallas_call`` has no transpose rule of its own).

The forward pass saves the state entering every chunk; the backward pass walks the chunks in
reverse, carrying the state's gradient, and recomputes each chunk's intermediates from the
saved state. See ``chunk_math`` for the recurrence and its gradients.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import gpu, gpu_split, tpu

BACKENDS = {"gpu": gpu, "tpu": tpu}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static kernel settings: chunk length, value block width, backend, interpret mode,
    schedule ("fused": each chunk done whole inside the sequential loop; "split", GPU only:
    the loop keeps the recurrence and the rest runs parallel over chunks, ``gpu_split``) and
    where the delta rules' WY transform runs ("pallas", ``wy_kernel``; or "xla", ``wy``)."""

    chunk: int
    block_v: int
    backend: str  # "gpu" (Triton) or "tpu" (Mosaic)
    interpret: bool
    schedule: str
    wy: str
    num_warps: int  # per GPU program; 0 on TPU


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def chunk_recurrence(q, k, w, u, G, s0, cfg: KernelConfig):
    """Runs the recurrence over ``[BH, T, .]`` inputs (T a multiple of ``cfg.chunk``).

    ``w`` is None for rules without the delta correction and ``G`` (``[BH, T]`` float32
    within-chunk cumulative log-decay) None for rules without decay. Returns
    ``(o [BH, T, V] in q's dtype, final state [BH, K, V] float32)``.
    """
    o, sT, _ = _forward(q, k, w, u, G, s0, cfg, save_states=False)
    return o, sT


def _forward(q, k, w, u, G, s0, cfg, *, save_states):
    """Returns (o, final state, residual for backward; fused kernels skip it without
    ``save_states``)."""
    if cfg.schedule == "split":
        return gpu_split.forward(q, k, w, u, G, s0, **_tiling(cfg))
    return BACKENDS[cfg.backend].forward(q, k, w, u, G, s0, save_states=save_states, **_tiling(cfg))


def _tiling(cfg):
    """The static settings a backend's kernels take."""
    tiling = {"chunk": cfg.chunk, "block_v": cfg.block_v, "interpret": cfg.interpret}
    return tiling | ({"num_warps": cfg.num_warps} if cfg.backend == "gpu" else {})


def _fwd(q, k, w, u, G, s0, cfg):
    o, sT, residual = _forward(q, k, w, u, G, s0, cfg, save_states=True)
    return (o, sT), (q, k, w, u, G, s0, residual)


def _bwd(cfg, residuals, cotangents):
    q, k, w, u, G, s0, residual = residuals
    dO, dsT = cotangents
    kernels = gpu_split if cfg.schedule == "split" else BACKENDS[cfg.backend]
    dq, dk, dw, du, dG, ds0 = kernels.backward(
        q, k, w, u, G, residual, dO.astype(q.dtype), dsT.astype(jnp.float32), **_tiling(cfg)
    )
    cast = lambda grad, like: None if like is None else grad.astype(like.dtype)  # noqa: E731
    return cast(dq, q), cast(dk, k), cast(dw, w), cast(du, u), cast(dG, G), cast(ds0, s0)


chunk_recurrence.defvjp(_fwd, _bwd)
