"""Linear-attention kernel speed: Pallas (both GPU schedules; the delta rules' WY transform on
its Pallas kernels or in XLA) against chunked jnp and the recurrent jnp reference.

    python benchmarks/kernel_bench.py --out=kernels.json
    python benchmarks/kernel_bench.py --shapes=1x256x2x64 --impls=pallas,chunked   # CPU smoke

For each shape BxTxHxD (q, k, v [B, H, T, D]; default: the flash-linear-attention README's,
REFERENCE.md section 4), rule and implementation it times the forward pass and forward plus
backward (a VJP against a random cotangent, gradients of every input), compilation excluded,
and reports milliseconds (median) and TFLOP/s. TFLOP/s counts the chunked algorithm's nominal
FLOPs (``shapes.nominal_flops``) for every implementation, so the column ranks like the times do.
The recurrent reference's backward keeps every step's state; it is skipped where that
would pass ``--recurrent_bwd_gib``. ``benchmarks/fla_bench.py`` times flash-linear-attention's
Triton kernels at the same shapes.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from shapes import FLA_README_SHAPES, RULES, nominal_flops, parse_shape  # benchmarks/shapes.py

import pallas_kernels
from pallas_kernels import wy, wy_kernel
from pallas_kernels.recurrence import chunk_recurrence
from search_spaces.linear_attention import mixers

_SHAPES = flags.DEFINE_list("shapes", FLA_README_SHAPES, "BxTxHxD per shape.")
_RULES = flags.DEFINE_list("rules", RULES, "Update rules.")
# Pallas variants: keyword arguments of the kernels' entry points.
PALLAS_VARIANTS = {
    "pallas": {},
    "pallas_fused": {"schedule": "fused"},
    "pallas_xla_wy": {"wy": "xla"},
}
WY_PARTS = ("wy_pallas", "wy_xla")  # the delta rules' WY transform alone
PARTS = (*WY_PARTS, "recurrence")  # parts of the pallas impl, timed alone
_IMPLS = flags.DEFINE_list(
    "impls", [*PALLAS_VARIANTS, *PARTS, "chunked", "recurrent"],
    "Implementations: mixers.mix impls (chunked, recurrent); pallas, the default kernels;"
    " pallas_fused, the fused schedule (TPU's default); pallas_xla_wy, the WY transform in XLA;"
    " parts of pallas: wy_pallas and wy_xla, the WY transform alone on its kernels and in XLA,"
    " and recurrence, the chunk recurrence's kernels alone.",
)  # fmt: skip
_TUNINGS = flags.DEFINE_list(
    "tunings", [], "GPU tilings to sweep for the Pallas impls, as block_v:num_warps (64:4,128:8);"
    " empty: the kernels' defaults.",
)  # fmt: skip
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "q, k, v dtype.")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "Chunk length.")
_MIN_SECONDS = flags.DEFINE_float("min_seconds", 0.5, "Time each case for at least this long.")
_RECURRENT_BWD_GIB = flags.DEFINE_float(
    "recurrent_bwd_gib", 4.0, "Skip the recurrent backward above this many GiB of saved states."
)
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")


def _inputs(rule, B, T, H, D, dtype):
    keys = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(keys[0], (B, H, T, D), dtype)
    k = jax.random.normal(keys[1], (B, H, T, D), jnp.float32)
    k = (k * jax.lax.rsqrt(jnp.sum(k * k, -1, keepdims=True))).astype(dtype)
    v = jax.random.normal(keys[2], (B, H, T, D), dtype)
    kw = {}
    if rule in ("delta", "gated_delta"):
        kw["beta"] = jax.nn.sigmoid(jax.random.normal(keys[3], (B, H, T)))
    if rule in ("scalar_decay", "gated_delta"):
        kw["g"] = jax.nn.log_sigmoid(jax.random.normal(keys[4], (B, H, T)) + 4.0)
    do = jax.random.normal(keys[5], (B, H, T, D), dtype)
    return (q, k, v), kw, do


def _time(fn, *args) -> float:
    """Median milliseconds of ``fn(*args)`` after one warm-up (compilation) call."""
    jax.block_until_ready(fn(*args))
    times, start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < _MIN_SECONDS.value and len(times) < 50):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _flat(x):
    """[B, H, T, ...] -> [BH, T, ...], the layout ``pallas_kernels.ops`` gives its kernels."""
    return x.reshape(-1, *x.shape[2:])


def _cumulative_gates(kw, C):
    """The within-chunk cumsum of ``g``, [BH, T] as ``pallas_kernels.ops`` makes it; or None."""
    if "g" not in kw:
        return None
    g = _flat(kw["g"])
    return jnp.cumsum(g.reshape(g.shape[0], -1, C), -1).reshape(g.shape)


def _wy_only(k, v, kw, C, where):
    """The WY transform alone, as ``pallas_kernels.ops`` runs it before the recurrence."""
    if "beta" not in kw:
        raise ValueError("the rule has no WY transform")
    D = k.shape[-1]
    k, v, beta, G = _flat(k), _flat(v), _flat(kw["beta"]), _cumulative_gates(kw, C)
    if where == "wy_pallas":
        cfg = pallas_kernels.kernel_config(D, D, C)  # the platform's backend
        w, u = wy_kernel.wy_transform(k, v, beta, G, C, cfg.backend, cfg.interpret)
    else:
        chunks = lambda x: x.reshape(x.shape[0], -1, C, *x.shape[2:])  # noqa: E731
        G = None if G is None else chunks(G)
        precision = jax.lax.Precision.HIGHEST if k.dtype == jnp.float32 else None
        w, u = wy.wy_transform(chunks(k), chunks(v), chunks(beta), G, precision=precision)
        w, u = w.reshape(k.shape), u.reshape(v.shape)
    return jnp.concatenate([w, u], axis=-1).astype(k.dtype)


def _tilings(impl):
    """(label suffix, kernel options) for each tiling to time ``impl`` with."""
    if impl not in (*PALLAS_VARIANTS, "recurrence") or not _TUNINGS.value:
        return [("", {})]
    tilings = []
    for text in _TUNINGS.value:
        block_v, num_warps = (int(x) for x in text.split(":"))
        tilings.append((f"[{text}]", {"block_v": block_v, "num_warps": num_warps}))
    return tilings


def _recurrence_only(q, k, v, kw, C, tiling):
    """The chunk recurrence's kernels alone, on inputs shaped as ``pallas_kernels.ops`` makes
    them (``k`` stands in for the WY keys ``w``)."""
    B, H, _, D = q.shape
    w = _flat(k) if "beta" in kw else None
    cfg = pallas_kernels.kernel_config(D, D, C, **(tiling or {}))
    s0 = jnp.zeros((B * H, D, D), jnp.float32)
    G = _cumulative_gates(kw, C)
    return chunk_recurrence(_flat(q), _flat(k), w, _flat(v), G, s0, cfg)[0]


def bench_case(rule, impl, B, T, H, D, dtype, tiling=None):
    (q, k, v), kw, do = _inputs(rule, B, T, H, D, dtype)
    C = _CHUNK.value

    def forward(q, k, v, kw):
        if impl in WY_PARTS:
            return _wy_only(k, v, kw, C, impl)
        if impl == "recurrence":
            return _recurrence_only(q, k, v, kw, C, tiling)
        if impl in PALLAS_VARIANTS:
            kernel = mixers.PALLAS_KERNELS[rule]
            options = PALLAS_VARIANTS[impl] | (tiling or {})
            return kernel(q, k, v, chunk_size=C, **options, **kw)[0]
        return mixers.mix(rule, q, k, v, impl=impl, chunk_size=C, **kw)[0]

    def forward_backward(q, k, v, kw, do):
        o, vjp = jax.vjp(forward, q, k, v, kw)
        return o, vjp(do.reshape(o.shape) if o.size == do.size else jnp.ones_like(o))

    flops = nominal_flops(rule, B, T, H, D, C)
    row = {"rule": rule, "impl": impl, "B": B, "T": T, "H": H, "D": D, "dtype": str(dtype)}
    row |= tiling or {}
    row["fwd_ms"] = _time(jax.jit(forward), q, k, v, kw)
    if impl in PARTS:  # a part of the work: its time, not a rate of the whole
        flops = float("nan")
    row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
    saved_gib = B * H * T * D * D * 4 / 2**30
    if impl == "recurrent" and saved_gib > _RECURRENT_BWD_GIB.value:
        row["fwdbwd_ms"] = None
        row["note"] = f"backward skipped: {saved_gib:.0f} GiB of per-step states"
    else:
        row["fwdbwd_ms"] = _time(jax.jit(forward_backward), q, k, v, kw, do)
        row["fwdbwd_tflops"] = 3 * flops / row["fwdbwd_ms"] / 1e9
    return row


def main(argv):
    del argv
    dtype = jnp.dtype(_DTYPE.value)
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    )
    print(f"{'BxTxHxD':>14} {'rule':>12} {'impl':>20} {'fwd ms':>9} {'TFLOP/s':>8} "
          f"{'f+b ms':>9} {'TFLOP/s':>8}")  # fmt: skip
    rows = []
    for shape in _SHAPES.value:
        B, T, H, D = parse_shape(shape)
        for rule in _RULES.value:
            cases = [(impl, *tiling) for impl in _IMPLS.value for tiling in _tilings(impl)]
            for impl, label, tiling in cases:
                needs_beta = impl in WY_PARTS or impl == "pallas_xla_wy"
                if needs_beta and rule not in ("delta", "gated_delta"):
                    continue
                try:
                    row = bench_case(rule, impl, B, T, H, D, dtype, tiling)
                    fb = row["fwdbwd_ms"]
                    fb_text = f"{fb:9.2f} {row['fwdbwd_tflops']:8.1f}" if fb else "  skipped"
                    text = f"{row['fwd_ms']:9.2f} {row['fwd_tflops']:8.1f} {fb_text}"
                except Exception as e:  # a failing case is reported, the others still run
                    row = {"rule": rule, "impl": impl, "B": B, "T": T, "H": H, "D": D,
                           "error": f"{type(e).__name__}: {str(e)[:300]}"}  # fmt: skip
                    text = row["error"]
                rows.append(row)
                print(f"{shape:>14} {rule:>12} {impl + label:>20} {text}", flush=True)
                if _OUT.value:  # after every case, so a run cut short keeps what it measured
                    with open(_OUT.value, "w") as f:
                        json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f)


if __name__ == "__main__":
    app.run(main)
